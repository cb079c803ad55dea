"""Canonical passes for layout transposes (channels-last exporters such as tf2onnx).

tf2onnx writes a channels-last (NHWC) network as ``Transpose(0,3,1,2) -> Conv ->
Transpose(0,2,3,1)`` around every conv, with the ops between convs in NHWC. Pushing each
transpose down through elementwise ops and reductions until it meets its inverse leaves a
plain channels-first (NCHW) conv chain with one transpose at the input, as a channels-first
exporter writes it. Only layout permutations (the channel axis moved between position 1 and
the end) are moved: other transposes (attention heads) are part of the architecture.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .rules import BINARY, REDUCTIONS, UNARY
from .surgery import constant, fresh_variable, producer, replace_input, same_shape, shape_target, sole_consumer


def is_layout_perm(perm: list[int]) -> bool:
    """NCHW -> NHWC or NHWC -> NCHW, for any number of spatial axes."""
    rank = len(perm)
    channels_last = [0, *range(2, rank), 1]
    channels_first = [0, rank - 1, *range(1, rank - 1)]
    return rank >= 3 and list(perm) in (channels_last, channels_first)


def _perm(node: gs.Node) -> list[int] | None:
    if node.op != "Transpose" or not node.inputs:
        return None
    perm = node.attrs.get("perm")
    if perm is None:
        shape = node.inputs[0].shape
        perm = list(reversed(range(len(shape)))) if shape is not None else None
    return None if perm is None else [int(p) for p in perm]


def compose_transposes(graph: gs.Graph) -> int:
    """Transpose(q) of Transpose(p) is one Transpose of the first's input; inverse pairs
    become an identity permutation, which ``drop_aliases`` removes."""
    count = 0
    for node in graph.nodes:
        outer = _perm(node)
        inner_node = producer(node.inputs[0]) if outer is not None else None
        inner = _perm(inner_node) if inner_node is not None else None
        if inner is None:
            continue
        node.inputs[0] = inner_node.inputs[0]
        node.attrs["perm"] = [inner[q] for q in outer]
        count += 1
    return count


def push_transposes(graph: gs.Graph) -> int:
    """Move layout transposes after elementwise ops and reductions, towards their inverses."""
    count = 0
    moved = True
    while moved:
        moved = False
        for node in list(graph.nodes):
            perm = _perm(node)
            if perm is None or not is_layout_perm(perm) or not node.inputs or not node.outputs:
                continue
            consumer = sole_consumer(graph, node.outputs[0])
            if consumer is not None and _push(graph, node, consumer, perm):
                moved = True
                count += 1
    return count


def _push(graph: gs.Graph, transpose: gs.Node, op: gs.Node, perm: list[int]) -> bool:
    if len(op.outputs) != 1 or op.domain not in ("", "ai.onnx", None):
        return False
    if op.op in UNARY and all(_scalar(t) for t in op.inputs[1:]):  # Clip's bounds
        after = perm
    elif op.op in BINARY:
        if not _transpose_operands(graph, transpose, op, perm):
            return False
        after = perm
    elif op.op in REDUCTIONS:
        after = _transpose_reduction(graph, op, perm)
        if after is None:
            return False
    else:
        return False
    _swap(graph, transpose, op, after)
    return True


def _scalar(tensor: gs.Tensor) -> bool:
    """A scalar constant or an omitted optional input."""
    value = constant(tensor)
    return not tensor.name or (value is not None and value.size <= 1)


def _swap(graph: gs.Graph, transpose: gs.Node, op: gs.Node, perm: list[int]) -> None:
    """Rewire ``x -> transpose -> op -> y`` into ``x -> op -> transpose(perm) -> y``."""
    source, result = transpose.inputs[0], op.outputs[0]
    replace_input(op, transpose.outputs[0], source)
    between = fresh_variable(graph, result, "untransposed")
    op.outputs[0] = between
    transpose.inputs[0] = between
    transpose.outputs[0] = result
    transpose.attrs["perm"] = perm
    graph.toposort()


def _transpose_operands(graph: gs.Graph, transpose: gs.Node, op: gs.Node, perm: list[int]) -> bool:
    """Other operands of a broadcasting op: constants are transposed back (in place of the
    transpose); activations must come through the same transpose, alone."""
    inverse = list(np.argsort(perm))
    rank = len(perm)
    updates = {}
    for index, tensor in enumerate(op.inputs):
        if tensor is transpose.outputs[0]:
            continue
        value = constant(tensor)
        if value is not None:
            if value.ndim > rank:
                return False
            full = value.reshape((1,) * (rank - value.ndim) + value.shape)
            updates[index] = gs.Constant(f"{tensor.name}_untransposed", np.ascontiguousarray(full.transpose(inverse)))
            continue
        other = producer(tensor)
        if other is None or _perm(other) != perm or sole_consumer(graph, tensor) is not op:
            return False
        updates[index] = other.inputs[0]
    for index, tensor in updates.items():
        op.inputs[index] = tensor
    return True


def _transpose_reduction(graph: gs.Graph, op: gs.Node, perm: list[int]) -> list[int] | None:
    """Reduce over the transposed axes instead; returns the permutation left after it."""
    axes = _reduce_axes(op)
    if not axes:
        return None
    rank = len(perm)
    axes = sorted(perm[a % rank] for a in axes)
    _set_reduce_axes(op, axes)
    if op.attrs.get("keepdims", 1):
        return perm
    kept = [p for p in perm if p not in axes]
    return [int(k) for k in np.argsort(np.argsort(kept))]


def _reduce_axes(op: gs.Node) -> list[int] | None:
    if len(op.inputs) > 1:
        value = constant(op.inputs[1])
        return None if value is None else [int(a) for a in value.reshape(-1)]
    axes = op.attrs.get("axes")
    return None if axes is None else [int(a) for a in axes]


def _set_reduce_axes(op: gs.Node, axes: list[int]) -> None:
    if len(op.inputs) > 1:
        op.inputs[1] = gs.Constant(f"{op.inputs[1].name}_untransposed", np.array(axes, dtype=np.int64))
    else:
        op.attrs["axes"] = axes


def layout_transposes_as_reshapes(graph: gs.Graph) -> int:
    """A layout transpose that moves only axes of size 1 (NHWC <-> NCHW with one channel) is
    a reshape; tf2onnx writes it so, and merged reshapes then cancel."""
    count = 0
    for node in graph.nodes:
        perm = _perm(node)
        shape = node.inputs[0].shape if perm is not None and node.inputs else None
        if shape is None or not is_layout_perm(perm):
            continue
        moved = [p for p in perm if shape[p] != 1]
        target = shape_target(node.outputs[0], f"{node.outputs[0].name}_shape")
        if moved != sorted(moved) or target is None:
            continue
        node.op, node.attrs = "Reshape", {}
        node.inputs.append(target)
        count += 1
    return count


def merge_reshapes(graph: gs.Graph) -> int:
    """Reshape of a Reshape is one Reshape of the first's input (targets without 0 entries,
    which would copy the middle tensor's dimensions)."""
    count = 0
    for node in graph.nodes:
        if node.op != "Reshape":
            continue
        inner = producer(node.inputs[0])
        target = constant(node.inputs[1])
        if inner is None or inner.op != "Reshape" or target is None or (target == 0).any():
            continue
        node.inputs[0] = inner.inputs[0]
        count += 1
    return count


def is_noop_reshape(node: gs.Node) -> bool:
    """Reshape-like ops whose output has the input's shape."""
    return (node.op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze") and len(node.outputs) == 1
            and same_shape(node.inputs[0], node.outputs[0]))
