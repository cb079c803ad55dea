"""Build the merged ONNX graph: one trunk with merged parameters, one head copy per model.

For model i and a matched space, producers become ``M_i p`` and consumers ``W U_i``
(method.md §4); the merged parameter is the sum over models. Fixed spaces are averaged.
A head copy reads the trunk through ``U_i``: folded into its first weight layer where it
reads the trunk directly, else through an explicit MatMul "unmerge" node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph.correspond import Correspondence
from ..graph.layout import Layout, layout_width, leaves
from ..graph.rules import RULES
from ..graph.spaces import SpaceGraph
from ..match.matching import Matching
from ..graph.apply import transformed_arrays, transformer
from .heads import TrunkSplit
from ..graph.transform import Linear, transform_axis
from .. import weights


@dataclass(frozen=True)
class Member:
    """One input model of a merge: canonical model, spaces, and correspondence to model 0."""

    model: onnx.ModelProto
    graph: SpaceGraph
    correspondence: Correspondence

    def space_of(self, reference_space: int) -> int:
        return self.correspondence.spaces[reference_space]


def merged_trunk_parameters(members: list[Member], split: TrunkSplit, matchings: dict[int, Matching],
                            combine: Callable[[str, list[np.ndarray]], np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Trunk parameters of the merged model, keyed by model 0's initializer names.

    Each model's parameters are carried into the merged feature spaces (producers through
    ``count * M_i``, consumers through ``U_i^T``); a floating tensor is then the mean of the
    models' (ZipIt!'s merge), or ``combine(name, values)`` of their float64 values when given
    (the same-base methods, whose matchings are identities). Tensor by tensor: the float64
    values of one tensor of every model at a time; with mapped models (``weights``) each
    large result is spilled as soon as it exists, so memory holds no whole model.
    """
    reference = members[0].model
    trunk_inputs = {name for k, node in enumerate(reference.graph.node) if k not in split.head_nodes for name in node.input}
    names = [init.name for init in reference.graph.initializer if init.name in trunk_inputs]
    dtypes = {init.name: helper.tensor_dtype_to_np_dtype(init.data_type) for init in reference.graph.initializer}
    count = len(members)
    transformed = [transformer(member.model, member.graph, _transform_for(member, i, matchings, count))
                   for i, member in enumerate(members)]
    mapped = any(weights.has_mapped(member.model) for member in members)
    merged: dict[str, np.ndarray] = {}
    for name in names:
        floats = []
        for member, transform in zip(members, transformed):
            value = transform(member.correspondence.params[name])
            if value.dtype.kind != "f":  # shapes, axes, indices: identical across models
                merged.setdefault(name, np.asarray(value).astype(dtypes[name]))
            else:
                floats.append(value.astype(np.float64))
            del value
        if floats:
            result = combine(name, floats) if combine is not None else _mean(floats)
            merged[name] = weights.kept(np.asarray(result).astype(dtypes[name]), mapped)
    return merged


def _mean(floats: list[np.ndarray]) -> np.ndarray:
    """The models' mean, summed in model order (ZipIt!'s merge of the carried parameters)."""
    total = 0.0
    for value in floats:
        total = total + value / len(floats)
    return total


def _transform_for(member: Member, i: int, matchings: dict[int, Matching], count: int):
    """The parameter transforms of model ``i``: into the merged spaces of ``matchings``."""
    back = member.correspondence.reference_spaces

    def transform_for(space: int, role: str):
        matching = matchings.get(back[space])
        if matching is None:
            return None
        # producers carry count * M_i so that the final division by count averages
        return Linear(matching.merge[i] * count) if role == "producer" else Linear(matching.unmerge[i].T)
    return transform_for


def merged_width(member: Member, layout: Layout | int, matchings: dict[int, Matching]) -> int:
    """Width of an axis of ``member`` once its matched spaces have their merged widths."""
    back = member.correspondence.reference_spaces

    def leaf_width(space: int) -> int:
        matching = matchings.get(back[space])
        return member.graph.table.widths[space] if matching is None else matching.width

    return layout_width(layout, leaf_width)


