"""Canonicalisation: rewrite exporter idioms into one form the rule table understands.

Each pass takes an onnx-graphsurgeon graph and returns the number of rewrites it made. The
pipeline runs to a fixpoint under ``MAX_ROUNDS``. Passes for layout transposes are in
``transposes.py``, for weight layers, pooling and flattening in ``layers.py``: together they
make one architecture written by different exporters into one graph, node by node; shape
inference between rounds, on the one graph every round rewrites, is in ``shapes.py``. The
canonical model computes the same outputs as the input model; the caller's ModelProto is
never modified.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from ..choices import BN_MODES
from ..errors import UnsupportedGraphError
from ..options import MergeOptions
from ..runtime import import_onnxruntime
from .facts import op_facts
from .ir import export_graph, import_graph, initializers_apart, one_tensor_per_name
from .layers import (CONVOLUTIONS, canonical_attributes, explicit_conv_biases, flatten_reshapes, fold_affine,
                     global_pools, matmul_to_gemm, normalize_gemm, output_channels, scale_output_channels)
from .merged_axes import gemm_on_merged_rows, heads_through_batch
from .norms import layer_norms, with_layer_norm_opset
from .quantized import dequantize
from .shapes import infer_graph_shapes, infer_shapes
from .surgery import bypass, constant, shape_target
from .transposes import (compose_transposes, is_noop_reshape, layout_transposes_as_reshapes, merge_reshapes,
                         push_transposes)
from .. import weights

log = logging.getLogger(__name__)

MAX_ROUNDS = 8
INITIALIZERS_APART_IR = 4  # the first IR version whose initializers need not be graph inputs


def drop_aliases(graph: gs.Graph) -> int:
    """Nodes that return their input unchanged are removed: consumers read the input."""
    return sum(bypass(graph, node, node.inputs[0]) for node in list(graph.nodes) if _is_alias(node))


def _is_alias(node: gs.Node) -> bool:
    """Identity, a Cast to the input's own type (skl2onnx's float -> float), Dropout at
    inference, Transpose by the identity permutation, a reshape to the input's shape."""
    if len(node.outputs) != 1 or not node.inputs:
        return False
    if node.op == "Cast":
        source = node.inputs[0].dtype
        return source is not None and np.dtype(onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"])) == source
    if node.op == "Dropout":  # at inference unless a training_mode input says otherwise
        training = constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else np.zeros(1)
        return training is not None and not training.any()
    if node.op == "Transpose":
        perm = node.attrs.get("perm")
        return perm is not None and list(perm) == list(range(len(perm)))
    return node.op == "Identity" or is_noop_reshape(node)


def fold_constants(graph: gs.Graph) -> int:
    """Evaluate subgraphs whose inputs are all constant (ConstantOfShape weights, shape math)."""
    before = len(graph.nodes)
    import_onnxruntime().set_default_logger_severity(3)  # its graph optimiser warns about partial folds
    graph.fold_constants(error_ok=True).cleanup()
    return before - len(graph.nodes)


def constant_reshape_targets(graph: gs.Graph) -> int:
    """Reshape targets computed at run time (Shape -> Gather -> Concat, as the legacy torch
    exporter writes for dynamic batches) become constants: the entries read from a tensor's
    shape that copy the reshaped input's dimension at the same place are 0 (copy), the others
    their constants (``copied_target``); failing that, the inferred output shape when it has
    at most one unknown dimension, written -1. Merging can then resize them."""
    count = 0
    for node in graph.nodes:
        if node.op != "Reshape" or isinstance(node.inputs[1], gs.Constant):
            continue
        copied = copied_target(node)
        target = copied or shape_target(node.outputs[0], f"{node.outputs[0].name}_target")
        if target is None:
            continue
        node.inputs[1] = target
        if copied is not None or not (target.values == 0).any():  # its 0 entries copy (dynamo writes allowzero=1)
            node.attrs.pop("allowzero", None)
        count += 1
    return count


def copied_target(node: gs.Node) -> gs.Constant | None:
    """A Reshape's run-time target as a constant, from the shape algebra: each entry is a
    constant or a dimension of some tensor; a known dimension is its size, an unknown one must
    be the reshaped input's dimension at the entry's place (the same tensor and axis, or one
    symbol of shape inference, which names equal sizes alike) and becomes 0, copy. A literal 0
    (a copy, or with ``allowzero`` an empty axis) is left to run time."""
    entries = _target_entries(node.inputs[1])
    source = node.inputs[0].shape
    if entries is None or source is None or 0 in entries:
        return None
    values = []
    for place, entry in enumerate(entries):
        if isinstance(entry, int):
            values.append(entry)
            continue
        tensor, axis = entry
        dim = tensor.shape[axis]
        copies = place < len(source) and ((tensor is node.inputs[0] and axis == place)
                                          or (isinstance(dim, str) and source[place] == dim))
        if not isinstance(dim, int) and not copies:
            return None
        values.append(dim if isinstance(dim, int) else 0)
    if values.count(-1) > 1:
        return None
    return gs.Constant(f"{node.outputs[0].name}_target", np.array(values, dtype=np.int64))


def _target_entries(tensor: gs.Tensor) -> list[int | tuple[gs.Tensor, int]] | None:
    """A 1-D shape tensor as entries: ints, or (tensor, axis) for a dimension read at run time
    by Shape (with Gather, Slice, Unsqueeze, Concat); None for anything else."""
    value = constant(tensor)
    if value is not None:
        return [int(v) for v in value.reshape(-1)] if value.ndim <= 1 else None
    node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if node is None:
        return None
    if node.op == "Concat" and node.attrs.get("axis") in (0, -1):
        parts = [_target_entries(t) for t in node.inputs]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]
    if node.op == "Unsqueeze" and tensor.shape is not None and len(tensor.shape) == 1:
        return _target_entries(node.inputs[0])
    if node.op == "Shape" and node.inputs[0].shape is not None:
        rank = len(node.inputs[0].shape)
        return [(node.inputs[0], axis) for axis in range(rank)[node.attrs.get("start", 0):node.attrs.get("end", rank)]]
    if node.op == "Gather" and node.attrs.get("axis", 0) == 0 and constant(node.inputs[1]) is not None:
        dims = _target_entries(node.inputs[0])
        return None if dims is None else [dims[int(i)] for i in constant(node.inputs[1]).reshape(-1)]
    if node.op == "Slice" and all(constant(t) is not None for t in node.inputs[1:]):
        dims = _target_entries(node.inputs[0])
        bounds = [int(constant(t).reshape(-1)[0]) for t in node.inputs[1:3]]
        steps = [int(constant(t).reshape(-1)[0]) for t in node.inputs[4:5]] or [1]
        return None if dims is None else dims[bounds[0]:bounds[1]:steps[0]]
    return None


