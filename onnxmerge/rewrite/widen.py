"""Function-preserving widening (Net2Net, Chen et al. 2016): each widened space gains copies
of randomly chosen features; producers duplicate them, consumers split their weight between
the copies, so every consumer's input sum is unchanged."""

from __future__ import annotations

import numpy as np

from ..graph.spaces import SpaceGraph
from .transform import Linear


def widenable(graph: SpaceGraph) -> list[int]:
    """Free spaces a copy of a feature cannot change: none combines features (normalisation
    statistics, reductions, activation-activation products) and none is the block index of
    a grid (heads, groups keep their count)."""
    blocks = graph.block_spaces()
    return [s.id for s in graph.free_spaces if s.id not in graph.mixed and s.id not in blocks]


def widening(graph: SpaceGraph, factor: float, rng: np.random.Generator) -> dict[int, tuple[Linear, Linear]]:
    """(producer, consumer) transforms per widened space; width d becomes round(d * factor)."""
    transforms = {}
    for space in widenable(graph):
        width = graph.table.widths[space]
        wider = max(width, int(round(width * factor)))
        if wider == width:
            continue
        source = np.concatenate([np.arange(width), rng.choice(width, wider - width)])
        copies = np.bincount(source, minlength=width)
        produce = np.zeros((wider, width))
        produce[np.arange(wider), source] = 1.0
        transforms[space] = (Linear(produce), Linear(produce / copies[source][:, None]))
    return transforms
