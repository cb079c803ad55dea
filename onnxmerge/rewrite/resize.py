"""Width-bearing constants that follow new space widths: Reshape targets (constant, or
concatenated at run time around a constant channel count), Split sizes, Slice bounds and
depthwise Conv groups, as the op table names them (``OpFacts.resize``). Merging, widening and
lifting all change widths and call ``resize_constants`` on their result."""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph.facts import depthwise, op_facts
from ..graph.layout import Concat, Layout, layout_width
from ..graph.rules import attr
from ..graph.spaces import SpaceGraph, tensor_shapes
from ..io import default_opset
from .. import weights


def resize_constants(model: onnx.ModelProto, reference: SpaceGraph, leaf_width: Callable[[int], int]) -> None:
    """Make the width-bearing constants of nodes that come from ``reference``'s model agree
    with new space widths (in place): the constants the op table names (``OpFacts.resize``:
    Reshape targets, Split sizes, Slice bounds, depthwise Conv groups). Entries 0 and -1 of a
    Reshape target (copy, infer) stay."""
    inits = {init.name: init for init in model.graph.initializer}
    layouts = reference.layouts

    def new_width(layout) -> int:
        return layout_width(layout, leaf_width)

    def rewrite(name: str, change: Callable[[np.ndarray], None]) -> None:
        value = weights.read(inits[name]).copy()
        change(value)
        inits[name].CopyFrom(numpy_helper.from_array(value, name))

    concats = {node.output[0]: node for node in model.graph.node if op_facts(node.op_type).joins}
    shapes = None  # of the shape tensors, read when a Reshape target is concatenated at run time
    for node in model.graph.node:
        resize = op_facts(node.op_type).resize
        if resize == "target" and node.input[1] in inits and node.output[0] in layouts:
            rewrite(node.input[1], lambda shape, node=node: _resize_reshape(shape, layouts[node.output[0]], new_width))
        elif resize == "target" and node.input[1] in concats and node.output[0] in layouts:
            shapes = shapes if shapes is not None else tensor_shapes(model)
            for name, offset in _constant_parts(concats[node.input[1]], inits, shapes):
                rewrite(name, lambda part, node=node, offset=offset: _resize_reshape(
                    part, {a - offset: v for a, v in layouts[node.output[0]].items() if 0 <= a - offset < len(part)},
                    new_width))
        elif resize == "sizes" and len(node.input) > 1 and node.input[1] in inits:
            rewrite(node.input[1], lambda sizes, node=node: _resize_split(node, sizes, layouts, new_width))
        elif resize == "sizes" and (len(node.input) < 2 or not node.input[1]) and default_opset(model) >= 13:
            _explicit_split(model, node, layouts, new_width)
        elif resize == "bounds" and node.output[0] in layouts and all(n in inits for n in node.input[1:3]):
            _resize_slice(node, inits, reference, leaf_width)
        elif resize == "group" and node.input[1] in inits and depthwise(
                node.op_type, tuple(inits[node.input[1]].dims), attr(node, "group", 1)):
            channels = layouts.get(node.input[0], {}).get(1)
            for attribute in node.attribute:
                if attribute.name == "group" and channels is not None:
                    attribute.i = new_width(channels)


def _constant_parts(concat: onnx.NodeProto, inits: dict, shapes: dict) -> list[tuple[str, int]]:
    """The constant parts of a Reshape target concatenated at run time (Shape entries of other
    tensors around a constant channel count, as exporters write for dynamic axes) and where each
    starts; none when a part's length is unknown."""
    parts, offset = [], 0
    for name in concat.input:
        length = inits[name].dims[0] if name in inits else (shapes.get(name) or (None,))[0]
        if not isinstance(length, int):
            return []
        if name in inits:
            parts.append((name, offset))
        offset += length
    return parts


def _resize_reshape(shape: np.ndarray, out: dict[int, Layout], new_width: Callable) -> None:
    for axis, layout in out.items():
        if shape[axis] > 0:
            shape[axis] = new_width(layout)


def _resize_split(node: onnx.NodeProto, sizes: np.ndarray, layouts: dict, new_width: Callable) -> None:
    axis = attr(node, "axis", 0)
    for k, name in enumerate(node.output):
        layout = next((v for a, v in layouts.get(name, {}).items() if a == axis or a - len(sizes) == axis), None)
        if layout is not None:
            sizes[k] = new_width(layout)


def _explicit_split(model: onnx.ModelProto, node: onnx.NodeProto, layouts: dict, new_width: Callable) -> None:
    """A Split into equal parts (no sizes, or ``num_outputs``) gets the sizes of its parts as an
    input when they are no longer equal (one part widened or merged to another width)."""
    found = [layouts.get(name, {}).get(attr(node, "axis", 0)) for name in node.output]
    if any(layout is None for layout in found):
        return
    sizes = np.array([new_width(layout) for layout in found], np.int64)
    if len(set(sizes.tolist())) == 1:
        return
    name = f"{node.name or node.output[0]}_sizes"
    model.graph.initializer.append(numpy_helper.from_array(sizes, name))
    del node.input[1:]
    node.input.append(name)
    kept = [a for a in node.attribute if a.name != "num_outputs"]
    del node.attribute[:]
    node.attribute.extend(kept)


def _resize_slice(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], reference: SpaceGraph,
                  leaf_width: Callable[[int], int]) -> None:
    """A contiguous slice of a tracked axis is a run of that axis's parts (the space is cut at
    its bounds): its new bounds are the new widths of the parts before it and of the run.
    Axes are non-negative (canonicalisation)."""
    starts, ends = (weights.read(inits[name]).copy() for name in node.input[1:3])
    axes = (weights.read(inits[node.input[3]]) if len(node.input) > 3 and node.input[3]
            else range(len(starts)))
    data, piece = reference.layouts.get(node.input[0], {}), reference.layouts[node.output[0]]
    old_width = reference.table.widths.__getitem__
    for k, axis in enumerate(int(a) for a in axes):
        if axis not in data or axis not in piece:
            continue
        width = layout_width(data[axis], old_width)
        start = min(max(int(starts[k]) + width if starts[k] < 0 else int(starts[k]), 0), width)
        parts = _parts(data[axis])
        before = np.cumsum([0] + [layout_width(p, old_width) for p in parts]).tolist().index(start)
        starts[k] = sum(layout_width(p, leaf_width) for p in parts[:before])
        ends[k] = starts[k] + layout_width(piece[axis], leaf_width)
    for name, value in zip(node.input[1:3], (starts, ends)):
        inits[name].CopyFrom(numpy_helper.from_array(value, name))


def _parts(layout: Layout) -> list[Layout]:
    """The consecutive parts of an axis: a Concat's, nested ones flattened."""
    if isinstance(layout, Concat):
        return [leaf for part in layout.parts for leaf in _parts(part)]
    return [layout]
