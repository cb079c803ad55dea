"""Data-free weight matching (Git Re-Basin): permute each model's spaces so that its weights
line up with model 0's, by coordinate descent over spaces.

For one space s and model i, with every other space's permutation fixed, the best
permutation maximises sum over the parameters touching s of <W_0, P W_i>: a Hungarian
assignment on S = sum_k W_0(k) W_i(k)^T, where W(k) is parameter k with the axis of s first
and every other axis flattened. Sweeps repeat until no permutation changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import numpy_helper
from scipy.optimize import linear_sum_assignment

from ..graph.layout import Atom, Grid, feature_positions, leaves
from ..rewrite.transform import Permutation, transform_axis
from .grid import block_scores
from .matching import Matching

MAX_SWEEPS = 50


@dataclass(frozen=True)
class WeightParams:
    """seed: order in which spaces are visited in each sweep."""

    seed: int = 0


def match_weights(members, spaces: list[int], params: WeightParams = WeightParams()) -> dict[int, Matching]:
    """Matchings of model 0's ``spaces`` (equal widths) from the weights alone.

    Args:
        members: ``rewrite.merge.Member`` list; model 0 is the reference.
        spaces: model 0's space ids to match.
    """
    reference = members[0]
    arrays = [{i.name: numpy_helper.to_array(i).astype(np.float64) for i in m.model.graph.initializer} for m in members]
    touching = {s: [u for u in reference.graph.params if s in leaves(u.layout)] for s in spaces}
    orders = [{s: np.arange(reference.graph.table.widths[s]) for s in spaces} for _ in members]
    rng = np.random.default_rng(params.seed)
    for i in range(1, len(members)):
        for _ in range(MAX_SWEEPS):
            changed = False
            for s in rng.permutation(spaces):
                order = _best_order(members, arrays, i, int(s), touching[int(s)], orders[i])
                if not np.array_equal(order, orders[i][int(s)]):
                    orders[i][int(s)], changed = order, True
            if not changed:
                break
    result = {}
    for s in spaces:
        labels = [np.arange(len(orders[0][s]))] + [np.argsort(orders[i][s]) for i in range(1, len(members))]
        result[s] = Matching.from_clusters(np.concatenate(labels), [len(orders[0][s])] * len(members))
    return result


def _best_order(members, arrays, i: int, space: int, uses, orders: dict[int, np.ndarray]) -> np.ndarray:
    """Model i's feature order for ``space`` that best aligns its parameters with model 0's."""
    reference, member = members[0], members[i]
    back = member.correspondence.reference_spaces
    mine = {(u.name, u.axis): u for u in member.graph.params}
    width = reference.graph.table.widths[space]
    similarity = np.zeros((width, width))
    for use in uses:
        name = member.correspondence.params[use.name]
        value = arrays[i][name]
        for other in member.graph.params:  # align every other space of this parameter first
            if other.name == name:
                value = transform_axis(value, other.axis, other.layout,
                                       lambda s: _permutation(orders, back.get(s), space),
                                       member.graph.table.width)
        theirs_use = mine[(name, use.axis)]
        if _leads_grid(use.layout, space):  # blocks (heads, groups): scored by their best channel pairing
            ours = np.moveaxis(arrays[0][use.name], use.axis, 0)
            theirs = np.moveaxis(value, theirs_use.axis, 0)
            cross = ours.reshape(len(ours), -1) @ theirs.reshape(len(theirs), -1).T
            similarity += block_scores(cross, width)
            continue
        ours = _by_feature(arrays[0][use.name], use.axis, use.layout, space, reference.graph.table.widths.__getitem__)
        theirs = _by_feature(value, theirs_use.axis, theirs_use.layout, member.space_of(space),
                             member.graph.table.widths.__getitem__)
        similarity += ours @ theirs.T
    rows, cols = linear_sum_assignment(similarity, maximize=True)
    return cols[np.argsort(rows)]


def _leads_grid(layout, space: int) -> bool:
    """Whether the axis is a grid of ``space``'s blocks by a within-block space."""
    return (isinstance(layout, Grid) and len(layout.factors) == 2 and layout.factors[0] == Atom(space)
            and isinstance(layout.factors[1], Atom))


def _by_feature(array: np.ndarray, axis: int, layout, space: int, width) -> np.ndarray:
    """[width of space, rest]: each feature's values, wherever the layout puts it on the axis
    (a grid factor such as a head or a within-head channel, a part of a concat), in an order
    every model shares."""
    positions = feature_positions(layout, space, width)
    values = np.take(np.moveaxis(array, axis, 0), positions, axis=0)  # [features, k, ...]
    return values.reshape(positions.shape[0], -1)


def _permutation(orders: dict[int, np.ndarray], space: int | None, skip: int) -> Permutation | None:
    if space is None or space == skip or space not in orders:
        return None
    return Permutation(orders[space])
