"""Stage 1 of a merge: the models as the merge reads them. Each model's canonical core (its
post-processing split off, BatchNormalization kept or folded alike), the calibration set
checked against every model, models of different depths aligned and lifted into the deepest's
topology (docs/method.md §5), each lined up with model 0 (a ``Member``); for the same-base
methods, the base lined up too and the fine-tune checks (samebase.py)."""

from __future__ import annotations

import logging
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx

from ..choices import MIN_SAMPLES
from ..calib.data import CalibrationSet, check_variation, input_specs, load_calibration
from ..calib.stats import load_stats
from ..depth import DepthAlignment, align_depths, lift_models, needs_alignment
from ..errors import CalibrationError, RecipeError, UnsupportedGraphError, about
from ..graph.blocks import BlockStructure, find_blocks, lines_up, regroup_like
from ..graph.canonical import canonicalize, check_finite_parameters
from ..graph.correspond import correspond
from ..graph.facts import op_facts
from ..graph.interface import channels_first_input, check_same_inputs, common_opset
from ..graph.postprocess import PostProcessing, split_postprocessing
from ..graph.spaces import SpaceGraph, find_spaces
from ..match import get_method
from ..options import MergeOptions
from ..progress import progress
from ..rewrite.heads import split_trunk
from ..rewrite.merge import Member
from ..samebase import check_fine_tunes, check_same_graph
from ..sources import Data, Source


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """What every merge of these models starts from (see ``prepare``)."""

    members: list[Member]
    post: list[PostProcessing]
    bn: str
    calib: CalibrationSet | None
    depth: DepthAlignment | None
    base: Member | None = None  # same-base methods: the base, lined up with model 0


def prepare(sources: list[Source], data: Data | None, options: MergeOptions, stats: Sequence[str] = (),
             base: Source | None = None):
    """Everything a merge starts from: members (canonical cores lined up with model 0's; models
    of different depths lifted into the deepest's topology, method.md §5), each model's
    post-processing, the BatchNormalization mode used, the calibration set and the depth
    alignment (None when depths agree), and the base of a same-base merge (None without).
    Without data, an alignment is read from the statistics files when ``calibrate`` stored one."""
    if options.method and get_method(options.method).same_base:
        return _prepare_same_base(sources, data, options, base)
    named, post, bn = cores(sources, options)
    if options.heads == "shared":
        _check_shared_postprocessing([s.name for s in sources], post)
    calib = calibration_set(data, named, options) if data is not None else None
    depth = None
    structures = [] if options.align == "none" else block_structures(named)
    _check_cut_points(named, structures)
    if needs_alignment(structures, options.align):
        stored = _stored_alignment(named, structures, stats, options.align) if calib is None else None
        depth = stored or align_models(named, structures, calib, options)
        named = list(zip([name for name, _ in named], lift_models(named, depth)))
    return members_of(named), post, bn, calib, depth, None


def _prepare_same_base(sources: list[Source], data: Data | None, options: MergeOptions, base: Source | None):
    """``prepare`` for fine-tunes of one base: the same graph for every model and the base
    (else refused), no depth alignment; the base is canonicalised with them and lined up."""
    everything = [*sources, *([base] if base else [])]
    named, post, bn = cores(everything, options)
    reference = named[0][1]
    reference_graph = _spaces(named[0][0], reference)
    heads = split_trunk(reference, reference_graph, heads=options.heads).head_nodes
    check_same_graph(named, heads)  # heads kept per model may have other label counts
    members = members_of(named, reference_graph)
    base_member = members.pop() if base else None
    post = post[:len(sources)]
    inits = {i.name for i in reference.graph.initializer}
    names = [n for k, node in enumerate(reference.graph.node) if k not in heads for n in node.input if n in inits]
    if not options.align_first:  # aligned models may come from other bases
        check_fine_tunes(members, base_member, list(dict.fromkeys(names)), [s.name for s in sources])
    calib = calibration_set(data, named[:len(sources)], options) if data is not None else None
    return members, post, bn, calib, None, base_member


def _stored_alignment(named: list[tuple[str, onnx.ModelProto]], structures: list[BlockStructure],
                      stats: Sequence[str], method: str) -> DepthAlignment | None:
    """The depth alignment ``calibrate`` stored in the first statistics file, or None. A file
    of other models is refused later by its fingerprint (lifting changes what is captured);
    one aligned by another method than ``method`` (``--align``; auto takes any) is refused."""
    text = load_stats(stats[0])[1].get("alignment") if stats else None
    if not text:
        return None
    stored = json.loads(text)
    if method not in ("auto", stored["method"]):
        raise RecipeError(f"{stats[0]}: its statistics were computed on models aligned by {stored['method']}, not "
                          f"{method}; pass --align {stored['method']} (or auto), or recompute them with "
                          f"onnxmerge calibrate --align {method}")
    sizes = [len(s.units) for s in structures]
    maps = {int(i): mapping for i, mapping in stored["maps"].items()}
    if sorted(maps) != list(range(len(named))) or any(len(m) != max(sizes) for m in maps.values()):
        raise CalibrationError(f"{stats[0]}: its depth alignment is for other models; recompute the statistics "
                               "with onnxmerge calibrate on the same models")
    return DepthAlignment(stored["method"], [name for name, _ in named], structures, int(np.argmax(sizes)), maps)


