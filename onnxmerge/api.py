"""The Python API, which the CLI calls: ``onnxmerge.merge`` and the other public functions
re-exported by ``onnxmerge/__init__.py`` (docs/api.md). Models are paths or ``onnx.ModelProto``;
data are paths, arrays, dicts of arrays or iterables of batches (sources.py). Inputs are never
modified."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, replace

from . import tradeoff
from .depth import DepthAlignment
from .depth import describe as describe_alignment
from .errors import RecipeError
from .graph.shapes import infer_shapes
from .io import check_writable, model_sha256
from .limits import check_options
from .match import get_method
from .models import analyse, check, deepen, inspect, load, permute, widen  # noqa: F401 (the public API)
from .options import MergeOptions, merge_options
from .progress import lap
from .recipe import Recipe, read_recipe
from .results import MergeResult, recipe_path, record  # noqa: F401 (the public API)
from .rewrite.heads import split_trunk
from .scoring import accuracies, parse_tasks
from .sources import DataLike, ModelLike, Source, read_data, read_models
from .stages.assembly import assemble_merged, attach_model_postprocessing, check_coverage
from .stages.matching import match_spaces, matching_method
from .stages.prepare import (Prepared, align_models, block_structures, calibration_set, cores, layouts_by_file_name,
                             prepare)
from .stages.repair import repair_merged
from .stages.statistics import calibration_statistics, statistics


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
        calibration: inputs for statistics and repair: a ``.npz``/``.npy`` path, a list of
            such paths (shards of one data set with the same arrays, read in order), a float32
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
    check_options(options)
    sources = read_models(models)
    base_source = None if base is None else read_models([base])[0]
    data = None if calibration is None else read_data(calibration)
    stats = [os.fspath(path) for path in stats or []]
    if options.method is None:
        default = "task-arithmetic" if base is not None else "zip" if data is not None or stats else "weight"
        options = replace(options, method=default)
    chosen = get_method(options.method)
    if base is not None and not chosen.needs_base:
        raise RecipeError(f"--base is the pre-trained model that task-arithmetic, ties and dare add task vectors to; "
                          f"--method {options.method} does not read it: drop --base or use one of those")
    if options.align_first and not chosen.same_base:
        raise RecipeError(f"--align-first aligns models before a same-base method combines them; --method "
                          f"{options.method} aligns by itself (zip, permute, weight) or not at all (average): drop it")
    if len(sources) < (1 if get_method(options.method).same_base else 2):
        raise RecipeError("merge needs at least two models (one fine-tune with --base for the same-base methods)")
    if options.repair_samples is not None and options.repair_samples < 1:
        raise RecipeError(f"--repair-samples {options.repair_samples}: use at least 1 sample")
    options = layouts_by_file_name(sources, options)
    prepared = Prepared(*prepare(sources, data, options, stats, base_source))
    if options.zip_layers == "auto":
        result = tradeoff.merge_auto(prepared, bool(stats), options,
                                     lambda at, cut: _merge_prepared(sources, at, stats, cut))
    else:
        result = _merge_prepared(sources, prepared, stats, options, time.perf_counter() - clock)
    result.recipe = Recipe.of(sources, data, stats, options, base_source)
    record(result.model, sources, result.recipe)
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
    if plan.report is not None:  # before any work, as the merge command
        check_writable(plan.report, "report", [recipe, *plan.input_paths(), plan.output])
    calibration = [entry.path for entry in plan.calibration] or None
    result = merge([m.path for m in plan.models], calibration, base=plan.base.path if plan.base else None,
                   stats=[s.path for s in plan.stats], options=plan.options)
    same = os.path.exists(recipe_path(plan.output)) and os.path.samefile(recipe, recipe_path(plan.output))
    result.save(plan.output, report=plan.report, recipe=not same)
    result.recipe = replace(result.recipe, output=plan.output, report=plan.report)
    return result


def _merge_prepared(sources: list[Source], prepared: Prepared, stats: list[str], options: MergeOptions,
                    analysed_s: float = 0.0) -> MergeResult:
    """The merge of prepared models with a given cut (``options.zip_layers`` an int or None)."""
    members, calib = prepared.members, prepared.calib
    method = get_method(options.method)
    timings: dict[str, float] = {"analyse_s": analysed_s}
    clock = time.perf_counter()
    split = split_trunk(members[0].model, members[0].graph, heads=options.heads, zip_layers=options.zip_layers)
    check_coverage(members[0], split, options)
    clock = lap(timings, "analyse", clock)
    if method.needs_calibration and calib is None and not stats:
        raise RecipeError(f"--method {options.method} needs calibration data: pass --calib DATA or --stats FILES")
    matcher = matching_method(method, options, calib is not None or bool(stats))
    units, unit_stats, provider = ([], [], "none")
    if (calib is not None or stats) and matcher.needs_calibration:
        units, unit_stats, provider = statistics(members, split, calib, stats, options)
    clock = lap(timings, "calibrate", clock)
    matchings, summary = match_spaces(members, split, units, unit_stats, matcher, options)
    clock = lap(timings, "match", clock)
    merged = assemble_merged(members, split, matchings, prepared.base, method, options, calib)
    merged, repair, repaired = repair_merged(merged, members, split, matchings, calib, options, method.same_base, stats)
    merged = attach_model_postprocessing(merged, members, prepared.post, options.heads)
    merged = infer_shapes(merged)
    lap(timings, "rewrite", clock)
    report = {"format": "onnxmerge.merge/1", "models": [s.name for s in sources], "method": options.method,
              "options": asdict(options), "bn": prepared.bn, "provider": provider, "repair": repair,
              "repaired_tensors": repaired,
              "layers": f"{split.zipped_layers} of {split.total_layers} layers {'merged' if method.same_base else 'zipped'}",
              "weight_layers": {"merged": split.zipped_layers, "total": split.total_layers},
              "spaces": summary, "timings": timings}
    if prepared.depth is not None:
        report["alignment"] = describe_alignment(prepared.depth)
    return MergeResult(merged, report)


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
    check_options(options)
    named, _, _ = cores(sources, layouts_by_file_name(sources, options))
    calib = calibration_set(read_data(calibration), named, options) if calibration is not None else None
    return align_models(named, block_structures(named), calib,
                  replace(options, align="sma" if options.align in ("auto", "none") else options.align))


def calibrate(models: Sequence[ModelLike], calibration: DataLike, *, options: MergeOptions | None = None,
              **settings) -> tuple[dict, dict]:
    """The statistics a merge of these models needs, computed on ``calibration``, to save with
    ``calib.stats.save_stats`` and pass to ``merge(stats=...)`` (shards of the same models and
    options add up exactly): the feature statistics matching reads, and the source moments
    REPAIR reads (every repairable layer output of every model, whatever the cut), so that a
    merge with these files measures only the merged model for REPAIR.

    Args:
        models, calibration, options, **settings: as for ``merge`` (the options that shape
            the plan must be the merge's: bn, heads, zip_layers, align, input_layout).

    Returns:
        (statistics by capture unit with their source moments in ``.moments``, a
        ``calib.stats.Statistics``; string metadata with the plan's fingerprint).
    """
    options = merge_options(options, **settings)
    if options.zip_layers == "auto":
        raise RecipeError("--zip-layers auto tries several cuts, each with its own statistics; "
                          "give calibrate a number of layers, or merge --zip-layers auto with --calib")
    check_options(options)
    sources = read_models(models)
    members, _, _, calib, depth, _ = prepare(sources, read_data(calibration), layouts_by_file_name(sources, options))
    return calibration_statistics(members, calib, depth, options)


def evaluate(models: Sequence[ModelLike], data: str | os.PathLike | Sequence[str | os.PathLike] | dict, *,
             labels: str = "y", tasks: str | None = None, ensemble: bool = False,
             provider: str = MergeOptions.provider) -> list[dict]:
    """Accuracy of models on class-split tasks (docs/method.md, evaluation): one row per model,
    or one for their ensemble, each ``{"model", "joint", "tasks": {name: accuracy}, "average"}``
    with accuracies in [0, 1].

    Args:
        models: ONNX file paths or ``onnx.ModelProto`` (a merged multi-head model, or sources).
        data: an ``.npz`` path (or a list of them: one test set, in file order), or a dict of
            arrays: the inputs by name (or one array) and the integer labels ``[N]`` under ``labels``.
        labels: the name of the labels array.
        tasks: each head's classes across all heads scored together: for a two-head merged
            model or an ensemble of two models ``0-4,5-9``; for one source model its own
            classes (``0-4``). Default: one head, classes 0..k-1.
        ensemble: score the models' outputs together as one multi-head model.
        provider: onnxruntime provider: auto, cpu or cuda.
    """
    return accuracies(read_models(models), data, labels, parse_tasks(tasks) if tasks else None, ensemble, provider)


