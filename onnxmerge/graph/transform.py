"""Linear maps on feature spaces and their application to parameter axes through layouts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from .layout import Atom, Concat, Grid, Interleave, Layout


class Transform(Protocol):
    """A map from a space's old features (width d) to new ones (width r)."""

    def apply(self, array: np.ndarray, axis: int) -> np.ndarray: ...


@dataclass(frozen=True)
class Permutation:
    """New feature j is old feature ``order[j]``."""

    order: np.ndarray

    def apply(self, array: np.ndarray, axis: int) -> np.ndarray:
        return np.take(array, self.order, axis=axis)


@dataclass(frozen=True)
class Linear:
    """New features are ``matrix @ old`` along the axis (matrix is r x d: a numpy array or a
    scipy.sparse array)."""

    matrix: np.ndarray

    def apply(self, array: np.ndarray, axis: int) -> np.ndarray:
        values = array.astype(np.float64)
        infinite = np.isinf(values)
        if not infinite.any():
            mixed = _product(self.matrix, values, axis)
        else:
            # a mask's -inf is no number to weigh: a new feature drawing on it (weight != 0) is
            # masked too, and the zero weights of other features leave it out (0 * inf is NaN)
            matrix = _dense(self.matrix)
            mixed = np.tensordot(matrix, np.where(infinite, 0.0, values), axes=([1], [axis]))
            for sign in (1.0, -1.0):
                hits = np.tensordot(matrix != 0, values == sign * np.inf, axes=([1], [axis]))
                mixed = np.where(hits, mixed + sign * np.inf, mixed)
        return np.moveaxis(mixed, 0, axis).astype(array.dtype)


SPARSE_SHARE = 4
"""A matrix with at most this many nonzeros per row or column on average (a permutation, a
matching's one-hot unmerge, its merge of clusters of a few features) is applied as a sparse
matrix: work in proportion to its nonzeros instead of r * d, which for a layer of width W
is W times less (minutes for layers thousands wide)."""


def _product(matrix: np.ndarray, values: np.ndarray, axis: int) -> np.ndarray:
    """``np.tensordot(matrix, values, axes=([1], [axis]))``: the new axis first, then the
    other axes of ``values`` in order. Rows of up to two nonzeros sum exactly as the dense
    product does (its other terms are exact zeros)."""
    nonzeros = np.count_nonzero(matrix) if isinstance(matrix, np.ndarray) else matrix.nnz
    if nonzeros > SPARSE_SHARE * max(matrix.shape):
        return np.tensordot(_dense(matrix), values, axes=([1], [axis]))
    from scipy.sparse import csr_array  # imported on first use: scipy takes a while to import
    moved = np.moveaxis(values, axis, 0)
    mixed = csr_array(matrix) @ moved.reshape(moved.shape[0], -1)
    return np.asarray(mixed).reshape((matrix.shape[0],) + moved.shape[1:])


def _dense(matrix) -> np.ndarray:
    """A numpy array, or a scipy.sparse array made dense."""
    return matrix if isinstance(matrix, np.ndarray) else matrix.toarray()


TransformFor = Callable[[int], "Transform | None"]


def transform_axis(array: np.ndarray, axis: int, layout: Layout | int | None,
                   transform_for: TransformFor, width_of: Callable[[Layout | int], int]) -> np.ndarray:
    """Apply the per-space transforms to one axis whose positions follow ``layout``.

    Concat parts are transformed block by block, Grid factors as a Kronecker product (each
    factor on its own sub-axis), Interleave parts on every g-th position.
    """
    if layout is None or isinstance(layout, int):
        return array
    if isinstance(layout, Atom):
        transform = transform_for(layout.space)
        return array if transform is None else transform.apply(array, axis)
    if isinstance(layout, Concat):
        bounds = np.cumsum([width_of(p) for p in layout.parts])[:-1]
        pieces = np.split(array, bounds, axis=axis)
        return np.concatenate([transform_axis(piece, axis, part, transform_for, width_of)
                               for piece, part in zip(pieces, layout.parts)], axis=axis)
    if isinstance(layout, Grid):
        sizes = [width_of(f) for f in layout.factors]
        grid = array.reshape(array.shape[:axis] + tuple(sizes) + array.shape[axis + 1:])
        for offset, factor in enumerate(layout.factors):
            grid = transform_axis(grid, axis + offset, factor, transform_for, width_of)
        return grid.reshape(grid.shape[:axis] + (-1,) + grid.shape[axis + len(sizes):])
    if isinstance(layout, Interleave):
        groups = len(layout.parts)
        grid = array.reshape(array.shape[:axis] + (-1, groups) + array.shape[axis + 1:])
        parts = [transform_axis(np.take(grid, k, axis=axis + 1), axis, part, transform_for, width_of)
                 for k, part in enumerate(layout.parts)]
        stacked = np.stack(parts, axis=axis + 1)
        return stacked.reshape(stacked.shape[:axis] + (-1,) + stacked.shape[axis + 2:])
    raise ValueError(f"parameters cannot follow a {type(layout).__name__} layout")
