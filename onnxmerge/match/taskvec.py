"""Same-base merging: fine-tunes of one pre-trained model, combined tensor by tensor.

Each function takes one parameter tensor of the base (None where the method needs none) and the
same tensor of every fine-tune, all of one shape, in float64, and returns the merged tensor.
A task vector is ``tuned - base`` (Ilharco et al. 2023).

- task arithmetic (Ilharco et al. 2023): ``base + scale * sum_i (tuned_i - base)``.
- TIES (Yadav et al. 2023): trim each task vector to its ``density`` largest magnitudes, elect
  each entry's sign as the sign of the trimmed vectors' sum, average the trimmed entries that
  agree with it (the disjoint mean), ``base + scale * merged``.
- DARE (Yu et al. 2024): drop each task-vector entry with probability ``drop_rate`` and rescale
  the kept ones by ``1 / (1 - drop_rate)``, then task arithmetic or TIES (sign election and
  disjoint mean, no trimming).
- SLERP (Shoemake 1985, as used for model merging): spherical interpolation between two models
  at ``t``, per tensor; linear where the two are (nearly) parallel.
- linear (Wortsman et al. 2022, the model soup): the weighted average, weights normalised.
- RegMean (Jin et al. 2023) is in regmean.py: it needs each layer's input Gram matrices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import RecipeError
from ..choices import default

_PARALLEL = 1 - 1e-6  # cosine above which SLERP falls back to linear interpolation


# Parameters of each method; what each means and its range: choices.PARAMETERS.
@dataclass(frozen=True)
class TaskArithmeticParams:
    scale: float = default("scale")


@dataclass(frozen=True)
class TiesParams:
    scale: float = default("scale")
    density: float = default("density")


@dataclass(frozen=True)
class DareParams:
    scale: float = default("scale")
    drop_rate: float = default("drop_rate")
    dare_then: str = default("dare_then")


@dataclass(frozen=True)
class SlerpParams:
    t: float = default("t")


@dataclass(frozen=True)
class LinearParams:
    weights: tuple[float, ...] | None = default("weights")


def task_arithmetic(base: np.ndarray, tuned: Sequence[np.ndarray], params, rng=None) -> np.ndarray:
    return base + params.scale * sum(t - base for t in tuned)


def _trim(vector: np.ndarray, density: float) -> np.ndarray:
    """``vector`` with all but its ``density`` share of largest magnitudes zeroed."""
    keep = int(np.ceil(density * vector.size))
    if keep >= vector.size:
        return vector
    threshold = np.partition(np.abs(vector).ravel(), vector.size - keep)[vector.size - keep]
    return np.where(np.abs(vector) >= threshold, vector, 0.0)


def _disjoint_mean(vectors: list[np.ndarray]) -> np.ndarray:
    """TIES' sign election and disjoint mean of (trimmed or dropped) task vectors."""
    stacked = np.stack(vectors)
    sign = np.sign(stacked.sum(axis=0))
    agree = (np.sign(stacked) == sign) & (stacked != 0)
    count = agree.sum(axis=0)
    return np.where(count > 0, (stacked * agree).sum(axis=0) / np.maximum(count, 1), 0.0)


def ties(base: np.ndarray, tuned: Sequence[np.ndarray], params, rng=None) -> np.ndarray:
    return base + params.scale * _disjoint_mean([_trim(t - base, params.density) for t in tuned])


def dare(base: np.ndarray, tuned: Sequence[np.ndarray], params, rng: np.random.Generator) -> np.ndarray:
    keep = 1.0 - params.drop_rate
    dropped = [(t - base) * (rng.random(base.shape) < keep) / keep for t in tuned]
    if params.dare_then == "ties":
        return base + params.scale * _disjoint_mean(dropped)
    return base + params.scale * sum(dropped)


def slerp(base: np.ndarray | None, tuned: Sequence[np.ndarray], params, rng=None) -> np.ndarray:
    a, b = tuned
    t = params.t
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    cosine = float(np.dot(a.ravel(), b.ravel()) / norms) if norms > 0 else 1.0
    if cosine > _PARALLEL:
        return (1 - t) * a + t * b
    angle = np.arccos(np.clip(cosine, -1.0, 1.0))
    return (np.sin((1 - t) * angle) * a + np.sin(t * angle) * b) / np.sin(angle)


def linear(base: np.ndarray | None, tuned: Sequence[np.ndarray], params, rng=None) -> np.ndarray:
    weights = np.ones(len(tuned)) if params.weights is None else np.asarray(params.weights, dtype=np.float64)
    return sum(w * t for w, t in zip(weights, tuned)) / weights.sum()


def check_params(method: str, params, models: int) -> None:
    """Refuse model counts a method cannot take and weights that do not fit them (the ranges of
    single values are checked with every option: limits.check_options).

    Raises:
        RecipeError: naming the option and what to give.
    """
    if method == "slerp" and models != 2:
        raise RecipeError(f"--method slerp interpolates two models; {models} were given")
    weights = getattr(params, "weights", None)
    if weights is not None and (len(weights) != models or not all(np.isfinite(w) and w >= 0 for w in weights)
                                or sum(weights) <= 0):
        raise RecipeError(f"--weights {' '.join(map(str, weights))}: give one non-negative weight per model "
                          f"({models}), not all 0")
