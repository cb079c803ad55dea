"""Data-free weight matching (Git Re-Basin): permute each model's spaces so that its weights
line up with model 0's, by coordinate descent over spaces.

For one space s and model i, with every other space's permutation fixed, the best
permutation maximises sum over the parameters touching s of <W_0, P W_i>: a Hungarian
assignment on S = sum_k W_0(k) W_i(k)^T, where W(k) is parameter k with the positions of s
as rows (s may be one factor of a grid, one part of a concat) and every other position as
columns. Sweeps repeat until no permutation changes.

Spaces that other methods matched already (``fixed``) are not searched: both models'
parameters are compared as the merge will combine them along those spaces, so a space no
calibration tensor shows is matched from the weights around the matchings of its neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..graph.layout import Atom, Concat, Grid, Interleave, Layout, layout_width, leaves
from ..graph.apply import transformed_arrays
from ..graph.transform import Linear, Permutation, Transform
from .grid import block_scores
from .matching import Matching, max_assignment

MAX_SWEEPS = 50
RESTARTS = 3  # visit orders tried by coordinate descent; the best is kept


@dataclass(frozen=True)
class WeightParams:
    """seed: order in which spaces are visited in each sweep."""

    seed: int = 0


def match_weights(members, spaces: list[int], params: WeightParams = WeightParams(),
                  fixed: dict[int, Matching] | None = None) -> dict[int, Matching]:
    """Matchings of model 0's ``spaces`` (equal widths) from the weights alone.

    Args:
        members: ``rewrite.merge.Member`` list; model 0 is the reference.
        spaces: model 0's space ids to match.
        params: see ``WeightParams``.
        fixed: matchings of other spaces of model 0, kept as they are.
    """
    fixed = fixed or {}
    reference = members[0]
    touching = {s: [u for u in reference.graph.params if s in leaves(u.layout)] for s in spaces}
    names = {u.name for uses in touching.values() for u in uses}
    ours = _aligned(members, 0, {}, None, fixed, names)
    # a constant with infinities (an attention mask's -inf) is no learned weight: it says nothing
    # of which channels match, and would make every score NaN
    touching = {s: [u for u in uses if np.isfinite(ours[u.name]).all()] for s, uses in touching.items()}
    orders = [{s: np.arange(reference.graph.table.widths[s]) for s in spaces}]
    for i in range(1, len(members)):
        # coordinate descent ends in a local optimum that depends on the visit order: keep the
        # best of a few orders (the total similarity of the weights it aligns)
        runs = [_descend(members, ours, i, spaces, touching, fixed, np.random.default_rng(params.seed + k))
                for k in range(RESTARTS)]
        orders.append(max(runs, key=lambda run: run[1])[0])
    result = {}
    for s in spaces:
        labels = [np.arange(len(orders[0][s]))] + [np.argsort(orders[i][s]) for i in range(1, len(members))]
        result[s] = Matching.from_clusters(np.concatenate(labels), [len(orders[0][s])] * len(members))
    return result


def _descend(members, ours: dict[str, np.ndarray], i: int, spaces: list[int], touching: dict, fixed: dict,
             rng: np.random.Generator) -> tuple[dict[int, np.ndarray], float]:
    """Model i's feature orders by coordinate descent from the identity, spaces visited in
    ``rng``'s orders until none changes, and the total similarity they reach: the sum over the
    last sweep, in which (nothing changing) every space was scored against the final orders
    (after ``MAX_SWEEPS`` sweeps without a fixed point, against the orders as the sweep went)."""
    widths = members[0].graph.table.widths
    orders = {s: np.arange(widths[s]) for s in spaces}
    total = 0.0
    for _ in range(MAX_SWEEPS):
        changed, total = False, 0.0
        for s in rng.permutation(spaces):
            order, score = _best_order(members, ours, i, int(s), touching[int(s)], orders, fixed)
            total += score
            if not np.array_equal(order, orders[int(s)]):
                orders[int(s)], changed = order, True
        if not changed:
            break
    return orders, total


def _best_order(members, ours: dict[str, np.ndarray], i: int, space: int, uses, orders: dict[int, np.ndarray],
                fixed: dict[int, Matching]) -> tuple[np.ndarray, float]:
    """Model i's feature order for ``space`` that best aligns its parameters with model 0's,
    and the similarity it reaches."""
    similarity = _similarity(members, ours, i, space, uses, orders, fixed)
    assigned, cols = max_assignment(similarity)
    return cols[np.argsort(assigned)], float(similarity[assigned, cols].sum())


def _similarity(members, ours: dict[str, np.ndarray], i: int, space: int, uses, orders: dict[int, np.ndarray],
                fixed: dict[int, Matching]) -> np.ndarray:
    """Model 0's features of ``space`` (rows) against model i's (columns): how alike the
    parameters they touch are, model i's other spaces in their current orders."""
    reference, member = members[0], members[i]
    theirs = _aligned(members, i, orders, space, fixed, {member.correspondence.params[u.name] for u in uses})
    mine = {(u.name, u.axis): u for u in member.graph.params}
    width = reference.graph.table.widths[space]
    similarity = np.zeros((width, width))
    for use in uses:
        other = mine[(member.correspondence.params[use.name], use.axis)]
        if _leads_grid(use.layout, space):  # blocks (heads, groups): scored by their best channel pairing
            cross = _flat(ours[use.name], use.axis) @ _flat(theirs[other.name], other.axis).T
            similarity += block_scores(cross, width)
            continue
        rows = _rows(ours[use.name], use.axis, use.layout, space, _widths(reference, fixed))
        their_rows = _rows(theirs[other.name], other.axis, other.layout, member.space_of(space), _widths(member, fixed))
        similarity += rows @ their_rows.T
    return similarity


