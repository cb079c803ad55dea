"""Shape inference for the rules and passes: ONNX's own, completed by onnxruntime's symbolic
inference where ONNX leaves a tensor unshaped or names a dimension afresh (the run-time shape
arithmetic of dynamic axes), on a skeleton of the model without its large weights; of a
ModelProto (``infer_shapes``) or of a graphsurgeon graph in place (``infer_graph_shapes``)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import UnsupportedGraphError
from ..io import model_file, too_big
from .ir import record_types

log = logging.getLogger(__name__)


SMALL_CONSTANT = 1024  # elements; constants up to this size may feed shape computations


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without its large weights, which become typed graph inputs: shape
    inference needs their shapes, not their values, and copying 100 MB costs seconds."""
    skeleton = onnx.ModelProto(ir_version=model.ir_version)
    skeleton.opset_import.extend(model.opset_import)
    graph = skeleton.graph
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    for init in model.graph.initializer:
        if int(np.prod(init.dims)) <= SMALL_CONSTANT:
            graph.initializer.append(init)
        else:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return skeleton


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Record inferred shapes in ``model`` (modified and returned).

    ONNX shape inference with data propagation; where it leaves node outputs unknown
    (function ops such as GroupNormalization-21, shape arithmetic on symbols), onnxruntime's
    symbolic shape inference is tried as well.
    """
    skeleton = _skeleton(model)
    try:
        inferred = _onnx_shapes(skeleton)
    except Exception as error:  # onnx raises several types; all mean the same to the user
        raise UnsupportedGraphError(f"shape inference failed: {str(error).splitlines()[0]}") from error
    known = {v.name for v in list(inferred.graph.value_info) + list(inferred.graph.output)
             if v.type.tensor_type.HasField("shape") and not _invented(v)}
    if not all(name in known for node in inferred.graph.node for name in node.output if name) and _symbolic():
        try:
            symbolic = _symbolic_shapes(skeleton)
        except Exception as error:  # best effort: the rules report what stays unknown
            log.info("symbolic shape inference failed: %s", error)
        else:
            _fill_unknown_dims(inferred.graph.value_info, symbolic.graph.value_info,
                               outputs=frozenset(o.name for o in inferred.graph.output))
            _fill_unknown_dims(inferred.graph.output, symbolic.graph.output, whole=False)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    # symbolic inference drops a declared output shape it cannot derive (a sequence input's items)
    declared = {o.name: o for o in model.graph.output}
    outputs = [declared.get(o.name, o) if _unshaped(o) else o for o in inferred.graph.output]
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    return model


def infer_graph_shapes(graph: gs.Graph, export: Callable[[gs.Graph], onnx.ModelProto]) -> None:
    """Record inferred shapes and types on ``graph``'s variables, as ``infer_shapes`` finds them
    on ``export(graph)``, without exporting the weights: ``export`` (the exporter the caller
    uses for the model: IR version, opsets, declared output types) writes a copy of the graph
    whose large constants are typed inputs, the skeleton ``infer_shapes`` would make.

    Raises:
        UnsupportedGraphError: when ONNX's shape inference fails.
    """
    record_types(graph, infer_shapes(export(_weightless(graph))))


def _weightless(graph: gs.Graph) -> gs.Graph:
    """A copy of ``graph`` (sharing its weights) whose constants of more than ``SMALL_CONSTANT``
    elements are typed graph inputs, after its own inputs in the order an export lists
    initializers: ``_skeleton`` makes the same skeleton of its export as of the graph's."""
    copy = graph.copy()
    for mine, theirs in zip(copy.inputs, graph.inputs):
        mine.type = theirs.type  # gs copies every variable as a tensor (a sequence input stays one)
    for tensor in list(copy.tensors().values()):
        if isinstance(tensor, gs.Constant) and int(np.prod(tensor.shape)) > SMALL_CONSTANT:
            copy.inputs.append(tensor.to_variable(shape=list(tensor.shape)))
            tensor.type = "tensor_type"  # what a Variable is made with; to_variable sets no type
    return copy


