"""Run models in onnxruntime exposing the intermediate tensors the statistics need."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import onnx
import onnx.compose
import onnx_graphsurgeon as gs

from ..graph.canonical import export_like
from ..graph.facts import op_facts
from ..graph.ir import import_graph
from ..graph.surgery import add_node
from ..graph.layout import Atom, Grid, leaves
from ..graph.spaces import SpaceGraph, tensor_shapes
from .device import accumulate, accumulating_model
from .stats import BlockStats, CKAStats, SpaceStats, to_samples

from ..io import default_opset
from .sessions import cuda_asked, open_session, require_finite

log = logging.getLogger(__name__)


def expose(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs also list ``tensors`` (types from shape inference)."""
    graph = import_graph(model)
    known = graph.tensors()
    graph.outputs += [known[name] for name in dict.fromkeys(tensors) if all(o.name != name for o in graph.outputs)]
    return export_like(graph, model)


@dataclass(frozen=True)
class CaptureUnit:
    """Spaces whose statistics come from one tensor axis: one space, or a 2-factor grid
    (heads x within-head, groups x within-group) captured jointly.

    ``fold`` is the size of untracked factors of the axis before and after the one space (the
    fixed groups of a grouped layer that reads an untracked tensor): each of their positions
    is another sample of the space's features. ``span`` axes from ``axis`` on are read as one
    (row-major): a grid whose block and within-block spaces sit on two axes (heads, head_dim)."""

    spaces: tuple[int, ...]
    tensor: str
    axis: int
    fold: tuple[int, int] = (1, 1)
    span: int = 1


def plan_captures(model: onnx.ModelProto, graph: SpaceGraph, wanted: set[int]) -> tuple[list[CaptureUnit], set[int]]:
    """Choose a tensor for each wanted space: the one with the most positions per sample
    (most statistics per batch), earliest in the graph on ties: the weight layer's output,
    before any nonlinearity, where no channel is dead and every channel identifies its
    counterpart in the other models. A space that several weight layers write into (a residual
    stream: the stem's output, each block's last conv, the sums) also gets a *companion* unit
    for each other tensor of it that a weight layer or a sum produces, since one of them alone
    shows only a part of what the stream carries (method.md §2).

    Returns the units, each space's or grid's chosen one first and the companions after them
    (one space each, the chosen unit's ``spaces``), and the wanted spaces no tensor shows
    (matched as identity).
    """
    order = {name: k for k, node in enumerate(model.graph.node) for name in node.output}
    written = _written(model)
    shapes = tensor_shapes(model)

    def score(unit: CaptureUnit) -> tuple[int, int]:
        dims = [d for k, d in enumerate(shapes.get(unit.tensor, ())) if k and not unit.axis <= k < unit.axis + unit.span]
        positions = int(np.prod([d if isinstance(d, int) else 1 for d in dims])) * unit.fold[0] * unit.fold[1]
        return positions, -order.get(unit.tensor, -1)

    candidates: dict[tuple[int, ...], list[CaptureUnit]] = {}
    free = {s.id for s in graph.free_spaces}
    grids = graph.axis_grids()
    for tensor, axes in graph.layouts.items():
        for axis, span, found in _readings(axes, grids):
            if found is None or not set(found[0]) & wanted:
                continue
            # other tracked axes of the tensor would be read as aligned replicas: they are not
            if any(set(leaves(other)) & free for k, other in axes.items() if not axis <= k < axis + span):
                continue
            key, fold = found
            candidates.setdefault(key, []).append(CaptureUnit(key, tensor, axis, fold, span))
    units, companions, covered = [], [], set()
    for key in sorted(candidates, key=len):  # single spaces first, then grids for what is left
        if len(key) > 1 and set(key) <= covered:
            continue
        chosen = max(candidates[key], key=score)
        units.append(chosen)
        covered.update(key)
        if len(key) == 1:
            companions += [u for u in candidates[key] if u is not chosen and u.tensor in written]
    return units + companions, wanted - covered


