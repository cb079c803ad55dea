"""Post-processing after a model's last weight layer, kept apart from the network while merging.

What follows the last layer with parameters computes nothing a merge could share, and models
of one architecture often differ there: scikit-learn's classifiers end in a Softmax, PyTorch
models return logits, others end in a LogSoftmax or a Sigmoid. skl2onnx also writes a label
output (ArgMax -> ArrayFeatureExtractor -> Reshape -> Cast) next to the probabilities, and
with ``zipmap=True`` turns them into a sequence of maps (ZipMap). Post-processing is every
node read only by post-processing nodes or as graph outputs that either outputs only
non-float tensors or non-tensors (labels, maps), or is parameter-free and computes from one
output of a layer with parameters, directly or through such nodes (Softmax, LogSoftmax,
Sigmoid, ArgMax, ...). The
rest, the core, is the network that merges; the merged model computes each model's
post-processing from that model's own scores, so each model keeps its outputs
(``probabilities_m<i>``, ``label_m<i>``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import onnx
import onnx_graphsurgeon as gs

from .canonical import export_like
from .ir import import_graph, renamed_copy

FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


@dataclass(frozen=True)
class PostProcessing:
    """The post-processing nodes of a model, what they read from the core and produce."""

    model: onnx.ModelProto | None = None  # the post-processing alone, reading the scores as inputs
    scores: tuple[str, ...] = ()  # core tensors the nodes read; outputs of the core
    opsets: tuple[onnx.OperatorSetIdProto, ...] = ()
    order: tuple[str, ...] = ()  # the model's outputs in order, after scores that were none
    head: tuple[str, ...] = ()  # its floating-point ops (Softmax, ...) with their attributes

    def describe(self) -> str:
        """The floating-point ops after the last weight layer: what heads of one design share."""
        return " -> ".join(self.head) or "nothing"

    def output_names(self, core: onnx.ModelProto) -> list[str]:
        """The outputs of ``core`` with this post-processing, in the original model's order."""
        return list(self.order) or [o.name for o in core.graph.output]


def _signature(node: onnx.NodeProto) -> str:
    values = [f"{a.name}={onnx.helper.get_attribute_value(a)!r}" for a in node.attribute]
    return node.op_type + (f"({', '.join(sorted(values))})" if values else "")


def _score_types(model: onnx.ModelProto) -> dict[str, bool]:
    """Whether each typed tensor is a floating-point tensor."""
    graph = model.graph
    result = {init.name: init.data_type in FLOATS for init in graph.initializer}
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        kind = info.type.WhichOneof("value")
        result[info.name] = kind == "tensor_type" and info.type.tensor_type.elem_type in FLOATS
    return result


def _after_weights(model: onnx.ModelProto) -> set[int]:
    """Parameter-free nodes computing from one output of a node with float parameters (weight
    layer, normalisation), directly or through such nodes. A node combining two such outputs
    (a residual Add ending a feature extractor) ties their spaces: it belongs to the network."""
    params = {init.name for init in model.graph.initializer if init.data_type in FLOATS}
    constants = {init.name for init in model.graph.initializer}
    origin: dict[str, str] = {}  # tensor -> the parameterised node output it is computed from
    found = set()
    for index, node in enumerate(model.graph.node):
        dynamic = [name for name in node.input if name and name not in constants]
        if any(name in params for name in node.input):
            origin.update((name, name) for name in node.output)
        elif dynamic and all(name in origin for name in dynamic) and len({origin[n] for n in dynamic}) == 1:
            found.add(index)
            origin.update((name, origin[dynamic[0]]) for name in node.output)
    return found


def _non_float(model: onnx.ModelProto) -> set[int]:
    """Nodes whose outputs are all non-float tensors or non-tensors; a tensor of unknown type
    may be a score, so its node is not among them."""
    floats = _score_types(model)
    return {index for index, node in enumerate(model.graph.node)
            if any(node.output) and all(name in floats and not floats[name] for name in node.output if name)}


