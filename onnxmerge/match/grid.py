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
from scipy.optimize import linear_sum_assignment

from .matching import Matching

MatchFn = Callable[[np.ndarray, Sequence[int]], Matching]


def assign_blocks(corr: np.ndarray, blocks: int, inner: int, models: int) -> list[np.ndarray]:
    """For each model, which of its blocks goes with model 0's block a (identity for model 0)."""
    size = blocks * inner
    assignments = [np.arange(blocks)]
    for i in range(1, models):
        score = np.zeros((blocks, blocks))
        for a in range(blocks):
            for b in range(blocks):
                block = corr[a * inner:(a + 1) * inner, i * size + b * inner:i * size + (b + 1) * inner]
                rows, cols = linear_sum_assignment(block, maximize=True)
                score[a, b] = block[rows, cols].sum()
        rows, cols = linear_sum_assignment(score, maximize=True)
        assignments.append(cols[np.argsort(rows)])
    return assignments


def pooled_inner(corr: np.ndarray, assignments: list[np.ndarray], blocks: int, inner: int) -> np.ndarray:
    """Correlation of the within-block features averaged over assigned block tuples."""
    models = len(assignments)
    size = blocks * inner
    pooled = np.zeros((models * inner, models * inner))
    for a in range(blocks):
        index = np.concatenate([i * size + assignments[i][a] * inner + np.arange(inner) for i in range(models)])
        pooled += corr[np.ix_(index, index)]
    return pooled / blocks


def match_grid(corr: np.ndarray, blocks: int, inner: int, models: int, match_inner: MatchFn,
               assignments: list[np.ndarray] | None = None) -> tuple[Matching, Matching]:
    """(block matching, within-block matching) of a grid space.

    Args:
        corr: correlation of the concatenated flattened features, models * blocks * inner wide.
        match_inner: the merge method applied to the pooled within-block correlation.
        assignments: block assignments decided earlier for the same block space (heads shared
            by q, k and v), else computed here.
    """
    if assignments is None:
        assignments = assign_blocks(corr, blocks, inner, models)
    labels = np.concatenate([np.argsort(assignment) for assignment in assignments])
    block_matching = Matching.from_clusters(labels, [blocks] * models)
    return block_matching, match_inner(pooled_inner(corr, assignments, blocks, inner), [inner] * models)


def assignments_of(block_matching: Matching) -> list[np.ndarray]:
    """Recover block assignments from a block matching made by ``match_grid``."""
    blocks = block_matching.width
    labels = np.asarray(block_matching.clusters).reshape(-1, blocks)
    return [np.argsort(row) for row in labels]
