"""Elastic neuron zipping (ZipIt! generalised to unequal widths, method.md §3).

The greedy, stated once (``zip_clusters`` makes exactly these decisions):

- Every concatenated feature starts as its own cluster. A cluster is named by its smallest
  feature index (its *representative*); its score to another cluster starts as their
  correlation, read from (C + C^T) / 2 so that rounding asymmetry in C cannot matter.
- Each step takes the allowed pair of clusters (p, q), p < q, with the highest score; ties go
  to the smallest (p, q) in lexicographic order. q is joined into p, and the joint cluster's
  score to every other cluster x becomes ``alpha * min(score(p, x), score(q, x))``.
- *Same model*: a cluster is *pure* of model i while all its features are model i's. A pair is
  within model i when both clusters are pure of model i (for singletons: two features of model
  i, as in the method); joining it spends one unit of model i's budget
  ``floor((sum d - r) * d_i / sum d * beta)``. Once model i's budget is spent (<= 0), pairs
  within model i are no longer allowed. A pair with a mixed cluster, or of clusters pure of
  different models, is always allowed and costs nothing.
- Stop when r clusters remain.

The greedy cannot run out of allowed pairs before r: only pairs of clusters pure of one model
can be forbidden, so running out needs every cluster pure of one model i, i.e. every other
model of width 0, and then r = d_i leaves nothing to join. (If it happened anyway, a
RecipeError says so rather than returning a wider result.)

Cost: the direct implementation (argmax over the dense masked matrix each step, kept in the
tests as the reference) is O(n^3) for n = sum d_i. ``zip_clusters`` keeps, for every cluster,
its best allowed partner (highest score, then smallest index); a join changes one column and
removes one, so only rows whose best partner was p or q, and rows of a model whose budget just
ran out, are rescanned. The best pair is then the best of n row candidates: O(n) per step and
O(n^2) in all, plus the rescans: 7-17 rows of n per step on factor-model and random matrices
(benchmarks/bench_zip.py). The degenerate case is many rows sharing one best partner whose
score then drops, e.g. a constant matrix, where each step rescans every row: O(n^3) again,
though still vectorised (about 3x faster than the reference at 2 x 1024 instead of 80x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .. import weights
from ..errors import RecipeError
from ..choices import default
from .matching import Matching, checked_correlation


@dataclass(frozen=True)
class ZipParams:
    """alpha: score of a joined cluster = alpha * min of its parts' scores (0..1);
    beta: scale of the within-model merge budgets (>= 0); width: target width r
    (max d_i .. sum d_i, default max d_i)."""

    alpha: float = default("alpha")
    beta: float = default("beta")
    width: int | None = None


def budgets(widths: Sequence[int], target: int, beta: float) -> list[int]:
    """Within-model joins allowed per model: floor((sum d - r) * d_i / sum d * beta)."""
    total = sum(widths)
    if total == 0:
        return [0] * len(widths)
    return [math.floor((total - target) * d / total * beta) for d in widths]


def target_width(widths: Sequence[int], params: ZipParams, space: str = "") -> int:
    """The merged width r (default max d_i, at most sum d_i); also checks alpha and beta.

    Raises:
        RecipeError: r, alpha or beta out of range.
    """
    where = f"space {space}: " if space else ""
    # method.md lets r range over max..sum; below max the widest model also merges within
    # itself (compression), which the budgets already allow, so 1..sum is accepted when asked
    widest, high = max(widths, default=0), sum(widths)
    target = widest if params.width is None else int(params.width)
    if not min(1, high) <= target <= high:
        raise RecipeError(f"{where}zip target width {target} is outside 1..{high} "
                          f"(the sum of the widths {list(widths)}); choose a width in that range")
    if not 0.0 <= params.alpha <= 1.0:
        raise RecipeError(f"{where}zip alpha {params.alpha} is outside 0..1; use e.g. --alpha 0.5")
    if not 0.0 <= params.beta < math.inf:
        raise RecipeError(f"{where}zip beta {params.beta} is not a finite number >= 0; use e.g. --beta 1.0")
    return target


def zip_clusters(corr: np.ndarray, widths: Sequence[int], params: ZipParams = ZipParams(), space: str = "", *,
                 overwrite_corr: bool = False) -> Matching:
    """Greedy zipping of one space down to ``params.width`` clusters (module docstring).

    Args:
        corr: (sum d_i) x (sum d_i) correlation of the concatenated features of the models,
            model i's at offsets[i]:offsets[i] + d_i (``SpaceStats.similarity``: constant and
            collinear features ranked by how nearly equal they are).
        widths: d_i per model (0 allowed).
        params: alpha, beta, target width.
        space: the space's name, for error messages.
        overwrite_corr: work in ``corr``'s memory (a float64 array; its values are lost), as
            scipy's ``overwrite_a``: the greedy search holds one (n, n) matrix, not two.

    Returns:
        The matching; ``mean_correlation`` is the mean score of the joined pairs and
        ``within_model_merges`` the budget spent per model.

    Raises:
        RecipeError: target width, alpha or beta out of range.
        CalibrationError: ``corr`` has non-finite values.
    """
    return _zip(checked_correlation(corr, widths, space, overwrite=overwrite_corr), [int(d) for d in widths], params,
                space)


def _zip(corr: np.ndarray, widths: list[int], params: ZipParams, space: str) -> Matching:
    """``zip_clusters`` on a checked correlation, which it overwrites."""
    target = target_width(widths, params, space)
    zipper = _Zipper(corr, widths, target, params)
    for _ in range(sum(widths) - target):
        p, q = zipper.best_pair(space)
        zipper.join(p, q)
    mean = float(np.mean(zipper.joined)) if zipper.joined else float("nan")
    return Matching.from_clusters(zipper.labels(), widths, mean_correlation=mean, within_model_merges=zipper.within)


class _Zipper:
    """Greedy state: dense scores between cluster representatives, -inf off the active pairs
    (``corr`` is taken over and overwritten), and each active row's best allowed partner
    (``best_value``, ``best_col``; -inf if none)."""

    def __init__(self, corr: np.ndarray, widths: list[int], target: int, params: ZipParams):
        n = len(corr)
        self.alpha = float(params.alpha)
        self.score = corr
        np.fill_diagonal(self.score, -np.inf)
        self.owner = np.repeat(np.arange(len(widths)), widths)  # model of a pure cluster, -1 when mixed
        self.left = np.array(budgets(widths, target, params.beta), dtype=np.int64)
        self.active = np.ones(n, dtype=bool)
        self.parent = np.arange(n)
        self.within = [0] * len(widths)
        self.joined: list[float] = []
        self.best_value = np.full(n, -np.inf)
        self.best_col = np.zeros(n, dtype=np.int64)
        self.rescan(np.arange(n))

    def closed(self) -> np.ndarray:
        """Per cluster: its model if it is pure of a model with no budget left, else -1."""
        spent = np.append(self.left <= 0, False)  # index -1 (mixed) -> never spent
        return np.where(spent[self.owner], self.owner, -1)

    def rescan(self, rows: np.ndarray) -> None:
        """Recompute the best allowed partner of ``rows`` (first maximum: smallest column), a
        band of rows at a time (all of them at the start: no copy of the whole matrix)."""
        closed = self.closed()
        for band in weights.row_bands((len(rows), len(self.score))):
            self._rescan(rows[band], closed)

    def _rescan(self, rows: np.ndarray, closed: np.ndarray) -> None:
        values = self.score[rows]
        shut = closed[rows] >= 0
        if shut.any():
            values[shut] = np.where(closed[rows[shut]][:, None] == closed[None, :], -np.inf, values[shut])
        cols = values.argmax(axis=1)
        self.best_col[rows] = cols
        self.best_value[rows] = values[np.arange(len(rows)), cols]

    def best_pair(self, space: str) -> tuple[int, int]:
        """The allowed pair (p < q) of highest score, smallest (p, q) among ties."""
        top = self.best_value.max()
        if top == -np.inf:
            where = f"space {space}: " if space else ""
            raise RecipeError(f"{where}zip ran out of allowed pairs before reaching the target width; "
                              "raise --beta or the target width")
        rows = np.flatnonzero(self.best_value == top)
        cols = self.best_col[rows]
        first, second = np.minimum(rows, cols), np.maximum(rows, cols)
        k = np.lexsort((second, first))[0]
        return int(first[k]), int(second[k])

    def join(self, p: int, q: int) -> None:
        """Join q into p, spend budget, update scores and the rows' best partners."""
        score, model = self.score, self.owner[p]
        self.joined.append(float(score[p, q]))
        same = model >= 0 and self.owner[q] == model
        if same:
            self.left[model] -= 1
            self.within[model] += 1
        else:
            self.owner[p] = -1
        self.active[q] = False
        self.parent[q] = p
        with np.errstate(invalid="ignore"):  # alpha 0 times -inf at inactive entries, masked next
            merged = self.alpha * np.minimum(score[p], score[q])
        merged[~self.active] = -np.inf
        merged[p] = -np.inf
        score[p], score[:, p] = merged, merged
        score[q], score[:, q] = -np.inf, -np.inf
        self.best_value[q] = -np.inf
        self.update_rows(p, q, merged, exhausted=model if same and self.left[model] <= 0 else -1)

    def update_rows(self, p: int, q: int, merged: np.ndarray, exhausted: int) -> None:
        """Best partners after a join: column p changed (to ``merged``), column q is gone.

        Column p is forbidden only to rows of a model whose budget this very join used up (p is
        then pure of it), and those rows are rescanned at the end, so p is offered to all rows.
        """
        rows = self.active.copy()
        rows[p] = False
        was = (self.best_col == p) | (self.best_col == q)
        # a row whose best was p or q keeps p if p's new score is at least the old best (every
        # other entry is at most that, and a tie sits at a larger column); else it is rescanned
        better = (merged > self.best_value) | ((merged == self.best_value) & (p < self.best_col))
        take = rows & np.where(was, merged >= self.best_value, better)
        self.best_col[take] = p
        self.best_value[take] = merged[take]
        again = rows & was & ~take
        again[p] = True
        if exhausted >= 0:  # pairs within that model just became forbidden
            again |= self.active & (self.owner == exhausted)
        self.rescan(np.flatnonzero(again))

    def labels(self) -> np.ndarray:
        """Each feature's representative (parents point to smaller indices)."""
        labels = self.parent.copy()
        for i in range(len(labels)):
            labels[i] = labels[labels[i]]
        return labels
