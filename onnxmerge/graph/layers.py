"""Canonical passes for how exporters write weight layers, pooling and flattening.

One form per layer, whichever framework wrote it, so models of one architecture from
different exporters line up node by node (``correspond.py``):

- a linear layer on a matrix is ``Gemm(x, W[out, in], b[out])`` with alpha = beta = 1,
  transA = 0, transB = 1 (skl2onnx and tf2onnx write MatMul + Add, tf2onnx drops zero biases);
- every Conv, ConvTranspose and Gemm has a bias (exporters drop zero ones);
- a constant per-channel Mul/Div/Add/Sub right after a Conv, ConvTranspose or Gemm is folded
  into it (BatchNormalization written as Mul + Add, conv bias as a separate Add);
- a mean or max over every spatial axis is a global pool, and a reshape of ``[N, C, 1, ...]``
  to ``[N, C]`` is ``Flatten(axis=1)``;
- attributes with defaults are written out, those inference ignores dropped, axes are
  non-negative.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .facts import op_facts, output_axis
from .rules import SOFTMAXES
from .spaces import find_spaces
from .ir import export_graph
from .surgery import constant, fresh_variable, replacement, sole_consumer

GLOBAL_POOLS = {"ReduceMean": "GlobalAveragePool", "ReduceMax": "GlobalMaxPool"}
AFFINE = ("Mul", "Div", "Add", "Sub")
CANONICAL_GEMM = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 1}


def _rank(tensor: gs.Tensor) -> int | None:
    return None if tensor.shape is None else len(tensor.shape)


def _has_input(node: gs.Node, index: int) -> bool:
    return len(node.inputs) > index and bool(node.inputs[index].name)


def matmul_to_gemm(graph: gs.Graph) -> int:
    """MatMul of a matrix by a constant matrix (skl2onnx, tf2onnx) is a Gemm."""
    count = 0
    for node in graph.nodes:
        weight = constant(node.inputs[1]) if node.op == "MatMul" else None
        if weight is None or weight.ndim != 2 or _rank(node.inputs[0]) != 2:
            continue
        node.op = "Gemm"
        node.inputs[1] = replacement(graph, node.inputs[1], np.ascontiguousarray(weight.T), "t")
        node.inputs.append(gs.Constant(f"{node.outputs[0].name}_bias", np.zeros(weight.shape[1], weight.dtype)))
        node.attrs = dict(CANONICAL_GEMM)
        count += 1
    return count


def normalize_gemm(graph: gs.Graph) -> int:
    """Gemm with a constant weight: alpha = beta = 1 (scaled into the constants), W as
    [out, in] (transB = 1) and a bias vector [out] (zeros when it has none)."""
    count = 0
    for node in graph.nodes:
        weight = constant(node.inputs[1]) if node.op == "Gemm" else None
        if weight is None or node.attrs.get("transA", 0):
            continue
        if not node.attrs.get("transB", 0):
            weight = weight.T
        bias = _gemm_bias(node, weight.shape[0])
        if bias is None or (node.attrs == CANONICAL_GEMM and _has_input(node, 2) and bias is constant(node.inputs[2])):
            continue
        alpha, beta = (weight.dtype.type(node.attrs.get(k, 1.0)) for k in ("alpha", "beta"))
        # a tensor already in canonical form stays (a large weight may be a memory map of its file)
        same_weight = node.attrs.get("transB", 0) and alpha == 1
        same_bias = _has_input(node, 2) and beta == 1 and bias is constant(node.inputs[2])
        new_bias = np.ascontiguousarray(bias * beta)
        node.inputs = [node.inputs[0],
                       node.inputs[1] if same_weight else replacement(graph, node.inputs[1],
                                                                      np.ascontiguousarray(weight * alpha), "gemm"),
                       node.inputs[2] if same_bias else replacement(graph, node.inputs[2], new_bias, "gemm")
                       if _has_input(node, 2) else gs.Constant(f"{node.outputs[0].name}_bias", new_bias)]
        node.attrs = dict(CANONICAL_GEMM)
        count += 1
    return count


def _gemm_bias(node: gs.Node, width: int) -> np.ndarray | None:
    """Gemm's C as a vector over the outputs (the same array when it already is one), or
    None when it is not a constant or varies along the rows."""
    if not _has_input(node, 2):
        return np.zeros(width, constant(node.inputs[1]).dtype)
    bias = constant(node.inputs[2])
    if bias is None or bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1) or bias.size not in (1, width):
        return None
    return bias if bias.shape == (width,) else np.broadcast_to(bias.reshape(-1), (width,))


CONVOLUTIONS = ("Conv", "ConvTranspose")


def _groups(node: gs.Node, axis: int) -> int:
    """How many groups share weight axis ``axis``: a grouped layer's axis 1 holds one group's
    channels (Conv weights are [out, in / group, ...], ConvTranspose weights [in, out / group, ...])."""
    return node.attrs.get("group", 1) if axis == 1 and op_facts(node.op).layout.grouped else 1


def output_channels(node: gs.Node, weight: np.ndarray) -> int:
    """Output channels of a weight layer (Conv, ConvTranspose, Gemm) with this weight."""
    axis = output_axis(op_facts(node.op).layout, node.attrs)
    return weight.shape[axis] * _groups(node, axis)


def scale_output_channels(node: gs.Node, weight: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """``weight`` with output channel c multiplied by ``factor[c]`` (see ``output_channels``)."""
    axis = output_axis(op_facts(node.op).layout, node.attrs)
    if axis == 0:
        return (weight * factor.reshape(-1, *[1] * (weight.ndim - 1))).astype(weight.dtype)
    groups = _groups(node, axis)
    per_group = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
    factor = factor.reshape(groups, 1, weight.shape[1], *[1] * (weight.ndim - 2))
    return (per_group * factor).reshape(weight.shape).astype(weight.dtype)


def explicit_conv_biases(graph: gs.Graph) -> int:
    """A Conv or ConvTranspose without a bias gets a zero one."""
    count = 0
    for node in graph.nodes:
        weight = constant(node.inputs[1]) if node.op in CONVOLUTIONS else None
        if weight is None or _has_input(node, 2):
            continue
        zeros = np.zeros(output_channels(node, weight), weight.dtype)
        node.inputs = [node.inputs[0], node.inputs[1], gs.Constant(f"{node.outputs[0].name}_bias", zeros)]
        count += 1
    return count


def fold_affine(graph: gs.Graph) -> int:
    """A Mul/Div/Add/Sub by a constant that varies only along the output channels, applied
    to the output of a Conv, ConvTranspose or Gemm and nothing else, is folded into its weights
    and bias."""
    count = 0
    for node in graph.nodes:
        canonical = node.op in CONVOLUTIONS or (node.op == "Gemm" and node.attrs == CANONICAL_GEMM)
        if not canonical or not _has_input(node, 2):
            continue
        weight, bias = constant(node.inputs[1]), constant(node.inputs[2])
        op = sole_consumer(graph, node.outputs[0])
        if weight is None or bias is None or op is None or op.op not in AFFINE or len(op.inputs) != 2:
            continue
        position = 0 if op.inputs[0] is node.outputs[0] else 1  # of the layer's output
        value = constant(op.inputs[1 - position])
        rank = weight.ndim if node.op in CONVOLUTIONS else 2
        channels = _per_channel(value, rank, output_channels(node, weight)) if value is not None else None
        if channels is None or (position == 1 and op.op in ("Div", "Sub")):
            continue
        if op.op in ("Mul", "Div"):
            scale = channels if op.op == "Mul" else 1.0 / channels
            weight = scale_output_channels(node, weight, scale.astype(weight.dtype))
            bias = bias * scale.astype(bias.dtype)
        else:
            bias = bias + (channels if op.op == "Add" else -channels).astype(bias.dtype)
        suffix = op.op.lower()
        node.inputs = [node.inputs[0], replacement(graph, node.inputs[1], weight, suffix),
                       replacement(graph, node.inputs[2], bias, suffix)]
        node.outputs[0] = op.outputs[0]
        op.outputs.clear()
        op.inputs.clear()
        count += 1
    return count


def _per_channel(value: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """``value`` as one number per channel (axis 1 of a rank-``rank`` output), or None when
    it varies along other axes or would broadcast the output to another shape."""
    if value.ndim > rank:
        return None
    full = value.reshape((1,) * (rank - value.ndim) + value.shape)
    if any(d != 1 for k, d in enumerate(full.shape) if k != 1) or full.shape[1] not in (1, channels):
        return None
    return np.broadcast_to(full.reshape(-1), (channels,)).copy()


def global_pools(graph: gs.Graph) -> int:
    """ReduceMean/ReduceMax over every spatial axis, or ReduceSum over them divided by their
    size (jax2onnx's mean), is GlobalAveragePool/GlobalMaxPool, followed by Flatten(axis=1)
    when the reduced axes are dropped. A rank-3 tensor may be ``[N, T, D]`` with channels last
    (transformers): its last axis is a pool's only where the rule table tracks no channels there."""
    count = 0
    tracked: dict[str, dict] | None = None
    for node in list(graph.nodes):
        if not _over_spatial_axes(node):
            continue
        if _rank(node.inputs[0]) == 3:
            tracked = _tracked_axes(graph) if tracked is None else tracked
            if 2 in tracked.get(node.inputs[0].name, {}):
                continue
        if node.op == "ReduceSum":
            divide = sole_consumer(graph, node.outputs[0])
            if divide is None or not _divides_by(divide, node.outputs[0], _spatial_size(node.inputs[0])):
                continue
            node.outputs[0] = divide.outputs[0]
            divide.outputs.clear()
            divide.inputs.clear()
        keep = node.attrs.get("keepdims", 1)
        node.op, node.attrs, node.inputs = GLOBAL_POOLS.get(node.op, "GlobalAveragePool"), {}, [node.inputs[0]]
        if not keep:
            result = node.outputs[0]
            pooled = fresh_variable(graph, result, "pooled")
            node.outputs[0] = pooled
            graph.nodes.append(gs.Node("Flatten", f"{node.name}_flatten", {"axis": 1}, [pooled], [result]))
        count += 1
    return count


def _tracked_axes(graph: gs.Graph) -> dict[str, dict]:
    """Each tensor's axes that carry channels, as the rule table finds them in ``graph``."""
    return find_spaces(export_graph(graph.copy().toposort(), do_type_check=False)).layouts


def _over_spatial_axes(node: gs.Node) -> bool:
    """A ReduceMean/ReduceMax/ReduceSum over exactly the axes after the channels."""
    rank = _rank(node.inputs[0]) if node.op in (*GLOBAL_POOLS, "ReduceSum") else None
    if rank is None or rank < 3:
        return False
    axes = constant(node.inputs[1]) if len(node.inputs) > 1 else node.attrs.get("axes")
    return axes is not None and sorted(int(a) % rank for a in np.reshape(axes, -1)) == list(range(2, rank))


def _spatial_size(tensor: gs.Tensor) -> int | None:
    spatial = tensor.shape[2:]
    return int(np.prod(spatial)) if all(isinstance(d, int) for d in spatial) else None


def _divides_by(node: gs.Node, tensor: gs.Tensor, size: int | None) -> bool:
    """Whether ``node`` is ``tensor / size`` or ``tensor * (1 / size)``."""
    if size is None or node.op not in ("Div", "Mul") or len(node.inputs) != 2:
        return False
    position = 0 if node.inputs[0] is tensor else 1
    value = constant(node.inputs[1 - position])
    if value is None or value.size != 1 or (node.op == "Div" and position == 1):
        return False
    factor = float(value.reshape(-1)[0])
    return bool(np.isclose(factor, size if node.op == "Div" else 1.0 / size, rtol=1e-6, atol=0))


def flatten_reshapes(graph: gs.Graph) -> int:
    """Reshape or Squeeze of ``[N, C, ...]`` to ``[N, C * ...]`` (the flatten of a classifier,
    with its target constant or computed from the input's shape) is ``Flatten(axis=1)``."""
    count = 0
    for node in graph.nodes:
        if node.op not in ("Reshape", "Squeeze"):
            continue
        source, result = node.inputs[0].shape, node.outputs[0].shape
        if source is None or result is None or len(source) < 3 or len(result) != 2:
            continue
        batch_kept = result[0] == source[0] and result[0] is not None  # equal symbols or sizes
        size_known = all(isinstance(d, int) for d in source[1:]) and result[1] == int(np.prod(source[1:]))
        if batch_kept or size_known:
            node.op, node.attrs, node.inputs = "Flatten", {"axis": 1}, [node.inputs[0]]
            count += 1
    return count


def canonical_attributes(graph: gs.Graph) -> int:
    """Write out default attributes, drop those inference ignores (BatchNormalization's
    momentum) and make axes non-negative, so equal layers compare equal."""
    count = 0
    for node in graph.nodes:
        before = dict(node.attrs)
        if node.op == "Conv" and constant(node.inputs[1]) is not None:
            _conv_attributes(node)
        elif node.op == "BatchNormalization" and not node.attrs.get("training_mode", 0):
            node.attrs.pop("momentum", None)
            node.attrs.pop("training_mode", None)
        elif node.op in (*SOFTMAXES, "Flatten", "LayerNormalization") and _rank(node.inputs[0]) is not None:
            default = 1 if node.op == "Flatten" or (node.op in SOFTMAXES and graph.opset < 13) else -1
            axis = int(node.attrs.get("axis", default))
            node.attrs["axis"] = axis + _rank(node.inputs[0]) if axis < 0 else axis
        elif node.op == "Slice":
            count += _slice_axes(node)
        count += node.attrs != before
    return count


def _slice_axes(node: gs.Node) -> bool:
    """Slice axes non-negative (as the rule table and ``resize_constants`` read them)."""
    axes = constant(node.inputs[3]) if len(node.inputs) > 3 else None
    rank = _rank(node.inputs[0])
    if axes is None or rank is None or (axes >= 0).all():
        return False
    node.inputs[3] = gs.Constant(node.inputs[3].name, (axes % rank).astype(axes.dtype))
    return True


def _conv_attributes(node: gs.Node) -> None:
    kernel = list(constant(node.inputs[1]).shape[2:])
    spatial = len(kernel)
    attrs = node.attrs
    attrs.setdefault("kernel_shape", kernel)
    attrs.setdefault("strides", [1] * spatial)
    attrs.setdefault("dilations", [1] * spatial)
    attrs.setdefault("group", 1)
    pad = attrs.get("auto_pad", "NOTSET")
    pad = pad.decode() if isinstance(pad, bytes) else pad
    if pad == "NOTSET":
        attrs.pop("auto_pad", None)
        attrs.setdefault("pads", [0] * 2 * spatial)
    elif pad == "VALID":
        attrs.pop("auto_pad")
        attrs["pads"] = [0] * 2 * spatial
    else:
        sizes = (node.inputs[0].shape or [None] * (spatial + 2))[2:]
        if all(isinstance(s, int) for s in sizes):
            attrs.pop("auto_pad")
            attrs["pads"] = _same_pads(sizes, kernel, attrs["strides"], attrs["dilations"], upper=pad == "SAME_UPPER")


def _same_pads(sizes, kernel, strides, dilations, *, upper: bool) -> list[int]:
    """Explicit pads of auto_pad SAME_UPPER/SAME_LOWER (output size ceil(in / stride))."""
    begins, ends = [], []
    for size, k, stride, dilation in zip(sizes, kernel, strides, dilations):
        total = max((-(-size // stride) - 1) * stride + (k - 1) * dilation + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if upper else large)
        ends.append(large if upper else small)
    return begins + ends
