"""Feature moments accumulated where onnxruntime runs (on the GPU with ``--provider cuda``).

``capture.moments_model`` computes each batch's moments in the graph, but its outputs (an
(n, n) block matrix per unit and batch) still cross to the host to be added there. Here the
graph also adds them: each unit's running count, sums and X^T X blocks are float64 graph inputs
(``acc<k>_...``) and the graph outputs them with the batch added (``next<k>_...``), in exactly
the operations and order of ``SpaceStats.add_moments``. An onnxruntime IOBinding keeps two sets
of these accumulators on the device and swaps them after every batch, so a batch sends only its
inputs to the device, and the moments come back once, at the end.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from ..graph.canonical import export_like
from ..graph.ir import import_graph
from ..graph.surgery import add_node
from .stats import SpaceStats

if TYPE_CHECKING:
    from .sessions import Session


def accumulating_model(fused: onnx.ModelProto, widths: list[list[int]]) -> onnx.ModelProto:
    """``fused`` (``capture.moments_model`` of units of these ``widths``) whose outputs are,
    per unit k, the accumulators ``next<k>_count`` (float64 scalar: feature rows),
    ``next<k>_sum<i>`` ([d_i]) and ``next<k>_outer<i>_<j>`` ([d_i, d_j], i <= j), each its
    ``acc<k>_...`` input plus the batch's uncentred moments (shift added back in float64)."""
    graph = import_graph(fused)
    tensors = graph.tensors()

    names = itertools.count()

    def op(kind: str, inputs: list, **attrs) -> gs.Variable:
        return add_node(graph, kind, inputs, f"acc_batch{next(names)}", **attrs)

    def double(tensor: gs.Tensor) -> gs.Variable:
        return op("Cast", [tensor], to=TensorProto.DOUBLE)

    def outer(left: gs.Tensor, right: gs.Tensor) -> gs.Variable:  # [d, 1] x [1, d]: one rounding per entry
        return op("MatMul", [op("Unsqueeze", [left, column]), op("Unsqueeze", [right, row])])

    column, row, flat = (gs.Constant(f"acc_{name}", np.array([axis], np.int64))
                         for name, axis in (("column", 1), ("row", 0), ("flat", -1)))
    batch = {}  # accumulator name: the batch's value to add
    for k, unit in enumerate(widths):
        rows = op("Div", [double(tensors[f"moments{k}_size"]), gs.Constant(f"acc{k}_width0", np.array(float(unit[0])))])
        shift = [double(op("Reshape", [tensors[f"moments{k}_shift{i}"], flat])) for i in range(len(unit))]
        total = [double(tensors[f"moments{k}_sum{i}"]) for i in range(len(unit))]
        for i in range(len(unit)):
            batch[f"{k}_sum{i}"] = op("Add", [total[i], op("Mul", [rows, shift[i]])])
        for i, j in ((i, j) for i in range(len(unit)) for j in range(i, len(unit))):
            # ((B + s_i t_j^T) + t_i s_j^T) + rows * s_i s_j^T: add_moments's operations in its order
            block = op("Add", [double(tensors[f"moments{k}_outer{i}_{j}"]), outer(shift[i], total[j])])
            block = op("Add", [block, outer(total[i], shift[j])])
            batch[f"{k}_outer{i}_{j}"] = op("Add", [block, op("Mul", [outer(shift[i], shift[j]), rows])])
        batch[f"{k}_count"] = rows
    graph.outputs = []
    for name, shape in _accumulators(widths).items():
        accumulator = gs.Variable(f"acc{name}", dtype=np.float64, shape=shape)
        graph.inputs.append(accumulator)
        result = add_node(graph, "Add", [accumulator, batch[name]], f"next{name}")
        result.dtype, result.shape = np.float64, shape
        graph.outputs.append(result)
    return export_like(graph, fused)


def _accumulators(widths: list[list[int]]) -> dict[str, list[int]]:
    """Each accumulator's name (after ``acc``/``next``) and shape: per unit k, ``<k>_count``,
    ``<k>_sum<i>`` and the blocks ``<k>_outer<i>_<j>`` (i <= j)."""
    shapes = {}
    for k, unit in enumerate(widths):
        shapes[f"{k}_count"] = []
        shapes.update({f"{k}_sum{i}": [width] for i, width in enumerate(unit)})
        shapes.update({f"{k}_outer{i}_{j}": [unit[i], unit[j]] for i in range(len(unit)) for j in range(i, len(unit))})
    return shapes


def accumulate(session: Session, batches: Iterable[dict[str, np.ndarray]], widths: list[list[int]],
               device: str) -> list[SpaceStats]:
    """Run an ``accumulating_model`` session on every feed of ``batches`` with its accumulators
    kept on ``device`` (``cuda`` or ``cpu``) between runs; each unit's ``SpaceStats``.

    Raises:
        CalibrationError: a run fails, or a model produced NaN/Inf features.
    """
    from ..runtime import import_onnxruntime

    onnxruntime = import_onnxruntime()
    shapes = _accumulators(widths)
    zeros = {name: np.zeros(shape) for name, shape in shapes.items()}  # on the CPU the OrtValues are views of these
    current = {name: onnxruntime.OrtValue.ortvalue_from_numpy(value, device, 0) for name, value in zeros.items()}
    spare = {name: onnxruntime.OrtValue.ortvalue_from_shape_and_type(shape, np.float64, device, 0)
             for name, shape in shapes.items()}
    for feed in batches:
        session.run_bound(feed, {f"acc{name}": value for name, value in current.items()},
                          {f"next{name}": value for name, value in spare.items()})
        current, spare = spare, current
    del spare, zeros
    stats = []
    for k, unit in enumerate(widths):  # numpy() views a CPU OrtValue's memory: read while ``current`` holds it
        moments = SpaceStats.empty(tuple(unit))
        total = np.concatenate([current[f"{k}_sum{i}"].numpy() for i in range(len(unit))])
        blocks = [[current[f"{k}_outer{i}_{j}"].numpy() if j >= i else None for j in range(len(unit))]
                  for i in range(len(unit))]
        moments.add_moments(int(round(float(current[f"{k}_count"].numpy()))), total, blocks)
        stats.append(moments)
    return stats