def unmerge_matrix(member: Member, index: int, layout: Layout, matchings: dict[int, Matching]) -> np.ndarray | None:
    """The (d x r) matrix giving model ``index``'s features on an axis from the merged ones."""
    back = member.correspondence.reference_spaces
    if not any(back[s] in matchings for s in leaves(layout)):
        return None

    def transform_for(space: int):
        matching = matchings.get(back[space])
        return None if matching is None else Linear(matching.unmerge[index])

    def width_of(part) -> int:  # the input of this transform is in merged widths
        return merged_width(member, part, matchings)

    size = width_of(layout)
    return transform_axis(np.eye(size), 0, layout, transform_for, width_of)


def merge_matrix(member: Member, index: int, layout: Layout, matchings: dict[int, Matching],
                 count: int):
    """The (r x d) matrix taking model ``index``'s features on an axis to its share of the
    merged ones, as ``merged_trunk_parameters`` merges producers: ``count * M_i`` on each matched
    space (a grid's factors each), the identity on the others, all divided by ``count``. A
    scipy.sparse CSR array (a few nonzeros per row; REPAIR holds one per repaired layer)."""
    from scipy.sparse import csr_array  # imported on first use: scipy takes a while to import
    back = member.correspondence.reference_spaces
    widths = member.graph.table.widths

    def transform_for(space: int):
        matching = matchings.get(back[space])
        return None if matching is None else Linear(matching.merge[index] * count)

    def width_of(part) -> int:  # the input of this transform is in model i's widths
        return layout_width(part, widths.__getitem__)

    return csr_array(transform_axis(np.eye(width_of(layout)), 0, layout, transform_for, width_of) / count)


class _HeadBuilder:
    """Copies model i's head nodes, renamed with ``_m<i>``, reading the trunk through U_i."""

    def __init__(self, members: list[Member], split: TrunkSplit, matchings: dict[int, Matching]):
        self.members, self.split, self.matchings = members, split, matchings
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._unmerged: dict[tuple[int, str], str] = {}

    def build(self, index: int) -> dict[str, str]:
        """Append model ``index``'s head; return its tensor renames (model i name -> merged)."""
        member = self.members[index]
        model = member.model
        back_tensors = member.correspondence.reference_tensors
        produced = {name for k in self.split.head_nodes for name in model.graph.node[k].output}
        suffix = f"_m{index}"
        params = {init.name: init for init in model.graph.initializer}
        for k in sorted(self.split.head_nodes):
            node = onnx.NodeProto()
            node.CopyFrom(model.graph.node[k])
            fold = self._foldable(node, params, produced)
            arrays = self._folded_params(member, index, node) if fold else {}
            for slot, name in enumerate(node.input):
                if not name:
                    continue
                if name in params:
                    value = arrays.get(name, weights.read(params[name]))
                    self.initializers.append(weights.tensor(value, name + suffix))
                    node.input[slot] = name + suffix
                elif name in produced:
                    node.input[slot] = name + suffix
                else:
                    trunk = back_tensors[name]
                    node.input[slot] = trunk if fold else self.unmerged(index, trunk, name)
            for slot, name in enumerate(node.output):
                if name:
                    node.output[slot] = name + suffix
            node.name = (node.name or f"{node.op_type}_{node.output[0]}") + suffix  # unnamed nodes: unique names
            self.nodes.append(node)
        return {name: name + suffix for name in produced}

    @staticmethod
    def _foldable(node: onnx.NodeProto, params: dict, produced: set[str]) -> bool:
        """A weight layer reading one trunk tensor directly can absorb U_i into its weights."""
        rule = RULES.get(node.op_type)
        dynamic = [n for n in node.input if n and n not in params]
        return rule is not None and rule.kind == "new-space" and len(dynamic) == 1 and dynamic[0] not in produced

    def _folded_params(self, member: Member, index: int, node: onnx.NodeProto) -> dict[str, np.ndarray]:
        back = member.correspondence.reference_spaces

        def transform_for(space: int, role: str):
            matching = self.matchings.get(back[space])
            if role != "consumer" or matching is None:
                return None
            return Linear(matching.unmerge[index].T)

        return transformed_arrays(member.model, member.graph, transform_for, list(node.input))

    def unmerged(self, index: int, trunk: str, name: str) -> str:
        """Model ``index``'s features of trunk tensor ``trunk`` (explicit MatMul per tracked axis)."""
        key = (index, trunk)
        if key in self._unmerged:
            return self._unmerged[key]
        member = self.members[index]
        current = trunk
        tensor = _tensor_type(member.model, name)
        rank, dtype = len(tensor.shape.dim), helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        for axis, layout in sorted(member.graph.layouts.get(name, {}).items()):
            matrix = unmerge_matrix(member, index, layout, self.matchings)
            if matrix is None:
                continue
            # in the tensor's own type: MatMul takes one type (float16 models stay float16)
            current = self._matmul_on_axis(current, axis, rank, matrix.T.astype(dtype), f"{trunk}_unmerge{axis}_m{index}")
        self._unmerged[key] = current
        return current

    def _matmul_on_axis(self, tensor: str, axis: int, rank: int, matrix: np.ndarray, name: str) -> str:
        weight = numpy_helper.from_array(matrix, name + "_w")
        self.initializers.append(weight)
        if axis == rank - 1:
            self.nodes.append(helper.make_node("MatMul", [tensor, weight.name], [name], name=name))
            return name
        perm = [k for k in range(rank) if k != axis] + [axis]
        inverse = list(np.argsort(perm))
        self.nodes.append(helper.make_node("Transpose", [tensor], [name + "_t"], name=name + "_t", perm=perm))
        self.nodes.append(helper.make_node("MatMul", [name + "_t", weight.name], [name + "_mm"], name=name))
        self.nodes.append(helper.make_node("Transpose", [name + "_mm"], [name], name=name + "_back",
                                           perm=[int(p) for p in inverse]))
        return name