def fold_batch_norm(graph: gs.Graph) -> int:
    """Fold BatchNormalization into the Conv or ConvTranspose that alone feeds it (as exporters
    do by default)."""
    count = 0
    for bn in list(graph.nodes):
        if bn.op != "BatchNormalization" or len(bn.outputs) != 1 or not bn.inputs[0].inputs:
            continue
        conv = bn.inputs[0].inputs[0]
        if conv.op not in CONVOLUTIONS or len(conv.outputs[0].outputs) != 1 or not all(
            isinstance(t, gs.Constant) for t in list(conv.inputs[1:]) + list(bn.inputs[1:])
        ):
            continue
        scale, bias, mean, var = (t.values.astype(np.float64) for t in bn.inputs[1:])
        factor = scale / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
        weight = conv.inputs[1].values
        old_bias = conv.inputs[2].values if len(conv.inputs) > 2 else np.zeros(output_channels(conv, weight))
        new_weight = scale_output_channels(conv, weight, factor)
        new_bias = ((old_bias - mean) * factor + bias).astype(weight.dtype)
        name = conv.inputs[1].name
        conv.inputs = [conv.inputs[0], gs.Constant(name + "_bn", new_weight), gs.Constant(name + "_bnbias", new_bias)]
        result = bn.outputs[0]
        bn.outputs.clear()
        conv.outputs = [result]
        count += 1
    return count


def untie_initializers(graph: gs.Graph) -> int:
    """Give each constant use its own tensor: exporters share identical tensors between layers
    (fresh BatchNorm statistics), but each layer's copy must transform with its own space."""
    count = 0
    seen: set[int] = set()
    for node in graph.nodes:
        for index, tensor in enumerate(node.inputs):
            if not isinstance(tensor, gs.Constant):
                continue
            if id(tensor) in seen:
                node.inputs[index] = gs.Constant(f"{tensor.name}_{node.name or 'use'}_{index}", tensor.values.copy())
                count += 1
            else:
                seen.add(id(tensor))
    return count


PASSES: tuple[Callable[[gs.Graph], int], ...] = (
    dequantize, drop_aliases, fold_constants, constant_reshape_targets,
    compose_transposes, push_transposes, layout_transposes_as_reshapes, merge_reshapes,
    heads_through_batch, layer_norms, global_pools, flatten_reshapes, matmul_to_gemm, normalize_gemm, explicit_conv_biases, fold_affine,
    gemm_on_merged_rows, canonical_attributes,
)


