"""Small graph-surgery steps on onnx-graphsurgeon graphs, shared by the canonical passes."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .. import weights
from .ir import has_mapped_weights


def constant(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor, else None."""
    return tensor.values if isinstance(tensor, gs.Constant) else None


def is_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


def sole_consumer(graph: gs.Graph, tensor: gs.Tensor) -> gs.Node | None:
    """The one node reading ``tensor`` when nothing else (another node, the graph outputs) does."""
    if len(tensor.outputs) != 1 or is_output(graph, tensor):
        return None
    return tensor.outputs[0]


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for index, tensor in enumerate(node.inputs):
        if tensor is old:
            node.inputs[index] = new


def bypass(graph: gs.Graph, node: gs.Node, source: gs.Tensor) -> bool:
    """Remove ``node``, whose single output equals ``source``: its consumers read ``source``.

    When the output is a graph output, the producer of ``source`` writes it instead, so the
    model keeps its output names; that needs ``source`` to be an intermediate tensor.
    Returns whether the node was removed.
    """
    alias = node.outputs[0]
    if is_output(graph, alias):
        maker = producer(source)
        if maker is None or is_output(graph, source) or any(t is source for t in graph.inputs):
            return False
        for consumer in list(source.outputs):
            if consumer is not node:
                replace_input(consumer, source, alias)
        maker.outputs[maker.outputs.index(source)] = alias
    else:
        for consumer in list(alias.outputs):
            replace_input(consumer, alias, source)
    node.outputs.clear()
    node.inputs.clear()
    return True


def same_shape(a: gs.Tensor, b: gs.Tensor) -> bool:
    """Whether two tensors of equal size surely have one shape: equal rank and equal known
    dimensions everywhere but at most one place (equal sizes then fix that one too)."""
    if a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
        return False
    unknown = 0
    for x, y in zip(a.shape, b.shape):
        if isinstance(x, int) and isinstance(y, int):
            if x != y:
                return False
        elif not (isinstance(x, str) and x == y):
            unknown += 1
    return unknown <= 1


def shape_target(tensor: gs.Tensor, name: str) -> gs.Constant | None:
    """A constant Reshape target giving ``tensor``'s shape, its one unknown dimension as -1."""
    shape = tensor.shape
    if shape is None or sum(not isinstance(d, int) for d in shape) > 1:
        return None
    return gs.Constant(name, np.array([d if isinstance(d, int) else -1 for d in shape], dtype=np.int64))


def fresh_variable(graph: gs.Graph, like: gs.Tensor, suffix: str) -> gs.Variable:
    """A new intermediate tensor named after ``like``, of its dtype and unknown shape."""
    taken = graph.tensors()
    name, count = f"{like.name}_{suffix}", 0
    while name in taken:
        count += 1
        name = f"{like.name}_{suffix}{count}"
    return gs.Variable(name, dtype=like.dtype)


def replacement(graph: gs.Graph, old: gs.Tensor, values: np.ndarray, suffix: str) -> gs.Constant:
    """A constant to use instead of ``old`` in its one use: it keeps the name when nothing else
    reads ``old``, so folded parameters keep their names. In the graph of a model with mapped
    weights a large one is spilled at once (``weights.kept``): a pass folding every layer
    would otherwise hold all their new weights in memory until the graph is exported."""
    values = weights.kept(values, has_mapped_weights(graph))
    if isinstance(old, gs.Constant) and len(old.outputs) == 1:
        return gs.Constant(old.name, values)
    return gs.Constant(f"{old.name}_{suffix}", values)


def add_node(graph: gs.Graph, op: str, inputs: list[gs.Tensor], output: str, *, node_name: str = "",
             **attrs) -> gs.Variable:
    """Append an ``op`` node (named ``node_name``) reading ``inputs`` to ``graph``; its output, a
    new tensor named ``output``. (``graph.layer`` scans the whole graph for free names at every
    call: quadratic in the nodes a pass adds to a large model.)"""
    result = gs.Variable(output)
    graph.nodes.append(gs.Node(op, name=node_name, attrs=attrs, inputs=inputs, outputs=[result]))
    return result


def drop_shapes(graph: gs.Graph) -> None:
    """Forget the type and shape of every intermediate tensor (graph inputs and outputs keep
    theirs): after a rewrite that changes widths they are inferred again, and none is exported
    as value_info meanwhile."""
    typed = {id(t) for t in graph.inputs + graph.outputs}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and id(tensor) not in typed:
            tensor.dtype = tensor.shape = None