def space_groups(units: list[CaptureUnit]) -> list[list[int]]:
    """Per chosen capture unit of ``plan_captures``, in order, its index and its companions'
    (the other units of its space, listed after the chosen ones)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, unit in enumerate(units):
        groups.setdefault(unit.spaces, []).append(k)
    return list(groups.values())


def _written(model: onnx.ModelProto) -> set[str]:
    """Outputs of weight layers (a computed input and a constant weight) and of sums of two
    computed tensors (residual joins; not a constant bias, nor a mask that may hold -inf)."""
    computed = {i.name for i in model.graph.input} - {init.name for init in model.graph.initializer}
    written = set()
    for node in model.graph.node:
        inputs = [x for x in node.input if x]
        facts, fed = op_facts(node.op_type), [x in computed for x in inputs]
        if any(fed) and ((facts.weight and not all(fed)) or (facts.adds and all(fed))):
            written.update(node.output)
        if any(fed):
            computed.update(o for o in node.output if o)
    return written


def _readings(axes: dict, grids: set[tuple[int, int]]):
    """(axis, span, unit key) for each tracked axis of a tensor, and for each two adjacent
    axes that hold a grid (``SpaceGraph.axis_grids``)."""
    for axis, layout in axes.items():
        yield axis, 1, _unit_key(layout)
        after = axes.get(axis + 1)
        if isinstance(layout, Atom) and isinstance(after, Atom) and (layout.space, after.space) in grids:
            yield axis, 2, ((layout.space, after.space), (1, 1))


def _unit_key(layout) -> tuple[tuple[int, ...], tuple[int, int]] | None:
    """The spaces a layout shows and the untracked factors (before, after) around a lone space."""
    if isinstance(layout, Atom):
        return (layout.space,), (1, 1)
    if not isinstance(layout, Grid) or not all(isinstance(f, (Atom, int)) for f in layout.factors):
        return None
    atoms = [k for k, f in enumerate(layout.factors) if isinstance(f, Atom)]
    if len(atoms) == 2 and len(layout.factors) == 2:
        return tuple(f.space for f in layout.factors), (1, 1)
    if len(atoms) != 1:
        return None
    before, after = layout.factors[:atoms[0]], layout.factors[atoms[0] + 1:]
    return (layout.factors[atoms[0]].space,), (int(np.prod(before)), int(np.prod(after)))


def collect_statistics(models: list[onnx.ModelProto], units: list[list[CaptureUnit]],
                       batches: Iterable[list[dict[str, np.ndarray]]], widths: list[list[int]],
                       provider: str, *, threads: int | None = None,
                       on_device: bool | None = None) -> tuple[list[SpaceStats], str]:
    """Stream the calibration batches through every model and accumulate unit statistics.

    Args:
        models: canonical models.
        units: for each model, its capture units (same order across models).
        batches: per step, one feed dict per model (the same samples).
        widths: for each unit, each model's feature width there.
        provider: ``auto``, ``cpu`` or ``cuda``.
        threads: onnxruntime intra-op threads (default: one per physical core).
        on_device: accumulate the moments in the graph, on the device that runs it
            (``calib.device``; default: when CUDA runs it), instead of on the host; the same
            numbers up to the last bits of the blocks below the diagonal.

    Returns:
        One ``SpaceStats`` per unit (features of all models concatenated) and the provider
        that ran.
    """
    stats = [SpaceStats.empty(tuple(w)) for w in widths]
    if not stats:  # nothing is merged (--zip-layers 0)
        return stats, "none"
    fused = moments_model(models, units, widths)
    if fused is not None and (on_device if on_device is not None else cuda_asked(provider)):
        session, ran = open_session(accumulating_model(fused, widths), provider, threads=threads)
        del fused
        return accumulate(session, (_fused_feed(feeds) for feeds in batches), widths,
                          "cuda" if ran == "cuda" else "cpu"), ran
    if fused is not None:
        session, ran = open_session(fused, provider, threads=threads)
        names = [o.name for o in fused.graph.output]
        del fused  # a copy of every model's weights; the session has its own
        for feeds in batches:
            values = dict(zip(names, session.run(names, _fused_feed(feeds))))
            require_finite(values)
            for k, unit_stats in enumerate(stats):
                count, total, outer, shift = _assemble_moments(values, k, len(models))
                unit_stats.add_moments(count // widths[k][0], total, outer, shift)
                del outer
                for name in [n for n in values if n.startswith(f"moments{k}_")]:
                    del values[name]  # each unit's outputs go once added
        return stats, ran
    sessions, used = [], set()
    for model, model_units in zip(models, units):
        session, ran = open_session(expose(model, [u.tensor for u in model_units]), provider, threads=threads)
        sessions.append(session)
        used.add(ran)
    for feeds in batches:
        outputs = []
        for session, model_units, feed in zip(sessions, units, feeds):
            names = list(dict.fromkeys(u.tensor for u in model_units))
            values = dict(zip(names, session.run(names, feed)))
            require_finite(values, len(outputs))
            outputs.append([to_samples(values[u.tensor], u.axis, u.fold, u.span) for u in model_units])
        for k, unit_stats in enumerate(stats):
            # float32 products of centred rows, float64 accumulation: ~1e-7 relative error, twice as fast
            unit_stats.update([per_model[k] for per_model in outputs], precise=False)
    return stats, "+".join(sorted(used))


def collect_block(models: list[onnx.ModelProto], units: list[CaptureUnit],
                  batches: Iterable[list[dict[str, np.ndarray]]], widths: list[int], pair: tuple[int, int],
                  provider: str, *, threads: int | None = None) -> tuple[BlockStats, str]:
    """The block of one unit's statistics between models ``pair`` (i, j), streamed through a
    moments graph of those models alone (``moments_model`` with ``pairs``): one pass of a
    space too large for its whole statistics (``stages.statistics``), accumulated on the host
    whatever runs the graph. Arguments as for ``collect_statistics``, for one unit (``units``:
    per model; ``widths``: per model).

    Raises:
        ValueError: the models are not ``fusable`` (a caller bug).
    """
    computed = tuple(sorted(pair))  # a block below the diagonal is the transpose of the one above
    fused = moments_model(models, [[unit] for unit in units], [widths], [computed])
    if fused is None:
        raise ValueError("collect_block needs models with a moments graph (fusable)")
    session, ran = open_session(fused, provider, threads=threads)
    names = [o.name for o in fused.graph.output]
    del fused
    block, models_of = BlockStats.empty(pair, widths), list(dict.fromkeys(pair))
    for feeds in batches:
        values = dict(zip(names, session.run(names, _fused_feed(feeds))))
        require_finite(values)
        product = values[f"moments0_outer{computed[0]}_{computed[1]}"]
        block.add_moments(int(values["moments0_size"]) // widths[computed[0]],
                          [values[f"moments0_sum{i}"] for i in models_of], product if computed == pair else product.T,
                          [values[f"moments0_shift{i}"].reshape(-1) for i in models_of])
    return block, ran


def _fused_feed(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One feed of ``moments_model`` from each model's feed."""
    return {f"m{i}_{name}": value for i, model_feed in enumerate(feeds) for name, value in model_feed.items()}


