"""Width-bearing constants that follow new space widths: Reshape targets (constant, or
concatenated at run time around a constant channel count), Split sizes, Slice bounds and
depthwise Conv groups, as the op table names them (``OpFacts.resize``). Merging, widening and
lifting all change widths and call ``resize_constants`` on their result."""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..graph.facts import depthwise, op_facts
from ..graph.layout import Concat, Layout, layout_width
from ..graph.spaces import SpaceGraph


def resize_constants(graph: gs.Graph, reference: SpaceGraph, leaf_width: Callable[[int], int]) -> None:
    """Make the width-bearing constants of nodes that come from ``reference``'s model agree
    with new space widths (in place): the constants the op table names (``OpFacts.resize``:
    Reshape targets, Split sizes, Slice bounds, depthwise Conv groups). Entries 0 and -1 of a
    Reshape target (copy, infer) stay."""
    layouts = reference.layouts

    def new_width(layout) -> int:
        return layout_width(layout, leaf_width)

    for node in list(graph.nodes):  # _explicit_split adds constants, no nodes
        resize = op_facts(node.op).resize
        second = _input(node, 1)
        output = node.outputs[0].name
        if resize == "target" and isinstance(second, gs.Constant) and output in layouts:
            _rewrite(second, lambda shape, output=output: _resize_reshape(shape, layouts[output], new_width))
        elif resize == "target" and _joined(second) and output in layouts:
            for part, offset in _constant_parts(second.inputs[0]):
                _rewrite(part, lambda part, output=output, offset=offset: _resize_reshape(
                    part, {a - offset: v for a, v in layouts[output].items() if 0 <= a - offset < len(part)},
                    new_width))
        elif resize == "sizes" and isinstance(second, gs.Constant):
            _rewrite(second, lambda sizes, node=node: _resize_split(node, sizes, layouts, new_width))
        elif resize == "sizes" and second is None and graph.opset >= 13:
            _explicit_split(node, layouts, new_width)
        elif resize == "bounds" and output in layouts and all(isinstance(_input(node, k), gs.Constant) for k in (1, 2)):
            _resize_slice(node, reference, leaf_width)
        elif resize == "group" and isinstance(second, gs.Constant) and depthwise(
                node.op, tuple(second.shape), node.attrs.get("group", 1)):
            channels = layouts.get(node.inputs[0].name, {}).get(1)
            if "group" in node.attrs and channels is not None:
                node.attrs["group"] = new_width(channels)


def _input(node: gs.Node, index: int) -> gs.Tensor | None:
    """The node's input ``index``, None when it has none there (or an empty one)."""
    return node.inputs[index] if len(node.inputs) > index and node.inputs[index].name else None


def _joined(tensor: gs.Tensor | None) -> bool:
    """Whether ``tensor`` is concatenated at run time (a Concat's output)."""
    return tensor is not None and len(tensor.inputs) == 1 and op_facts(tensor.inputs[0].op).joins


def _rewrite(constant: gs.Constant, change: Callable[[np.ndarray], None]) -> None:
    value = constant.values.copy()
    change(value)
    constant.values = value


def _constant_parts(concat: gs.Node) -> list[tuple[gs.Constant, int]]:
    """The constant parts of a Reshape target concatenated at run time (Shape entries of other
    tensors around a constant channel count, as exporters write for dynamic axes) and where each
    starts; none when a part's length is unknown."""
    parts, offset = [], 0
    for tensor in concat.inputs:
        length = (tensor.shape or (None,))[0]
        if not isinstance(length, int):
            return []
        if isinstance(tensor, gs.Constant):
            parts.append((tensor, offset))
        offset += length
    return parts


def _resize_reshape(shape: np.ndarray, out: dict[int, Layout], new_width: Callable) -> None:
    for axis, layout in out.items():
        if shape[axis] > 0:
            shape[axis] = new_width(layout)


def _resize_split(node: gs.Node, sizes: np.ndarray, layouts: dict, new_width: Callable) -> None:
    axis = node.attrs.get("axis", 0)
    for k, tensor in enumerate(node.outputs):
        layout = next((v for a, v in layouts.get(tensor.name, {}).items() if a == axis or a - len(sizes) == axis), None)
        if layout is not None:
            sizes[k] = new_width(layout)


def _explicit_split(node: gs.Node, layouts: dict, new_width: Callable) -> None:
    """A Split into equal parts (no sizes, or ``num_outputs``) gets the sizes of its parts as an
    input when they are no longer equal (one part widened or merged to another width)."""
    found = [layouts.get(tensor.name, {}).get(node.attrs.get("axis", 0)) for tensor in node.outputs]
    if any(layout is None for layout in found):
        return
    sizes = np.array([new_width(layout) for layout in found], np.int64)
    if len(set(sizes.tolist())) == 1:
        return
    while len(node.inputs) > 1:
        node.inputs.pop()
    node.inputs.append(gs.Constant(f"{node.name or node.outputs[0].name}_sizes", sizes))
    node.attrs.pop("num_outputs", None)


def _resize_slice(node: gs.Node, reference: SpaceGraph, leaf_width: Callable[[int], int]) -> None:
    """A contiguous slice of a tracked axis is a run of that axis's parts (the space is cut at
    its bounds): its new bounds are the new widths of the parts before it and of the run.
    Axes are non-negative (canonicalisation)."""
    starts, ends = (node.inputs[k].values.copy() for k in (1, 2))
    axes = _input(node, 3)
    axes = axes.values if isinstance(axes, gs.Constant) else range(len(starts))
    data, piece = reference.layouts.get(node.inputs[0].name, {}), reference.layouts[node.outputs[0].name]
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
    node.inputs[1].values, node.inputs[2].values = starts, ends


def _parts(layout: Layout) -> list[Layout]:
    """The consecutive parts of an axis: a Concat's, nested ones flattened."""
    if isinstance(layout, Concat):
        return [leaf for part in layout.parts for leaf in _parts(part)]
    return [layout]
