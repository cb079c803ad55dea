"""What ``onnxmerge inspect`` reports: a JSON-ready summary of a model's spaces and barriers.

The JSON layout (``format: onnxmerge.inspect/1``) is documented in docs/inspect-json.md and
kept stable: fields are only ever added.
"""

from __future__ import annotations

from collections import Counter

import onnx

from .graph.blocks import find_blocks
from .graph.facts import op_facts
from .graph.layout import leaves
from .graph.spaces import ParamUse, SpaceGraph

FORMAT = "onnxmerge.inspect/1"


def _value_info(info: onnx.ValueInfoProto) -> dict:
    tensor = info.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
    return {"name": info.name, "shape": shape, "dtype": _type_name(info.type)}


def _type_name(proto: onnx.TypeProto) -> str:
    """A tensor's element type as numpy names it (float32); other types spelled out around it:
    sequence(float32), map(int64, float32), optional(...), sparse(float32)."""
    kind = proto.WhichOneof("value")
    if kind == "sequence_type":
        return f"sequence({_type_name(proto.sequence_type.elem_type)})"
    if kind == "optional_type":
        return f"optional({_type_name(proto.optional_type.elem_type)})"
    if kind == "map_type":
        return f"map({_element_name(proto.map_type.key_type)}, {_type_name(proto.map_type.value_type)})"
    if kind == "sparse_tensor_type":
        return f"sparse({_element_name(proto.sparse_tensor_type.elem_type)})"
    return _element_name(proto.tensor_type.elem_type) if kind == "tensor_type" else "unknown"


def _element_name(elem_type: int) -> str:
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name
    except (KeyError, ValueError, TypeError):
        return "unknown"


def _use(use: ParamUse) -> dict:
    return {"param": use.name, "axis": use.axis, "node": use.node}


def describe(path: str, model: onnx.ModelProto, graph: SpaceGraph) -> dict:
    """The inspect report of a canonical model and its spaces."""
    spaces, grids = [], graph.axis_grids()
    for space in graph.spaces:
        spaces.append({
            "id": space.name,
            "width": space.width,
            "free": not space.fixed,
            "fixed_reasons": space.fixed_reasons,
            "producers": [_use(u) for u in space.producers],
            "consumers": [_use(u) for u in space.consumers],
            "tensors": [{"tensor": t, "axis": a} for t, a in space.tensors],
            "structured": _structured(graph, space.id, grids),
        })
    return {
        "format": FORMAT,
        "model": str(path),
        "ir_version": model.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "inputs": [_value_info(i) for i in model.graph.input],
        "outputs": [_value_info(o) for o in model.graph.output],
        "ops": dict(sorted(Counter(n.op_type for n in model.graph.node).items())),
        "spaces": spaces,
        "barriers": [{"node": b.node, "op": b.op, "reason": b.reason} for b in graph.barriers],
        "stages": _stages(model),
        "summary": {
            "nodes": len(model.graph.node),
            "parameters": sum(int(_numel(i)) for i in model.graph.initializer),
            "spaces": len(graph.spaces),
            "free": len(graph.free_spaces),
            "fixed": len(graph.spaces) - len(graph.free_spaces),
            "barriers": len(graph.barriers),
        },
    }


def _stages(model: onnx.ModelProto) -> list[dict]:
    """Each stage's units: their blocks' ops, input and output cuts."""
    structure = find_blocks(model)
    nodes = model.graph.node
    return [{"units": [{"input": unit.input, "output": unit.output,
                        "blocks": [[nodes[i].op_type for i in block.nodes] for block in unit.blocks]}
                       for unit in stage.units]}
            for stage in structure.stages]


def _numel(init: onnx.TensorProto) -> int:
    count = 1
    for d in init.dims:
        count *= d
    return count


def _structured(graph: SpaceGraph, space_id: int, grids: set[tuple[int, int]]) -> bool:
    """True when the space is a factor of a head/group grid (flattened in one axis, or on two
    axes: ``grids``) or a part of a concat."""
    return (any(space_id in pair for pair in grids)
            or any(len(leaves(p.layout)) > 1 and space_id in leaves(p.layout) for p in graph.params))


def _ops_text(ops: list[str]) -> str:
    """A block's weight ops, e.g. Conv,Conv,Gemm, or its first op when it has none."""
    weights = [op for op in ops if op_facts(op).layout is not None]
    return ",".join(weights or ops[:1])


def render(report: dict) -> str:
    """Plain-text form of ``describe``'s report."""
    lines = [f"model: {report['model']}  (IR {report['ir_version']}, opsets {report['opsets']})"]
    for kind in ("inputs", "outputs"):
        for info in report[kind]:
            lines.append(f"  {kind[:-1]:6} {info['name']}: {info['dtype']} {info['shape']}")
    lines.append("ops: " + ", ".join(f"{op} x{n}" for op, n in report["ops"].items()))
    lines.append(f"{'space':6} {'width':>5}  {'state':5}  producers -> consumers")
    for space in report["spaces"]:
        state = "free" if space["free"] else "fixed"
        producers = ", ".join(f"{u['param']}[{u['axis']}]" for u in space["producers"][:3])
        more = "" if len(space["producers"]) <= 3 else f" +{len(space['producers']) - 3}"
        consumers = ", ".join(f"{u['param']}[{u['axis']}]" for u in space["consumers"][:3])
        more_c = "" if len(space["consumers"]) <= 3 else f" +{len(space['consumers']) - 3}"
        reason = f"  ({space['fixed_reasons'][0]})" if space["fixed_reasons"] else ""
        lines.append(f"{space['id']:6} {space['width']:>5}  {state:5}  {producers}{more} -> {consumers}{more_c}{reason}")
    for index, stage in enumerate(report["stages"]):
        units = " | ".join("+".join(_ops_text(ops) for ops in unit["blocks"]) for unit in stage["units"])
        lines.append(f"stage {index} ({len(stage['units'])} blocks): {units}")
    for barrier in report["barriers"]:
        lines.append(f"barrier: node {barrier['node']!r} ({barrier['op']}): {barrier['reason']}")
    s = report["summary"]
    lines.append(f"{s['spaces']} spaces: {s['free']} free, {s['fixed']} fixed; {s['barriers']} barriers; "
                 f"{s['nodes']} nodes, {s['parameters']} parameters")
    return "\n".join(lines)
