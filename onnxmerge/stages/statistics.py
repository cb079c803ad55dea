"""Stage 2 of a merge: the feature statistics each merged space is matched on (docs/method.md
§2), computed on the calibration data and/or read from statistics files (``calibrate``), whose
fingerprint must be that of the same models and plan."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace

import numpy as np

from ..calib.capture import CaptureUnit, collect_statistics, plan_captures
from ..calib.channels import Tensors, source_moments
from ..calib.stats import SourceMoments, SpaceStats, Statistics, combine_moments, combine_stats, load_moments, load_stats
from ..errors import CalibrationError
from ..options import MergeOptions
from ..progress import progress
from ..rewrite.heads import split_trunk
from ..rewrite.merge import Member
from ..rewrite.repair import repairable_tensors


from .prepare import lockstep_batches

log = logging.getLogger(__name__)


def plan_units(members: list[Member], split):
    """Capture units of model 0, the same units in every model, and their widths."""
    reference = members[0]
    units, missing = plan_captures(reference.model, reference.graph, set(split.zipped))
    for space in sorted(missing):
        log.info("space %s appears in no capturable tensor; it is matched from the weights",
                 reference.graph.space(space).name)
    per_model = [[replace(u, spaces=tuple(m.space_of(s) for s in u.spaces), tensor=m.correspondence.tensors[u.tensor])
                  for u in units] for m in members]
    widths = [[int(np.prod([m.graph.table.widths[s] for s in mine.spaces])) for m, mine in zip(members, column)]
              for column in zip(*per_model)]
    return units, per_model, widths


def statistics(members: list[Member], split, calib, stats_files, options: MergeOptions):
    """Capture units of model 0, their statistics (computed and/or loaded), the provider used."""
    units, per_model, widths = plan_units(members, split)
    fingerprint = plan_fingerprint(members, units)
    shards, provider = [], "none"
    if calib is not None:
        computed, _, provider = collect(members, per_model, widths, calib, options)
        shards.append(({stats_key(u): s for u, s in zip(units, computed)}, {"fingerprint": fingerprint}))
    shards.extend(load_stats(path) for path in stats_files or [])
    if not shards:
        return units, [], provider
    _check_fingerprints(stats_files or [], [meta for _, meta in shards[-len(stats_files or []):]], fingerprint)
    combined = combine_stats(shards, consume=True)  # the shards are dropped: no second copy
    return units, [combined[stats_key(u)] for u in units], provider


def collect(members: list[Member], per_model: list[list[CaptureUnit]], widths: list[list[int]], calib,
            options: MergeOptions, tensors: Tensors | None = None) -> tuple[list[SpaceStats], SourceMoments | None, str]:
    """The statistics of the capture units (``plan_units``) on ``calib``, the source moments of
    ``tensors`` (None without), and the provider; in shards on Ray workers with ``options.ray``
    (docs/scale.md), else in this process."""
    models = [m.model for m in members]
    if options.ray is not None:
        from ..calib.distributed import collect_on_ray
        return collect_on_ray(models, per_model, calib, widths, options, tensors)
    computed, provider = collect_statistics(models, per_model, lockstep_batches(calib, len(members), options.batch_size),
                                            widths, options.provider)
    if tensors is None:
        return computed, None, provider
    steps = -(-calib.num_samples // calib.batch_size(options.batch_size))

    def batches(index: int):
        return progress(calib.batches(index, options.batch_size), "source moments", steps, "batch")

    return computed, source_moments(models, tensors, batches, options.provider), provider


def stored_moments(members: list[Member], split, stats_files: list[str]) -> SourceMoments | None:
    """REPAIR's source moments pooled over the statistics files (method.md §7), or None when
    there are no files or one holds no moments (format 1, written before they were stored).

    Raises:
        CalibrationError: a file of other models or options, or a damaged one.
    """
    if not stats_files:
        return None
    shards = [load_moments(path) for path in stats_files]
    missing = [path for path, (moments, _) in zip(stats_files, shards) if moments is None]
    if missing:
        log.info("%s holds no source moments (written before onnxmerge stored them)", missing[0])
        return None
    _check_fingerprints(stats_files, [meta for _, meta in shards], plan_fingerprint(members, plan_units(members, split)[0]))
    return combine_moments([moments for moments, _ in shards], stats_files)


def _check_fingerprints(paths: list[str], metas: list[dict[str, str]], fingerprint: str) -> None:
    """Refuse statistics files computed for other models or plan options."""
    for path, meta in zip(paths, metas):
        if meta.get("fingerprint") != fingerprint:
            raise CalibrationError(f"{path}: statistics of other models or options; recompute them with "
                                   "onnxmerge calibrate on the same models and --bn/--heads/--zip-layers")


def stats_key(unit: CaptureUnit) -> str:
    return f"{unit.tensor}:{unit.axis}" + (f"+{unit.span}" if unit.span > 1 else "")


def plan_fingerprint(members: list[Member], units: list[CaptureUnit]) -> str:
    """Identifies the statistics a plan needs, so shards of other models are refused."""
    digest = hashlib.sha256()
    for member in members:
        for init in member.model.graph.initializer:
            digest.update(init.raw_data[:4096])
    digest.update(";".join(stats_key(u) for u in units).encode())
    return digest.hexdigest()[:16]


def calibration_statistics(members: list[Member], calib, depth, options: MergeOptions) -> tuple[Statistics, dict]:
    """``api.calibrate``'s result for prepared members: the statistics of the plan's capture
    units with the source moments REPAIR reads, and the metadata (fingerprint, provider,
    samples, and the depth alignment, so that merge --stats without data lifts the same way)."""
    split = split_trunk(members[0].model, members[0].graph, heads=options.heads, zip_layers=options.zip_layers)
    units, per_model, widths = plan_units(members, split)
    stats, moments, provider = collect(members, per_model, widths, calib, options, repairable_tensors(members))
    meta = {"fingerprint": plan_fingerprint(members, units), "provider": provider, "samples": str(calib.num_samples)}
    if depth is not None:
        meta["alignment"] = json.dumps({"method": depth.method, "maps": {str(i): m for i, m in depth.maps.items()}})
    return Statistics({stats_key(u): s for u, s in zip(units, stats)}, moments), meta
