"""Post-processing after a classifier's scores, kept apart from the network while merging.

skl2onnx writes a label output (ArgMax -> ArrayFeatureExtractor -> Reshape -> Cast) next to
the probabilities, and with ``zipmap=True`` turns the probabilities into a sequence of maps
(ZipMap). Those nodes compute nothing a merge could share: the network that merges is the
part computing floating-point tensors (the core); post-processing is every node whose
outputs are all non-float tensors or non-tensors and are read only by post-processing nodes
or as graph outputs. The merged model computes each model's post-processing from that
model's own scores, so each model keeps its label output (``label_m<i>``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import onnx

FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


@dataclass(frozen=True)
class PostProcessing:
    """The post-processing nodes of a model, what they read from the core and produce."""

    nodes: tuple[onnx.NodeProto, ...] = ()
    initializers: tuple[onnx.TensorProto, ...] = ()
    scores: tuple[str, ...] = ()  # core tensors the nodes read; outputs of the core
    outputs: tuple[onnx.ValueInfoProto, ...] = ()
    opsets: tuple[onnx.OperatorSetIdProto, ...] = ()
    order: tuple[str, ...] = ()  # the model's outputs in order, after scores that were none

    def output_names(self, core: onnx.ModelProto) -> list[str]:
        """The outputs of ``core`` with this post-processing, in the original model's order."""
        return list(self.order) or [o.name for o in core.graph.output]


def _score_types(model: onnx.ModelProto) -> dict[str, bool]:
    """Whether each typed tensor is a floating-point tensor."""
    graph = model.graph
    result = {init.name: init.data_type in FLOATS for init in graph.initializer}
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        kind = info.type.WhichOneof("value")
        result[info.name] = kind == "tensor_type" and info.type.tensor_type.elem_type in FLOATS
    return result


def _postprocessing_nodes(model: onnx.ModelProto) -> set[int]:
    floats = _score_types(model)
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(model.graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(index)
    found: set[int] = set()
    for index in reversed(range(len(model.graph.node))):
        outputs = [name for name in model.graph.node[index].output if name]
        # a tensor of unknown type may be a score: such a node stays in the core
        if outputs and all(name in floats and not floats[name] for name in outputs) and all(
                k in found for name in outputs for k in consumers.get(name, [])):
            found.add(index)
    return found


def split_postprocessing(model: onnx.ModelProto) -> tuple[onnx.ModelProto, PostProcessing]:
    """The core of a canonical model (its floating-point network, with the scores the
    post-processing reads as outputs) and the post-processing, which may be empty."""
    tail = _postprocessing_nodes(model)
    if not tail:
        return model, PostProcessing()
    graph = model.graph
    nodes = [n for k, n in enumerate(graph.node) if k in tail]
    produced = {name for node in nodes for name in node.output}
    read = list(dict.fromkeys(name for node in nodes for name in node.input if name and name not in produced))
    core_nodes = [n for k, n in enumerate(graph.node) if k not in tail]
    own = [init for init in graph.initializer if init.name in read]  # untied: read by the tail only
    own_names = {init.name for init in own}
    scores = [name for name in read if name not in own_names]
    core = onnx.ModelProto()
    core.CopyFrom(model)
    del core.graph.node[:]
    core.graph.node.extend(core_nodes)
    kept_inits = [init for init in graph.initializer if init.name not in own_names]
    del core.graph.initializer[:]
    core.graph.initializer.extend(kept_inits)
    outputs = [o for o in graph.output if o.name not in produced]
    known = {v.name: v for v in list(graph.value_info) + list(graph.input)}
    outputs += [known[name] for name in scores if name not in {o.name for o in outputs} and name in known]
    del core.graph.output[:]
    core.graph.output.extend(outputs)
    exposed = [name for name in scores if name not in {o.name for o in graph.output}]
    post = PostProcessing(tuple(nodes), tuple(own), tuple(scores),
                          tuple(o for o in graph.output if o.name in produced),
                          tuple(o for o in model.opset_import if o.domain not in ("", "ai.onnx")),
                          tuple(exposed + [o.name for o in graph.output]))
    return core, post


def attach_postprocessing(model: onnx.ModelProto, post: PostProcessing, rename: Callable[[str], str]) -> None:
    """Append ``post`` to ``model`` (in place), every tensor name passed through ``rename``
    (the scores must exist in ``model`` under their renamed names)."""
    for node in post.nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [rename(name) if name else name for name in node.input]
        copy.output[:] = [rename(name) if name else name for name in node.output]
        copy.name = rename(node.name or node.op_type)
        model.graph.node.append(copy)
    for init in post.initializers:
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        copy.name = rename(init.name)
        model.graph.initializer.append(copy)
    for output in post.outputs:
        copy = onnx.ValueInfoProto()
        copy.CopyFrom(output)
        copy.name = rename(output.name)
        model.graph.output.append(copy)
    domains = {o.domain for o in model.opset_import}
    model.opset_import.extend(o for o in post.opsets if o.domain not in domains)
