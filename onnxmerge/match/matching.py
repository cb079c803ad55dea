"""The result of matching one feature space across models (method.md §3-4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .. import weights
from ..errors import CalibrationError


def max_assignment(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the one-to-one assignment with the largest total score (scipy's
    Hungarian solver; imported here, on first use, because scipy.optimize takes a quarter of a
    second to import and inspect, permute, widen, deepen and eval never match)."""
    from scipy.optimize import linear_sum_assignment
    return linear_sum_assignment(scores, maximize=True)


@dataclass(frozen=True)
class Matching:
    """Merge/unmerge matrices per model for one space of width r after merging.

    Every merged feature is a cluster of original features (of any models). Invariants:

    - ``merge[i]`` (r x d_i, float64) holds 1/|cluster| at each of model i's members of a
      cluster, so ``sum_i merge[i] @ x_i`` is each cluster's mean over all its members;
    - ``unmerge[i]`` (d_i x r, float64) is one-hot: model i's feature -> its cluster, so model
      i's features are approximated by ``unmerge[i] @ merged``;
    - both are scipy.sparse CSR arrays (``.toarray()`` for a dense one): a few nonzeros per
      row, where dense matrices of layers thousands wide take gigabytes;
    - ``clusters`` (int, length sum d_i) is the cluster of each concatenated feature; clusters
      are numbered by first appearance in model 0's features, then model 1's, and so on, so a
      model matched with a permuted copy of itself keeps its own channel order.

    ``mean_correlation`` is the mean correlation of the pairs of clusters joined (NaN when
    nothing was joined or the method does not measure it); ``within_model_merges[i]`` counts
    the joins of two clusters made only of model i's features.
    """

    merge: list[np.ndarray]
    unmerge: list[np.ndarray]
    clusters: np.ndarray
    mean_correlation: float = float("nan")
    within_model_merges: list[int] = field(default_factory=list)

    @property
    def width(self) -> int:
        """Merged width r (number of clusters)."""
        return int(self.merge[0].shape[0]) if self.merge else 0

    @classmethod
    def from_clusters(cls, labels: Sequence[int], widths: Sequence[int], *, mean_correlation: float = float("nan"),
                      within_model_merges: Sequence[int] | None = None) -> "Matching":
        """The matching whose clusters are the features sharing a label.

        Args:
            labels: one integer per concatenated feature (model 0's d_0 features first);
                only equality matters, clusters are renumbered by first appearance.
            widths: d_i per model; they must sum to ``len(labels)``.
            mean_correlation: reported as is.
            within_model_merges: per model; zeros when not given.

        Raises:
            ValueError: ``labels`` and ``widths`` disagree (a caller bug, not a user error).
        """
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        widths = [int(d) for d in widths]
        if len(labels) != sum(widths) or min(widths, default=0) < 0:
            raise ValueError(f"{len(labels)} cluster labels for widths {widths}")
        distinct, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
        renumber = np.empty(len(distinct), dtype=np.int64)
        renumber[np.argsort(first)] = np.arange(len(distinct))
        clusters = renumber[inverse.reshape(-1)]
        r = len(distinct)
        sizes = np.bincount(clusters, minlength=r).astype(np.float64)
        merges, unmerges = [], []
        for start, d in zip(np.cumsum([0, *widths[:-1]]), widths):
            mine = clusters[start:start + d]
            unmerges.append(_one_hot(mine, r))
            merges.append(_sparse((1.0 / sizes[mine], (mine, np.arange(d))), (r, d)))
        within = [int(k) for k in within_model_merges] if within_model_merges is not None else [0] * len(widths)
        return cls(merges, unmerges, clusters, float(mean_correlation), within)

    def spread(self, widths: Sequence[int], present: Sequence[int]) -> "Matching":
        """This matching of the models ``present`` (indices into ``widths``), extended to all: an
        absent model (one with no features here) has its features join clusters round-robin with
        zero merge weight, and the present models' weights scale by len(present) / len(widths), so
        merged parameters stay the mean over all models, the absent ones counting as zeros."""
        r = self.width
        scale = len(present) / len(widths)
        merges, unmerges, clusters, within = [], [], [], []
        mine = dict(zip(present, range(len(present))))
        for i, d in enumerate(widths):
            if i in mine:
                k = mine[i]
                merges.append(self.merge[k] * scale)
                unmerges.append(self.unmerge[k])
                start = sum(int(self.merge[j].shape[1]) for j in range(k))
                clusters.append(self.clusters[start:start + d])
                within.append(self.within_model_merges[k] if self.within_model_merges else 0)
                continue
            merges.append(_sparse(([], ([], [])), (r, d)))
            unmerges.append(_one_hot(np.arange(d) % r, r))
            clusters.append(np.arange(d) % r)
            within.append(0)
        return Matching(merges, unmerges, np.concatenate(clusters), self.mean_correlation, within)

    @classmethod
    def identity(cls, widths: Sequence[int]) -> "Matching":
        """Feature j of every model is cluster j (plain averaging; width max d_i)."""
        return cls.from_clusters(np.concatenate([np.arange(d) for d in widths]) if widths else [], widths)


def _sparse(entries, shape: tuple[int, int]):
    """A float64 CSR array of (values, (rows, columns)) (scipy, imported on first use: see
    ``max_assignment``)."""
    from scipy.sparse import csr_array
    return csr_array(entries, shape=shape, dtype=np.float64)


def _one_hot(columns: np.ndarray, width: int):
    """The (len(columns) x width) CSR array with a 1 at each row's column."""
    return _sparse((np.ones(len(columns)), (np.arange(len(columns)), columns)), (len(columns), width))


def checked_correlation(corr: np.ndarray, widths: Sequence[int], space: str = "", *,
                        overwrite: bool = False) -> np.ndarray:
    """``corr`` as a symmetric float64 matrix of side sum(widths).

    The correlation of the concatenated features is symmetric in exact arithmetic; averaging it
    with its transpose removes rounding asymmetry (and changes nothing in an exactly symmetric
    matrix), so "the pair (a, b)" has one value whichever way it is read.

    Args:
        overwrite: symmetrise ``corr`` itself when it is a float64 array (as scipy's
            ``overwrite_a``): no (n, n) copy; else a copy.

    Raises:
        ValueError: wrong shape (a caller bug).
        CalibrationError: non-finite values (the calibration features overflowed).
    """
    corr = np.asarray(corr, dtype=np.float64) if overwrite else np.array(corr, dtype=np.float64)
    total = sum(int(d) for d in widths)
    if corr.shape != (total, total):
        raise ValueError(f"correlation of shape {corr.shape} for widths {list(widths)}")
    if not all(np.isfinite(corr[rows]).all() for rows in weights.row_bands(corr.shape)):
        where = f"space {space}: " if space else ""
        raise CalibrationError(f"{where}the feature correlation has NaN or infinite values; the calibration "
                               "features overflow float32 somewhere upstream, check the calibration inputs' range")
    weights.symmetrize(corr)
    return corr