def _postprocessing_nodes(model: onnx.ModelProto) -> set[int]:
    candidates = _after_weights(model) | _non_float(model)
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(model.graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(index)
    found: set[int] = set()
    for index in reversed(range(len(model.graph.node))):
        outputs = [name for name in model.graph.node[index].output if name]
        if index in candidates and all(k in found for name in outputs for k in consumers.get(name, [])):
            found.add(index)
    return found


def split_postprocessing(model: onnx.ModelProto) -> tuple[onnx.ModelProto, PostProcessing]:
    """The core of a canonical model (its network up to the last layers with parameters, with
    the scores the post-processing reads as outputs) and the post-processing, which may be empty."""
    tail = _postprocessing_nodes(model)
    if not tail:
        return model, PostProcessing()
    graph = model.graph
    nodes = [n for k, n in enumerate(graph.node) if k in tail]
    produced = {name for node in nodes for name in node.output}
    read = list(dict.fromkeys(name for node in nodes for name in node.input if name and name not in produced))
    constants = {init.name for init in graph.initializer}  # copied with the tail
    scores = [name for name in read if name not in constants]
    known = {v.name: v for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    if any(name not in known for name in scores):  # untyped (after a custom op): keep it all in the core
        return model, PostProcessing()
    exposed = _exposed(model, tail)
    outputs = [o.name for o in graph.output if o.name in produced] + [name for name in exposed if name in produced]
    core = _core(model, tail, scores)
    post = PostProcessing(_tail(model, tail, scores, outputs), tuple(scores),
                          tuple(o for o in model.opset_import if o.domain not in ("", "ai.onnx")),
                          tuple(exposed + [o.name for o in graph.output]),
                          tuple(_signature(graph.node[k]) for k in sorted(tail - _non_float(model))))
    return core, post


def _exposed(model: onnx.ModelProto, tail: set[int]) -> list[str]:
    """Floating-point tensors that labels or maps are computed from but that are no graph
    output (the probabilities a ZipMap reads): each model's become outputs of the merged model."""
    floats = _score_types(model)
    hidden = {o.name for o in model.graph.output} | {init.name for init in model.graph.initializer}
    return list(dict.fromkeys(name for k in sorted(tail & _non_float(model)) for name in model.graph.node[k].input
                              if floats.get(name) and name not in hidden))


def _core(model: onnx.ModelProto, tail: set[int], scores: list[str]) -> onnx.ModelProto:
    """The model without the ``tail`` nodes and the initializers only they read, its outputs
    those the tail does not produce and the ``scores`` the tail reads."""
    produced = {name for k in tail for name in model.graph.node[k].output if name}
    graph = import_graph(model)  # the same nodes in the same order: tail indices hold
    for node in [graph.nodes[k] for k in tail]:
        node.inputs.clear()
        node.outputs.clear()
    graph.nodes = [node for k, node in enumerate(graph.nodes) if k not in tail]
    tensors = graph.tensors()  # the tail's own initializers are gone with it
    outputs = [o for o in graph.outputs if o.name not in produced]
    graph.outputs = outputs + [tensors[name] for name in scores if name not in {kept.name for kept in outputs}]
    return export_like(graph, model)


def _tail(model: onnx.ModelProto, tail: set[int], scores: list[str], outputs: list[str]) -> onnx.ModelProto:
    """The ``tail`` nodes of ``model`` alone, with the initializers they read: a model of the
    ``scores`` with the post-processing ``outputs``."""
    graph = import_graph(model)  # the same nodes in the same order: tail indices hold
    graph.nodes = [node for k, node in enumerate(graph.nodes) if k in tail]
    tensors = graph.tensors()
    graph.inputs = [tensors[name] for name in scores]
    graph.outputs = [tensors[name] for name in outputs]
    return export_like(graph, model)


def attach_postprocessing(graph: gs.Graph, post: PostProcessing, rename: Callable[[str], str]) -> None:
    """Append ``post`` to ``graph`` (in place), every tensor name passed through ``rename``
    (the scores must exist in ``graph`` under their renamed names)."""
    if post.model is None:
        return
    source = import_graph(post.model)
    tensors = graph.tensors()
    copies = {score.name: tensors[rename(score.name)] for score in source.inputs}

    def copy(tensor: gs.Tensor) -> gs.Tensor:
        if not tensor.name:
            return gs.Variable.empty()
        if tensor.name not in copies:
            name = rename(tensor.name)
            copies[tensor.name] = renamed_copy(tensor, name) if isinstance(tensor, gs.Constant) else gs.Variable(name)
        return copies[tensor.name]

    for node in source.nodes:
        name = rename(node.name or f"{node.op}_{node.outputs[0].name}")  # unnamed nodes: unique names
        graph.nodes.append(gs.Node(node.op, name=name, attrs=dict(node.attrs), inputs=[copy(t) for t in node.inputs],
                                   outputs=[copy(t) for t in node.outputs], domain=node.domain))
    for output in source.outputs:
        result = copy(output)
        result.dtype, result.shape, result.type = output.dtype, output.shape, output.type
        graph.outputs.append(result)
