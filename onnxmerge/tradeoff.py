"""``--zip-layers auto``: the accuracy-size trade-off of partial zipping, measured on held-back
calibration samples, and the cut it chooses.

Zipping fewer layers keeps more of each model's own layers (a bigger model, closer to the
ensemble); zipping more gives a smaller model that may lose accuracy (ZipIt!, Stoica et al.
2024, section 4.3; FlexMerge, 2025, chooses merges along such a curve). Without labels the loss
of a merge is estimated as how often the merged model disagrees with the source
models' ensemble on the held-back samples: the rate at which the joint prediction (argmax over
all models' class scores side by side, as ``eval`` scores them) differs. The chosen cut is the
largest N whose loss stays within ``--max-loss``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np
import onnx

from .calib.sessions import open_session
from .calib.data import CalibrationSet
from .errors import RecipeError
from .progress import progress
from .rewrite.heads import weight_layers

log = logging.getLogger(__name__)

HOLD_OUT = 0.2  # share of the calibration samples held back to measure the loss
MAX_POINTS = 16  # candidate cuts measured at most (evenly spaced over the weight layers)


@dataclass(frozen=True)
class Point:
    """One measured cut: zipped weight layers, estimated loss, parameters of the merged model."""

    zip_layers: int
    loss: float
    parameters: int


def split_samples(calib: CalibrationSet, seed: int) -> tuple[CalibrationSet, CalibrationSet]:
    """(samples to merge with, held-back samples), drawn at random with ``seed``."""
    order = calib.shuffled(None, seed)
    held = max(1, int(round(HOLD_OUT * len(order))))
    return calib.subset(np.sort(order[held:])), calib.subset(np.sort(order[:held]))


def candidates(total: int) -> list[int]:
    """The cuts to measure: every N from 1 to ``total`` weight layers, or MAX_POINTS of them."""
    if total <= MAX_POINTS:
        return list(range(1, total + 1))
    return sorted({int(round(x)) for x in np.linspace(1, total, MAX_POINTS)})


def parameters(model: onnx.ModelProto) -> int:
    """Number of stored parameter values (initializer elements)."""
    return int(sum(np.prod(init.dims) for init in model.graph.initializer))


@dataclass(frozen=True)
class Ensemble:
    """The source models' class scores on the held-back samples, computed once for every cut:
    ``names[i]`` model i's class-score outputs (the first ``len(scores)`` of each model), and
    ``scores[k]`` the k-th of them of every model side by side (samples first)."""

    names: list[list[str]]
    scores: list[np.ndarray]


def ensemble(sources: list[onnx.ModelProto], held: CalibrationSet, batch_size: int, provider: str) -> Ensemble:
    """The source models' class scores on ``held``.

    Raises:
        RecipeError: no output of the models holds class scores to compare.
    """
    sessions = [open_session(source, provider)[0] for source in sources]
    names = [[o.name for o in session.get_outputs() if _is_score(o)] for session in sessions]
    count = min(len(n) for n in names)
    if count == 0:
        raise RecipeError("--zip-layers auto compares class scores (a float output of 2 or more entries on its "
                          "last axis) and the models have none; give --zip-layers N")
    names = [n[:count] for n in names]
    batches = [[s.run(n, feed) for s, n, feed in zip(sessions, names, feeds)]
               for feeds in zip(*(held.batches(i, batch_size) for i in range(len(sources))))]
    scores = [np.concatenate([np.concatenate([outputs[k] for outputs in batch], axis=-1) for batch in batches])
              for k in range(count)]
    return Ensemble(names, scores)


def loss(merged: onnx.ModelProto, reference: Ensemble, held: CalibrationSet, batch_size: int, provider: str,
         rename: Callable[[str, int], str]) -> float:
    """How often the merged model's joint prediction differs from the source models' ensemble
    on the held-back samples: for the k-th class-score output of every model, the argmax over
    all models' scores concatenated (the ``eval`` joint prediction), averaged over k. Heads are
    compared jointly because a model's own head is arbitrary on samples of another's task."""
    session, _ = open_session(merged, provider)
    count = len(reference.scores)
    wanted = [rename(n, i) for i, model_names in enumerate(reference.names) for n in model_names]
    batches = [session.run(wanted, feed) for feed in held.batches(0, batch_size)]
    ours = [np.concatenate([np.concatenate(batch[k::count], axis=-1) for batch in batches]) for k in range(count)]
    return float(np.mean([np.mean(_differs(theirs, mine)) for theirs, mine in zip(reference.scores, ours)]))


def _differs(theirs: np.ndarray, mine: np.ndarray) -> np.ndarray:
    """Where the merged prediction is not a best one of the ensemble's: a tie in the ensemble
    (two models that agree exactly) is not a difference, whichever entry the merge picks."""
    chosen = np.take_along_axis(theirs, mine.argmax(-1)[..., None], axis=-1)[..., 0]
    best = theirs.max(-1)
    return chosen < best - 1e-5 * np.maximum(np.abs(theirs).max(-1), 1.0)


def _is_score(output) -> bool:
    last = output.shape[-1] if output.shape else None
    return output.type == "tensor(float)" and isinstance(last, int) and last > 1


def choose(points: list[Point], max_loss: float) -> Point:
    """The largest cut whose loss is within ``max_loss`` (the smallest cut when none is)."""
    within = [p for p in points if p.loss <= max_loss]
    return max(within, key=lambda p: p.zip_layers) if within else min(points, key=lambda p: p.zip_layers)


def merge_auto(prepared, stats: bool, options, merge_at: Callable):
    """``--zip-layers auto``: merge at every candidate cut on most calibration samples, measure
    each merge's loss on the held-back rest, and merge at the largest cut within ``max_loss``
    on all samples; the report's ``zip_layers_auto`` holds the measured curve.

    Args:
        prepared: the merge's ``stages.prepare.Prepared``.
        stats: whether statistics files were given (refused: each cut needs its own).
        options: the merge's ``MergeOptions``.
        merge_at: ``merge_at(prepared, options) -> MergeResult``, the merge at
            ``options.zip_layers`` on ``prepared`` (its calibration set replaced by the fitting part).
    """
    if prepared.calib is None or stats:
        raise RecipeError("--zip-layers auto measures each cut on held-back calibration samples; "
                          "pass --calib DATA (and no --stats)")
    fit, held = split_samples(prepared.calib, options.seed)
    reference = prepared.members[0]
    sources = ensemble([m.model for m in prepared.members], held, options.batch_size, options.provider)
    points = []
    cuts = candidates(len(weight_layers(reference.model, reference.graph)))
    for cut in progress(cuts, "--zip-layers auto", len(cuts), "cut"):
        trial = merge_at(replace(prepared, calib=fit), replace(options, zip_layers=cut))
        measured = loss(trial.model, sources, held, options.batch_size, options.provider,
                        lambda name, index: f"{name}_m{index}")
        points.append(Point(cut, measured, parameters(trial.model)))
        log.info("--zip-layers %d: loss %.4f on %d held-back samples", cut, measured, held.num_samples)
    chosen = choose(points, options.max_loss)
    result = merge_at(prepared, replace(options, zip_layers=chosen.zip_layers))
    result.report["zip_layers_auto"] = {"max_loss": options.max_loss, "held_out_samples": held.num_samples,
                                        "chosen": chosen.zip_layers, "curve": [asdict(p) for p in points]}
    return result