def members_of(named: list[tuple[str, onnx.ModelProto]], reference_graph: SpaceGraph | None = None) -> list[Member]:
    """Each model with its feature spaces, lined up with model 0's (``reference_graph``: model
    0's spaces when already found)."""
    graphs = [reference_graph or _spaces(*named[0]), *(_spaces(name, model) for name, model in named[1:])]
    analysed = [(name, model, graph) for (name, model), graph in zip(named, graphs)]
    return [Member(model, graph, correspond(analysed[0], (path, model, graph))) for path, model, graph in analysed]


def _spaces(name: str, model: onnx.ModelProto) -> SpaceGraph:
    with about(name):
        return find_spaces(model)


def _check_cut_points(named: list[tuple[str, onnx.ModelProto]], structures: list[BlockStructure]) -> None:
    """Models of different sizes that have no cut between their layers cannot be aligned by
    depth: say why, rather than that their architectures differ."""
    sizes = {len(model.graph.node) for _, model in named}
    if structures and len(sizes) > 1 and all(len(s.units) <= 1 for s in structures):
        raise UnsupportedGraphError(
            f"the models differ in size ({' vs '.join(str(len(m.graph.node)) for _, m in named)} nodes) and have no cut "
            "between their layers, so their depths cannot be aligned: a tensor every layer reads (an attention mask "
            "made once from an input) joins them; export without it (a fixed mask or none) or merge models of one "
            "depth (onnxmerge inspect shows the blocks)")


def cores(sources: list[Source], options: MergeOptions) -> tuple[list[tuple[str, onnx.ModelProto]], list[PostProcessing], str]:
    """Each model's canonical core (post-processing split off) with its name, the
    post-processing, and the BatchNormalization mode used: ``keep`` turns into ``fold`` when
    some models have BN nodes and others have it folded (exporters differ), so that they line up."""
    for source in sources:  # before canonicalisation folds them, under the file's own names
        with about(source.name):
            check_finite_parameters(source.model)
    # no copies: each step returns a new model (a file given twice is one model of two sources)
    models = common_opset([(s.name, s.model) for s in sources])
    models = [_with_input_layout(s, model, options.input_layout) for s, model in zip(sources, models)]
    analysed, bn = _split_all(models, options.bn), options.bn
    if bn == "keep" and len({_batch_norms(core) > 0 for core, _ in analysed}) > 1:
        log.warning("some models have BatchNormalization nodes and others have it folded: folding it in all")
        analysed, bn = _split_all(models, "fold"), "fold"
    named = [(s.name, core) for s, (core, _) in zip(sources, analysed)]
    for name, core in named:
        with about(name):
            check_finite_parameters(core)
    check_same_inputs(named)
    return named, [post for _, post in analysed], bn


def _batch_norms(model: onnx.ModelProto) -> int:
    return sum(op_facts(node.op_type).norm == "running" for node in model.graph.node)


def _split_all(models: list[onnx.ModelProto], bn: str) -> list[tuple[onnx.ModelProto, PostProcessing]]:
    """(canonical core, post-processing) of each model."""
    return [split_postprocessing(canonicalize(model, bn=bn)) for model in progress(models, "canonicalise", unit="model")]


def _with_input_layout(source: Source, model: onnx.ModelProto, layouts: tuple[tuple[str, str], ...]) -> onnx.ModelProto:
    """The model with a channels-first input when ``--input-layout`` names it."""
    layout = next((lay for name, lay in layouts if name == source.file_name), None)
    return model if layout is None else channels_first_input(model, layout, source.name)


def layouts_by_file_name(sources: list[Source], options: MergeOptions) -> MergeOptions:
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


def calibration_set(data: Data, named: list[tuple[str, onnx.ModelProto]], options: MergeOptions) -> CalibrationSet:
    specs = [input_specs(model) for _, model in named]
    calib = load_calibration(data.content, specs, max_samples=options.max_samples,
                             model_names=[name for name, _ in named])
    if calib.num_samples < MIN_SAMPLES and not options.allow_few_samples:
        raise CalibrationError(f"{data.name}: {calib.num_samples} calibration samples are too few for correlations and "
                               f"repair statistics (at least {MIN_SAMPLES}, a few hundred is typical); "
                               "pass more samples, or --allow-few-samples to go on")
    check_variation(calib, options.allow_few_samples)
    return calib


def block_structures(named: list[tuple[str, onnx.ModelProto]]) -> list[BlockStructure]:
    """Each model's blocks and stages; a model whose stages do not line up with those of the
    model with the most blocks is read in that model's stage pattern where its blocks fit."""
    structures = [find_blocks(model) for _, model in named]
    deepest = structures[int(np.argmax([len(s.blocks) for s in structures]))]
    return [s if lines_up(deepest, s) else (regroup_like(deepest, s) or s) for s in structures]


def align_models(named: list[tuple[str, onnx.ModelProto]], structures: list[BlockStructure], calib: CalibrationSet | None,
           options: MergeOptions) -> DepthAlignment:
    batches = lockstep_batches(calib, len(named), options.batch_size, "CKA") if calib is not None else None
    return align_depths(named, structures, options.align, batches, options.provider)


def lockstep_batches(calib: CalibrationSet, count: int, batch_size: int, what: str = "statistics"):
    """Per step, the feeds of ``count`` models (the same samples), with a progress bar."""
    steps = -(-calib.num_samples // calib.batch_size(batch_size))
    return progress(zip(*(calib.batches(i, batch_size) for i in range(count))), what, steps, "batch")
