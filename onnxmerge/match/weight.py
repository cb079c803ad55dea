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

from ..graph.layout import Atom
from ..rewrite.transform import Permutation, transform_axis
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
    touching = {s: [u for u in reference.graph.params if isinstance(u.layout, Atom) and u.layout.space == s]
                for s in spaces}
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
            if other.name == name and other.axis != use.axis:
                value = transform_axis(value, other.axis, other.layout,
                                       lambda s: _permutation(orders, back.get(s), space),
                                       member.graph.table.width)
        ours = np.moveaxis(arrays[0][use.name], use.axis, 0).reshape(width, -1)
        theirs = np.moveaxis(value, mine[(name, use.axis)].axis, 0).reshape(width, -1)
        similarity += ours @ theirs.T
    rows, cols = linear_sum_assignment(similarity, maximize=True)
    return cols[np.argsort(rows)]


def _permutation(orders: dict[int, np.ndarray], space: int | None, skip: int) -> Permutation | None:
    if space is None or space == skip or space not in orders:
        return None
    return Permutation(orders[space])
