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
import onnx_graphsurgeon as gs
from onnx import helper

from ..graph.correspond import Correspondence
from ..graph.layout import Layout, layout_width, leaves
from ..graph.rules import RULES
from ..graph.spaces import SpaceGraph
from ..match.matching import Matching
from ..graph.apply import transformed_arrays, transformer
from ..graph.canonical import export_like
from ..graph.ir import import_graph
from ..graph.surgery import add_node, drop_shapes
from .heads import TrunkSplit
from .resize import resize_constants
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
                            combine: Callable[..., np.ndarray] | None = None,
                            elementwise: bool = False) -> dict[str, np.ndarray]:
    """Trunk parameters of the merged model, keyed by model 0's initializer names.

    Each model's parameters are carried into the merged feature spaces (producers through
    ``count * M_i``, consumers through ``U_i^T``); a floating tensor is then the mean of the
    models' (ZipIt!'s merge), or ``combine(name, values, rows=...)`` of their float64 values
    when given (the same-base methods, whose matchings are identities; ``rows`` the slice of
    axis 0 the values hold). Tensor by tensor: the float64 values of one tensor of every model
    at a time, and with an ``elementwise`` combine (each entry from the same entry of every
    model) a band of rows of it at a time; with mapped models (``weights``) each large result is
    spilled as soon as it exists, so memory holds no whole model.
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
    banded = combine is not None and elementwise
    for name in names:
        floats = []
        for member, transform in zip(members, transformed):
            value = transform(member.correspondence.params[name])
            if value.dtype.kind != "f":  # shapes, axes, indices: identical across models
                merged.setdefault(name, np.asarray(value).astype(dtypes[name]))
            else:  # kept as it is to be read a band at a time, else its float64 copy alone is kept
                floats.append(value if banded else value.astype(np.float64))
            del value
        if not floats:
            continue
        if banded:
            result = _banded(name, floats, combine, dtypes[name])
        else:
            result = combine(name, floats) if combine is not None else _mean(floats)
        del floats
        merged[name] = weights.kept(np.asarray(result).astype(dtypes[name], copy=False), mapped)
    return merged


def _banded(name: str, values: list[np.ndarray], combine: Callable[..., np.ndarray], dtype: np.dtype) -> np.ndarray:
    """An elementwise ``combine`` of the models' tensors a band of rows at a time
    (``weights.row_bands``): their float64 rows of one band are held, not the tensors."""
    result = np.empty(values[0].shape, dtype)
    for rows in weights.row_bands(values[0].shape):
        # a file's rows mapped afresh per band: the pages read leave memory with the band
        result[rows] = combine(name, [weights.transient(value)[rows].astype(np.float64) for value in values], rows)
    return result


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
    """Copies model i's head nodes into the merged ``graph``, renamed with ``_m<i>``, reading
    the trunk through U_i."""

    def __init__(self, graph: gs.Graph, members: list[Member], split: TrunkSplit, matchings: dict[int, Matching]):
        self.graph, self.members, self.split, self.matchings = graph, members, split, matchings
        self.trunk = graph.tensors()  # the trunk's tensors by name, before any head is added
        self._unmerged: dict[tuple[int, str], gs.Tensor] = {}

    def build(self, index: int) -> tuple[gs.Graph, dict[str, gs.Tensor]]:
        """Append model ``index``'s head; return model i's graph and its head tensors (by model
        i name)."""
        member = self.members[index]
        source = import_graph(member.model)  # the same nodes in the same order: head indices hold
        heads = [source.nodes[k] for k in sorted(self.split.head_nodes)]
        produced = {t.name for node in heads for t in node.outputs}
        suffix = f"_m{index}"
        renamed: dict[str, gs.Tensor] = {}
        for node in heads:
            fold = self._foldable(node, produced)
            arrays = self._folded_params(member, index, node) if fold else {}
            inputs = []
            for tensor in node.inputs:
                if not tensor.name:
                    inputs.append(gs.Variable.empty())
                elif isinstance(tensor, gs.Constant):
                    renamed[tensor.name] = gs.Constant(tensor.name + suffix, arrays.get(tensor.name, tensor.values))
                    inputs.append(renamed[tensor.name])
                elif tensor.name in produced:
                    inputs.append(renamed.setdefault(tensor.name, gs.Variable(tensor.name + suffix)))
                else:
                    trunk = member.correspondence.reference_tensors[tensor.name]
                    inputs.append(self.trunk[trunk] if fold else self.unmerged(index, trunk, tensor))
            outputs = [renamed.setdefault(t.name, gs.Variable(t.name + suffix)) if t.name else gs.Variable.empty()
                       for t in node.outputs]
            name = (node.name or f"{node.op}_{node.outputs[0].name}") + suffix  # unnamed nodes: unique names
            self.graph.nodes.append(gs.Node(node.op, name=name, attrs=dict(node.attrs), inputs=inputs,
                                            outputs=outputs, domain=node.domain))
        return source, {name: renamed[name] for name in produced}

    @staticmethod
    def _foldable(node: gs.Node, produced: set[str]) -> bool:
        """A weight layer reading one trunk tensor directly can absorb U_i into its weights."""
        rule = RULES.get(node.op)
        dynamic = [t.name for t in node.inputs if t.name and not isinstance(t, gs.Constant)]
        return rule is not None and rule.kind == "new-space" and len(dynamic) == 1 and dynamic[0] not in produced

    def _folded_params(self, member: Member, index: int, node: gs.Node) -> dict[str, np.ndarray]:
        back = member.correspondence.reference_spaces

        def transform_for(space: int, role: str):
            matching = self.matchings.get(back[space])
            if role != "consumer" or matching is None:
                return None
            return Linear(matching.unmerge[index].T)

        return transformed_arrays(member.model, member.graph, transform_for, [t.name for t in node.inputs])

    def unmerged(self, index: int, trunk: str, tensor: gs.Tensor) -> gs.Tensor:
        """Model ``index``'s features of trunk tensor ``trunk`` (explicit MatMul per tracked
        axis); ``tensor`` is model i's, whose rank and type the result has."""
        key = (index, trunk)
        if key in self._unmerged:
            return self._unmerged[key]
        member = self.members[index]
        current = self.trunk[trunk]
        rank = len(tensor.shape)
        for axis, layout in sorted(member.graph.layouts.get(tensor.name, {}).items()):
            matrix = unmerge_matrix(member, index, layout, self.matchings)
            if matrix is None:
                continue
            # in the tensor's own type: MatMul takes one type (float16 models stay float16)
            current = self._matmul_on_axis(current, axis, rank, matrix.T.astype(tensor.dtype),
                                           f"{trunk}_unmerge{axis}_m{index}")
        self._unmerged[key] = current
        return current

    def _matmul_on_axis(self, tensor: gs.Tensor, axis: int, rank: int, matrix: np.ndarray, name: str) -> gs.Tensor:
        weight = gs.Constant(name + "_w", matrix)
        if axis == rank - 1:
            return add_node(self.graph, "MatMul", [tensor, weight], name, node_name=name)
        perm = [k for k in range(rank) if k != axis] + [axis]
        inverse = [int(p) for p in np.argsort(perm)]
        moved = add_node(self.graph, "Transpose", [tensor], name + "_t", node_name=name + "_t", perm=perm)
        product = add_node(self.graph, "MatMul", [moved, weight], name + "_mm", node_name=name)
        return add_node(self.graph, "Transpose", [product], name, node_name=name + "_back", perm=inverse)


