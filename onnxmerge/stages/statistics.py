"""Stage 2 of a merge: the feature statistics each merged space is matched on (docs/method.md
§2), computed on the calibration data and/or read from statistics files (``calibrate``), whose
fingerprint must be that of the same models and plan."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace

import numpy as np

from .. import weights
from ..calib.capture import (CaptureUnit, collect_block, collect_statistics, fusable, plan_captures,
                             space_groups)
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


STATISTICS_BUDGET = 2 << 30
"""Bytes of statistics held at once when they are computed here from calibration data, at
most, and at most a quarter of the models' mapped weights (``onnxmerge.weights``) when that is
more than ``STATISTICS_FLOOR``: past this the spaces are taken in groups, each group's
statistics computed in its own pass over the data and matched before the next
(``GroupedStatistics``), so that memory stays near what the models' weights take. A space of
n = sum of its widths d_i takes 8 n^2 bytes of statistics (float64 X^T X of every model's
features) and 2 (n^2 + sum d_i^2) bytes of a batch's products (the float32 blocks on and above
the diagonal, ``capture.moments_model``): 0.7 GB for two models 4096 wide. A space past the
budget alone is computed a block (pair of models) a pass (``_blockwise``): 12 d_i d_j bytes
and the two models' weights up to it. Read at each use, so that tests can lower it."""
STATISTICS_FLOOR = 256 << 20


def statistics(members: list[Member], split, calib, stats_files, options: MergeOptions):
    """Capture units of model 0, their statistics (computed and/or loaded), the provider used.
    Statistics past ``STATISTICS_BUDGET`` computed here come as a ``GroupedStatistics``."""
    units, per_model, widths = plan_units(members, split)
    fingerprint = plan_fingerprint(members, units)
    shards, provider = [], "none"
    budget = min(STATISTICS_BUDGET, max(STATISTICS_FLOOR, sum(weights.mapped_bytes(m.model) for m in members) // 4))
    passes = _passes(units, widths, budget) if calib is not None and not stats_files and options.ray is None else []
    blockwise = _blockwise(members, units, widths, budget) if passes else set()
    if len(passes) > 1 or blockwise:
        grouped = GroupedStatistics(members, per_model, widths, calib, options, passes, blockwise)
        return units, grouped, grouped.provider
    if calib is not None:
        computed, _, provider = collect(members, per_model, widths, calib, options)
        shards.append(({stats_key(u): s for u, s in zip(units, computed)}, {"fingerprint": fingerprint}))
    shards.extend(load_stats(path) for path in stats_files or [])
    if not shards:
        return units, [], provider
    _check_fingerprints(stats_files or [], [meta for _, meta in shards[-len(stats_files or []):]], fingerprint)
    combined = combine_stats(shards, consume=True)  # the shards are dropped: no second copy
    return units, [combined[stats_key(u)] for u in units], provider


def _passes(units: list[CaptureUnit], widths: list[list[int]], budget: int) -> list[list[int]]:
    """The units' indices in passes of whole spaces (a space's chosen unit with its companions,
    in the chosen units' order) whose statistics fit ``budget`` bytes (a space larger than
    that alone in its pass)."""
    passes: list[list[int]] = []
    held = 0
    for indices in space_groups(units):
        size = sum(_held_bytes(widths[k]) for k in indices)
        if not passes or held + size > budget:
            passes.append([])
            held = 0
        passes[-1] += indices
        held += size
    return passes


def _blockwise(members: list[Member], units: list[CaptureUnit], widths: list[list[int]], budget: int) -> set[int]:
    """The units whose statistics are computed a block (pair of models) at a time: each alone
    in its space and over ``budget`` by itself, of two models or more that one moments graph
    runs (``capture.fusable``)."""
    if len(members) < 2 or not fusable([m.model for m in members]):
        return set()
    return {group[0] for group in space_groups(units) if len(group) == 1 and _held_bytes(widths[group[0]]) > budget}


def _held_bytes(widths: list[int]) -> int:
    """What one unit's statistics and a batch's products take (``STATISTICS_BUDGET``)."""
    n = sum(widths)
    return 8 * n * n + 2 * (n * n + sum(d * d for d in widths))


class GroupedStatistics:
    """The statistics of every capture unit, as a sequence, computed a pass at a time: asking
    for a unit of another pass computes that pass's statistics (one run over the calibration
    data) and drops the previous pass's. Matching asks for them in pass order (a space's
    units together, spaces in order), so each pass runs once and memory holds one pass's."""

    def __init__(self, members: list[Member], per_model: list[list[CaptureUnit]], widths: list[list[int]],
                 calib, options: MergeOptions, passes: list[list[int]], blockwise: set[int] = frozenset()):
        self._args = members, per_model, widths, calib, options
        self._passes, self._blockwise = passes, blockwise
        self._pass_of = {k: p for p, indices in enumerate(passes) for k in indices}
        self._current: dict[int, SpaceStats] = {}
        self._load(0)  # the first pass now: it says which provider runs

    def _load(self, index: int) -> None:
        members, per_model, widths, calib, options = self._args
        wanted = self._passes[index]
        self._current = {}  # the previous pass's statistics go first
        log.info("statistics pass %d of %d: %d capture units", index + 1, len(self._passes), len(wanted))
        if wanted[0] in self._blockwise:
            self._current = {wanted[0]: self._by_blocks(wanted[0])}
            return
        computed, _, self.provider = collect(members, [[units[k] for k in wanted] for units in per_model],
                                             [widths[k] for k in wanted], calib, options)
        self._current = dict(zip(wanted, computed))

    def _by_blocks(self, k: int) -> SpaceStats:
        """Unit k's statistics, a pass over the data per ordered pair of models (i, j), each pass
        running only models i and j and holding only their block of X^T X (the same numbers as
        computed whole); the finished blocks wait in files of their own (``weights.spill``,
        removed once assembled), so memory holds one block and the weights it reads."""
        members, per_model, widths, calib, options = self._args
        count = len(members)
        blocks = []
        for pair in [(i, j) for i in range(count) for j in range(count)]:
            log.info("statistics of a space too large to hold whole: block of models %d and %d", *pair)
            block, self.provider = collect_block([m.model for m in members], [units[k] for units in per_model],
                                                 lockstep_batches(calib, count, options.batch_size), widths[k], pair,
                                                 options.provider)
            blocks.append(replace(block, outer=weights.spill().apart(block.outer)))
            del block
        stats = SpaceStats.from_blocks(blocks, widths[k])
        for block in blocks:
            weights.discard(block.outer)
        return stats

    def __len__(self) -> int:
        return len(self._pass_of)

    def __getitem__(self, k: int) -> SpaceStats:
        if k not in self._current:
            self._load(self._pass_of[k])
        return self._current[k]

    def __iter__(self):
        return (self[k] for k in range(len(self)))


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
