"""The Python API the CLI calls. Every function takes and returns ONNX models or plain data."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx

from . import __version__, inspection, tradeoff
from .calib.capture import CaptureUnit, collect_statistics, plan_captures
from .calib.data import MIN_SAMPLES, CalibrationSet, check_variation, input_specs, load_calibration
from .calib.stats import combine_stats, load_stats
from .depth import DepthAlignment, align_depths, lift_models, needs_alignment
from .depth import describe as describe_alignment
from .errors import CalibrationError, InvalidModelError, RecipeError, UnsupportedGraphError
from .evaluate import load_test_data, parse_tasks, run_heads, score
from .graph.blocks import BlockStructure, find_blocks, lines_up, regroup_like
from .graph.canonical import canonicalize, infer_shapes
from .graph.correspond import correspond
from .graph.interface import channels_first_input, check_same_inputs, common_opset
from .graph.postprocess import PostProcessing, attach_postprocessing, split_postprocessing
from .graph.quantized import read_as_float
from .graph.spaces import SpaceGraph, find_spaces
from .io import load_model, model_sha256
from .limits import MAX_DEEPEN_PER_BLOCK, check_factor, check_memory, check_options, check_range, check_seed
from .match import get_method
from .match.permute import permute as permute_features
from .match.permute import require_equal_widths
from .match.grid import assignments_of, match_grid
from .match.matching import Matching
from .match.weight import WeightParams, match_weights
from .rewrite.apply import transform_parameters
from .rewrite.heads import split_trunk, weight_layers
from .rewrite.lift import insert_identities
from .rewrite.merge import Member, assemble, merged_trunk_parameters, reference_widths, resize_constants
from .rewrite.repair import REPAIRS, insert_repair, repair_sources, repair_targets, reset_batch_norm, source_moments
from .rewrite.transform import Permutation
from .rewrite.widen import widening, widening_bytes

log = logging.getLogger(__name__)


def load(path: str | os.PathLike) -> onnx.ModelProto:
    """A model file as the commands read it: ``io.load_model``, refusing QOperator-quantized
    models and warning that QDQ-quantized ones are read in float (graph/quantized.py)."""
    model = load_model(path)
    read_as_float(str(path), model)
    return model


def analyse(model: onnx.ModelProto, *, bn: str = "keep") -> tuple[onnx.ModelProto, SpaceGraph]:
    """Canonicalise a model and find its feature spaces. The input is not modified."""
    canonical = canonicalize(model, bn=bn)
    return canonical, find_spaces(canonical)


def inspect(path: str | os.PathLike, *, bn: str = "keep") -> dict:
    """The ``onnxmerge inspect`` report of the model file at ``path`` (see inspection.py)."""
    canonical, graph = analyse(load(path), bn=bn)
    return inspection.describe(str(path), canonical, graph)


def permute(model: onnx.ModelProto, *, seed: int = 0, bn: str = "keep") -> onnx.ModelProto:
    """Return a function-preserving copy of ``model`` with every free space randomly permuted.

    Attention heads are permuted as whole heads and, jointly, within heads; grouped channels
    likewise by groups and within groups.
    """
    check_seed(seed)
    canonical, graph = analyse(model, bn=bn)
    rng = np.random.default_rng(seed)
    orders = {space.id: Permutation(rng.permutation(space.width)) for space in graph.free_spaces}
    permuted = transform_parameters(canonical, graph, lambda space, role: orders.get(space))
    check(permuted, "permuted model")
    return permuted


def widen(model: onnx.ModelProto, *, factor: float, seed: int = 0, bn: str = "keep") -> onnx.ModelProto:
    """A function-preserving copy of ``model`` with each widenable space ``factor`` times as wide
    (Net2Net): spaces normalised, reduced or multiplied with other activations stay as they are."""
    check_factor(factor)
    check_seed(seed)
    canonical, graph = analyse(model, bn=bn)
    check_memory(widening_bytes(canonical, graph, factor), f"widening by --factor {factor}",
                 "use a smaller factor")
    transforms = widening(graph, factor, np.random.default_rng(seed))
    wider = transform_parameters(canonical, graph,
                                 lambda space, role: transforms.get(space, (None, None))[role == "consumer"])
    resize_constants(wider, graph, lambda s: transforms[s][0].matrix.shape[0] if s in transforms else graph.table.widths[s])
    wider = infer_shapes(wider)
    check(wider, "widened model")
    return wider


def check(model: onnx.ModelProto, what: str) -> None:
    """Full ONNX checks on a model onnxmerge produced; a failure here is an onnxmerge bug
    unless the input was already invalid, so name both."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise InvalidModelError(f"{what} fails onnx.checker: {str(error).splitlines()[0]}; "
                                "check the input with onnx.checker, else report this") from error


