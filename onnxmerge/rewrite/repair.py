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
from onnx import numpy_helper

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

    Returns the model, the number of passes over the data and the provider that ran them.
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    inits = {init.name: init for init in result.graph.initializer}
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
            var = np.maximum(squares / count - mean ** 2, 0.0)
            node = result.graph.node[k]
            for slot, value in ((3, mean), (4, var)):
                init = inits[node.input[slot]]
                dtype = numpy_helper.to_array(init).dtype
                init.CopyFrom(numpy_helper.from_array(value.astype(dtype), init.name))
            del pending[k]
        passes += 1
    log.info("BN reset: %d passes", passes)
    return result, passes, ran