def fusable(models: list[onnx.ModelProto]) -> bool:
    """Whether ``moments_model`` can run the models in one graph: the same opsets, the default
    one 13 or later (ReduceSum's axes input)."""
    opsets = {tuple(sorted((o.domain or "ai.onnx", o.version) for o in m.opset_import)) for m in models}
    return len(opsets) == 1 and default_opset(models[0]) >= 13


def moments_model(models: list[onnx.ModelProto], units: list[list[CaptureUnit]], widths: list[list[int]],
                  pairs: Sequence[tuple[int, int]] | None = None) -> onnx.ModelProto | None:
    """One graph running every model side by side (names prefixed ``m<i>_``) that also
    computes each unit's batch moments, so onnxruntime does the products and only small
    matrices leave it: per unit k, ``moments<k>_size`` (elements of the first model's features),
    ``moments<k>_shift<i>`` (model i's features at the batch's first position), and of the
    concatenated features minus that shift (float32 products near the mean, stats.py)
    ``moments<k>_sum<i>`` and the blocks ``moments<k>_outer<i>_<j>`` (i <= j) of X^T X; blocks
    below the diagonal are transposes and are not computed. With ``pairs``, only those blocks,
    and the shifts and sums of their models (the nodes no output needs are dropped, so the
    other models' weights are not read: a pass of ``collect_block``).
    None when the models' opsets differ or predate 13 (ReduceSum's axes input): then features
    are copied out."""
    if not fusable(models):
        return None
    # onnx.compose renames a whole model (subgraphs too) in one call: the IR has no such step
    parts = [import_graph(onnx.compose.add_prefix(m, f"m{i}_")) for i, m in enumerate(models)]
    graph = gs.Graph([n for p in parts for n in p.nodes], [i for p in parts for i in p.inputs], name="moments")
    graph.mapped_weights = any(p.mapped_weights for p in parts)  # import_graph's flag, which export reads
    known = {name: tensor for p in parts for name, tensor in p.tensors().items()}
    axes = {len(a): gs.Constant(f"moments_axes{len(a)}", np.array(a, np.int64)) for a in ([0], [0, 2])}
    first = gs.Constant("moments_first", np.array([0], np.int64))
    pairs = sorted(pairs if pairs is not None else ((i, j) for i in range(len(models)) for j in range(i, len(models))))
    used = sorted({i for pair in pairs for i in pair})
    for k in range(len(units[0])):
        features, batched = {}, False
        for i in used:
            unit = units[i][k]
            rank = len(tensor_shapes(models[i])[unit.tensor]) - unit.span + 1
            batched = unit.axis == 1 and rank > 2 and unit.fold == (1, 1)
            features[i] = _rows(graph, known[f"m{i}_{unit.tensor}"], unit, rank, widths[k][i], f"moments{k}_m{i}")
        # [N, C, L] (channels first: no transpose of the activations) or [rows, C]
        perm, sum_axes = ([0, 2, 1], axes[2]) if batched else ([1, 0], axes[1])
        centred = {i: _centred(graph, x, batched, first, f"moments{k}_shift{i}") for i, x in features.items()}
        graph.outputs += [shift for _, shift in centred.values()]
        transposed = {}
        for i, (x, _) in centred.items():
            graph.outputs.append(add_node(graph, "ReduceSum", [x, sum_axes], f"moments{k}_sum{i}", keepdims=0))
            transposed[i] = add_node(graph, "Transpose", [x], f"{x.name}_t", perm=perm)
        for i, j in pairs:
            block = f"moments{k}_outer{i}_{j}"
            if batched:  # per sample [C_i, L] x [L, C_j], summed over the batch
                product = add_node(graph, "MatMul", [centred[i][0], transposed[j]], f"{block}_n")
                graph.outputs.append(add_node(graph, "ReduceSum", [product, axes[1]], block, keepdims=0))
            else:
                graph.outputs.append(add_node(graph, "MatMul", [transposed[i], centred[j][0]], block))
        graph.outputs.append(add_node(graph, "Size", [centred[used[0]][0]], f"moments{k}_size"))
    graph.cleanup()  # what no output needs: the models' heads, other models' layers, and their weights
    return export_like(graph, models[0])


