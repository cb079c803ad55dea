"""Function-preserving widening (Net2Net, Chen et al. 2016): each widened space gains copies
of randomly chosen features; producers duplicate them, consumers split their weight between
the copies, so every consumer's input sum is unchanged."""

from __future__ import annotations

from math import prod

import numpy as np
import onnx

from ..graph.layout import Atom, Grid, Interleave, Layout, layout_width, leaves
from ..graph.spaces import SpaceGraph
from ..graph.transform import Linear


def widenable(graph: SpaceGraph, factor: float) -> list[int]:
    """Free spaces a copy of a feature cannot change: none combines features (normalisation
    statistics, reductions, activation-activation products), none is the block index of
    a grid (heads, groups keep their count), and none would leave the parts of a channel
    shuffle (Interleave) at different widths."""
    blocks = graph.block_spaces()
    chosen = {s.id for s in graph.free_spaces if s.id not in graph.mixed and s.id not in blocks}
    shuffles = _interleaves(graph)

    def width(space: int) -> int:
        return wider_width(graph.table.widths[space], factor) if space in chosen else graph.table.widths[space]

    while True:
        uneven = {s for parts in shuffles if len({layout_width(p, width) for p in parts}) > 1
                  for part in parts for s in leaves(part)}
        if not uneven & chosen:
            return sorted(chosen)
        chosen -= uneven  # at their old widths the parts are even again


def wider_width(width: int, factor: float) -> int:
    """A width-1 axis stays 1: it may broadcast against a wider one (a score gating channels),
    which a copy would break."""
    return max(width, int(round(width * factor))) if width > 1 else width


def _interleaves(graph: SpaceGraph) -> set[tuple[Layout, ...]]:
    """The parts of every Interleave in the layouts of the tensors and parameters."""
    found: set[tuple[Layout, ...]] = set()

    def visit(layout) -> None:
        if layout is None or isinstance(layout, (int, Atom)):
            return
        if isinstance(layout, Interleave):
            found.add(layout.parts)
        for child in layout.factors if isinstance(layout, Grid) else layout.parts:
            visit(child)

    for axes in graph.layouts.values():
        for layout in axes.values():
            visit(layout)
    for use in graph.params:
        visit(use.layout)
    return found


def widening_bytes(model: onnx.ModelProto, graph: SpaceGraph, factor: float) -> int:
    """Estimated peak memory of widening ``model`` (whose spaces ``graph`` holds) by ``factor``,
    computed from shapes before anything is allocated: each widened space's producer and
    consumer matrices, every parameter at its new size (the arrays, the model holding them and
    its checked copy) and the largest parameter's float64 work arrays."""
    chosen = set(widenable(graph, factor))

    def new_width(space: int) -> int:
        width = graph.table.widths[space]
        return wider_width(width, factor) if space in chosen else width

    total = sum(2 * 8 * new_width(s) * graph.table.widths[s] for s in chosen)
    axes: dict[str, dict[int, int]] = {}
    for use in graph.params:
        axes.setdefault(use.name, {})[use.axis] = layout_width(use.layout, new_width)
    largest = 0
    for init in model.graph.initializer:
        if init.name not in axes:
            continue
        dims = [axes[init.name].get(axis, dim) for axis, dim in enumerate(init.dims)]
        count = prod(dims)
        total += 3 * count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        largest = max(largest, count)
    return total + 2 * 8 * largest


def widening(graph: SpaceGraph, factor: float, rng: np.random.Generator) -> dict[int, tuple[Linear, Linear]]:
    """(producer, consumer) transforms per widened space; width d becomes round(d * factor)."""
    transforms = {}
    for space in widenable(graph, factor):
        width = graph.table.widths[space]
        wider = wider_width(width, factor)
        if wider == width:
            continue
        source = np.concatenate([np.arange(width), rng.choice(width, wider - width)])
        copies = np.bincount(source, minlength=width)
        produce = np.zeros((wider, width))
        produce[np.arange(wider), source] = 1.0
        transforms[space] = (Linear(produce), Linear(produce / copies[source][:, None]))
    return transforms
