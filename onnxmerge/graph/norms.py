"""Normalisations that exporters write as elementwise ops.

torch below opset 17 writes ``nn.LayerNorm`` as ``ReduceMean -> Sub -> Pow -> ReduceMean ->
Add(eps) -> Sqrt -> Div`` (then ``Mul`` by the scale and ``Add`` of the bias); from opset 17 it
writes one ``LayerNormalization``. Canonical form is the op, so both exports line up node by
node; a model below opset 17 that has the pattern is first raised to opset 17 with onnx's
version converter. RMSNorm (``x / sqrt(mean(x^2) + eps) * w``) has no op before opset 23 and
stays as it is: the rule table maps its reductions and broadcasts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from .ir import import_graph
from .surgery import constant, sole_consumer

log = logging.getLogger(__name__)

LAYER_NORM_OPSET = 17  # LayerNormalization's first opset


@dataclass
class _LayerNorm:
    """A matched pattern: its input, normalised axes, epsilon, output and nodes."""

    x: gs.Tensor
    axis: int
    epsilon: float
    output: gs.Tensor
    nodes: list[gs.Node]
    scale: np.ndarray | None = None
    bias: np.ndarray | None = None


def layer_norms(graph: gs.Graph) -> int:
    """Rewrite each decomposed LayerNorm as ``LayerNormalization(x, scale, bias)`` (scale ones
    and bias zeros when the pattern has none), where the opset has the op."""
    if graph.opset < LAYER_NORM_OPSET:
        return 0
    matches = [found for found in map(lambda node: _match(graph, node), graph.nodes) if found is not None]
    for found in matches:
        width = found.x.shape[found.axis:]
        dtype = found.x.dtype or np.float32
        scale = found.scale if found.scale is not None else np.ones(width, dtype)
        bias = found.bias if found.bias is not None else np.zeros(width, dtype)
        name = found.output.name
        for old in found.nodes:  # out of the list, so later passes of the round skip them
            old.inputs.clear()
            old.outputs.clear()
            graph.nodes.remove(old)
        graph.nodes.append(gs.Node("LayerNormalization", f"{name}_layer_norm",
                                   {"axis": found.axis, "epsilon": found.epsilon},
                                   [found.x, gs.Constant(f"{name}_scale", scale.astype(dtype)),
                                    gs.Constant(f"{name}_bias", bias.astype(dtype))], [found.output]))
    return len(matches)


def has_layer_norm_pattern(model: onnx.ModelProto) -> bool:
    """Whether the (shape-inferred) model writes a LayerNorm as elementwise ops."""
    graph = import_graph(model)
    return any(_match(graph, node) is not None for node in graph.nodes)


def with_layer_norm_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` raised to opset 17 when it is below and writes a decomposed LayerNorm (so that
    the pattern can become the op); unchanged when the converter cannot raise it."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset >= LAYER_NORM_OPSET or not has_layer_norm_pattern(model):
        return model
    try:
        raised = version_converter.convert_version(model, LAYER_NORM_OPSET)
    except Exception as error:  # the converter raises several types; each means "not possible"
        log.info("cannot raise opset %d to %d: %s", opset, LAYER_NORM_OPSET, error)
        return model
    raised.ir_version = max(raised.ir_version, model.ir_version)
    return raised


def _match(graph: gs.Graph, mean: gs.Node) -> _LayerNorm | None:
    """The LayerNorm whose first ReduceMean is ``mean``, or None."""
    axes = _trailing_axes(mean)
    if axes is None:
        return None
    x = mean.inputs[0]
    centred = _only(graph, mean.outputs[0], "Sub")
    if centred is None or centred.inputs[0] is not x or centred.inputs[1] is not mean.outputs[0]:
        return None
    d = centred.outputs[0]
    users = [n for n in d.outputs]
    square = next((n for n in users if _is_square(n, d)), None)
    divide = next((n for n in users if n.op == "Div" and n.inputs[0] is d), None)
    if square is None or divide is None or len({id(n) for n in users}) != 2 or any(t is d for t in graph.outputs):
        return None
    variance = _only(graph, square.outputs[0], "ReduceMean")
    if variance is None or _trailing_axes(variance) != axes:
        return None
    add = _only(graph, variance.outputs[0], "Add")
    epsilon = _scalar(add, variance.outputs[0]) if add is not None else None
    root = _only(graph, add.outputs[0], "Sqrt") if epsilon is not None else None
    if root is None or sole_consumer(graph, root.outputs[0]) is not divide or divide.inputs[1] is not root.outputs[0]:
        return None
    found = _LayerNorm(x, axes[0], epsilon, divide.outputs[0], [mean, centred, square, variance, add, root, divide])
    _affine(graph, found, "Mul")
    _affine(graph, found, "Add")
    return found


def _trailing_axes(node: gs.Node) -> list[int] | None:
    """The axes of a keepdims ReduceMean when they are the input's last ones, else None."""
    if node.op != "ReduceMean" or node.inputs[0].shape is None or not node.attrs.get("keepdims", 1):
        return None
    rank = len(node.inputs[0].shape)
    axes = _value(node.inputs[1]) if len(node.inputs) > 1 else node.attrs.get("axes")
    if axes is None:
        return None
    axes = sorted(int(a) % rank for a in np.reshape(axes, -1))
    return axes if axes and axes == list(range(axes[0], rank)) else None


def _value(tensor: gs.Tensor) -> np.ndarray | None:
    """A constant's value, also before constant folding (the output of a Constant node)."""
    made = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if made is not None and made.op == "Constant" and isinstance(made.attrs.get("value"), gs.Constant):
        return made.attrs["value"].values
    return constant(tensor)


def _only(graph: gs.Graph, tensor: gs.Tensor, op: str) -> gs.Node | None:
    node = sole_consumer(graph, tensor)
    return node if node is not None and node.op == op else None


def _is_square(node: gs.Node, d: gs.Tensor) -> bool:
    if node.op == "Mul":
        return len(node.inputs) == 2 and node.inputs[0] is d and node.inputs[1] is d
    return node.op == "Pow" and node.inputs[0] is d and _scalar(node, d) == 2.0


def _scalar(node: gs.Node, tensor: gs.Tensor) -> float | None:
    """The one-element constant ``node`` combines with ``tensor``, or None."""
    others = [t for t in node.inputs if t is not tensor]
    value = _value(others[0]) if len(node.inputs) == 2 and len(others) == 1 else None
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _affine(graph: gs.Graph, found: _LayerNorm, op: str) -> None:
    """Take a following Mul by the scale (or Add of the bias) into the pattern when it is a
    constant over the normalised axes only."""
    node = _only(graph, found.output, op)
    if node is None or len(node.inputs) != 2:
        return
    value = _value(node.inputs[1] if node.inputs[0] is found.output else node.inputs[0])
    width = tuple(found.x.shape[found.axis:])
    lead = None if value is None else value.ndim - len(width)
    if lead is None or lead < 0 or value.ndim > len(found.x.shape) or value.shape[lead:] != width \
            or any(d != 1 for d in value.shape[:lead]):
        return
    values = value.reshape(width)
    if op == "Mul":
        found.scale = values
    else:
        found.bias = values
    found.output = node.outputs[0]
    found.nodes.append(node)
