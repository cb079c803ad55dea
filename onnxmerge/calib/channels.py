"""Per-channel mean and variance of intermediate tensors, measured in onnxruntime.

Each measured tensor gets a few plain nodes (Transpose, Reshape, ReduceMean, Sub, Mul) that
give its batch mean and biased batch variance per channel, so only vectors leave the session;
batches are pooled exactly in float64 (Chan et al.'s parallel variance), so the result does
not depend on the batch size.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..graph.canonical import export_like
from ..graph.ir import import_graph
from ..graph.surgery import add_node
from ..io import default_opset
from .sessions import open_session, require_finite
from .stats import ChannelMoments, SourceMoments

SHAPES = {"moments_flat": [0, 0, -1], "moments_vector": [-1]}

Tensors = list[dict[str, tuple[int, int]]]
"""Per model, tensor name -> (channel axis, rank)."""


class MomentNodes:
    """Adds to ``graph`` (of a model of default ``opset``) the nodes giving tensors' per-channel
    batch mean and biased variance; they share one set of constants."""

    def __init__(self, graph: gs.Graph, opset: int):
        self.graph, self.opset = graph, opset
        self.constants = {n: gs.Constant(n, np.array(v, np.int64)) for n, v in SHAPES.items()}
        if opset >= 18:  # ReduceMean's axes became an input
            self.constants["moments_axes"] = gs.Constant("moments_axes", np.array([0, 2], np.int64))

    def add(self, tensor: gs.Tensor, axis: int, name: str, rank: int = 0) -> tuple[gs.Variable, gs.Variable]:
        """Nodes giving ``<name>_mean`` and ``<name>_var`` of shape [C] of ``tensor`` (channels
        on ``axis``; ``rank`` is needed when ``axis`` is not 1): ``tensor`` viewed as [N, C, L]
        and reduced over N and L. Returns the two tensors."""
        source = tensor
        if axis != 1:  # channels to axis 1; rank-2 tensors with channels on 0 do not occur
            perm = [0, axis] + [k for k in range(1, rank) if k != axis]
            source = add_node(self.graph, "Transpose", [tensor], f"{name}_t", perm=perm)
        x = add_node(self.graph, "Reshape", [source, self.constants["moments_flat"]], f"{name}_x")
        kept = self._mean(x, f"{name}_mean_kept", 1)
        centred = add_node(self.graph, "Sub", [x, kept], f"{name}_centred")
        var = self._mean(add_node(self.graph, "Mul", [centred, centred], f"{name}_squares"), f"{name}_var", 0)
        mean = add_node(self.graph, "Reshape", [kept, self.constants["moments_vector"]], f"{name}_mean")
        return mean, var

    def _mean(self, x: gs.Tensor, name: str, keep: int) -> gs.Variable:
        if self.opset >= 18:
            return add_node(self.graph, "ReduceMean", [x, self.constants["moments_axes"]], name, keepdims=keep)
        return add_node(self.graph, "ReduceMean", [x], name, axes=[0, 2], keepdims=keep)


def with_moments(model: onnx.ModelProto, tensors: dict[str, tuple[int, int]]) -> tuple[onnx.ModelProto, dict[str, tuple[str, str]]]:
    """A copy of ``model`` that also outputs the batch moments of ``tensors`` (name -> (channel
    axis, rank)), and for each tensor the names of its mean and variance outputs."""
    graph = import_graph(model)
    known, moments = graph.tensors(), MomentNodes(graph, default_opset(model))
    outputs = {}
    for k, (tensor, (axis, rank)) in enumerate(tensors.items()):
        pair = moments.add(known[tensor], axis, f"moments{k}", rank)
        graph.outputs += pair
        outputs[tensor] = tuple(t.name for t in pair)
    return export_like(graph, model), outputs


def measure(session, outputs: dict[str, tuple[str, str]], batches: Iterable[dict[str, np.ndarray]],
            extra: dict[str, np.ndarray] | None = None) -> dict[str, ChannelMoments]:
    """Pooled moments of the tensors in ``outputs`` (tensor -> (mean output, var output)) over
    ``batches``; ``extra`` is fed with every batch. Only the requested outputs are computed."""
    names = [n for pair in outputs.values() for n in pair]
    moments = {tensor: ChannelMoments() for tensor in outputs}
    for feed in batches:
        size = len(next(iter(feed.values())))
        values = dict(zip(names, session.run(names, {**feed, **(extra or {})})))
        require_finite(values)  # huge activations overflow the float32 moments
        for tensor, (mean, var) in outputs.items():
            moments[tensor].add(size, values[mean], values[var])
    return moments


def source_moments(models: list[onnx.ModelProto], tensors: Tensors, batches: Callable[[int], Iterable],
                   provider: str, *, threads: int | None = None) -> SourceMoments:
    """Per model, the pooled per-channel moments of its ``tensors`` (``batches(i)`` gives
    model i's feeds; ``threads`` as for ``open_session``)."""
    result = []
    for i, (model, wanted) in enumerate(zip(models, tensors)):
        if not wanted:
            result.append({})
            continue
        measured, outputs = with_moments(model, wanted)
        session, _ = open_session(measured, provider, threads=threads)
        result.append(measure(session, outputs, batches(i)))
    return result
