"""The boundary between ``onnx.ModelProto`` and onnx-graphsurgeon graphs, where mapped
weights (``onnxmerge.weights``) stay in their files: a constant read from a file is a
read-only memory map of it, and a constant still holding such a map is written back as a
reference to the file, not copied into the model."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter
from onnx_graphsurgeon.ir.tensor import LazyValues

from .. import weights


class _MappedValues(LazyValues):
    """A mapped tensor's values, read as a memory map when a pass asks for them."""

    def load(self):
        return weights.read(self.tensor)


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """``gs.import_onnx(model)``; mapped constants load as memory maps of their files, and the
    graph remembers whether the model had any (``mapped_weights``)."""
    graph = gs.import_onnx(model)
    graph.mapped_weights = weights.has_mapped(model)  # what export_graph spills by
    for tensor in graph.tensors().values():
        values = getattr(tensor, "_values", None)
        if isinstance(values, LazyValues) and weights.is_mapped(values.tensor):
            tensor._values = _MappedValues(values.tensor)
    return graph


def record_types(graph: gs.Graph, model: onnx.ModelProto) -> None:
    """Give ``graph``'s variables the types and shapes that ``model``, an export of it whose
    shapes were inferred, records for them, as ``import_graph(model)`` would read them: a value
    info, else the graph output's type; a variable with neither has none (a graph input keeps
    its own). The graph then reads as if imported again, and no weight crossed the boundary."""
    found: dict[str, gs.Variable] = {}
    for info in list(model.graph.value_info) + list(model.graph.output):
        found.setdefault(info.name, OnnxImporter.import_tensor(info))
    inputs = {id(tensor) for tensor in graph.inputs}
    for name, tensor in graph.tensors().items():
        if isinstance(tensor, gs.Variable) and (name in found or id(tensor) not in inputs):
            typed = found[name] if name in found else gs.Variable(name)
            tensor.dtype, tensor.shape, tensor.type = typed.dtype, typed.shape, typed.type


def one_tensor_per_name(graph: gs.Graph) -> None:
    """Make each node read, under each name, the one tensor an export of ``graph`` writes for it
    (the last ``graph.tensors()`` meets): a gs graph may hold two tensors of one name (a pass that
    rewrites each use of a constant makes one per use) where a model holds one, so the graph
    then reads as if exported and imported again. A constant of other values than the one kept
    under its name (the same constant rewritten two ways) is renamed instead: merging it would
    change the function."""
    named = graph.tensors()
    taken = set(named)
    for node in graph.nodes:
        for index, tensor in enumerate(node.inputs):
            kept = named.get(tensor.name) if tensor.name else None
            if kept is None or kept is tensor:
                continue
            if _same_constant(kept, tensor) or not isinstance(tensor, gs.Constant):
                node.inputs[index] = kept
            else:
                tensor.name = next(name for k in itertools.count(1) if (name := f"{tensor.name}_{k}") not in taken)
                taken.add(tensor.name)


def _same_constant(a: gs.Tensor, b: gs.Tensor) -> bool:
    return (isinstance(a, gs.Constant) and isinstance(b, gs.Constant) and a.values.dtype == b.values.dtype
            and np.array_equal(a.values, b.values))


def initializers_apart(model: onnx.ModelProto, ir_version: int) -> onnx.ModelProto:
    """A copy of ``model`` whose graph inputs do not list its initializers (IR 3 lists every
    weight as an input too), of IR version ``ir_version`` at least. A proto copy at the
    boundary: importing and exporting the graph for it serialised every weight once more
    (+25 % of the analysis of a BN-folded ResNet-50)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model)  # mapped tensors are references: no weights are copied for them
    names = {init.name for init in proto.graph.initializer}
    kept = [tensor for tensor in proto.graph.input if tensor.name not in names]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    proto.ir_version = max(proto.ir_version, ir_version)
    return proto


def has_mapped_weights(graph: gs.Graph) -> bool:
    """``import_graph``'s ``mapped_weights`` flag; False for a graph made otherwise (a
    ``copy()``). Read from the instance: gs logs an error for every attribute it lacks."""
    return vars(graph).get("mapped_weights", False)


def export_graph(graph: gs.Graph, **options) -> onnx.ModelProto:
    """``gs.export_onnx(graph, **options)``; a constant whose values are a whole memory map of a
    file is written as a reference to it (``weights.reference``), and in the graph of a model
    with mapped weights (``import_graph``'s ``mapped_weights``, which stays true once every
    weight is recomputed, as REPAIR folds them all) a large computed one is spilled first
    (``weights.kept``), so that the exported model holds no weights in memory either. A copy
    (``graph.copy()``, exported to be read and dropped) spills nothing."""
    mapped = has_mapped_weights(graph)
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and not isinstance(tensor._values, LazyValues):
            reference = weights.reference(weights.kept(tensor._values, mapped), tensor.name)
            if reference is not None:
                tensor._values = _MappedValues(reference)
    return gs.export_onnx(graph, **options)


def renamed_copy(tensor: gs.Constant, name: str) -> gs.Constant:
    """A copy of ``tensor`` named ``name`` whose stored tensor is written as it was read (its
    encoding kept, a mapped one still a reference): gs renames a stored tensor in place on
    export, so the copy holds its own."""
    values = tensor._values
    if not isinstance(values, LazyValues):
        return gs.Constant(name, tensor.values)
    stored = onnx.TensorProto()
    stored.CopyFrom(values.tensor)  # the stored tensor itself, not a graph edit
    stored.name = name
    return gs.Constant(name, type(values)(stored))