def canonicalize(model: onnx.ModelProto, *, bn: str = MergeOptions.bn) -> onnx.ModelProto:
    """Return the canonical form of ``model`` with inferred shapes.

    Args:
        model: any valid ONNX model; not modified.
        bn: ``keep`` leaves BatchNormalization nodes, ``fold`` folds them into the Conv before.

    Raises:
        UnsupportedGraphError: when the model uses constructs canonicalisation cannot handle.
    """
    if bn not in BN_MODES:
        raise UnsupportedGraphError(f"unknown BatchNormalization mode {bn!r}; use one of {BN_MODES}")
    # old IR versions list every weight as a graph input too: here they are constants, and the IR
    # version becomes one where initializers need not be inputs (onnx.checker insists)
    inferred = infer_shapes(initializers_apart(model, INITIALIZERS_APART_IR))
    proto = with_layer_norm_opset(inferred)
    # what export_like copies from the source, without its weights: a model's worth less memory
    source = onnx.ModelProto(ir_version=proto.ir_version, opset_import=proto.opset_import,
                             metadata_props=proto.metadata_props, graph=onnx.GraphProto(output=proto.graph.output))
    passes = PASSES + ((fold_batch_norm,) if bn == "fold" else ())
    # graphsurgeon warns about every non-tensor value (skl2onnx's ZipMap maps); they are fine.
    # Folding huge or non-finite weights overflows quietly: merges refuse what results
    # (check_finite_parameters), and a function-preserving rewrite carries it along.
    with G_LOGGER.suppress(G_LOGGER.ERROR), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        # the one graph every round rewrites (a raised opset's model is inferred again)
        graph = import_graph(proto if proto is inferred else infer_shapes(proto))
        del proto, inferred  # the graph's constants hold its weights: one copy of them, not two
        export = functools.partial(export_like, like=source)
        for index in range(MAX_ROUNDS):
            # passes read inferred shapes (gs folds Shape ops only where they are known), and a
            # round's rewrites can make more shapes known: infer again between rounds
            if index:
                infer_graph_shapes(graph, export)
            changed = sum(p(graph) for p in passes)
            graph.cleanup().toposort()
            one_tensor_per_name(graph)
            if not changed:
                break
        untie_initializers(graph)
        graph.cleanup().toposort()
        return infer_shapes(export_like(graph, source))


def export_like(graph: gs.Graph, like: onnx.ModelProto, *, provenance: bool = True,
                types: dict[str, onnx.TypeProto] | None = None) -> onnx.ModelProto:
    """Export a gs graph with the IR version, opsets, producer and metadata of the original
    model (without ``provenance``, no producer nor metadata: a model that is none of the
    sources', the merged one), and its graph outputs' types (or those ``types`` gives, for
    outputs ``like`` lacks) where they are no tensors (graphsurgeon writes a ZipMap's sequence
    of maps as a sequence of tensors of no type)."""
    result = export_graph(graph, do_type_check=False)
    declared = {name: kind for name, kind in ({o.name: o.type for o in like.graph.output} | (types or {})).items()
                if not kind.HasField("tensor_type")}
    for output in result.graph.output:
        if output.name in declared:
            output.type.CopyFrom(declared[output.name])  # a value-info type, which gs cannot express
    result.ir_version = like.ir_version
    for field in ("producer_name", "producer_version"):  # graphsurgeon writes them even where empty
        result.ClearField(field)
        if provenance and like.HasField(field):
            setattr(result, field, getattr(like, field))
    del result.opset_import[:]
    result.opset_import.extend(like.opset_import)
    if provenance:
        result.metadata_props.extend(like.metadata_props)
    return result


_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                          onnx.TensorProto.BFLOAT16})


def check_finite_parameters(model: onnx.ModelProto) -> None:
    """Refuse NaN in any floating-point initializer and infinities in a parameter (an input
    after the first of a weight layer or normalisation): matching, alignment and repair
    compute on them. A mask's -inf, which an Add or Where reads, is left alone."""
    params = {name for node in model.graph.node if op_facts(node.op_type).parameters for name in node.input[1:]}
    for init in model.graph.initializer:
        if init.data_type not in _FLOAT_TYPES:
            continue
        values = weights.read(init)
        bad = ~np.isfinite(values) if init.name in params else np.isnan(values)
        if bad.any():
            kind = "NaN" if np.isnan(values).any() else "infinite"
            raise UnsupportedGraphError(f"initializer {init.name!r} holds {int(bad.sum())} {kind} value(s), which "
                                        "cannot be matched, aligned, averaged or widened; fix the model first (did "
                                        "its training diverge?)")
