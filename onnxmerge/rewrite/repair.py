"""Repair after merging (method.md §7).

BN reset recomputes every BatchNormalization's mean and variance on the merged model,
layer by layer: a BN is measured only once every BN upstream of it has been reset, so each
sees corrected inputs. REPAIR rescales merged channels of BN-free models.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..calib.capture import expose, open_session
from ..calib.stats import to_samples

log = logging.getLogger(__name__)

REPAIRS = ("auto", "none", "reset", "repair")
Batches = Callable[[], Iterable[dict[str, np.ndarray]]]


def _bn_ancestors(model: onnx.ModelProto) -> dict[int, set[int]]:
    """For each BatchNormalization node, the BatchNormalization nodes upstream of it."""
    producer = {name: k for k, node in enumerate(model.graph.node) for name in node.output}
    upstream: dict[int, set[int]] = {}
    for k, node in enumerate(model.graph.node):
        found: set[int] = set()
        for name in node.input:
            if name in producer:
                parent = producer[name]
                found |= upstream[parent]
                if model.graph.node[parent].op_type == "BatchNormalization":
                    found.add(parent)
        upstream[k] = found
    return {k: upstream[k] for k, n in enumerate(model.graph.node) if n.op_type == "BatchNormalization"}


def reset_batch_norm(model: onnx.ModelProto, batches: Batches,
                     provider: str = "auto") -> tuple[onnx.ModelProto, int, str]:
    """A copy of ``model`` with BatchNormalization statistics measured on the batches.

    From opset 14 in one pass, in train mode as the source frameworks reset BN: every BN
    normalises with its batch statistics, so later layers see corrected inputs, and the
    batch statistics are pooled over the batches. Older opsets have no train-mode BN
    attribute: there each BN is measured in eval mode once every BN upstream is reset.

    Returns the model, the number of passes over the data and the provider that ran them.
    """
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= 14:
        return _reset_in_train_mode(model, batches, provider)
    return _reset_layer_by_layer(model, batches, provider)


def _set_statistics(model: onnx.ModelProto, node: onnx.NodeProto, mean: np.ndarray, var: np.ndarray) -> None:
    inits = {init.name: init for init in model.graph.initializer}
    for slot, value in ((3, mean), (4, var)):
        init = inits[node.input[slot]]
        dtype = numpy_helper.to_array(init).dtype
        init.CopyFrom(numpy_helper.from_array(value.astype(dtype), init.name))


def _reset_in_train_mode(model: onnx.ModelProto, batches: Batches, provider: str):
    train = onnx.ModelProto()
    train.CopyFrom(model)
    outputs = []
    for k, node in enumerate(train.graph.node):
        if node.op_type != "BatchNormalization":
            continue
        names = [f"{node.output[0]}__reset_mean", f"{node.output[0]}__reset_var"]
        del node.output[1:]
        node.output.extend(names)
        kept = [a for a in node.attribute if a.name not in ("training_mode", "momentum")]
        del node.attribute[:]
        node.attribute.extend(kept + [helper.make_attribute("training_mode", 1), helper.make_attribute("momentum", 0.0)])
        outputs.append((k, names))
        train.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    session, ran = open_session(train, provider)
    wanted = [n for _, names in outputs for n in names]
    count, moments = 0, [[0.0, 0.0] for _ in outputs]
    for feed in batches():
        size = len(next(iter(feed.values())))
        values = session.run(wanted, feed)
        for j, acc in enumerate(moments):
            mean, var = (v.astype(np.float64) for v in values[2 * j:2 * j + 2])
            acc[0] = acc[0] + size * mean
            acc[1] = acc[1] + size * (var + mean ** 2)
        count += size
    result = onnx.ModelProto()
    result.CopyFrom(model)
    for (k, _), (total, squares) in zip(outputs, moments):
        mean = total / count
        _set_statistics(result, result.graph.node[k], mean, np.maximum(squares / count - mean ** 2, 0.0))
    return result, 1, ran


def _reset_layer_by_layer(model: onnx.ModelProto, batches: Batches, provider: str):
    result = onnx.ModelProto()
    result.CopyFrom(model)
    pending = _bn_ancestors(result)
    passes, ran = 0, "none"
    while pending:
        ready = [k for k, ups in pending.items() if not ups & pending.keys()]
        inputs = [result.graph.node[k].input[0] for k in ready]
        session, ran = open_session(expose(result, inputs), provider)
        sums: dict[str, list] = {}
        for feed in batches():
            for name, value in zip(inputs, session.run(inputs, feed)):
                samples = to_samples(value, 1).astype(np.float64)
                acc = sums.setdefault(name, [0, 0.0, 0.0])
                acc[0] += samples.shape[0]
                acc[1] = acc[1] + samples.sum(0)
                acc[2] = acc[2] + (samples ** 2).sum(0)
        for k, name in zip(ready, inputs):
            count, total, squares = sums[name]
            mean = total / count
            _set_statistics(result, result.graph.node[k], mean, np.maximum(squares / count - mean ** 2, 0.0))
            del pending[k]
        passes += 1
    log.info("BN reset: %d passes", passes)
    return result, passes, ran


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
