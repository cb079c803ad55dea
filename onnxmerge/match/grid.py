"""Matching a 2-factor grid space (attention heads x within-head channels, or conv groups x
within-group channels) from the correlation of its flattened features.

Blocks (heads, groups) keep their count: each model's blocks are assigned to model 0's by a
Hungarian assignment whose score for a pair of blocks is the best one-to-one correlation
between their channels. The within-block space is then matched by the chosen method on the
correlation pooled over assigned block pairs, so every block uses the same within-block map
(the Kronecker structure the feature space requires).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .matching import Matching, max_assignment

MatchFn = Callable[[np.ndarray, Sequence[int]], Matching]


def _block(offsets: list[int], inners: list[int], model: int, block: int) -> np.ndarray:
    """Indices of one block's features of one model in the concatenated features."""
    start = offsets[model] + block * inners[model]
    return np.arange(start, start + inners[model])


def block_scores(cross: np.ndarray, blocks: int) -> np.ndarray:
    """[blocks, blocks] scores of pairing block a of one model (rows of ``cross``, ``blocks``
    blocks of consecutive features) with block b of another (columns): the best one-to-one
    similarity between their features."""
    rows_per, cols_per = cross.shape[0] // blocks, cross.shape[1] // blocks
    score = np.zeros((blocks, blocks))
    for a in range(blocks):
        for b in range(blocks):
            block = cross[a * rows_per:(a + 1) * rows_per, b * cols_per:(b + 1) * cols_per]
            rows, cols = max_assignment(block)
            score[a, b] = block[rows, cols].sum()
    return score


def assign_blocks(corr: np.ndarray, blocks: int, inners: list[int]) -> list[np.ndarray]:
    """For each model, which of its blocks goes with model 0's block a (identity for model 0)."""
    offsets = list(np.cumsum([0] + [blocks * inner for inner in inners]))
    assignments = [np.arange(blocks)]
    for i in range(1, len(inners)):
        cross = corr[offsets[0]:offsets[1], offsets[i]:offsets[i + 1]]
        rows, cols = max_assignment(block_scores(cross, blocks))
        assignments.append(cols[np.argsort(rows)])
    return assignments


def pooled_inner(corr: np.ndarray, assignments: list[np.ndarray], blocks: int, inners: list[int]) -> np.ndarray:
    """Correlation of the within-block features averaged over assigned block tuples."""
    offsets = list(np.cumsum([0] + [blocks * inner for inner in inners]))
    pooled = np.zeros((sum(inners), sum(inners)))
    for a in range(blocks):
        index = np.concatenate([_block(offsets, inners, i, assignments[i][a]) for i in range(len(inners))])
        pooled += corr[np.ix_(index, index)]
    return pooled / blocks


def match_grid(corr: np.ndarray, blocks: int, inners: list[int], match_inner: MatchFn,
               assignments: list[np.ndarray] | None = None) -> tuple[Matching, Matching]:
    """(block matching, within-block matching) of a grid space.

    Args:
        corr: correlation of the concatenated flattened features; model i has ``blocks`` blocks
            of ``inners[i]`` features each (heads of different sizes, groups of different widths).
        match_inner: the merge method applied to the pooled within-block correlation.
        assignments: block assignments decided earlier for the same block space (heads shared
            by q, k and v), else computed here.
    """
    if assignments is None:
        assignments = assign_blocks(corr, blocks, inners)
    labels = np.concatenate([np.argsort(assignment) for assignment in assignments])
    block_matching = Matching.from_clusters(labels, [blocks] * len(inners))
    return block_matching, match_inner(pooled_inner(corr, assignments, blocks, inners), list(inners))


def assignments_of(block_matching: Matching) -> list[np.ndarray]:
    """Recover block assignments from a block matching made by ``match_grid``."""
    blocks = block_matching.width
    labels = np.asarray(block_matching.clusters).reshape(-1, blocks)
    return [np.argsort(row) for row in labels]
