"""Elastic neuron zipping (ZipIt! generalised to unequal widths, method.md §3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import RecipeError
from .matching import Matching


@dataclass(frozen=True)
class ZipParams:
    """alpha: correlation of a joined cluster = alpha * min of its parts' correlations;
    beta: scale of the within-model merge budgets; width: target width (default max)."""

    alpha: float = 0.5
    beta: float = 1.0
    width: int | None = None


def budgets(widths: Sequence[int], target: int, beta: float) -> list[int]:
    total = sum(widths)
    return [int(np.floor((total - target) * d / total * beta)) for d in widths]


def interchangeable_dead(corr: np.ndarray, widths: Sequence[int]) -> np.ndarray:
    """Dead features (constant on the calibration data: correlation 0 to everything, itself
    included) of different models are interchangeable, so their pairs get correlation 1.
    Without this, the greedy joins already-matched live clusters (alpha * min > 0) before
    pairing dead ones, and a model merged with a permuted copy of itself is not recovered."""
    owner = np.repeat(np.arange(len(widths)), widths)
    dead = np.flatnonzero((np.abs(corr) < 1e-12).all(axis=1))
    if not len(dead):
        return corr
    corr = np.array(corr, dtype=np.float64)
    cross = owner[dead][:, None] != owner[dead][None, :]
    corr[np.ix_(dead, dead)] = np.where(cross, 1.0, 0.0)
    return corr


def zip_features(corr: np.ndarray, widths: Sequence[int], params: ZipParams = ZipParams(), space: str = "") -> Matching:
    """Elastic zipping of one space (see ``zip_clusters``), dead features paired first."""
    return zip_clusters(interchangeable_dead(corr, widths), widths, params, space)


def zip_clusters(corr: np.ndarray, widths: Sequence[int], params: ZipParams = ZipParams(), space: str = "") -> Matching:
    """Greedily join the most correlated pair of clusters until ``params.width`` remain.

    A pair is within model i when both clusters hold only features of model i; such a join
    spends one unit of model i's budget, and a model without budget joins no more within
    itself. Ties go to the smallest (row, column) pair. Stops early (wider result) when
    only forbidden pairs are left.
    """
    total = sum(widths)
    target = params.width or max(widths)
    if not max(widths) <= target <= total:
        raise RecipeError(f"space {space}: target width {target} outside {max(widths)}..{total}")
    owner = np.repeat(np.arange(len(widths)), widths)  # model of a pure cluster, -1 if mixed
    left = budgets(widths, target, params.beta)
    score = np.array(corr, dtype=np.float64)
    np.fill_diagonal(score, -np.inf)
    labels = np.arange(total)
    active = np.ones(total, bool)
    joined, within = [], [0] * len(widths)
    for _ in range(total - target):
        masked = score.copy()
        for model, budget in enumerate(left):
            if budget == 0:
                own = np.flatnonzero(active & (owner == model))
                masked[np.ix_(own, own)] = -np.inf
        flat = int(np.argmax(masked))
        p, q = divmod(flat, total)
        if not np.isfinite(masked[p, q]):
            break
        joined.append(score[p, q])
        if owner[p] == owner[q] != -1:
            left[owner[p]] -= 1
            within[owner[p]] += 1
        row = params.alpha * np.minimum(score[p], score[q])
        score[p], score[:, p] = row, row
        score[q], score[:, q] = -np.inf, -np.inf
        score[p, p] = -np.inf
        owner[p] = owner[p] if owner[p] == owner[q] else -1
        active[q] = False
        labels[labels == q] = p
    mean = float(np.mean(joined)) if joined else float("nan")
    return Matching.from_clusters(labels, widths, mean_correlation=mean, within_model_merges=within)
