"""Identity matching (weight averaging) and activation matching (Hungarian on correlation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..errors import RecipeError
from .matching import Matching


@dataclass(frozen=True)
class NoParams:
    """The method has no parameters."""


def require_equal_widths(widths: Sequence[int], method: str, space: str = "") -> None:
    if len(set(widths)) > 1:
        where = f"space {space}: " if space else ""
        raise RecipeError(f"{where}--method {method} needs equal widths but the models have {list(widths)}; "
                          "use --method zip for models of different widths")


def average(corr: np.ndarray | None, widths: Sequence[int], params: NoParams = NoParams(), space: str = "") -> Matching:
    """Feature j of every model forms cluster j (plain weight averaging)."""
    require_equal_widths(widths, "average", space)
    return Matching.identity(widths)


def permute(corr: np.ndarray, widths: Sequence[int], params: NoParams = NoParams(), space: str = "") -> Matching:
    """Assign every model's features one to one onto model 0's, maximising total correlation."""
    require_equal_widths(widths, "permute", space)
    d = widths[0]
    labels = [np.arange(d)]
    joined = []
    for i in range(1, len(widths)):
        block = corr[:d, i * d:(i + 1) * d]
        rows, cols = linear_sum_assignment(block, maximize=True)
        own = np.empty(d, dtype=int)
        own[cols] = rows
        labels.append(own)
        joined.append(block[rows, cols])
    mean = float(np.mean(np.concatenate(joined))) if joined else float("nan")
    return Matching.from_clusters(np.concatenate(labels), widths, mean_correlation=mean)
