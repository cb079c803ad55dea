"""Stage 5 of a merge: BN reset or REPAIR of the merged model (docs/method.md §7), as
``--repair`` says, on the calibration samples in a seeded random order."""

from __future__ import annotations

import logging

import onnx

from ..choices import MIN_SAMPLES, REPAIRS
from ..errors import RecipeError
from ..options import MergeOptions
from ..progress import progress
from ..rewrite.merge import Member
from ..rewrite.repair import insert_repair, repair_sources, repair_targets, reset_batch_norm, source_moments


log = logging.getLogger(__name__)


def repair_merged(merged: onnx.ModelProto, members: list[Member], split, matchings, calib,
            options: MergeOptions, same_base: bool = False) -> tuple[onnx.ModelProto, str, list[str]]:
    """BN reset or REPAIR of the merged model, as ``options.repair`` says (method.md §7); the
    report's line about it and the tensors REPAIR corrected. A same-base merge (fine-tunes in
    one basin, as the literature merges them) is repaired only when asked."""
    if options.repair not in REPAIRS:
        raise RecipeError(f"unknown --repair {options.repair!r}; use one of {', '.join(REPAIRS)}")
    if same_base and options.repair == "auto":
        return merged, "none (same-base method; --repair reset or repair to repair)", []
    has_bn = any(n.op_type == "BatchNormalization" for n in merged.graph.node)
    mode = options.repair if options.repair != "auto" else ("reset" if has_bn else "repair")
    if mode == "none":
        return merged, "none", []
    if calib is None:
        if options.repair != "auto":
            raise RecipeError(f"--repair {mode} needs calibration data (--calib)")
        log.warning("no calibration data, so the merged model is not repaired (%s) and its accuracy may "
                    "collapse; pass --calib DATA (a few hundred inputs), or --repair none to silence this",
                    "BN reset" if mode == "reset" else "REPAIR")
        return merged, "none (no calibration data)", []
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
    targets = repair_targets(plan, source_moments(members, plan, batches, options.provider))
    repaired, ran = insert_repair(merged, targets, batches, options.provider)
    tensors = [t.tensor for t in targets]
    return repaired, f"REPAIR of {len(tensors)} tensors (on {ran}, {len(samples)} of {calib.num_samples} samples)", tensors