@dataclass(frozen=True)
class MergeOptions:
    """Every option of a merge, with its default."""

    method: str | None = None  # zip with calibration data, weight without
    alpha: float = 0.5
    beta: float = 1.0
    width: float | str | None = None  # zip: multiple of the widest model's width, or "min"
    heads: str = "separate"
    zip_layers: int | str | None = None  # None: every layer; "auto": chosen within max_loss
    max_loss: float = 0.05  # --zip-layers auto: argmax disagreement allowed on held-back samples
    repair: str = "auto"
    bn: str = "keep"
    input_layout: tuple[tuple[str, str], ...] = ()  # (model path or file name, layout such as NHWC)
    batch_size: int = 64
    max_samples: int | None = None
    repair_samples: int | None = None  # BN reset / REPAIR measures on this many samples (default all)
    provider: str = "auto"
    seed: int = 0
    align: str = "auto"  # depth alignment: auto (sma when depths differ), sma, lma, uniform, head-tail, none
    allow_few_samples: bool = False  # accept fewer than MIN_SAMPLES calibration samples
    strict: bool = False  # refuse a full merge that leaves most weight layers per model


@dataclass
class MergeResult:
    """The merged model and the JSON-ready report."""

    model: onnx.ModelProto
    report: dict = field(default_factory=dict)


def merge(paths: list[str], *, calibration: str | None = None, stats: list[str] | None = None,
          options: MergeOptions = MergeOptions()) -> MergeResult:
    """Merge models of one architecture into one ONNX model (method.md §2-4, 6-7).

    Args:
        paths: two or more ONNX files; model 0 is the reference whose graph the trunk keeps.
        calibration: .npz/.npy inputs for statistics (``--calib``).
        stats: statistics files from ``calibrate`` to use instead of (or with) calibration.
        options: see ``MergeOptions``; ``zip_layers="auto"`` chooses the cut (see tradeoff.py).
    """
    clock = time.perf_counter()
    check_options(options)
    if options.method is None:
        options = replace(options, method="zip" if calibration or stats else "weight")
    if len(paths) < 2:
        raise RecipeError("merge needs at least two models")
    if options.repair_samples is not None and options.repair_samples < 1:
        raise RecipeError(f"--repair-samples {options.repair_samples}: use at least 1 sample")
    prepared = _Prepared(*_prepare(paths, calibration, options))
    if options.zip_layers == "auto":
        return _merge_auto(paths, prepared, stats, options)
    return _merge_prepared(paths, prepared, stats, options, time.perf_counter() - clock)


@dataclass(frozen=True)
class _Prepared:
    """What every merge of these models starts from (see ``_prepare``)."""

    members: list[Member]
    post: list[PostProcessing]
    bn: str
    calib: CalibrationSet | None
    depth: DepthAlignment | None


