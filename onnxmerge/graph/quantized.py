"""Quantized models: QDQ models are read as the float model they approximate, QOperator
models are refused.

onnxruntime's static quantization writes two forms. QDQ (``QuantFormat.QDQ``) keeps float
ops and wraps them in QuantizeLinear / DequantizeLinear nodes: integer weights with a
DequantizeLinear, activations quantized and at once dequantized. Merging averages weights,
whose scales and zero points no longer fit them, so onnxmerge merges in float: the weights
become the float constants they stand for and the activation pairs go; the result is a float
model to be quantized again. QOperator ops (QLinearConv, MatMulInteger, ...) compute on
integers with the quantization inside the op: they have no float form here and are refused.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import UnsupportedGraphError
from .facts import op_facts
from .surgery import bypass, constant, fresh_variable, is_output, producer

log = logging.getLogger(__name__)

QUANTIZE, DEQUANTIZE = "QuantizeLinear", "DequantizeLinear"
# Ops that compute on quantized integers (default domain and com.microsoft); the QLinear and
# QOrdered families are matched by prefix.
INTEGER_OPS = frozenset({"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "QGemm", "QAttention",
                         "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "DynamicQuantizeLSTM",
                         "QEmbedLayerNormalization"})
INTEGER_PREFIXES = ("QLinear", "QOrdered")


def read_as_float(name: str, model: onnx.ModelProto) -> None:
    """Refuse a QOperator-quantized model; say once that a QDQ one is handled in float.

    Raises:
        UnsupportedGraphError: a node computes on quantized integers (names the first).
    """
    nodes = list(model.graph.node)
    integer = next((n for n in nodes if n.op_type in INTEGER_OPS or n.op_type.startswith(INTEGER_PREFIXES)), None)
    if integer is not None:
        raise UnsupportedGraphError(
            f"{name}: node {integer.name or integer.output[0]!r} ({integer.op_type}) computes on quantized integers "
            "(QOperator format), which onnxmerge cannot merge; merge the float models and quantize the result, "
            "or quantize with onnxruntime.quantization's QuantFormat.QDQ, which onnxmerge reads in float")
    if any(n.op_type in (QUANTIZE, DEQUANTIZE) for n in nodes):
        log.warning("%s: QDQ-quantized: read in float (weights dequantized, activation quantization dropped); "
                    "the result is a float model, quantize it again with onnxruntime.quantization", name)


def dequantize(graph: gs.Graph) -> int:
    """Canonical pass: a DequantizeLinear of constants becomes the float constant it computes,
    and a QuantizeLinear read only by DequantizeLinear nodes (fake-quantized activations) goes
    with them, their readers reading the float tensor. Nodes are visited in graph order, so
    the tensors a pair reads are already in float form."""
    count = 0
    for node in list(graph.nodes):
        if not node.outputs:  # a DequantizeLinear removed with its QuantizeLinear
            continue
        if node.op == DEQUANTIZE and not is_output(graph, node.outputs[0]):
            values = _dequantized(node)
            if values is not None:
                result = node.outputs[0]
                node.outputs.clear()
                result.to_constant(values)
                count += 1
        elif node.op == QUANTIZE and _only_dequantized(graph, node.outputs[0]):
            source = _clamped_at_zero(graph, node)
            count += sum(bypass(graph, reader, source) for reader in list(node.outputs[0].outputs))
    return count


def _clamped_at_zero(graph: gs.Graph, quantize: gs.Node) -> gs.Tensor:
    """The float tensor a quantize-dequantize pair stands for. A pair whose range starts at
    zero clamps negative values to zero: onnxruntime's quantizer removes a Relu before such a
    pair, so it becomes a Relu again unless its input is non-negative anyway or a graph input
    (whose range is its calibration data's, no removed op). Saturation at the top of the
    range, a calibrated maximum, is dropped."""
    source = quantize.inputs[0]
    if not _starts_at_zero(quantize) or producer(source) is None or _non_negative(source):
        return source
    clamped = fresh_variable(graph, source, "relu")
    graph.nodes.append(gs.Node("Relu", name=clamped.name, inputs=[source], outputs=[clamped]))
    return clamped


def _starts_at_zero(quantize: gs.Node) -> bool:
    """Whether the quantized range's lowest value dequantizes to 0: every zero point is the
    smallest integer of its type (a missing zero point is 0 of uint8 or the output's type)."""
    has_zero = len(quantize.inputs) > 2 and quantize.inputs[2].name
    zero = constant(quantize.inputs[2]) if has_zero else np.zeros((), quantize.outputs[0].dtype or np.uint8)
    return zero is not None and zero.dtype.kind in "iu" and bool(np.all(zero == np.iinfo(zero.dtype).min))


def _non_negative(tensor: gs.Tensor) -> bool:
    """Whether ``tensor`` is the output of an op with non-negative values, possibly pooled,
    reshaped or concatenated."""
    maker = producer(tensor)
    if maker is None:
        return False
    facts = op_facts(maker.op)
    if facts.sign == "non-negative":
        return True
    reads = maker.inputs if facts.joins else maker.inputs[:1]
    return facts.sign == "keeps" and all(_non_negative(t) for t in reads)


def _only_dequantized(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    readers = tensor.outputs
    return bool(readers) and all(r.op == DEQUANTIZE for r in readers) and not is_output(graph, tensor)


def _dequantized(node: gs.Node) -> np.ndarray | None:
    """(x - zero point) * scale of a DequantizeLinear with constant integer inputs, else None."""
    values, scale = constant(node.inputs[0]), constant(node.inputs[1])
    has_zero = len(node.inputs) > 2 and node.inputs[2].name
    zero = constant(node.inputs[2]) if has_zero else np.zeros(())
    if values is None or scale is None or zero is None or values.dtype.kind not in "iu":
        return None
    axis, block = node.attrs.get("axis", 1), node.attrs.get("block_size", 0)
    shifted = values.astype(np.float64) - _along(zero, values.shape, axis, block)
    return (shifted * _along(scale, values.shape, axis, block)).astype(scale.dtype)


def _along(param: np.ndarray, shape: tuple[int, ...], axis: int, block: int) -> np.ndarray:
    """A scale or zero point broadcast against the quantized tensor: one value, one per index
    of ``axis``, or (blocked quantization) one per ``block`` indices of it."""
    param = np.asarray(param, dtype=np.float64)
    if param.size == 1:
        return param.reshape(())
    axis %= len(shape)
    if block:
        return np.repeat(param, block, axis=axis)[tuple(slice(0, n) for n in shape)]
    return param.reshape([-1 if i == axis else 1 for i in range(len(shape))])