def _leads_grid(layout: Layout, space: int) -> bool:
    """Whether the axis is a grid of ``space``'s blocks by a within-block space: then blocks are
    compared whole, whatever order their channels are in (coordinate descent from the identity
    would otherwise settle on blocks matched by position)."""
    return (isinstance(layout, Grid) and len(layout.factors) == 2 and layout.factors[0] == Atom(space)
            and isinstance(layout.factors[1], Atom))


def _flat(array: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(array, axis, 0)
    return moved.reshape(moved.shape[0], -1)


def _aligned(members, i: int, orders: dict[int, np.ndarray], skip: int | None, fixed: dict[int, Matching],
             names: set[str]) -> dict[str, np.ndarray]:
    """Model i's parameters ``names`` (float64) in model 0's order along every space but
    ``skip``: searched spaces in their current order, ``fixed`` ones merged as the merge will
    (count * M_i on producers, U_i on consumers; model 0 is transformed alike)."""
    member = members[i]
    back = member.correspondence.reference_spaces

    def transform_for(space: int, role: str) -> Transform | None:
        reference_space = back.get(space)
        if reference_space in fixed:
            matching = fixed[reference_space]
            if role == "producer":
                return Linear(matching.merge[i] * len(members))
            return Linear(matching.unmerge[i].T)
        if reference_space == skip or reference_space not in orders:
            return None
        return Permutation(orders[reference_space])

    arrays = transformed_arrays(member.model, member.graph, transform_for, names)
    return {name: array.astype(np.float64) for name, array in arrays.items()}


def _widths(member, fixed: dict[int, Matching]):
    """Widths of an axis of ``member``'s parameters once ``_aligned`` merged its fixed spaces."""
    back = member.correspondence.reference_spaces

    def leaf(space: int) -> int:
        matching = fixed.get(back.get(space))
        return member.graph.table.widths[space] if matching is None else matching.width

    return lambda layout: layout_width(layout, leaf)


def _rows(array: np.ndarray, axis: int, layout: Layout, space: int, width_of) -> np.ndarray:
    """The array as a (width of ``space``) x (everything else) matrix: one row per feature of
    ``space`` wherever it occurs on the axis (a grid factor, a concat or interleave part)."""
    if isinstance(layout, Atom):
        return _flat(array, axis)
    if isinstance(layout, Grid):
        sizes = tuple(width_of(f) for f in layout.factors)
        grid = array.reshape(array.shape[:axis] + sizes + array.shape[axis + 1:])
        return np.hstack([_rows(grid, axis + k, f, space, width_of)
                          for k, f in enumerate(layout.factors) if space in leaves(f)])
    if isinstance(layout, Concat):
        pieces = np.split(array, np.cumsum([width_of(p) for p in layout.parts])[:-1], axis=axis)
        return np.hstack([_rows(piece, axis, p, space, width_of)
                          for piece, p in zip(pieces, layout.parts) if space in leaves(p)])
    if isinstance(layout, Interleave):
        grid = array.reshape(array.shape[:axis] + (-1, len(layout.parts)) + array.shape[axis + 1:])
        return np.hstack([_rows(np.take(grid, k, axis=axis + 1), axis, p, space, width_of)
                          for k, p in enumerate(layout.parts) if space in leaves(p)])
    raise ValueError(f"parameters cannot follow a {type(layout).__name__} layout")
