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

from typing import TYPE_CHECKING, Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper

from .stats import SpaceStats

if TYPE_CHECKING:
    from .capture import Session


def accumulating_model(fused: onnx.ModelProto, widths: list[list[int]]) -> onnx.ModelProto:
    """``fused`` (``capture.moments_model`` of units of these ``widths``) whose outputs are,
    per unit k, the accumulators ``next<k>_count`` (float64 scalar: feature rows),
    ``next<k>_sum<i>`` ([d_i]) and ``next<k>_outer<i>_<j>`` ([d_i, d_j], i <= j), each its
    ``acc<k>_...`` input plus the batch's uncentred moments (shift added back in float64)."""
    nodes, batch = [], {}  # accumulator name: the batch's value to add
    for k, unit in enumerate(widths):
        rows = f"acc{k}_batch_rows"
        nodes += [helper.make_node("Cast", [f"moments{k}_size"], [f"{rows}_size"], to=TensorProto.DOUBLE),
                  helper.make_node("Div", [f"{rows}_size", f"acc{k}_width0"], [rows])]
        shift, total = [], []
        for i in range(len(unit)):
            shift.append(_double(nodes, f"moments{k}_shift{i}", flat=True))
            total.append(_double(nodes, f"moments{k}_sum{i}"))
            scaled = f"acc{k}_shift{i}_scaled"
            nodes += [helper.make_node("Mul", [rows, shift[i]], [scaled]),
                      helper.make_node("Add", [total[i], scaled], [f"acc{k}_batch_sum{i}"])]
            batch[f"{k}_sum{i}"] = f"acc{k}_batch_sum{i}"
        for i, j in ((i, j) for i in range(len(unit)) for j in range(i, len(unit))):
            batch[f"{k}_outer{i}_{j}"] = _shifted_block(nodes, f"moments{k}_outer{i}_{j}", shift, total, rows, i, j)
        batch[f"{k}_count"] = rows
    inputs, outputs = [], []
    for name, shape in _accumulators(widths).items():
        nodes.append(helper.make_node("Add", [f"acc{name}", batch[name]], [f"next{name}"]))
        inputs.append(helper.make_tensor_value_info(f"acc{name}", TensorProto.DOUBLE, shape))
        outputs.append(helper.make_tensor_value_info(f"next{name}", TensorProto.DOUBLE, shape))
    result = onnx.ModelProto()
    result.CopyFrom(fused)
    graph = result.graph
    graph.initializer.extend(helper.make_tensor(f"acc{k}_width0", TensorProto.DOUBLE, [], [float(unit[0])])
                             for k, unit in enumerate(widths))
    graph.initializer.extend([helper.make_tensor("acc_column", TensorProto.INT64, [1], [1]),
                              helper.make_tensor("acc_row", TensorProto.INT64, [1], [0]),
                              helper.make_tensor("acc_flat", TensorProto.INT64, [1], [-1])])
    graph.node.extend(nodes)
    graph.input.extend(inputs)
    del graph.output[:]
    graph.output.extend(outputs)
    return result


def _double(nodes: list, name: str, flat: bool = False) -> str:
    """``name`` cast to float64 (flattened to one axis when ``flat``)."""
    source = name
    if flat:
        source = f"{name}_flat"
        nodes.append(helper.make_node("Reshape", [name, "acc_flat"], [source]))
    nodes.append(helper.make_node("Cast", [source], [f"{name}_f64"], to=TensorProto.DOUBLE))
    return f"{name}_f64"


def _shifted_block(nodes: list, block: str, shift: list[str], total: list[str], rows: str, i: int, j: int) -> str:
    """Block (i, j) of the batch's X^T X with the shift added back, as ``add_moments`` adds it:
    ((B + s_i t_j^T) + t_i s_j^T) + rows * s_i s_j^T (outer products as [d, 1] x [1, d] MatMuls,
    one rounding each)."""
    def outer(left: str, right: str, name: str) -> str:
        nodes.extend([helper.make_node("Unsqueeze", [left, "acc_column"], [f"{name}_l"]),
                      helper.make_node("Unsqueeze", [right, "acc_row"], [f"{name}_r"]),
                      helper.make_node("MatMul", [f"{name}_l", f"{name}_r"], [name])])
        return name

    base = _double(nodes, block)
    cross = outer(shift[i], total[j], f"{block}_st")
    cross_t = outer(total[i], shift[j], f"{block}_ts")
    squares = outer(shift[i], shift[j], f"{block}_ss")
    nodes += [helper.make_node("Add", [base, cross], [f"{block}_a1"]),
              helper.make_node("Add", [f"{block}_a1", cross_t], [f"{block}_a2"]),
              helper.make_node("Mul", [squares, rows], [f"{block}_ssn"]),
              helper.make_node("Add", [f"{block}_a2", f"{block}_ssn"], [f"{block}_batch"])]
    return f"{block}_batch"


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
