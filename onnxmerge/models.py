"""One model at a time: load and analyse it (``inspect``), and the function-preserving rewrites
that are the project's oracles: ``permute`` (random permutations of every free space),
``widen`` (Net2Net widening) and ``deepen`` (identity blocks). Their outputs compute what the
input computes; merging a model with such a copy of itself must give back the model."""

from __future__ import annotations

import logging

import numpy as np
import onnx

from . import inspection
from .errors import InvalidModelError, RecipeError, UnsupportedGraphError, about
from .graph.blocks import BlockStructure, find_blocks
from .graph.canonical import canonicalize, check_finite_parameters, export_like
from .graph.shapes import infer_shapes
from .graph.spaces import SpaceGraph, find_spaces
from .io import check_model
from .options import MergeOptions
from .limits import MAX_DEEPEN_PER_BLOCK, check_factor, check_memory, check_range, check_seed
from .graph.apply import transform_parameters, transformed_graph
from .rewrite.lift import insert_identities
from .rewrite.resize import resize_constants
from .graph.transform import Permutation
from .rewrite.widen import widening, widening_bytes
from .sources import ModelLike, read_models



log = logging.getLogger(__name__)


def load(model: ModelLike) -> onnx.ModelProto:
    """A model as the commands read it: a checked copy (``io.load_model`` for a file),
    refusing QOperator-quantized models and warning that QDQ-quantized ones are read in float
    (graph/quantized.py).

    Raises:
        InvalidModelError, UnsupportedGraphError: see ``sources.read_models``.
    """
    return read_models([model])[0].model


def analyse(model: onnx.ModelProto, *, bn: str = MergeOptions.bn) -> tuple[onnx.ModelProto, SpaceGraph]:
    """Canonicalise a model and find its feature spaces. The input is not modified."""
    canonical = canonicalize(model, bn=bn)
    return canonical, find_spaces(canonical)


def inspect(model: ModelLike, *, bn: str = MergeOptions.bn) -> dict:
    """The ``onnxmerge inspect`` report of a model (docs/inspect-json.md): its feature spaces,
    which are free to permute, and the barriers with their reasons.

    Args:
        model: an ONNX file's path or an ``onnx.ModelProto``.
        bn: ``keep`` BatchNormalization nodes or ``fold`` them into the convolutions.
    """
    source = read_models([model])[0]
    with about(source.name):
        canonical, graph = analyse(source.model, bn=bn)
    return inspection.describe(source.name, canonical, graph)


def permute(model: ModelLike, *, seed: int = MergeOptions.seed, bn: str = MergeOptions.bn) -> onnx.ModelProto:
    """Return a function-preserving copy of ``model`` with every free space randomly permuted.

    Attention heads are permuted as whole heads and, jointly, within heads; grouped channels
    likewise by groups and within groups (Git Re-Basin's permutation symmetry).

    Args:
        model: an ONNX file's path or an ``onnx.ModelProto`` (not modified).
        seed: seed of the random permutations.
        bn: ``keep`` or ``fold`` BatchNormalization.
    """
    check_seed(seed)
    canonical, graph = analyse(load(model), bn=bn)
    rng = np.random.default_rng(seed)
    orders = {space.id: Permutation(rng.permutation(space.width)) for space in graph.free_spaces}
    permuted = transform_parameters(canonical, graph, lambda space, role: orders.get(space))
    check(permuted, "permuted model")
    return permuted


def widen(model: ModelLike, *, factor: float, seed: int = MergeOptions.seed,
          bn: str = MergeOptions.bn) -> onnx.ModelProto:
    """A function-preserving copy of ``model`` with each widenable space ``factor`` times as wide
    (Net2Net, Chen et al. 2016: copied channels, their consumers' weights split among the
    copies): spaces normalised, reduced or multiplied with other activations stay as they are.

    Args:
        model: an ONNX file's path or an ``onnx.ModelProto`` (not modified).
        factor: new width / old width, in [1, 1024].
        seed: seed choosing the copied channels.
        bn: ``keep`` or ``fold`` BatchNormalization.

    Raises:
        RecipeError: ``factor`` or ``seed`` out of range, or a widening larger than the
            available memory.
    """
    check_factor(factor)
    check_seed(seed)
    canonical, graph = analyse(load(model), bn=bn)
    check_finite_parameters(canonical)  # copies of channels are computed from the weights
    check_memory(widening_bytes(canonical, graph, factor), f"widening by --factor {factor}",
                 "use a smaller factor")
    transforms = widening(graph, factor, np.random.default_rng(seed))
    wider = transformed_graph(canonical, graph,
                              lambda space, role: transforms.get(space, (None, None))[role == "consumer"])
    resize_constants(wider, graph, lambda s: transforms[s][0].matrix.shape[0] if s in transforms else graph.table.widths[s])
    wider = infer_shapes(export_like(wider, canonical))
    check(wider, "widened model")
    return wider


def check(model: onnx.ModelProto, what: str) -> None:
    """Full ONNX checks on a model onnxmerge produced; a failure here is an onnxmerge bug
    unless the input was already invalid, so name both."""
    try:
        check_model(model)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise InvalidModelError(f"{what} fails onnx.checker: {str(error).splitlines()[0]}; "
                                "check the input with onnx.checker, else report this") from error


def _identity_problem(canonical: onnx.ModelProto, structure: BlockStructure, stage: int) -> str | None:
    """Why an identity copy of the stage's repeated unit cannot be built, or None when it can."""
    try:
        insert_identities(canonical, structure, [(stage, 0)], "deepen")
    except UnsupportedGraphError as error:
        return str(error)
    return None


def deepen(model: ModelLike, *, blocks: int, seed: int = MergeOptions.seed,
           bn: str = MergeOptions.bn) -> onnx.ModelProto:
    """A function-preserving copy of ``model`` with ``blocks`` identity units inserted at random
    positions of its stages (each a copy of the stage's repeated unit with identity parameters).
    Stages whose repeated unit has no exact identity (a max pool, a concat, an activation of
    possibly negative inputs on its only path) are skipped; an error names the first reason
    when no stage has one (Xu et al. 2024 lift shallower models with such identity blocks).

    Args:
        model: an ONNX file's path or an ``onnx.ModelProto`` (not modified).
        blocks: how many identity blocks to insert, at least 1 and at most 8 per block of the
            stages it can deepen.
        seed: seed choosing the positions.
        bn: ``keep`` or ``fold`` BatchNormalization.
    """
    if isinstance(blocks, int) and blocks < 1:
        raise RecipeError(f"--blocks {blocks}: insert at least one block")
    check_range("--blocks", blocks, 1, kind=int)
    check_seed(seed)
    canonical = canonicalize(load(model), bn=bn)
    check_finite_parameters(canonical)
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