def _tensor_type(model: onnx.ModelProto, name: str) -> onnx.TypeProto.Tensor:
    for info in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if info.name == name:
            return info.type.tensor_type
    raise KeyError(name)


def assemble(members: list[Member], split: TrunkSplit, matchings: dict[int, Matching],
             trunk_params: dict[str, np.ndarray], *, heads: str) -> onnx.ModelProto:
    """The merged model: model 0's trunk nodes with merged parameters plus the heads."""
    reference = members[0].model
    graph = reference.graph
    trunk_nodes = [n for k, n in enumerate(graph.node) if k not in split.head_nodes]
    initializers = [weights.tensor(value, name) for name, value in trunk_params.items()]
    builder = _HeadBuilder(members, split, matchings)
    outputs = []
    if heads == "shared":
        outputs = [_merged_output(output, members[0], matchings) for output in graph.output]
    else:
        for index, member in enumerate(members):
            renames = builder.build(index)
            back_tensors = member.correspondence.reference_tensors
            for output in member.model.graph.output:
                info = onnx.ValueInfoProto()
                info.CopyFrom(output)
                info.name = f"{output.name}_m{index}"
                source = renames.get(output.name) or builder.unmerged(index, back_tensors[output.name], output.name)
                if source != info.name:
                    builder.nodes.append(helper.make_node("Identity", [source], [info.name], name=info.name))
                outputs.append(info)
    merged_graph = helper.make_graph(trunk_nodes + builder.nodes, graph.name or "merged", list(graph.input),
                                     outputs, initializers + builder.initializers)
    model = helper.make_model(merged_graph, opset_imports=list(reference.opset_import))
    model.ir_version = reference.ir_version
    return model


def _merged_output(output: onnx.ValueInfoProto, member: Member, matchings: dict[int, Matching]) -> onnx.ValueInfoProto:
    """A graph output as the merged trunk computes it: a merged feature output (shared heads)
    has its merged width."""
    info = onnx.ValueInfoProto()
    info.CopyFrom(output)
    dims = info.type.tensor_type.shape.dim
    for axis, layout in member.graph.layouts.get(output.name, {}).items():
        if axis < len(dims):
            dims[axis].dim_value = merged_width(member, layout, matchings)
    return info


def reference_widths(reference: Member, matchings: dict[int, Matching]) -> Callable[[int], int]:
    """Widths of model 0's spaces in the merged model."""
    def leaf_width(space: int) -> int:
        matching = matchings.get(space)
        return reference.graph.table.widths[space] if matching is None else matching.width
    return leaf_width