def _merge_prepared(paths: list[str], prepared: _Prepared, stats: list[str] | None, options: MergeOptions,
                    analysed_s: float = 0.0) -> MergeResult:
    """The merge of prepared models with a given cut (``options.zip_layers`` an int or None)."""
    members, calib = prepared.members, prepared.calib
    method = get_method(options.method)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    split = split_trunk(members[0].model, members[0].graph, heads=options.heads, zip_layers=options.zip_layers)
    _check_coverage(members[0], split, options)
    timings["analyse_s"] = analysed_s + time.perf_counter() - clock
    clock = time.perf_counter()
    if method.needs_calibration and calib is None and not stats:
        raise RecipeError(f"--method {options.method} needs calibration data: pass --calib DATA or --stats FILES")
    units, unit_stats, provider = ([], [], "none")
    if calib is not None or stats:  # REPAIR needs the source statistics whatever the method
        units, unit_stats, provider = _statistics(members, split, calib, stats, options)
    timings["calibrate_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    matchings, summary = _match(members, split, units, unit_stats if method.needs_calibration else [], method, options)
    timings["match_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    merged = assemble(members, split, matchings, merged_trunk_parameters(members, split, matchings), heads=options.heads)
    resize_constants(merged, members[0].graph, reference_widths(members[0], matchings))
    merged, repair, repaired = _repair(merged, members, split, matchings, calib, options)
    _attach_postprocessing(merged, members, prepared.post, options.heads)
    merged = infer_shapes(merged)
    _record(merged, paths, options)
    check(merged, "merged model")
    timings["rewrite_s"] = time.perf_counter() - clock
    report = {"format": "onnxmerge.merge/1", "models": [str(p) for p in paths], "method": options.method,
              "options": asdict(options), "bn": prepared.bn, "provider": provider, "repair": repair,
              "repaired_tensors": repaired,
              "layers": f"{split.zipped_layers} of {split.total_layers} layers zipped",
              "weight_layers": {"merged": split.zipped_layers, "total": split.total_layers},
              "spaces": summary, "timings": timings}
    if prepared.depth is not None:
        report["alignment"] = describe_alignment(prepared.depth)
    return MergeResult(merged, report)


def _merge_auto(paths: list[str], prepared: _Prepared, stats: list[str] | None, options: MergeOptions) -> MergeResult:
    """``--zip-layers auto``: merge at every candidate cut on most calibration samples, measure
    each merge's loss on the held-back rest, and merge at the largest cut within ``max_loss``
    on all samples; the report's ``zip_layers_auto`` holds the measured curve."""
    if prepared.calib is None or stats:
        raise RecipeError("--zip-layers auto measures each cut on held-back calibration samples; "
                          "pass --calib DATA (and no --stats)")
    fit, held = tradeoff.split_samples(prepared.calib, options.seed)
    reference = prepared.members[0]
    ensemble = tradeoff.ensemble([m.model for m in prepared.members], held, options.batch_size, options.provider)
    points = []
    for cut in tradeoff.candidates(len(weight_layers(reference.model, reference.graph))):
        trial = _merge_prepared(paths, replace(prepared, calib=fit), stats, replace(options, zip_layers=cut))
        loss = tradeoff.loss(trial.model, ensemble, held, options.batch_size, options.provider,
                             lambda name, index: f"{name}_m{index}")
        points.append(tradeoff.Point(cut, loss, tradeoff.parameters(trial.model)))
        log.info("--zip-layers %d: loss %.4f on %d held-back samples", cut, loss, held.num_samples)
    chosen = tradeoff.choose(points, options.max_loss)
    result = _merge_prepared(paths, prepared, stats, replace(options, zip_layers=chosen.zip_layers))
    result.report["zip_layers_auto"] = {"max_loss": options.max_loss, "held_out_samples": held.num_samples,
                                        "chosen": chosen.zip_layers, "curve": [asdict(p) for p in points]}
    return result


def _check_coverage(reference: Member, split, options: MergeOptions) -> None:
    """A full merge that leaves most weight layers per model writes an ensemble, not a merged
    model: say so and name the first barriers (``--strict``: refuse)."""
    if options.zip_layers is not None or 2 * split.zipped_layers >= split.total_layers:
        return
    barriers = ", ".join(f"{b.node!r} ({b.op}: {b.reason})" for b in reference.graph.barriers[:3])
    message = (f"only {split.zipped_layers} of {split.total_layers} weight layers are merged, the rest stays per model; "
               f"first barriers: {barriers or 'none (fixed spaces reach into the trunk)'}; see onnxmerge inspect")
    if options.strict:
        raise UnsupportedGraphError(f"{message}; drop --strict to write it anyway")
    log.warning(message)


def _prepare(paths: list[str], calibration: str | None, options: MergeOptions):
    """Everything a merge starts from: members (canonical cores lined up with model 0's; models
    of different depths lifted into the deepest's topology, method.md §5), each model's
    post-processing, the BatchNormalization mode used, the calibration set and the depth
    alignment (None when depths agree)."""
    named, post, bn = _cores(paths, options)
    if options.heads == "shared":
        _check_shared_postprocessing(paths, post)
    calib = _calibration(calibration, [core for _, core in named], options) if calibration else None
    depth = None
    structures = [] if options.align == "none" else _structures(named)
    if needs_alignment(structures, options.align):
        depth = _align(named, structures, calib, options)
        named = list(zip([name for name, _ in named], lift_models(named, depth)))
    return _members(named), post, bn, calib, depth


def _members(named: list[tuple[str, onnx.ModelProto]]) -> list[Member]:
    analysed = [(name, model, find_spaces(model)) for name, model in named]
    return [Member(model, graph, correspond(analysed[0], (path, model, graph))) for path, model, graph in analysed]


def _cores(paths: list[str], options: MergeOptions) -> tuple[list[tuple[str, onnx.ModelProto]], list[PostProcessing], str]:
    """Each model's canonical core (post-processing split off) with its file name, the
    post-processing, and the BatchNormalization mode used: ``keep`` turns into ``fold`` when
    some models have BN nodes and others have it folded (exporters differ), so that they line up."""
    _check_layout_names(paths, options.input_layout)
    loaded: dict[str, onnx.ModelProto] = {}
    for path in paths:  # a file given twice is read, and warned about, once
        if os.path.realpath(path) not in loaded:
            loaded[os.path.realpath(path)] = load(path)
    models = common_opset([(str(path), _copy(loaded[os.path.realpath(path)])) for path in paths])
    models = [_with_input_layout(path, model, options.input_layout) for path, model in zip(paths, models)]
    analysed, bn = _split_all(models, options.bn), options.bn
    if bn == "keep" and len({_batch_norms(core) > 0 for core, _ in analysed}) > 1:
        log.warning("some models have BatchNormalization nodes and others have it folded: folding it in all")
        analysed, bn = _split_all(models, "fold"), "fold"
    named = [(str(path), core) for path, (core, _) in zip(paths, analysed)]
    check_same_inputs(named)
    return named, [post for _, post in analysed], bn


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _batch_norms(model: onnx.ModelProto) -> int:
    return sum(node.op_type == "BatchNormalization" for node in model.graph.node)


def _split_all(models: list[onnx.ModelProto], bn: str) -> list[tuple[onnx.ModelProto, PostProcessing]]:
    """(canonical core, post-processing) of each model."""
    return [split_postprocessing(canonicalize(model, bn=bn)) for model in models]


def _with_input_layout(path: str, model: onnx.ModelProto, layouts: tuple[tuple[str, str], ...]) -> onnx.ModelProto:
    """The model with a channels-first input when ``--input-layout`` names it."""
    layout = next((lay for name, lay in layouts if name in (str(path), os.path.basename(str(path)))), None)
    return model if layout is None else channels_first_input(model, layout, str(path))


def _check_layout_names(paths: list[str], layouts: tuple[tuple[str, str], ...]) -> None:
    names = {str(p) for p in paths} | {os.path.basename(str(p)) for p in paths}
    for name, layout in layouts:
        if name not in names:
            raise RecipeError(f"--input-layout {name}={layout}: {name} is none of the models "
                              f"({', '.join(str(p) for p in paths)}); name a model as given or by its file name")


def _check_shared_postprocessing(paths: list[str], post: list[PostProcessing]) -> None:
    """Shared heads are one head for all models: what follows it must be the same."""
    for path, tail in zip(paths[1:], post[1:]):
        if tail.describe() != post[0].describe():
            raise UnsupportedGraphError(
                f"{path}: after its last weight layer it computes {tail.describe()} where {paths[0]} computes "
                f"{post[0].describe()}; --heads shared needs the same output ops: use --heads separate")


def _attach_postprocessing(merged: onnx.ModelProto, members: list[Member], post: list[PostProcessing],
                           heads: str) -> None:
    """Each model's post-processing (skl2onnx labels, ZipMap) reads that model's own scores
    (model 0's alone with shared heads); each model's outputs keep their order."""
    order = []
    for index, (member, tail) in enumerate(zip(members[:1] if heads == "shared" else members, post)):
        def rename(name: str, index=index) -> str:
            return name if heads == "shared" else f"{name}_m{index}"

        attach_postprocessing(merged, tail, rename)
        order += [rename(name) for name in tail.output_names(member.model)]
    outputs = {o.name: o for o in merged.graph.output}
    reordered = [outputs[name] for name in order]
    del merged.graph.output[:]
    merged.graph.output.extend(reordered)


def _calibration(path: str, models: list[onnx.ModelProto], options: MergeOptions) -> CalibrationSet:
    specs = [input_specs(model) for model in models]
    calib = load_calibration(path, specs, max_samples=options.max_samples)
    if calib.num_samples < MIN_SAMPLES and not options.allow_few_samples:
        raise CalibrationError(f"{path}: {calib.num_samples} calibration samples are too few for correlations and "
                               f"repair statistics (at least {MIN_SAMPLES}, a few hundred is typical); "
                               "pass more samples, or --allow-few-samples to go on")
    check_variation(calib, options.allow_few_samples)
    return calib


def _structures(named: list[tuple[str, onnx.ModelProto]]) -> list[BlockStructure]:
    """Each model's blocks and stages; a model whose stages do not line up with those of the
    model with the most blocks is read in that model's stage pattern where its blocks fit."""
    structures = [find_blocks(model) for _, model in named]
    deepest = structures[int(np.argmax([len(s.blocks) for s in structures]))]
    return [s if lines_up(deepest, s) else (regroup_like(deepest, s) or s) for s in structures]


def _align(named: list[tuple[str, onnx.ModelProto]], structures: list[BlockStructure], calib: CalibrationSet | None,
           options: MergeOptions) -> DepthAlignment:
    batches = _batches(calib, len(named), options.batch_size) if calib is not None else None
    return align_depths(named, structures, options.align, batches, options.provider)


def align(paths: list[str], calibration: str | None = None, options: MergeOptions = MergeOptions()) -> DepthAlignment:
    """Block structure, CKA and the depth alignment of models onto the deepest (``onnxmerge align``)."""
    if len(paths) < 2:
        raise RecipeError("align needs at least two models")
    check_options(options)
    named, _, _ = _cores(paths, options)
    calib = _calibration(calibration, [m for _, m in named], options) if calibration else None
    return _align(named, _structures(named), calib,
                  replace(options, align="sma" if options.align in ("auto", "none") else options.align))


def _batches(calib: CalibrationSet, count: int, batch_size: int):
    return zip(*(calib.batches(i, batch_size) for i in range(count)))


def _plan(members: list[Member], split):
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


def _statistics(members: list[Member], split, calib, stats_files, options: MergeOptions):
    """Capture units of model 0, their statistics (computed and/or loaded), the provider used."""
    units, per_model, widths = _plan(members, split)
    fingerprint = _fingerprint(members, units)
    shards, provider = [], "none"
    if calib is not None:
        computed, provider = collect_statistics([m.model for m in members], per_model,
                                                _batches(calib, len(members), options.batch_size), widths, options.provider)
        shards.append(({_stats_key(u): s for u, s in zip(units, computed)}, {"fingerprint": fingerprint}))
    shards.extend(load_stats(path) for path in stats_files or [])
    if not shards:
        return units, [], provider
    for path, (_, meta) in zip(stats_files or [], shards[-len(stats_files or []):]):
        if meta.get("fingerprint") != fingerprint:
            raise CalibrationError(f"{path}: statistics of other models or options; recompute them with "
                                   "onnxmerge calibrate on the same models and --bn/--heads/--zip-layers")
    combined = combine_stats(shards)
    return units, [combined[_stats_key(u)] for u in units], provider


def calibrate(paths: list[str], calibration: str, options: MergeOptions = MergeOptions()) -> tuple[dict, dict]:
    """Statistics a merge of these models needs, as (stats by unit, meta) for ``save_stats``."""
    if options.zip_layers == "auto":
        raise RecipeError("--zip-layers auto tries several cuts, each with its own statistics; "
                          "give calibrate a number of layers, or merge --zip-layers auto with --calib")
    check_options(options)
    members, _, _, calib, _ = _prepare(paths, calibration, options)
    split = split_trunk(members[0].model, members[0].graph, heads=options.heads, zip_layers=options.zip_layers)
    units, stats, provider = _statistics(members, split, calib, None, options)
    meta = {"fingerprint": _fingerprint(members, units), "provider": provider, "samples": str(calib.num_samples)}
    return {_stats_key(u): s for u, s in zip(units, stats)}, meta


def _stats_key(unit: CaptureUnit) -> str:
    return f"{unit.tensor}:{unit.axis}"


def _fingerprint(members: list[Member], units: list[CaptureUnit]) -> str:
    """Identifies the statistics a plan needs, so shards of other models are refused."""
    digest = hashlib.sha256()
    for member in members:
        for init in member.model.graph.initializer:
            digest.update(init.raw_data[:4096])
    digest.update(";".join(_stats_key(u) for u in units).encode())
    return digest.hexdigest()[:16]


def _match(members: list[Member], split, units: list[CaptureUnit], stats: list, method, options: MergeOptions):
    """Matchings keyed by model 0's space ids, and the per-space report rows."""
    reference = members[0]
    params = method.make_params(alpha=options.alpha, beta=options.beta, seed=options.seed)
    run = _space_matcher(method, params, options.width)
    _check_widths(members, split.zipped, method)
    matchings: dict[int, Matching] = {}
    if method.graph_level:
        matchings.update(method.function(members, sorted(split.zipped), params))
    elif not method.needs_calibration:  # average: no statistics, but the same width checks
        for space in sorted(split.zipped):
            widths = [m.graph.table.widths[m.space_of(space)] for m in members]
            matchings[space] = method.function(None, widths, params, space=reference.graph.space(space).name)
    tensors, blocks = {}, reference.graph.block_spaces()
    for unit, unit_stats in zip(units, stats):
        for space, matching in _match_unit(reference, unit, unit_stats, run, matchings, blocks).items():
            matchings.setdefault(space, matching)
            tensors.setdefault(space, unit.tensor)
    matchings.update(_match_from_weights(members, sorted(set(split.zipped) - set(matchings)), matchings, options))
    rows = [{"space": reference.graph.space(space).name, "tensor": tensors.get(space),
             "widths": [m.graph.table.widths[m.space_of(space)] for m in members],
             "merged_width": matching.width, "mean_correlation": matching.mean_correlation,
             "within_model_merges": list(matching.within_model_merges)} for space, matching in sorted(matchings.items())]
    return matchings, rows


def _match_from_weights(members: list[Member], spaces: list[int], matchings: dict[int, Matching],
                        options: MergeOptions) -> dict[int, Matching]:
    """Spaces no statistics matched (no capturable tensor shows them) are matched from the
    weights, every other space's matching fixed: never left as the identity, which would
    merge unrelated features."""
    for space in spaces:
        widths = [m.graph.table.widths[m.space_of(space)] for m in members]
        if len(set(widths)) > 1:
            raise UnsupportedGraphError(
                f"space {members[0].graph.space(space).name} appears in no tensor the calibration can read, so it "
                f"is matched from the weights, which needs equal widths, and the models have {widths}; merge "
                "models of equal widths there")
    return match_weights(members, spaces, WeightParams(seed=options.seed), fixed=matchings) if spaces else {}


def _check_widths(members: list[Member], spaces, method) -> None:
    """Refuse, before any matching, widths that differ where they must agree: at a block space
    (conv groups, attention heads: matched one to one whatever the method) and, for methods
    that keep the width, everywhere."""
    reference = members[0]
    blocks = reference.graph.block_layers()
    for space in sorted(spaces):
        widths = [m.graph.table.widths[m.space_of(space)] for m in members]
        name = reference.graph.space(space).name
        if space in blocks and len(set(widths)) > 1:
            raise RecipeError(
                f"space {name}: the models have {widths} groups (or attention heads, or padded channels) at node "
                f"{blocks[space]!r}; groups, heads and padded channels are matched one to one whatever --method, so "
                "their counts must agree; merge models of equal widths there (a depthwise conv with a channel "
                "multiplier has one group per input channel)")
        if not method.unequal_widths:
            require_equal_widths(widths, method.name, name)


def _space_matcher(method, params, width: float | str | None):
    """The method on one space's correlation, with ``--width`` (a multiple of the widest
    model's width, or ``min``: the narrowest model's) turned into that space's target width."""
    def run(corr: np.ndarray, widths: list[int]) -> Matching:
        if width is None or not method.unequal_widths:
            return method.function(corr, widths, params)
        target = min(widths) if width == "min" else min(sum(widths), max(1, round(width * max(widths))))
        if max(widths) == 1:  # a one-channel axis may broadcast against wider ones: it stays one
            target = 1
        return method.function(corr, widths, replace(params, width=target))
    return run


def _match_unit(reference: Member, unit: CaptureUnit, unit_stats, run, known: dict, blocks: set[int]) -> dict:
    """Matchings of the spaces of one capture unit. Models with no features there (channels
    constant, as inside a lifted identity block: ``SpaceStats.models_vary``) are matched among
    the others only (method.md §5.5)."""
    corr = unit_stats.similarity()
    widths = list(unit_stats.widths)
    bounds = np.cumsum([0, *widths])
    live = [int(i) for i in np.flatnonzero(unit_stats.models_vary())]
    if not live or len(live) == len(widths):
        return _match_features(reference, unit, corr, widths, run, known, blocks)
    keep = np.concatenate([np.arange(bounds[i], bounds[i + 1]) for i in live])
    matched = _match_features(reference, unit, corr[np.ix_(keep, keep)], [widths[i] for i in live], run,
                              {}, blocks)
    per_space = {unit.spaces[0]: widths}
    if len(unit.spaces) == 2:  # a grid: block counts agree, blocks are w / count wide
        count = reference.graph.table.widths[unit.spaces[0]]
        per_space = {unit.spaces[0]: [count] * len(widths), unit.spaces[1]: [w // count for w in widths]}
    return {space: matching.spread(per_space[space], live) for space, matching in matched.items()}


def _match_features(reference: Member, unit: CaptureUnit, corr: np.ndarray, widths: list[int], run, known: dict,
                    blocks: set[int]) -> dict:
    """Block spaces (heads, groups) keep their count: they are assigned one to one whatever the method."""
    if len(unit.spaces) == 2:
        outer, inner = unit.spaces
        count = reference.graph.table.widths[outer]
        assignments = assignments_of(known[outer]) if outer in known else None
        block, within = match_grid(corr, count, [w // count for w in widths], run, assignments)
        return {outer: block, inner: within}
    (space,) = unit.spaces
    if space in blocks:
        return {space: permute_features(corr, widths, space=reference.graph.space(space).name)}
    return {space: run(corr, widths)}


def _repair(merged: onnx.ModelProto, members: list[Member], split, matchings, calib,
            options: MergeOptions) -> tuple[onnx.ModelProto, str, list[str]]:
    """BN reset or REPAIR of the merged model, as ``options.repair`` says (method.md §7); the
    report's line about it and the tensors REPAIR corrected."""
    if options.repair not in REPAIRS:
        raise RecipeError(f"unknown --repair {options.repair!r}; use one of {', '.join(REPAIRS)}")
    has_bn = any(n.op_type == "BatchNormalization" for n in merged.graph.node)
    mode = options.repair if options.repair != "auto" else ("reset" if has_bn else "repair")
    if mode == "none":
        return merged, "none", []
    if calib is None:
        if options.repair != "auto":
            raise RecipeError(f"--repair {mode} needs calibration data (--calib)")
        log.warning("no calibration data, so the merged model is not repaired (%s) and its accuracy may collapse; "
                    "pass --calib DATA (a few hundred inputs), or --repair none to silence this",
                    "BN reset" if mode == "reset" else "REPAIR")
        return merged, "none (no calibration data)", []
    if mode == "reset" and not has_bn:
        raise RecipeError("--repair reset needs BatchNormalization nodes; use --repair repair for BN-free models")
    # in random order: a file sorted by class would otherwise give single-class batches
    samples = calib.shuffled(options.repair_samples, options.seed)
    if len(samples) < MIN_SAMPLES:
        log.warning("the repair is measured on %d samples: its statistics may be noise and the accuracy may "
                    "collapse; measure on at least %d (--repair-samples, --calib)", len(samples), MIN_SAMPLES)

    def batches(index: int = 0):
        return calib.batches(index, options.batch_size, samples)

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


def _identity_problem(canonical: onnx.ModelProto, structure: BlockStructure, stage: int) -> str | None:
    """Why an identity copy of the stage's repeated unit cannot be built, or None when it can."""
    try:
        insert_identities(canonical, structure, [(stage, 0)], "deepen")
    except UnsupportedGraphError as error:
        return str(error)
    return None


def _record(model: onnx.ModelProto, paths: list[str], options: MergeOptions) -> None:
    """Store what produced the merged model in its metadata."""
    entries = {"onnxmerge.version": __version__, "onnxmerge.method": options.method,
               "onnxmerge.options": json.dumps(asdict(options), sort_keys=True)}
    for index, path in enumerate(paths):
        entries[f"onnxmerge.input{index}.sha256"] = model_sha256(path)
        entries[f"onnxmerge.input{index}.name"] = os.path.basename(str(path))
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def evaluate(paths: list[str], data: str, *, labels: str = "y", tasks: str | None = None,
             ensemble: bool = False, provider: str = "auto") -> list[dict]:
    """Accuracy rows (see evaluate.score): one per model, or one for their ensemble.

    ``tasks`` lists each head's classes across all heads scored together: for a two-head
    merged model or an ensemble of two models, ``0-4,5-9``; for one source model, its own
    classes (``0-4``).
    """
    task_lists = parse_tasks(tasks) if tasks else None
    models = [load_model(path) for path in paths]
    inputs, truth = load_test_data(data, [input_specs(m) for m in models], labels, [str(p) for p in paths])
    heads = [run_heads(model, inputs, provider, index=i, name=str(path))
             for i, (path, model) in enumerate(zip(paths, models))]
    if ensemble:
        joined = [h for model_heads in heads for h in model_heads]
        return [dict(model="ensemble(" + ", ".join(os.path.basename(str(p)) for p in paths) + ")",
                     **score(joined, truth, task_lists))]
    return [dict(model=str(path), **score(model_heads, truth, task_lists)) for path, model_heads in zip(paths, heads)]


def deepen(model: onnx.ModelProto, *, blocks: int, seed: int = 0, bn: str = "keep") -> onnx.ModelProto:
    """A function-preserving copy of ``model`` with ``blocks`` identity units inserted at random
    positions of its stages (each a copy of the stage's repeated unit with identity parameters).
    Stages whose repeated unit has no exact identity (a max pool, a concat, an activation of
    possibly negative inputs on its only path) are skipped; an error names the first reason
    when no stage has one."""
    if isinstance(blocks, int) and blocks < 1:
        raise RecipeError(f"--blocks {blocks}: insert at least one block")
    check_range("--blocks", blocks, 1, kind=int)
    check_seed(seed)
    canonical = canonicalize(model, bn=bn)
    structure = find_blocks(canonical)
    stages = [s for s, (start, stop) in enumerate(structure.stage_ranges()) if stop - start > 1]
    if not stages:
        raise UnsupportedGraphError("the model has no stage of repeated blocks to deepen (see onnxmerge inspect)")
    reasons = {s: _identity_problem(canonical, structure, s) for s in stages}
    if all(reasons.values()):
        raise UnsupportedGraphError(f"no stage's repeated block has an exact identity: {reasons[stages[0]]}")
    ranges = structure.stage_ranges()
    candidates = [(s, k) for s in stages if not reasons[s] for k in range(ranges[s][1] - ranges[s][0])]
    if blocks > MAX_DEEPEN_PER_BLOCK * len(candidates):
        raise RecipeError(f"--blocks {blocks}: the stages that can be deepened have {len(candidates)} blocks, so insert "
                          f"at most {MAX_DEEPEN_PER_BLOCK * len(candidates)} ({MAX_DEEPEN_PER_BLOCK} per block); "
                          "run deepen again on its output for more")
    rng = np.random.default_rng(seed)
    positions = [candidates[i] for i in rng.integers(len(candidates), size=blocks)]
    deeper = infer_shapes(insert_identities(canonical, structure, positions, "deepen"))
    check(deeper, "deepened model")
    return deeper
