"""Which part of the graph is merged (the trunk) and which stays per model (the heads).

Weight layers are the nodes that make a new space from constant weights (Conv, ConvTranspose,
Gemm, MatMul, embedding Gather), counted in topological order. A space is zipped when it is
mergeable and its first producing weight layer is among the first ``zip_layers`` ones. A weight
layer that produces a space that is not zipped starts a head: it and everything downstream
of it is copied once per model (method.md §6). With shared heads nothing is copied and the
fixed output spaces are averaged.

Mergeable: free, or a feature output: a space fixed only as a graph output that a weight layer
of the graph reads (an encoder's hidden state, a ResNet's pooled features). Each model gets
that output back from the merged one through its U_i; a space only written to an output
(logits) stays fixed, so its layer is a per-model task head.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from ..choices import HEADS
from ..errors import RecipeError
from ..graph.layout import leaves
from ..graph.rules import RULES
from ..graph.spaces import SpaceGraph, node_label
from ..options import MergeOptions



@dataclass(frozen=True)
class TrunkSplit:
    """Node indices (canonical order) that are per-model heads, and the zipped spaces."""

    head_nodes: frozenset[int]
    zipped: frozenset[int]
    zipped_layers: int
    total_layers: int


def weight_layers(model: onnx.ModelProto, graph: SpaceGraph) -> list[int]:
    """Indices of the nodes that produce a new space from constant weights, in order."""
    labels = {node_label(n, i): i for i, n in enumerate(model.graph.node)}
    return sorted({labels[p.node] for p in graph.params
                   if p.role == "producer" and RULES[model.graph.node[labels[p.node]].op_type].kind == "new-space"})


def split_trunk(model: onnx.ModelProto, graph: SpaceGraph, *, heads: str = MergeOptions.heads,
                zip_layers: int | None = None) -> TrunkSplit:
    """Decide the trunk and the heads of a canonical model (the reference of a merge)."""
    if heads not in HEADS:
        raise RecipeError(f"unknown --heads {heads!r}; use one of {', '.join(HEADS)}")
    layers = weight_layers(model, graph)
    if zip_layers is not None and heads == "shared":
        raise RecipeError("--heads shared merges every layer; drop --zip-layers or use --heads separate")
    if zip_layers is not None and not 0 <= zip_layers <= len(layers):
        raise RecipeError(f"--zip-layers {zip_layers} is out of range: the model has {len(layers)} weight layers")
    limit = len(layers) if zip_layers is None else zip_layers
    position = {node: k for k, node in enumerate(layers)}
    labels = {node_label(n, i): i for i, n in enumerate(model.graph.node)}
    first: dict[int, int] = {}
    for use in graph.params:
        if use.role == "producer" and labels[use.node] in position:
            for space in leaves(use.layout):
                first[space] = min(first.get(space, len(layers)), position[labels[use.node]])
    features = feature_outputs(graph)
    mergeable = [s for s in graph.spaces if not s.fixed or s.id in features]
    zipped = frozenset(s.id for s in mergeable if first.get(s.id, 0) < limit)
    seeds = set()
    for use in graph.params:
        node = labels[use.node]
        if use.role == "producer" and node in position and heads == "separate":
            if any(space not in zipped for space in leaves(use.layout)):
                seeds.add(node)
    head = _downstream(model, seeds)
    trunk_layers = sum(1 for node in layers if node not in head)
    return TrunkSplit(frozenset(head), zipped, trunk_layers, len(layers))


def feature_outputs(graph: SpaceGraph) -> set[int]:
    """Spaces fixed only as graph outputs that some weight layer consumes: the graph reads them
    itself, so they are features it exposes, not its answer (method.md §6)."""
    return {s for s in graph.outputs if graph.space(s).consumers}


def _downstream(model: onnx.ModelProto, seeds: set[int]) -> set[int]:
    tainted: set[str] = set()
    result = set()
    for index, node in enumerate(model.graph.node):
        if index in seeds or any(name in tainted for name in node.input):
            result.add(index)
            tainted.update(node.output)
    return result
