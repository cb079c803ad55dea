"""Identity matching (weight averaging) and activation matching (Hungarian on correlation),
method.md §3. Both keep the width and need every model to have the same width."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import RecipeError
from .matching import Matching, checked_correlation, max_assignment


@dataclass(frozen=True)
class NoParams:
    """The method has no parameters."""


def require_equal_widths(widths: Sequence[int], method: str, space: str = "") -> None:
    """Raises RecipeError naming the widths when they differ; ``space`` names the space."""
    if len(set(widths)) > 1:
        where = f"space {space}: " if space else ""
        raise RecipeError(f"{where}--method {method} needs equal widths but the models have {list(widths)}; "
                          "use --method zip for models of different widths")


def average(corr: np.ndarray | None, widths: Sequence[int], params: NoParams = NoParams(), space: str = "") -> Matching:
    """Feature j of every model forms cluster j (plain weight averaging).

    Args:
        corr: ignored (may be None); the method needs no calibration.
        widths: d_i per model, all equal.
        space: the space's name, for error messages.

    Raises:
        RecipeError: the widths differ.
    """
    require_equal_widths(widths, "average", space)
    return Matching.identity(widths)


def permute(corr: np.ndarray, widths: Sequence[int], params: NoParams = NoParams(), space: str = "", *,
            overwrite_corr: bool = False) -> Matching:
    """Assign every model's features one to one onto model 0's, maximising total correlation.

    Model i > 0 is matched to model 0 alone (a Hungarian assignment on the model-0 x model-i
    block of ``corr``), so cluster j holds model 0's feature j and the feature of every other
    model assigned to it; the cluster order is model 0's.

    Args:
        corr: (N d) x (N d) correlation of the concatenated features.
        widths: d per model, all equal.
        space: the space's name, for error messages.
        overwrite_corr: symmetrise ``corr`` in its own memory (a float64 array), as
            ``zip_clusters``'s.

    Returns:
        A width-d matching; ``mean_correlation`` is the mean correlation of the assigned
        (model 0, model i) pairs.

    Raises:
        RecipeError: the widths differ.
    """
    require_equal_widths(widths, "permute", space)
    corr = checked_correlation(corr, widths, space, overwrite=overwrite_corr)
    d = widths[0] if widths else 0
    labels, joined = [np.arange(d)], []
    for i in range(1, len(widths)):
        block = corr[:d, i * d:(i + 1) * d]
        rows, cols = max_assignment(block)
        own = np.empty(d, dtype=np.int64)
        own[cols] = rows  # model i's feature cols[k] joins model 0's feature rows[k]
        labels.append(own)
        joined.append(block[rows, cols])
    pairs = np.concatenate(joined) if joined else np.empty(0)
    mean = float(np.mean(pairs)) if len(pairs) else float("nan")
    return Matching.from_clusters(np.concatenate(labels), widths, mean_correlation=mean)
