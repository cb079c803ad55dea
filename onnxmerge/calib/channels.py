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
from onnx import helper, numpy_helper

from ..io import default_opset
from .capture import open_session, require_finite
from .stats import ChannelMoments, SourceMoments

SHAPES = {"moments_flat": [0, 0, -1], "moments_vector": [-1]}

Tensors = list[dict[str, tuple[int, int]]]
"""Per model, tensor name -> (channel axis, rank)."""


def moment_nodes(tensor: str, axis: int, name: str, opset: int, rank: int = 0) -> tuple[list[onnx.NodeProto], str, str]:
    """Nodes giving the per-channel batch mean and biased variance of ``tensor`` (channels on
    ``axis``; ``rank`` is needed when ``axis`` is not 1), as ``<name>_mean`` and ``<name>_var`` of shape [C]:
    ``tensor`` viewed as [N, C, L] and reduced over N and L. They read the shared constants of
    ``moment_constants``."""
    nodes, source = [], tensor
    if axis != 1:  # channels to axis 1; rank-2 tensors with channels on 0 do not occur
        perm = [0, axis] + [k for k in range(1, rank) if k != axis]
        nodes.append(helper.make_node("Transpose", [tensor], [f"{name}_t"], perm=perm))
        source = f"{name}_t"

    def mean(x: str, target: str, keep: int) -> onnx.NodeProto:
        if opset >= 18:  # ReduceMean's axes became an input
            return helper.make_node("ReduceMean", [x, "moments_axes"], [target], keepdims=keep)
        return helper.make_node("ReduceMean", [x], [target], axes=[0, 2], keepdims=keep)

    nodes += [helper.make_node("Reshape", [source, "moments_flat"], [f"{name}_x"]),
              mean(f"{name}_x", f"{name}_mean_kept", 1),
              helper.make_node("Sub", [f"{name}_x", f"{name}_mean_kept"], [f"{name}_centred"]),
              helper.make_node("Mul", [f"{name}_centred", f"{name}_centred"], [f"{name}_squares"]),
              mean(f"{name}_squares", f"{name}_var", 0),
              helper.make_node("Reshape", [f"{name}_mean_kept", "moments_vector"], [f"{name}_mean"])]
    return nodes, f"{name}_mean", f"{name}_var"


def moment_constants(opset: int) -> list[onnx.TensorProto]:
    """The constants ``moment_nodes`` reads (add once per graph)."""
    inits = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in SHAPES.items()]
    if opset >= 18:
        inits.append(numpy_helper.from_array(np.array([0, 2], np.int64), "moments_axes"))
    return inits


def with_moments(model: onnx.ModelProto, tensors: dict[str, tuple[int, int]]) -> tuple[onnx.ModelProto, dict[str, tuple[str, str]]]:
    """A copy of ``model`` that also outputs the batch moments of ``tensors`` (name -> (channel
    axis, rank)), and for each tensor the names of its mean and variance outputs."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    opset = default_opset(model)
    outputs = {}
    for k, (tensor, (axis, rank)) in enumerate(tensors.items()):
        nodes, mean, var = moment_nodes(tensor, axis, f"moments{k}", opset, rank)
        result.graph.node.extend(nodes)
        outputs[tensor] = (mean, var)
    result.graph.initializer.extend(moment_constants(opset))
    result.graph.output.extend(helper.make_empty_tensor_value_info(n) for pair in outputs.values() for n in pair)
    return result, outputs


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
                   provider: str = "auto", *, threads: int | None = None) -> SourceMoments:
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