def assemble(members: list[Member], split: TrunkSplit, matchings: dict[int, Matching],
             trunk_params: dict[str, np.ndarray], *, heads: str) -> onnx.ModelProto:
    """The merged model: model 0's trunk nodes with merged parameters plus the heads, its
    width-bearing constants (reshape targets, split sizes, slices) following the merged widths."""
    reference = members[0].model
    graph = import_graph(reference)  # the same nodes in the same order: head indices hold
    for node in [graph.nodes[k] for k in split.head_nodes]:
        node.inputs.clear()
        node.outputs.clear()
    graph.nodes = [node for k, node in enumerate(graph.nodes) if k not in split.head_nodes]
    for tensor in graph.tensors().values():
        if tensor.name in trunk_params:
            tensor.values = trunk_params[tensor.name]
    if heads == "shared":
        for output in graph.outputs:
            _merged_output(output, members[0], matchings)
    else:
        builder = _HeadBuilder(graph, members, split, matchings)
        outputs = []
        for index, member in enumerate(members):
            source, renamed = builder.build(index)
            for output in source.outputs:
                name = f"{output.name}_m{index}"
                result = renamed.get(output.name) or builder.unmerged(
                    index, member.correspondence.reference_tensors[output.name], output)
                if result.name != name:
                    result = add_node(graph, "Identity", [result], name, node_name=name)
                result.dtype, result.shape = output.dtype, output.shape
                outputs.append(result)
        graph.outputs = outputs
    drop_shapes(graph)  # model 0's widths: the merged model's are inferred later
    resize_constants(graph, members[0].graph, reference_widths(members[0], matchings))
    graph.name = graph.name or "merged"
    return export_like(graph, reference, provenance=False)


def _merged_output(output: gs.Tensor, member: Member, matchings: dict[int, Matching]) -> None:
    """A graph output as the merged trunk computes it: a merged feature output (shared heads)
    has its merged width."""
    shape = list(output.shape or [])
    for axis, layout in member.graph.layouts.get(output.name, {}).items():
        if axis < len(shape):
            shape[axis] = merged_width(member, layout, matchings)
    if output.shape is not None:
        output.shape = shape


def reference_widths(reference: Member, matchings: dict[int, Matching]) -> Callable[[int], int]:
    """Widths of model 0's spaces in the merged model."""
    def leaf_width(space: int) -> int:
        matching = matchings.get(space)
        return reference.graph.table.widths[space] if matching is None else matching.width
    return leaf_width
