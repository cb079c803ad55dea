"""Repair after merging (method.md §7).

BN reset recomputes every BatchNormalization's mean and variance on the merged model in one
pass in train mode, as the source frameworks reset BN: every BN normalises with its batch
statistics, so later layers see corrected inputs, and the batch statistics are pooled over
the batches. REPAIR rescales merged channels of BN-free models.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..calib.capture import open_session
from ..io import default_opset

REPAIRS = ("auto", "none", "reset", "repair")
Batches = Callable[[], Iterable[dict[str, np.ndarray]]]


def reset_batch_norm(model: onnx.ModelProto, batches: Batches, provider: str = "auto") -> tuple[onnx.ModelProto, str]:
    """A copy of ``model`` with BatchNormalization statistics measured on the batches.

    Returns the model and the provider that ran the pass.
    """
    train, measured = train_mode(model)
    session, ran = open_session(train, provider)
    names = [name for pair in measured.values() for name in pair]
    count, moments = 0, {k: [0.0, 0.0] for k in measured}
    for feed in batches():
        size = len(next(iter(feed.values())))
        values = dict(zip(names, session.run(names, feed)))
        for k, (mean_name, var_name) in measured.items():
            mean, var = (values[n].astype(np.float64).reshape(-1) for n in (mean_name, var_name))
            moments[k][0] = moments[k][0] + size * mean
            moments[k][1] = moments[k][1] + size * (var + mean ** 2)
        count += size
    result = onnx.ModelProto()
    result.CopyFrom(model)
    for k, (total, squares) in moments.items():
        mean = total / count
        _set_statistics(result, result.graph.node[k], mean, np.maximum(squares / count - mean ** 2, 0.0))
    return result, ran


def train_mode(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[int, tuple[str, str]]]:
    """A copy of ``model`` whose BatchNormalization nodes normalise with their batch statistics,
    and for each BN node (by index) the outputs holding its batch mean and (biased) variance.

    Each BN stays an inference-mode BN fed with the mean and variance of its input, computed
    with plain ops. BatchNormalization's own ``training_mode`` would do, but onnxruntime's CUDA
    provider refuses it from opset 14 and opsets before 14 lack it.
    """
    train = onnx.ModelProto()
    train.CopyFrom(model)
    opset = default_opset(model)
    shapes = [("flat", [0, 0, -1]), ("vector", [-1])]
    train.graph.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), f"bn_reset_{n}") for n, v in shapes)
    if opset >= 18:  # ReduceMean's axes became an input
        train.graph.initializer.append(numpy_helper.from_array(np.array([0, 2], np.int64), "bn_reset_axes"))
    nodes, measured = [], {}
    for k, node in enumerate(train.graph.node):
        if node.op_type == "BatchNormalization":
            name = f"{node.output[0]}__reset"
            nodes += _batch_statistics_nodes(node.input[0], name, opset)
            node.input[3], node.input[4] = f"{name}_mean", f"{name}_var"
            del node.output[1:]
            measured[k] = (f"{name}_mean", f"{name}_var")
        nodes.append(node)
    train.graph.output.extend(helper.make_empty_tensor_value_info(n) for pair in measured.values() for n in pair)
    del train.graph.node[:]
    train.graph.node.extend(nodes)
    return train, measured


def _batch_statistics_nodes(x: str, name: str, opset: int) -> list[onnx.NodeProto]:
    """Nodes giving the per-channel mean and biased variance of ``x`` (channels on axis 1, any
    rank), as ``<name>_mean`` and ``<name>_var`` of shape [C]: ``x`` viewed as [N, C, L] and
    reduced over N and L."""
    def mean(source: str, target: str, keep: int) -> onnx.NodeProto:
        if opset >= 18:
            return helper.make_node("ReduceMean", [source, "bn_reset_axes"], [target], keepdims=keep)
        return helper.make_node("ReduceMean", [source], [target], axes=[0, 2], keepdims=keep)

    return [helper.make_node("Reshape", [x, "bn_reset_flat"], [f"{name}_x"]),
            mean(f"{name}_x", f"{name}_mean_kept", 1),
            helper.make_node("Sub", [f"{name}_x", f"{name}_mean_kept"], [f"{name}_centred"]),
            helper.make_node("Mul", [f"{name}_centred", f"{name}_centred"], [f"{name}_squares"]),
            mean(f"{name}_squares", f"{name}_var", 0),
            helper.make_node("Reshape", [f"{name}_mean_kept", "bn_reset_vector"], [f"{name}_mean"])]


def _set_statistics(model: onnx.ModelProto, node: onnx.NodeProto, mean: np.ndarray, var: np.ndarray) -> None:
    inits = {init.name: init for init in model.graph.initializer}
    for slot, value in ((3, mean), (4, var)):
        init = inits[node.input[slot]]
        dtype = numpy_helper.to_array(init).dtype
        init.CopyFrom(numpy_helper.from_array(value.astype(dtype), init.name))


def insert_repair(model: onnx.ModelProto, targets: dict[str, tuple[np.ndarray, np.ndarray]]) -> onnx.ModelProto:
    """REPAIR (Jordan et al. 2022): after each tensor named in ``targets`` (channel axis 1),
    a BatchNormalization whose scale and bias are the target std and mean, i.e. the average
    of the source models' matched channels. ``reset_batch_norm`` then measures its input, so
    each merged channel leaves with the source statistics; canonicalisation can fold it into
    the weight layer before.
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    nodes = []
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name in targets:
                node.input[slot] = f"{name}__repaired"
        nodes.append(node)
        for name in node.output:
            if name not in targets:
                continue
            mean, std = targets[name]
            names = [f"{name}__repair_{part}" for part in ("scale", "bias", "mean", "var")]
            values = (std, mean, np.zeros_like(mean), np.ones_like(mean))
            graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), n) for n, v in zip(names, values))
            nodes.append(helper.make_node("BatchNormalization", [name, *names], [f"{name}__repaired"],
                                          name=f"{name}__repair"))
    for output in graph.output:
        if output.name in targets:  # a graph output keeps its name: repair it in place of the producer's
            raise ValueError(f"cannot repair graph output {output.name}")
    del graph.node[:]
    graph.node.extend(nodes)
    return result