def _centred(graph: gs.Graph, x: gs.Tensor, batched: bool, first: gs.Constant, shift: str) -> tuple[gs.Variable, gs.Variable]:
    """``x`` minus its first row ([rows, C]) or its first sample's first position ([N, C, L]),
    per channel (``first``: the index 0), and that shift, named ``shift``."""
    if batched:
        row = add_node(graph, "Gather", [x, first], f"{shift}_row", axis=0)
        values = add_node(graph, "Gather", [row, first], shift, axis=2)
    else:
        values = add_node(graph, "Gather", [x, first], shift, axis=0)
    return add_node(graph, "Sub", [x, values], f"{x.name}_centred"), values


def _assemble_moments(values: dict[str, np.ndarray], k: int, count: int) -> tuple[int, np.ndarray, list, np.ndarray]:
    """Unit k's (elements of model 0's features, sum, X^T X by blocks as
    ``SpaceStats.add_moments`` takes them, shift) from ``moments_model``'s outputs: sum and
    X^T X of the features minus the shift."""
    shift = np.concatenate([values[f"moments{k}_shift{i}"].reshape(-1) for i in range(count)]).astype(np.float64)
    total = np.concatenate([values[f"moments{k}_sum{i}"] for i in range(count)]).astype(np.float64)
    blocks = [[values[f"moments{k}_outer{i}_{j}"] if j >= i else None for j in range(count)] for i in range(count)]
    return int(values[f"moments{k}_size"]), total, blocks, shift


