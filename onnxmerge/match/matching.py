"""The result of matching one feature space across models."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Matching:
    """Merge/unmerge matrices per model for one space.

    ``merge[i]`` (r x d_i) averages model i's members of each cluster; summed over models it
    gives each cluster's mean. ``unmerge[i]`` (d_i x r) is one-hot: feature -> its cluster.
    """

    merge: list[np.ndarray]
    unmerge: list[np.ndarray]
    clusters: np.ndarray
    mean_correlation: float = float("nan")
    within_model_merges: list[int] = field(default_factory=list)

    @property
    def width(self) -> int:
        return int(self.merge[0].shape[0])

    @classmethod
    def from_clusters(cls, labels: Sequence[int], widths: Sequence[int], *, mean_correlation: float = float("nan"),
                      within_model_merges: Sequence[int] | None = None) -> "Matching":
        """Clusters renumbered by first appearance (model 0 first), so a model merged with a
        permuted copy of itself keeps its own channel order."""
        labels = np.asarray(labels)
        _, first = np.unique(labels, return_index=True)
        order = np.argsort(first)
        renumber = np.empty(len(order), dtype=int)
        renumber[order] = np.arange(len(order))
        clusters = renumber[np.searchsorted(np.unique(labels), labels)]
        r = len(order)
        sizes = np.bincount(clusters, minlength=r).astype(np.float64)
        merges, unmerges, start = [], [], 0
        for d in widths:
            own = clusters[start:start + d]
            unmerge = np.zeros((d, r))
            unmerge[np.arange(d), own] = 1.0
            unmerges.append(unmerge)
            merges.append(unmerge.T / sizes[:, None])
            start += d
        return cls(merges, unmerges, clusters, mean_correlation, list(within_model_merges or [0] * len(widths)))

    @classmethod
    def identity(cls, widths: Sequence[int]) -> "Matching":
        return cls.from_clusters(np.concatenate([np.arange(d) for d in widths]), widths)
