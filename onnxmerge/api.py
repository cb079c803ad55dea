"""The Python API, which the CLI calls: ``onnxmerge.merge`` and the other public functions
re-exported by ``onnxmerge/__init__.py`` (docs/api.md). Models are paths or ``onnx.ModelProto``;
data are paths, arrays, dicts of arrays or iterables of batches (sources.py). Inputs are never
modified."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx

from . import __version__, inspection, tradeoff
from .choices import MIN_SAMPLES, REPAIRS
from .calib.capture import CaptureUnit, collect_statistics, plan_captures
from .calib.data import CalibrationSet, input_specs, load_calibration
from .calib.stats import combine_stats, load_stats
from .depth import DepthAlignment, align_depths, lift_models, needs_alignment
from .depth import describe as describe_alignment
from .errors import CalibrationError, InvalidModelError, RecipeError, UnsupportedGraphError
from .scoring import load_test_data, parse_tasks, run_heads, score
from .graph.blocks import BlockStructure, find_blocks, lines_up, regroup_like
from .graph.canonical import canonicalize, infer_shapes
from .graph.correspond import correspond
from .graph.interface import channels_first_input, check_same_inputs, common_opset
from .graph.postprocess import PostProcessing, attach_postprocessing, split_postprocessing
from .graph.spaces import SpaceGraph, find_spaces
from .io import check_writable, model_sha256, save_model
from .match import get_method
from .match.permute import permute as permute_features
from .match.permute import require_equal_widths
from .match.grid import assignments_of, match_grid
from .match.matching import Matching
from .match.weight import WeightParams, match_weights
from .options import MergeOptions, merge_options, recorded
from .progress import progress
from .recipe import Recipe, read_recipe
from .report import write_json, write_text
from .rewrite.apply import transform_parameters
from .rewrite.heads import split_trunk, weight_layers
from .rewrite.lift import insert_identities
from .rewrite.merge import Member, assemble, merged_trunk_parameters, reference_widths, resize_constants
from .rewrite.repair import insert_repair, repair_sources, repair_targets, reset_batch_norm, source_moments
from .rewrite.transform import Permutation
from .rewrite.widen import widening
from .samebase import check_fine_tunes, check_same_graph, combiner
from .sources import Data, DataLike, ModelLike, Source, read_data, read_models

log = logging.getLogger(__name__)


def load(model: ModelLike) -> onnx.ModelProto:
    """A model as the commands read it: a checked copy (``io.load_model`` for a file),
    refusing QOperator-quantized models and warning that QDQ-quantized ones are read in float
    (graph/quantized.py).

    Raises:
        InvalidModelError, UnsupportedGraphError: see ``sources.read_models``.
    """
    return read_models([model])[0].model


def analyse(model: onnx.ModelProto, *, bn: str = "keep") -> tuple[onnx.ModelProto, SpaceGraph]:
    """Canonicalise a model and find its feature spaces. The input is not modified."""
    canonical = canonicalize(model, bn=bn)
    return canonical, find_spaces(canonical)


def inspect(model: ModelLike, *, bn: str = "keep") -> dict:
    """The ``onnxmerge inspect`` report of a model (docs/inspect-json.md): its feature spaces,
    which are free to permute, and the barriers with their reasons.

    Args:
        model: an ONNX file's path or an ``onnx.ModelProto``.
        bn: ``keep`` BatchNormalization nodes or ``fold`` them into the convolutions.
    """
    source = read_models([model])[0]
    canonical, graph = analyse(source.model, bn=bn)
    return inspection.describe(source.name, canonical, graph)


def permute(model: ModelLike, *, seed: int = 0, bn: str = "keep") -> onnx.ModelProto:
    """Return a function-preserving copy of ``model`` with every free space randomly permuted.

    Attention heads are permuted as whole heads and, jointly, within heads; grouped channels
    likewise by groups and within groups (Git Re-Basin's permutation symmetry).

    Args:
        model: an ONNX file's path or an ``onnx.ModelProto`` (not modified).
        seed: seed of the random permutations.
        bn: ``keep`` or ``fold`` BatchNormalization.
    """
    canonical, graph = analyse(load(model), bn=bn)
    rng = np.random.default_rng(seed)
    orders = {space.id: Permutation(rng.permutation(space.width)) for space in graph.free_spaces}
    permuted = transform_parameters(canonical, graph, lambda space, role: orders.get(space))
    check(permuted, "permuted model")
    return permuted


def widen(model: ModelLike, *, factor: float, seed: int = 0, bn: str = "keep") -> onnx.ModelProto:
    """A function-preserving copy of ``model`` with each widenable space ``factor`` times as wide
    (Net2Net, Chen et al. 2016: copied channels, their consumers' weights split among the
    copies): spaces normalised, reduced or multiplied with other activations stay as they are.

    Args:
        model: an ONNX file's path or an ``onnx.ModelProto`` (not modified).
        factor: new width / old width, at least 1.
        seed: seed choosing the copied channels.
        bn: ``keep`` or ``fold`` BatchNormalization.

    Raises:
        RecipeError: ``factor`` below 1.
    """
    if factor < 1:
        raise RecipeError(f"--factor {factor} would narrow the model; use a factor of at least 1")
    canonical, graph = analyse(load(model), bn=bn)
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


@dataclass
class MergeResult:
    """A merged model with what describes it.

    Attributes:
        model: the merged ``onnx.ModelProto`` (checked with ``onnx.checker``; its
            metadata_props hold the onnxmerge version, the inputs' file names and sha256, the
            options and the recipe).
        report: the JSON-ready report (docs/report-json.md).
        recipe: what reproduces the merge (``onnxmerge run``); ``recipe.runnable`` is False
            when a model or the calibration data was given in memory.
    """

    model: onnx.ModelProto
    report: dict = field(default_factory=dict)
    recipe: Recipe | None = None

    def save(self, path: str | os.PathLike, *, report: str | os.PathLike | None = None,
             recipe: bool = True) -> list[str]:
        """Write the model to ``path`` (atomically, external data over 2 GB), its recipe to
        ``<path>.recipe.yaml`` when it is runnable and ``recipe`` is true, and the report as
        JSON to ``report`` when given; returns the paths written.

        Raises:
            OnnxMergeError: a path is not writable, or names an input or another output.
        """
        path = os.fspath(path)
        inputs = [] if self.recipe is None else self.recipe.input_paths()
        targets = {"merged model": path}
        if recipe and self.recipe is not None and self.recipe.runnable:
            targets["recipe"] = recipe_path(path)
        if report is not None:
            targets["report"] = os.fspath(report)
        written = list(targets.values())
        for index, (what, target) in enumerate(targets.items()):
            check_writable(target, what, [*inputs, *written[:index]])
        save_model(self.model, path)
        if "recipe" in targets:
            write_text(self.recipe.to_yaml(folder=os.path.dirname(os.path.abspath(path)), output=path,
                                           report=targets.get("report")), targets["recipe"], "recipe")
        if report is not None:
            write_json(self.report, targets["report"])
        return written


def recipe_path(output: str | os.PathLike) -> str:
    """Where a merge writes its recipe: ``<output>.recipe.yaml`` beside the model."""
    return f"{os.fspath(output)}.recipe.yaml"


def merge(models: Sequence[ModelLike], calibration: DataLike | None = None, *, base: ModelLike | None = None,
          stats: Sequence[str | os.PathLike] | None = None, options: MergeOptions | None = None,
          **settings) -> MergeResult:
    """Merge two or more models of one design (widths and depths may differ) into one ONNX model.

    Feature spaces are found in the graph; features are matched per space from their
    correlations on the calibration data (ZipIt!, Stoica et al. 2023; widths and depths that
    differ: Xu et al. 2024) or from the weights without data (Git Re-Basin weight matching,
    Ainsworth et al. 2022); the merged model is repaired (BN reset, or REPAIR, Jordan et al.
    2023). Fine-tunes of one base merge with the same-base methods instead: task arithmetic
    (Ilharco et al. 2023), TIES (Yadav et al. 2023), DARE (Yu et al. 2024), SLERP, linear
    (model soups) and RegMean (Jin et al. 2023). docs/method.md says what is computed.

    Args:
        models: two or more ONNX file paths or ``onnx.ModelProto``; model 0 is the reference
            whose graph the merged trunk keeps. Not modified.
        calibration: inputs for statistics and repair: a ``.npz``/``.npy`` path, a float32
            array ``[N, ...]`` (the models' sole input), a dict of arrays by input name, or an
            iterable of such batches (tensors with ``.numpy()`` work); a few hundred samples.
        base: the pre-trained model the ``models`` were fine-tuned from (task-arithmetic, ties
            and dare need it); a path or ``onnx.ModelProto``.
        stats: statistics files from ``calibrate`` to use instead of (or with) calibration.
        options: a ``MergeOptions`` to start from (default: every default).
        **settings: ``MergeOptions`` fields to set, e.g. ``method="zip"``, ``alpha=0.5``,
            ``width=1.5``, ``heads="separate"``, ``zip_layers="auto"``, ``repair="auto"``,
            ``scale=0.5``; ``method`` defaults to task-arithmetic with a base, else zip with
            calibration or stats, else weight.

    Returns:
        ``MergeResult``: ``.model``, ``.report``, ``.recipe`` and ``.save(path)``.

    Raises:
        OnnxMergeError: invalid models or data, options that do not fit, or graphs onnxmerge
            cannot merge; the message says what, where and what to do.
    """
    clock = time.perf_counter()
    options = merge_options(options, **settings)
    sources = read_models(models)
    base_source = None if base is None else read_models([base])[0]
    data = None if calibration is None else read_data(calibration)
    stats = [os.fspath(path) for path in stats or []]
    if options.method is None:
        default = "task-arithmetic" if base is not None else "zip" if data is not None or stats else "weight"
        options = replace(options, method=default)
    if base is not None and not get_method(options.method).same_base:
        raise RecipeError(f"--base is the pre-trained model of the same-base methods; --method {options.method} "
                          "does not read it: drop --base or use task-arithmetic, ties or dare")
    if len(sources) < (1 if get_method(options.method).same_base else 2):
        raise RecipeError("merge needs at least two models (one fine-tune with --base for the same-base methods)")
    if options.repair_samples is not None and options.repair_samples < 1:
        raise RecipeError(f"--repair-samples {options.repair_samples}: use at least 1 sample")
    options = _layouts_by_file_name(sources, options)
    prepared = _Prepared(*_prepare(sources, data, options, stats, base_source))
    if options.zip_layers == "auto":
        result = _merge_auto(sources, prepared, stats, options)
    else:
        result = _merge_prepared(sources, prepared, stats, options, time.perf_counter() - clock)
    result.recipe = Recipe.of(sources, data, stats, options, base_source)
    _record(result.model, sources, result.recipe)
    check(result.model, "merged model")
    return result


def run(recipe: str | os.PathLike) -> MergeResult:
    """Run a recipe file (``onnxmerge run``): merge what it names and write its ``output``
    (and ``report``), and ``<output>.recipe.yaml`` unless that is the file being run. A recipe
    that a merge wrote gives the same model, byte for byte.

    Raises:
        RecipeError: the recipe is invalid (file, line and key named), names no output, or a
            file's sha256 differs from the recipe's.
        OnnxMergeError: as ``merge``.
    """
    recipe = os.fspath(recipe)
    plan = read_recipe(recipe)
    if plan.output is None:
        raise RecipeError(f"{recipe}: no output; add `output: merged.onnx` (relative to the recipe's folder)")
    for entry in plan.entries():
        if entry.sha256 is not None and model_sha256(entry.path) != entry.sha256:
            raise RecipeError(f"{recipe}: {entry.path} is not the file the recipe was written for (sha256 differs); "
                              "restore that file, or delete its sha256 line to merge this one")
    check_writable(plan.output, "merged model", [recipe, *plan.input_paths()])
    calibration = plan.calibration.path if plan.calibration else None
    result = merge([m.path for m in plan.models], calibration, base=plan.base.path if plan.base else None,
                   stats=[s.path for s in plan.stats], options=plan.options)
    same = os.path.exists(recipe_path(plan.output)) and os.path.samefile(recipe, recipe_path(plan.output))
    result.save(plan.output, report=plan.report, recipe=not same)
    result.recipe = replace(result.recipe, output=plan.output, report=plan.report)
    return result


@dataclass(frozen=True)
class _Prepared:
    """What every merge of these models starts from (see ``_prepare``)."""

    members: list[Member]
    post: list[PostProcessing]
    bn: str
    calib: CalibrationSet | None
    depth: DepthAlignment | None
    base: Member | None = None  # same-base methods: the base, lined up with model 0


def _merge_prepared(sources: list[Source], prepared: _Prepared, stats: list[str], options: MergeOptions,
                    analysed_s: float = 0.0) -> MergeResult:
    """The merge of prepared models with a given cut (``options.zip_layers`` an int or None)."""
    members, calib = prepared.members, prepared.calib
    method = get_method(options.method)
    timings: dict[str, float] = {"analyse_s": analysed_s}
    clock = time.perf_counter()
    split = split_trunk(members[0].model, members[0].graph, heads=options.heads, zip_layers=options.zip_layers)
    _check_coverage(members[0], split, options)
    clock = _lap(timings, "analyse", clock)
    if method.needs_calibration and calib is None and not stats:
        raise RecipeError(f"--method {options.method} needs calibration data: pass --calib DATA or --stats FILES")
    units, unit_stats, provider = ([], [], "none")
    if (calib is not None or stats) and not method.same_base:  # matching statistics (same-base: none needed)
        units, unit_stats, provider = _statistics(members, split, calib, stats, options)
    clock = _lap(timings, "calibrate", clock)
    matchings, summary = _match(members, split, units, unit_stats if method.needs_calibration else [], method, options)
    clock = _lap(timings, "match", clock)
    combine = None
    if method.same_base:
        trunk = [k for k in range(len(members[0].model.graph.node)) if k not in split.head_nodes]
        batches = None if calib is None else lambda what: _batches(calib, len(members), options.batch_size, what)
        combine = combiner(method, method.make_params(**asdict(options)), members, prepared.base, trunk, batches,
                           options.provider, options.seed)
    parameters = merged_trunk_parameters(members, split, matchings, combine)
    merged = assemble(members, split, matchings, parameters, heads=options.heads)
    resize_constants(merged, members[0].graph, reference_widths(members[0], matchings))
    merged, repair, repaired = _repair(merged, members, split, matchings, calib, options, method.same_base)
    _attach_postprocessing(merged, members, prepared.post, options.heads)
    merged = infer_shapes(merged)
    _lap(timings, "rewrite", clock)
    report = {"format": "onnxmerge.merge/1", "models": [s.name for s in sources], "method": options.method,
              "options": asdict(options), "bn": prepared.bn, "provider": provider, "repair": repair,
              "repaired_tensors": repaired,
              "layers": f"{split.zipped_layers} of {split.total_layers} layers zipped",
              "weight_layers": {"merged": split.zipped_layers, "total": split.total_layers},
              "spaces": summary, "timings": timings}
    if prepared.depth is not None:
        report["alignment"] = describe_alignment(prepared.depth)
    return MergeResult(merged, report)


def _lap(timings: dict[str, float], stage: str, start: float) -> float:
    """Add the seconds since ``start`` to ``timings[stage + "_s"]``, log them (``-v``) and
    return the time now."""
    now = time.perf_counter()
    timings[f"{stage}_s"] = timings.get(f"{stage}_s", 0.0) + now - start
    log.info("%s: %.2f s", stage, timings[f"{stage}_s"])
    return now


def _merge_auto(sources: list[Source], prepared: _Prepared, stats: list[str], options: MergeOptions) -> MergeResult:
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
    cuts = tradeoff.candidates(len(weight_layers(reference.model, reference.graph)))
    for cut in progress(cuts, "--zip-layers auto", len(cuts), "cut"):
        trial = _merge_prepared(sources, replace(prepared, calib=fit), stats, replace(options, zip_layers=cut))
        loss = tradeoff.loss(trial.model, ensemble, held, options.batch_size, options.provider,
                             lambda name, index: f"{name}_m{index}")
        points.append(tradeoff.Point(cut, loss, tradeoff.parameters(trial.model)))
        log.info("--zip-layers %d: loss %.4f on %d held-back samples", cut, loss, held.num_samples)
    chosen = tradeoff.choose(points, options.max_loss)
    result = _merge_prepared(sources, prepared, stats, replace(options, zip_layers=chosen.zip_layers))
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


def _prepare(sources: list[Source], data: Data | None, options: MergeOptions, stats: Sequence[str] = (),
             base: Source | None = None):
    """Everything a merge starts from: members (canonical cores lined up with model 0's; models
    of different depths lifted into the deepest's topology, method.md §5), each model's
    post-processing, the BatchNormalization mode used, the calibration set and the depth
    alignment (None when depths agree), and the base of a same-base merge (None without).
    Without data, an alignment is read from the statistics files when ``calibrate`` stored one."""
    if options.method and get_method(options.method).same_base:
        return _prepare_same_base(sources, data, options, base)
    named, post, bn = _cores(sources, options)
    if options.heads == "shared":
        _check_shared_postprocessing([s.name for s in sources], post)
    calib = _calibration(data, named, options) if data is not None else None
    depth = None
    structures = [] if options.align == "none" else _structures(named)
    if needs_alignment(structures, options.align):
        stored = _stored_alignment(named, structures, stats) if calib is None else None
        depth = stored or _align(named, structures, calib, options)
        named = list(zip([name for name, _ in named], lift_models(named, depth)))
    return _members(named), post, bn, calib, depth, None


def _prepare_same_base(sources: list[Source], data: Data | None, options: MergeOptions, base: Source | None):
    """``_prepare`` for fine-tunes of one base: the same graph for every model and the base
    (else refused), no depth alignment; the base is canonicalised with them and lined up."""
    everything = [*sources, *([base] if base else [])]
    named, post, bn = _cores(everything, options)
    reference = named[0][1]
    heads = split_trunk(reference, find_spaces(reference), heads=options.heads).head_nodes
    check_same_graph(named, heads)  # heads kept per model may have other label counts
    members = _members(named)
    base_member = members.pop() if base else None
    post = post[:len(sources)]
    inits = {i.name for i in reference.graph.initializer}
    names = [n for k, node in enumerate(reference.graph.node) if k not in heads for n in node.input if n in inits]
    check_fine_tunes(members, base_member, list(dict.fromkeys(names)), [s.name for s in sources])
    calib = _calibration(data, named[:len(sources)], options) if data is not None else None
    return members, post, bn, calib, None, base_member


def _stored_alignment(named: list[tuple[str, onnx.ModelProto]], structures: list[BlockStructure],
                      stats: Sequence[str]) -> DepthAlignment | None:
    """The depth alignment ``calibrate`` stored in the first statistics file, or None. A file
    of other models is refused later by its fingerprint (lifting changes what is captured)."""
    text = load_stats(stats[0])[1].get("alignment") if stats else None
    if not text:
        return None
    stored = json.loads(text)
    sizes = [len(s.units) for s in structures]
    maps = {int(i): mapping for i, mapping in stored["maps"].items()}
    if sorted(maps) != list(range(len(named))) or any(len(m) != max(sizes) for m in maps.values()):
        raise CalibrationError(f"{stats[0]}: its depth alignment is for other models; recompute the statistics "
                               "with onnxmerge calibrate on the same models")
    return DepthAlignment(stored["method"], [name for name, _ in named], structures, int(np.argmax(sizes)), maps)


def _members(named: list[tuple[str, onnx.ModelProto]]) -> list[Member]:
    analysed = [(name, model, find_spaces(model)) for name, model in named]
    return [Member(model, graph, correspond(analysed[0], (path, model, graph))) for path, model, graph in analysed]


def _cores(sources: list[Source], options: MergeOptions) -> tuple[list[tuple[str, onnx.ModelProto]], list[PostProcessing], str]:
    """Each model's canonical core (post-processing split off) with its name, the
    post-processing, and the BatchNormalization mode used: ``keep`` turns into ``fold`` when
    some models have BN nodes and others have it folded (exporters differ), so that they line up."""
    models = common_opset([(s.name, _copy(s.model)) for s in sources])
    models = [_with_input_layout(s, model, options.input_layout) for s, model in zip(sources, models)]
    analysed, bn = _split_all(models, options.bn), options.bn
    if bn == "keep" and len({_batch_norms(core) > 0 for core, _ in analysed}) > 1:
        log.warning("some models have BatchNormalization nodes and others have it folded: folding it in all")
        analysed, bn = _split_all(models, "fold"), "fold"
    named = [(s.name, core) for s, (core, _) in zip(sources, analysed)]
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
    return [split_postprocessing(canonicalize(model, bn=bn)) for model in progress(models, "canonicalise", unit="model")]


def _with_input_layout(source: Source, model: onnx.ModelProto, layouts: tuple[tuple[str, str], ...]) -> onnx.ModelProto:
    """The model with a channels-first input when ``--input-layout`` names it."""
    layout = next((lay for name, lay in layouts if name == source.file_name), None)
    return model if layout is None else channels_first_input(model, layout, source.name)


def _layouts_by_file_name(sources: list[Source], options: MergeOptions) -> MergeOptions:
    """``input_layout`` with each model named by its file name (as metadata and recipes store
    it: never a folder), after checking that every name is one of the models."""
    by_name = {s.name: s.file_name for s in sources} | {s.file_name: s.file_name for s in sources}
    for name, layout in options.input_layout:
        if name not in by_name:
            raise RecipeError(f"--input-layout {name}={layout}: {name} is none of the models "
                              f"({', '.join(s.name for s in sources)}); name a model as given or by its file name")
    return replace(options, input_layout=tuple((by_name[name], layout) for name, layout in options.input_layout))


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


def _calibration(data: Data, named: list[tuple[str, onnx.ModelProto]], options: MergeOptions) -> CalibrationSet:
    specs = [input_specs(model) for _, model in named]
    calib = load_calibration(data.content, specs, max_samples=options.max_samples,
                             model_names=[name for name, _ in named])
    if calib.num_samples < MIN_SAMPLES and not options.allow_few_samples:
        raise CalibrationError(f"{data.name}: {calib.num_samples} calibration samples are too few for correlations and "
                               f"repair statistics (at least {MIN_SAMPLES}, a few hundred is typical); "
                               "pass more samples, or --allow-few-samples to go on")
    return calib


def _structures(named: list[tuple[str, onnx.ModelProto]]) -> list[BlockStructure]:
    """Each model's blocks and stages; a model whose stages do not line up with those of the
    model with the most blocks is read in that model's stage pattern where its blocks fit."""
    structures = [find_blocks(model) for _, model in named]
    deepest = structures[int(np.argmax([len(s.blocks) for s in structures]))]
    return [s if lines_up(deepest, s) else (regroup_like(deepest, s) or s) for s in structures]


def _align(named: list[tuple[str, onnx.ModelProto]], structures: list[BlockStructure], calib: CalibrationSet | None,
           options: MergeOptions) -> DepthAlignment:
    batches = _batches(calib, len(named), options.batch_size, "CKA") if calib is not None else None
    return align_depths(named, structures, options.align, batches, options.provider)


def align(models: Sequence[ModelLike], calibration: DataLike | None = None, *, options: MergeOptions | None = None,
          **settings) -> DepthAlignment:
    """Block structure, CKA and the depth alignment of models onto the deepest (``onnxmerge align``;
    Xu et al. 2024: segment-wise ``sma`` or layer-wise ``lma`` alignment on linear CKA,
    Kornblith et al. 2019).

    Args:
        models: two or more ONNX file paths or ``onnx.ModelProto`` of one design.
        calibration: data as for ``merge``; needed by ``align="sma"`` (default) and ``"lma"``.
        options, **settings: as for ``merge``; ``align`` picks the method (auto and none mean sma).

    Returns:
        ``DepthAlignment``; ``onnxmerge.describe_alignment(result)`` is the JSON-ready report.
    """
    options = merge_options(options, **settings)
    sources = read_models(models)
    if len(sources) < 2:
        raise RecipeError("align needs at least two models")
    named, _, _ = _cores(sources, _layouts_by_file_name(sources, options))
    calib = _calibration(read_data(calibration), named, options) if calibration is not None else None
    return _align(named, _structures(named), calib,
                  replace(options, align="sma" if options.align in ("auto", "none") else options.align))


def _batches(calib: CalibrationSet, count: int, batch_size: int, what: str = "statistics"):
    """Per step, the feeds of ``count`` models (the same samples), with a progress bar."""
    steps = -(-calib.num_samples // calib.batch_size(batch_size))
    return progress(zip(*(calib.batches(i, batch_size) for i in range(count))), what, steps, "batch")


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
        if options.ray is not None:  # shards of the samples on Ray workers (docs/scale.md)
            from .calib.distributed import collect_on_ray
            computed, provider = collect_on_ray([m.model for m in members], per_model, calib, widths, options)
        else:
            computed, provider = collect_statistics([m.model for m in members], per_model,
                                                    _batches(calib, len(members), options.batch_size), widths,
                                                    options.provider)
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


def calibrate(models: Sequence[ModelLike], calibration: DataLike, *, options: MergeOptions | None = None,
              **settings) -> tuple[dict, dict]:
    """The statistics a merge of these models needs, computed on ``calibration``, to save with
    ``calib.stats.save_stats`` and pass to ``merge(stats=...)`` (shards of the same models and
    options add up exactly).

    Args:
        models, calibration, options, **settings: as for ``merge`` (the options that shape
            the plan must be the merge's: bn, heads, zip_layers, align, input_layout).

    Returns:
        (statistics by capture unit, string metadata with the plan's fingerprint).
    """
    options = merge_options(options, **settings)
    if options.zip_layers == "auto":
        raise RecipeError("--zip-layers auto tries several cuts, each with its own statistics; "
                          "give calibrate a number of layers, or merge --zip-layers auto with --calib")
    sources = read_models(models)
    members, _, _, calib, depth, _ = _prepare(sources, read_data(calibration), _layouts_by_file_name(sources, options))
    split = split_trunk(members[0].model, members[0].graph, heads=options.heads, zip_layers=options.zip_layers)
    units, stats, provider = _statistics(members, split, calib, None, options)
    meta = {"fingerprint": _fingerprint(members, units), "provider": provider, "samples": str(calib.num_samples)}
    if depth is not None:  # merge --stats without data lifts the models the same way
        meta["alignment"] = json.dumps({"method": depth.method, "maps": {str(i): m for i, m in depth.maps.items()}})
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
    params = method.make_params(**asdict(options))
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
    for unit, unit_stats in progress(zip(units, stats), "matching", len(stats), "unit"):
        for space, matching in _match_unit(reference, unit, unit_stats, run, matchings, blocks).items():
            matchings.setdefault(space, matching)
            tensors.setdefault(space, unit.tensor)
    matchings.update(_match_from_weights(members, sorted(set(split.zipped) - set(matchings)), matchings, options))
    rows = [{"space": reference.graph.space(space).name, "tensor": tensors.get(space),
             "widths": [m.graph.table.widths[m.space_of(space)] for m in members],
             "merged_width": matching.width,
             "mean_correlation": None if np.isnan(matching.mean_correlation) else matching.mean_correlation,
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


def _identity_problem(canonical: onnx.ModelProto, structure: BlockStructure, stage: int) -> str | None:
    """Why an identity copy of the stage's repeated unit cannot be built, or None when it can."""
    try:
        insert_identities(canonical, structure, [(stage, 0)], "deepen")
    except UnsupportedGraphError as error:
        return str(error)
    return None


def _record(model: onnx.ModelProto, sources: list[Source], recipe: Recipe) -> None:
    """Store what produced the merged model in its metadata: file names and sha256 only,
    never folders."""
    entries = {"onnxmerge.version": __version__, "onnxmerge.method": recipe.options.method,
               "onnxmerge.options": json.dumps(recorded(recipe.options), sort_keys=True)}
    for index, source in enumerate(sources):
        entries[f"onnxmerge.input{index}.sha256"] = source.sha256
        entries[f"onnxmerge.input{index}.name"] = source.file_name
    entries["onnxmerge.recipe"] = recipe.to_yaml()
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def evaluate(models: Sequence[ModelLike], data: str | os.PathLike | dict, *, labels: str = "y",
             tasks: str | None = None, ensemble: bool = False, provider: str = "auto") -> list[dict]:
    """Accuracy of models on class-split tasks (docs/method.md, evaluation): one row per model,
    or one for their ensemble, each ``{"model", "joint", "tasks": {name: accuracy}, "average"}``
    with accuracies in [0, 1].

    Args:
        models: ONNX file paths or ``onnx.ModelProto`` (a merged multi-head model, or sources).
        data: an ``.npz`` path, or a dict of arrays: the inputs by name (or one array) and the
            integer labels ``[N]`` under ``labels``.
        labels: the name of the labels array.
        tasks: each head's classes across all heads scored together: for a two-head merged
            model or an ensemble of two models ``0-4,5-9``; for one source model its own
            classes (``0-4``). Default: one head, classes 0..k-1.
        ensemble: score the models' outputs together as one multi-head model.
        provider: onnxruntime provider: auto, cpu or cuda.
    """
    inputs, truth = load_test_data(data, labels)
    task_lists = parse_tasks(tasks) if tasks else None
    sources = read_models(models)
    heads = [run_heads(source.model, inputs, provider) for source in sources]
    if ensemble:
        joined = [h for model_heads in heads for h in model_heads]
        return [dict(model="ensemble(" + ", ".join(s.file_name for s in sources) + ")",
                     **score(joined, truth, task_lists))]
    return [dict(model=s.name, **score(model_heads, truth, task_lists)) for s, model_heads in zip(sources, heads)]


def deepen(model: ModelLike, *, blocks: int, seed: int = 0, bn: str = "keep") -> onnx.ModelProto:
    """A function-preserving copy of ``model`` with ``blocks`` identity units inserted at random
    positions of its stages (each a copy of the stage's repeated unit with identity parameters).
    Stages whose repeated unit has no exact identity (a max pool, a concat, an activation of
    possibly negative inputs on its only path) are skipped; an error names the first reason
    when no stage has one (Xu et al. 2024 lift shallower models with such identity blocks).

    Args:
        model: an ONNX file's path or an ``onnx.ModelProto`` (not modified).
        blocks: how many identity blocks to insert, at least 1.
        seed: seed choosing the positions.
        bn: ``keep`` or ``fold`` BatchNormalization.
    """
    if blocks < 1:
        raise RecipeError(f"--blocks {blocks}: insert at least one block")
    canonical = canonicalize(load(model), bn=bn)
    structure = find_blocks(canonical)
    stages = [s for s, (start, stop) in enumerate(structure.stage_ranges()) if stop - start > 1]
    if not stages:
        raise UnsupportedGraphError("the model has no stage of repeated blocks to deepen (see onnxmerge inspect)")
    reasons = {s: _identity_problem(canonical, structure, s) for s in stages}
    if all(reasons.values()):
        raise UnsupportedGraphError(f"no stage's repeated block has an exact identity: {reasons[stages[0]]}")
    ranges = structure.stage_ranges()
    candidates = [(s, k) for s in stages if not reasons[s] for k in range(ranges[s][1] - ranges[s][0])]
    rng = np.random.default_rng(seed)
    positions = [candidates[i] for i in rng.integers(len(candidates), size=blocks)]
    deeper = infer_shapes(insert_identities(canonical, structure, positions, "deepen"))
    check(deeper, "deepened model")
    return deeper
