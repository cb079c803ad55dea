"""Stage 4 of a merge: the merged graph. Trunk parameters carried through the matchings and
averaged (or combined tensor by tensor by a same-base method), heads per model or shared,
width-bearing constants resized, and each model's post-processing attached to its outputs."""

from __future__ import annotations

import logging
from dataclasses import asdict

import numpy as np
import onnx

from ..calib.data import CalibrationSet
from ..errors import RecipeError, UnsupportedGraphError
from ..graph.canonical import export_like
from ..graph.ir import import_graph
from ..graph.postprocess import PostProcessing, attach_postprocessing
from ..match import MatchMethod
from ..options import MergeOptions
from ..rewrite.merge import Member, assemble, merged_trunk_parameters
from .prepare import lockstep_batches
from ..samebase import combiner
from .. import weights


log = logging.getLogger(__name__)


def check_coverage(reference: Member, split, options: MergeOptions) -> None:
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


def attach_model_postprocessing(merged: onnx.ModelProto, members: list[Member], post: list[PostProcessing],
                                heads: str) -> onnx.ModelProto:
    """``merged`` where each model's post-processing (skl2onnx labels, ZipMap) reads that model's
    own scores (model 0's alone with shared heads); each model's outputs keep their order."""
    tails = list(zip(members[:1] if heads == "shared" else members, post))
    if all(tail.model is None for _, tail in tails):  # the merged outputs are in order already
        return merged
    graph = import_graph(merged)
    order, types, opsets = [], {}, {}
    for index, (member, tail) in enumerate(tails):
        def rename(name: str, index=index) -> str:
            return name if heads == "shared" else f"{name}_m{index}"

        attach_postprocessing(graph, tail, rename)
        order += [rename(name) for name in tail.output_names(member.model)]
        if tail.model is not None:
            types |= {rename(o.name): o.type for o in tail.model.graph.output}
        for opset in tail.opsets:
            opsets.setdefault(opset.domain, opset)
    outputs = {o.name: o for o in graph.outputs}
    graph.outputs = [outputs[name] for name in order]
    result = export_like(graph, merged, types=types)
    domains = {o.domain for o in result.opset_import}
    result.opset_import.extend(o for domain, o in opsets.items() if domain not in domains)
    return result


def assemble_merged(members: list[Member], split, matchings: dict, base: Member | None, method: MatchMethod,
                    options: MergeOptions, calib: CalibrationSet | None) -> onnx.ModelProto:
    """The merged graph before repair: trunk parameters averaged through the matchings (or
    combined by a same-base method, samebase.py), heads per model or shared, and width-bearing
    constants (reshape targets, split sizes, slices) following the merged widths."""
    combine = None
    if method.same_base:
        trunk = [k for k in range(len(members[0].model.graph.node)) if k not in split.head_nodes]
        batches = None if calib is None else lambda what: lockstep_batches(calib, len(members), options.batch_size, what)
        combine = combiner(method, method.make_params(**asdict(options)), members, base, trunk, batches,
                           options.provider, options.seed)
    with np.errstate(over="ignore", invalid="ignore"):  # checked below, in one line
        parameters = merged_trunk_parameters(members, split, matchings, combine, method.elementwise)
    _check_finite(parameters, members[0].model, options)
    return assemble(members, split, matchings, parameters, heads=options.heads)


def _check_finite(parameters: dict[str, np.ndarray], reference: onnx.ModelProto, options: MergeOptions) -> None:
    """Refuse merged parameters that overflowed (a huge ``--scale``, weights near the dtype's
    limit): the model would compute NaN. A constant already not finite in the reference model
    (an attention mask's -inf) is the model's own."""
    for name, value in parameters.items():
        value = weights.transient(value)  # a spilled tensor's pages are not kept
        if value.dtype.kind == "f" and not np.isfinite(value).all() and _finite_in(reference, name):
            raise RecipeError(f"the merged parameter {name!r} overflows {value.dtype} ({int((~np.isfinite(value)).sum())} "
                              f"non-finite values) with --method {options.method}; use a smaller --scale or weights")


def _finite_in(model: onnx.ModelProto, name: str) -> bool:
    """Whether ``model``'s initializer ``name`` (if it has one) is finite everywhere."""
    found = next((init for init in model.graph.initializer if init.name == name), None)
    return found is None or bool(np.isfinite(weights.read(found)).all())
