"""Repair after merging (method.md §7).

BN reset recomputes every BatchNormalization's mean and variance on the merged model in one
pass in train mode, as the source frameworks reset BN: every BN normalises with its batch
statistics, so later layers see corrected inputs, and the batch statistics are pooled over
the batches.

REPAIR (Jordan et al., "REPAIR: REnormalizing Permuted Activations for Interpolation Repair",
ICLR 2023) corrects the output of every weight layer of the merged model, per channel, to the
mean and std its source channels had: for a merged layer the merge matrix's weighting of the
sources' statistics, for a per-model layer after a partial cut that model's own. Layers are
measured in dependency order, each on inputs already corrected upstream, with exactly pooled
statistics, so the result does not depend on the batch size; the corrections then fold into
the producing Conv/Gemm.
"""

from __future__ import annotations

import logging

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..calib.sessions import open_session
from ..calib.channels import MomentNodes, Tensors, measure, with_moments
from ..calib.stats import ChannelMoments, SourceMoments
from ..graph.canonical import export_like
from ..graph.facts import op_facts
from ..graph.ir import import_graph
from ..graph.surgery import replace_input
from ..graph.layers import fold_affine
from ..graph.spaces import tensor_shapes
from ..io import default_opset
from ..match.matching import Matching
from .heads import TrunkSplit, weight_layers
from .merge import Member, merge_matrix

log = logging.getLogger(__name__)

Batches = Callable[[], Iterable[dict[str, np.ndarray]]]


def reset_batch_norm(model: onnx.ModelProto, batches: Batches, provider: str) -> tuple[onnx.ModelProto, str]:
    """A copy of ``model`` with BatchNormalization statistics measured on the batches.

    Returns the model and the provider that ran the pass.
    """
    train, measured = train_mode(model)
    session, ran = open_session(train, provider)
    moments = measure(session, measured, batches())
    graph = import_graph(model)
    for node in graph.nodes:
        if node.outputs and node.outputs[0].name in moments:
            _set_statistics(node, moments[node.outputs[0].name])
    return export_like(graph, model), ran


def train_mode(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, tuple[str, str]]]:
    """A copy of ``model`` whose BatchNormalization nodes normalise with their batch statistics,
    and for each BN node (by its output's name) the outputs holding its batch mean and (biased)
    variance.

    Each BN stays an inference-mode BN fed with the mean and variance of its input, computed
    with plain ops. BatchNormalization's own ``training_mode`` would do, but onnxruntime's CUDA
    provider refuses it from opset 14 and opsets before 14 lack it.
    """
    graph = import_graph(model)
    moments, nodes, measured = MomentNodes(graph, default_opset(model)), graph.nodes, {}
    graph.nodes = []  # rebuilt in order, each BN's statistics just before it
    for node in nodes:
        if op_facts(node.op).norm == "running":
            name = node.outputs[0].name
            node.inputs[3], node.inputs[4] = moments.add(node.inputs[0], 1, f"{name}__reset")
            while len(node.outputs) > 1:  # the running statistics outputs of training
                node.outputs.pop()
            graph.outputs += node.inputs[3:5]
            measured[name] = (node.inputs[3].name, node.inputs[4].name)
        graph.nodes.append(node)
    return export_like(graph, model), measured


def _set_statistics(node: gs.Node, pooled: ChannelMoments) -> None:
    """A BatchNormalization's running mean and variance set to ``pooled``'s, in their own type."""
    for tensor, value in ((node.inputs[3], pooled.mean), (node.inputs[4], pooled.var)):
        tensor.values = value.astype(tensor.values.dtype)


@dataclass(frozen=True)
class RepairTarget:
    """A tensor of the merged model to correct: its channel axis and rank, and the per-channel
    mean and std (float64, shape [C]) it should have."""

    tensor: str
    axis: int
    rank: int
    mean: np.ndarray
    std: np.ndarray


TOLERANCE = 1e-4  # corrections that change less than this in a pass are final