def _onnx_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference, in memory, or by path for a model too big for one protobuf (huge
    Constant nodes: the skeleton holds no large initializer)."""
    if not too_big(model):
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    with model_file(model) as path:
        inferred = path + ".inferred.onnx"
        onnx.shape_inference.infer_shapes_path(path, inferred, strict_mode=False, data_prop=True)
        return onnx.load(inferred, load_external_data=False)


def _fill_unknown_dims(ours, theirs, whole: bool = True, outputs: frozenset[str] = frozenset()) -> None:
    """Complete ONNX's shapes (``ours``, in place) from symbolic inference's (``theirs``): a
    tensor ONNX left unshaped takes theirs whole (``whole``; not for graph outputs, whose
    declared types stay: symbolic inference calls a ZipMap's maps tensors); a dim ONNX left
    unknown or named afresh takes theirs when theirs is a size or a symbol of the inputs.
    Symbolic inference gives up on some ops (Upsample) that ONNX knows, so neither replaces
    the other whole."""
    mine = {v.name: v for v in ours}
    for info in theirs:
        if info.name in outputs:  # symbolic inference also lists graph outputs as value_info
            continue
        have = mine.get(info.name)
        if whole and (have is None or _unshaped(have)):
            if have is not None:
                ours.remove(have)
            ours.append(info)
            continue
        if have is None or not have.type.HasField("tensor_type"):
            continue
        dims, others = have.type.tensor_type.shape.dim, info.type.tensor_type.shape.dim
        if len(dims) != len(others):
            continue
        for dim, other in zip(dims, others):
            if not _known(dim, _ONNX_FRESH) and _known(other, _SYMBOLIC_FRESH):
                dim.CopyFrom(other)  # a value-info dimension between two shape inferences: no graph edit


# names each inference gives dims it cannot relate to any other
_ONNX_FRESH = re.compile(r"^unk__\d+$")
_SYMBOLIC_FRESH = re.compile(r"^unk__\d+$|__d\d+$")


def _known(dim: onnx.TensorShapeProto.Dimension, fresh: re.Pattern) -> bool:
    """A size, or a symbol other than one of the inference's fresh names."""
    return dim.HasField("dim_value") or bool(dim.dim_param and not fresh.search(dim.dim_param))


def _invented(info: onnx.ValueInfoProto) -> bool:
    """Whether ONNX's inference gave this tensor a dimension it could not relate to any other
    (a fresh ``unk__`` symbol): the run-time shape arithmetic of dynamic axes (a mask expanded
    to [batch, 1, seq, seq]) that symbolic inference follows."""
    return any(_ONNX_FRESH.search(d.dim_param) for d in info.type.tensor_type.shape.dim)


def _unshaped(info: onnx.ValueInfoProto) -> bool:
    return info.type.WhichOneof("value") == "tensor_type" and not info.type.tensor_type.HasField("shape")


@functools.cache
def _symbolic() -> type | None:
    """onnxruntime's ``SymbolicShapeInference``, or None (with one warning) when it cannot be
    imported: it needs sympy, which comes with the ``[cpu]`` and ``[gpu]`` extras (and torch).
    Imported on first use because ``onnxruntime.tools`` imports torch when torch is installed,
    which costs over a second, and most models never need it."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError as error:
        log.warning("onnxruntime's symbolic shape inference is not available (%s); shapes that ONNX's own "
                    "inference leaves unknown stay unknown", error)
        return None
    return SymbolicShapeInference


def _symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's symbolic shape inference, run in a private folder: when it cannot infer
    every shape it saves ``sym_shape_infer_temp.onnx`` and uuid-named data files in the working
    directory (or through a symlink there), and onnxmerge writes nothing but its outputs."""
    with tempfile.TemporaryDirectory(prefix="onnxmerge-") as folder, _working_directory(folder):
        return _symbolic().infer_shapes(model, auto_merge=True)


@contextlib.contextmanager
def _working_directory(folder: str) -> Iterator[None]:
    """Run the body in ``folder``, then return to the previous working directory (as Python
    3.11's contextlib.chdir; onnxmerge supports 3.10)."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)
