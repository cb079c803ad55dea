"""Stage 5 of a merge: BN reset or REPAIR of the merged model (docs/method.md §7), as
``--repair`` says, on the calibration samples in a seeded random order."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import onnx

from ..calib.channels import source_moments
from ..calib.stats import SourceMoments
from ..choices import MIN_SAMPLES, REPAIRS
from ..errors import CalibrationError, RecipeError
from ..graph.facts import op_facts
from ..options import MergeOptions
from ..progress import progress
from ..rewrite.merge import Member
from ..rewrite.repair import RepairSource, insert_repair, plan_tensors, repair_sources, repair_targets, reset_batch_norm
from .statistics import stored_moments


log = logging.getLogger(__name__)


def repair_merged(merged: onnx.ModelProto, members: list[Member], split, matchings, calib,
                  options: MergeOptions, same_base: bool = False,
                  stats_files: Sequence[str] = ()) -> tuple[onnx.ModelProto, str, list[str]]:
    """BN reset or REPAIR of the merged model, as ``options.repair`` says (method.md §7); the
    report's line about it and the tensors REPAIR corrected. REPAIR takes its source moments
    from ``stats_files`` when they all hold them, else measures the sources on ``calib``. A
    same-base merge (fine-tunes in one basin, as the literature merges them) is repaired only
    when asked."""
    if options.repair not in REPAIRS:
        raise RecipeError(f"unknown --repair {options.repair!r}; use one of {', '.join(REPAIRS)}")
    if same_base and options.repair == "auto":
        return merged, "none (same-base method; --repair reset or repair to repair)", []
    has_bn = any(op_facts(n.op_type).norm == "running" for n in merged.graph.node)
    mode = options.repair if options.repair != "auto" else ("reset" if has_bn else "repair")
    if mode == "none":
        return merged, "none", []
    stored = stored_moments(members, split, list(stats_files)) if mode == "repair" else None
    if calib is None:
        return merged, _unrepaired(mode, options.repair, stored is not None), []
    if mode == "reset" and not has_bn:
        raise RecipeError("--repair reset needs BatchNormalization nodes; use --repair repair for BN-free models")
    # in random order: a file sorted by class would otherwise give single-class batches
    samples = calib.shuffled(options.repair_samples, options.seed)
    if len(samples) < MIN_SAMPLES:
        log.warning("the repair is measured on %d samples: its statistics may be noise and the accuracy may "
                    "collapse; measure on at least %d (--repair-samples, --calib)", len(samples), MIN_SAMPLES)

    steps = -(-len(samples) // calib.batch_size(options.batch_size))

    def batches(index: int = 0):
        return progress(calib.batches(index, options.batch_size, samples), f"{mode} pass", steps, "batch")

    if mode == "reset":
        repaired, ran = reset_batch_norm(merged, batches, options.provider)
        return repaired, f"reset (on {ran}, {len(samples)} of {calib.num_samples} samples)", []
    plan = repair_sources(members, split, matchings, {o.name for o in merged.graph.output})
    if not plan:
        return merged, "none (no weight layer output with a channel axis to repair)", []
    if stored is None:
        tensors = plan_tensors(plan, len(members))
        moments = source_moments([m.model for m in members], tensors, batches, options.provider)
        origin = "measured on them"
    else:
        moments, origin = stored, f"from the statistics files, {_covering(plan, stored, stats_files)} samples"
    targets = repair_targets(plan, moments)
    repaired, ran = insert_repair(merged, targets, batches, options.provider)
    tensors = [t.tensor for t in targets]
    return repaired, (f"REPAIR of {len(tensors)} tensors (on {ran}, {len(samples)} of {calib.num_samples} samples; "
                      f"source moments {origin})"), tensors


def _unrepaired(mode: str, asked: str, stored: bool) -> str:
    """The report's line for a merge without calibration data, after its one warning line
    (``stored``: the statistics files hold REPAIR's source moments).

    Raises:
        RecipeError: the repair was asked for (not ``auto``).
    """
    name = "BN reset" if mode == "reset" else "REPAIR"
    fix = ("the statistics files hold REPAIR's source moments, so it runs from them given a few hundred samples "
           "with --calib DATA (--repair-samples N takes N of a larger set)" if stored
           else "pass --calib DATA (a few hundred inputs)")
    if asked != "auto":
        raise RecipeError(f"--repair {mode} needs calibration data: {fix}")
    log.warning("no calibration data, so the merged model is not repaired (%s) and its accuracy may collapse; "
                "%s, or --repair none to silence this", name, fix)
    return "none (no calibration data)"


def _covering(plan: list[RepairSource], stored: SourceMoments, stats_files: Sequence[str]) -> int:
    """The samples the stored moments were pooled over, after checking that they hold every
    source tensor of the plan.

    Raises:
        CalibrationError: a source tensor has no stored moments.
    """
    for item in plan:
        for index, name, _ in item.sources:
            if name not in stored[index]:
                raise CalibrationError(f"{', '.join(stats_files)}: no source moments of tensor {name!r} of model "
                                       f"{index}; recompute the statistics with onnxmerge calibrate")
    index, name, _ = plan[0].sources[0]
    return stored[index][name].count