def _rows(graph: gs.Graph, tensor: gs.Tensor, unit: CaptureUnit, rank: int, width: int, name: str) -> gs.Variable:
    """Nodes giving ``tensor``'s features as float32 [N, C, L] when channels are axis 1 (not
    folded), else as rows [rows, C] (the space's axis moved last, the rest flattened), named
    ``name``. ``rank`` counts the unit's ``span`` axes as one."""
    def target(values: list[int], suffix: str) -> gs.Constant:
        return gs.Constant(f"{name}_{suffix}", np.array(values, np.int64))

    current, shape, axis = tensor, [-1, width], unit.axis
    if unit.span > 1:  # its axes merged, the axes after them too: [..., H, Dh, T] -> [..., H*Dh, T]
        rank = axis + 1 + (rank > axis + 1)
        merged = [0] * axis + [width] + [-1] * (rank - axis - 1)
        current = add_node(graph, "Reshape", [current, target(merged, "merged")], f"{name}_merged_out")
    if unit.fold != (1, 1):  # split the axis into (before, space, after) and move the space last
        split = [0] * axis + [unit.fold[0], width, unit.fold[1]] + ([-1] if axis < rank - 1 else [])
        perm = [k for k in range(len(split)) if k != axis + 1] + [axis + 1]
        current = add_node(graph, "Reshape", [current, target(split, "split")], f"{name}_split_out")
        current = add_node(graph, "Transpose", [current], f"{name}_last", perm=perm)
    elif axis == 1 and rank > 2:
        shape = [0, width, -1]
    elif axis != rank - 1:
        perm = [k for k in range(rank) if k != axis] + [axis]
        current = add_node(graph, "Transpose", [current], f"{name}_last", perm=perm)
    rows = add_node(graph, "Reshape", [current, target(shape, "shape")], f"{name}_rows")
    return add_node(graph, "Cast", [rows], name, to=onnx.TensorProto.FLOAT)


def collect_cka(models: list[onnx.ModelProto], tensors: list[list[str]],
                batches: Iterable[list[dict[str, np.ndarray]]], provider: str) -> tuple[CKAStats, str]:
    """CKA between every listed tensor of every model (model 0's tensors first, then model 1's ...)."""
    sessions, used = [], set()
    for model, names in zip(models, tensors):
        session, ran = open_session(expose(model, names), provider)
        sessions.append(session)
        used.add(ran)
    stats = CKAStats(sum(len(names) for names in tensors))
    for feeds in batches:
        features = []
        for index, (session, names, feed) in enumerate(zip(sessions, tensors, feeds)):
            features.extend(session.run(names, feed))
            require_finite(dict(zip(names, features[-len(names):])), index)
        stats.update(features)
    return stats, "+".join(sorted(used))