def insert_repair(model: onnx.ModelProto, targets: list[RepairTarget], batches: Batches,
                  provider: str) -> tuple[onnx.ModelProto, str]:
    """REPAIR: a copy of ``model`` whose target tensors have the target per-channel mean and std
    on the batches, the corrections folded into their producers where these are canonical
    Conv/ConvTranspose/Gemm layers (else kept as per-channel Mul and Add nodes).

    Each target must be measured on inputs corrected upstream. A pass measures every target
    under the corrections of the pass before and corrects all of them: after pass k the targets
    with at most k targets upstream on a path are exact, so the passes stop at the depth of
    that chain, or sooner when no correction changes by ``TOLERANCE`` (relative to the target
    std) any more: one more pass would measure the same. Returns the model and the provider
    that ran.
    """
    dtypes = _dtypes(import_graph(model), targets)
    corrections = _first_guess(model, targets, dtypes, batches, provider)
    corrections, ran = _refine(model, targets, dtypes, corrections, batches, provider)
    # the probe's session is closed by now: its weights leave memory before the folded ones are made
    return _fold(model, targets, dtypes, corrections), ran


def _refine(model: onnx.ModelProto, targets: list[RepairTarget], dtypes: dict[str, np.dtype],
            corrections: dict[str, tuple[np.ndarray, np.ndarray]], batches: Batches,
            provider: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """The exact passes of ``insert_repair`` from the first-guess ``corrections``; the final
    corrections and the provider that ran."""
    probe, outputs = _probe(model, targets, dtypes)
    session, ran = open_session(probe, provider)
    for _ in range(_depth(model, set(corrections))):
        feed = {f"{t.tensor}__repair_{part}": value.astype(dtypes[t.tensor]).reshape(_broadcast(t))
                for t in targets for part, value in zip(("scale", "shift"), corrections[t.tensor])}
        moments = measure(session, outputs, batches(), feed)
        updated = {t.tensor: _correction(t, moments[t.tensor]) for t in targets}
        change = max(_change(t, corrections[t.tensor], updated[t.tensor]) for t in targets)
        log.debug("REPAIR pass: the largest correction moved by %.2e (done below %.0e)", change, TOLERANCE)
        corrections = updated
        if change < TOLERANCE:
            break
    return corrections, ran


def _first_guess(model: onnx.ModelProto, targets: list[RepairTarget], dtypes: dict[str, np.dtype], batches: Batches,
                 provider: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Corrections from one pass in which each target with channels on axis 1 is normalised by
    its own batch statistics and given the target mean and std (a BatchNormalization in train
    mode): close to the exact ones, so that few exact passes follow. Others start at identity."""
    graph = import_graph(model)
    normalised = [t for t in targets if t.axis == 1]
    for t in normalised:
        parameters = [gs.Constant(f"{t.tensor}__guess_{part}", value.astype(dtypes[t.tensor])) for part, value in
                      (("scale", t.std), ("bias", t.mean), ("mean", np.zeros_like(t.mean)), ("var", np.ones_like(t.mean)))]
        attrs = {"epsilon": _guess_epsilon(dtypes[t.tensor])}
        _insert_after(graph, t.tensor, lambda source, result: [gs.Node("BatchNormalization", inputs=[source, *parameters],
                                                                       outputs=[result], attrs=attrs)])
    graph.toposort()
    guide = export_like(graph, model)
    train, measured = train_mode(guide)
    session, _ = open_session(train, provider)
    moments = measure(session, measured, batches())
    guesses = {t.tensor: _correction(t, moments[f"{t.tensor}__repaired"]) for t in normalised}
    return {t.tensor: guesses.get(t.tensor, (np.ones(len(t.mean)), np.zeros(len(t.mean)))) for t in targets}


def _guess_epsilon(dtype: np.dtype) -> float:
    """The guess's BN epsilon: a channel constant on the data (a lifted block's zeroed residual
    branch, or channels merged only with such ones) has zero variance, and 0 / sqrt(0) is NaN,
    where any positive epsilon gives it the target mean. This one is far below a live channel's
    variance (``_correction`` calls a std below 1e-6 constant) and survives addition in ``dtype``."""
    return max(1e-12, float(np.finfo(dtype).tiny))


def _change(target: RepairTarget, old: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray]) -> float:
    """How much a target's correction moved: in scale, and in shift relative to its std."""
    return float(max(np.abs(new[0] - old[0]).max(initial=0.0),
                     (np.abs(new[1] - old[1]) / np.maximum(target.std, 1e-6)).max(initial=0.0)))


def _dtypes(graph: gs.Graph, targets: list[RepairTarget]) -> dict[str, np.dtype]:
    """Each target's element type: corrections are computed in it (an fp16 model stays fp16)."""
    tensors = graph.tensors()
    return {t.tensor: np.dtype(tensors[t.tensor].dtype or _weight_dtype(tensors[t.tensor])) for t in targets}


def _weight_dtype(tensor: gs.Tensor) -> np.dtype:
    """The type of the weights of the layer producing ``tensor`` (shapes may not be inferred yet)."""
    weights = [t for node in tensor.inputs for t in node.inputs if isinstance(t, gs.Constant)]
    return weights[0].values.dtype if weights else np.dtype(np.float32)


def _broadcast(target: RepairTarget) -> list[int]:
    """Shape of a per-channel constant that broadcasts along the target's channel axis."""
    return [len(target.mean)] + [1] * (target.rank - 1 - target.axis)


def _correction(target: RepairTarget, measured: ChannelMoments) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, shift) taking the measured mean and std to the target's; a channel
    constant in the merged model is only shifted (no scale can give it a spread)."""
    std = measured.std
    live = std > 1e-6 * np.maximum(1.0, np.abs(measured.mean))
    scale = np.where(live, target.std / np.where(live, std, 1.0), 1.0)
    return scale, target.mean - scale * measured.mean


def _insert_after(graph: gs.Graph, tensor: str, make: Callable[[gs.Tensor, gs.Tensor], list[gs.Node]]) -> None:
    """Consumers of ``tensor`` read ``<tensor>__repaired`` instead, computed from it by the
    nodes ``make(source, result)`` returns."""
    source = graph.tensors()[tensor]
    repaired = gs.Variable(f"{tensor}__repaired", dtype=source.dtype)
    for node in list(source.outputs):
        replace_input(node, source, repaired)
    graph.nodes += make(source, repaired)


def _affine(graph: gs.Graph, target: RepairTarget, scale: gs.Tensor, shift: gs.Tensor) -> None:
    """Consumers of the target read ``target * scale + shift`` instead (Mul and Add nodes)."""
    def nodes(source: gs.Tensor, result: gs.Tensor) -> list[gs.Node]:
        scaled = gs.Variable(f"{target.tensor}__scaled", dtype=source.dtype)
        return [gs.Node("Mul", inputs=[source, scale], outputs=[scaled]),
                gs.Node("Add", inputs=[scaled, shift], outputs=[result])]

    _insert_after(graph, target.tensor, nodes)


def _probe(model: onnx.ModelProto, targets: list[RepairTarget],
           dtypes: dict[str, np.dtype]) -> tuple[onnx.ModelProto, dict[str, tuple[str, str]]]:
    """The model with each target corrected by per-channel scale and shift graph inputs
    (``<tensor>__repair_scale`` / ``__repair_shift``), also giving the targets' batch moments
    before the correction."""
    graph = import_graph(model)
    for target in targets:
        scale, shift = (gs.Variable(f"{target.tensor}__repair_{part}", dtype=dtypes[target.tensor], shape=_broadcast(target))
                        for part in ("scale", "shift"))
        graph.inputs += [scale, shift]
        _affine(graph, target, scale, shift)
    graph.toposort()
    return with_moments(export_like(graph, model), {t.tensor: (t.axis, t.rank) for t in targets})


def _fold(model: onnx.ModelProto, targets: list[RepairTarget], dtypes: dict[str, np.dtype],
          corrections: dict[str, tuple[np.ndarray, np.ndarray]]) -> onnx.ModelProto:
    """The model with each target's (scale, shift) correction applied as per-channel Mul and Add
    constants, folded into the producing layer where it is a canonical Conv/ConvTranspose/Gemm."""
    graph = import_graph(model)
    for target in targets:
        constants = (gs.Constant(f"{target.tensor}__repair_{part}",
                                 value.astype(dtypes[target.tensor]).reshape(_broadcast(target)))
                     for part, value in zip(("scale", "shift"), corrections[target.tensor]))
        _affine(graph, target, *constants)
    while fold_affine(graph):
        pass
    graph.cleanup()
    tensors = graph.tensors()
    for target in targets:  # a folded correction leaves the layer's output its own name
        if target.tensor not in tensors:
            tensors[f"{target.tensor}__repaired"].name = target.tensor
    graph.toposort()
    return export_like(graph, model)


def _depth(model: onnx.ModelProto, tensors: set[str]) -> int:
    """The most target tensors on one path through the graph (nodes in topological order)."""
    depth: dict[str, int] = {}
    for node in model.graph.node:
        level = max((depth.get(name, 0) for name in node.input), default=0)
        for name in node.output:
            depth[name] = level + (name in tensors)
    return max(depth.values(), default=0)


@dataclass(frozen=True)
class RepairSource:
    """A weight layer output of the merged model and the source tensors its channels come
    from: (model index, tensor name in that model, r x d merge matrix of its channels)."""

    tensor: str
    axis: int
    rank: int
    sources: tuple[tuple[int, str, np.ndarray], ...]


def repair_sources(members: list[Member], split: TrunkSplit, matchings: dict[int, Matching],
                   outputs: set[str]) -> list[RepairSource]:
    """Every weight layer output (Conv, ConvTranspose, Gemm, MatMul) of the merged model that
    is not one of its graph ``outputs``, with its sources: a trunk layer's channels are the
    merge matrices' weighting of all models' channels (a fixed space the plain average); a
    layer of model i's head (after a partial cut) is that model's own."""
    plan = []
    for k, axis, rank in _repairable(members[0]):
        if k in split.head_nodes:
            plan += [RepairSource(f"{m.model.graph.node[k].output[0]}_m{i}", axis, rank,
                                  ((i, m.model.graph.node[k].output[0], None),))
                     for i, m in enumerate(members)]
        else:
            plan.append(RepairSource(members[0].model.graph.node[k].output[0], axis, rank, tuple(
                (i, m.model.graph.node[k].output[0], merge_matrix(m, i, m.graph.layouts[m.model.graph.node[k].output[0]][axis],
                                                                   matchings, len(members)))
                for i, m in enumerate(members))))
    return [p for p in plan if p.tensor not in outputs]


def _repairable(reference: Member) -> list[tuple[int, int, int]]:
    """(node index, channel axis, rank) of each weight layer of model 0 whose output REPAIR can
    correct: one with a weight layout (Conv, ConvTranspose, Gemm, MatMul) whose output has a
    tracked channel axis."""
    shapes = tensor_shapes(reference.model)
    layers = []
    for k in weight_layers(reference.model, reference.graph):
        node = reference.model.graph.node[k]
        layout = op_facts(node.op_type).layout
        if layout is None:
            continue
        rank = len(shapes.get(node.output[0], ()))
        axis = layout.channels % max(rank, 1)
        if rank >= 2 and axis in reference.graph.layouts.get(node.output[0], {}):
            layers.append((k, axis, rank))
    return layers


def plan_tensors(plan: list[RepairSource], count: int) -> Tensors:
    """Per model of ``count``, the source tensors the plan reads."""
    return [{name: (p.axis, p.rank) for p in plan for index, name, _ in p.sources if index == i} for i in range(count)]


def repairable_tensors(members: list[Member]) -> Tensors:
    """Per model, every tensor a REPAIR plan of these models can read, whatever the cut and the
    matchings: each repairable weight layer's output in every model (a trunk layer reads all of
    them, a head layer its own model's)."""
    layers = _repairable(members[0])
    return [{m.model.graph.node[k].output[0]: (axis, rank) for k, axis, rank in layers} for m in members]


def repair_targets(plan: list[RepairSource], moments: SourceMoments) -> list[RepairTarget]:
    """Each planned tensor's target mean and std: the merge matrices applied to the sources'
    (an unmerged per-model layer keeps its model's)."""
    targets = []
    for item in plan:
        mean = sum(_apply(m, moments[i][name].mean) for i, name, m in item.sources)
        std = sum(_apply(m, moments[i][name].std) for i, name, m in item.sources)
        targets.append(RepairTarget(item.tensor, item.axis, item.rank, mean, std))
    return targets


def _apply(matrix: np.ndarray | None, values: np.ndarray) -> np.ndarray:
    return values if matrix is None else matrix @ values
