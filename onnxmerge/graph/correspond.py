"""Structural correspondence between canonical models of one architecture.

Models are matched by graph structure, never by initializer names (exporters rename freely):
node k of every model must have the same op, attributes and parameter shapes, and
``find_spaces`` then yields the same spaces in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import onnx

from ..errors import UnsupportedGraphError
from .facts import depthwise
from .layout import Atom, Concat, Grid, Interleave, Layout
from .rules import attr
from .spaces import SpaceGraph


@dataclass(frozen=True)
class Correspondence:
    """Maps from model 0's names and space ids to model i's, and back."""

    tensors: dict[str, str]
    params: dict[str, str]
    spaces: dict[int, int]

    @cached_property
    def reference_spaces(self) -> dict[int, int]:
        """Model i's space id -> model 0's."""
        return {mine: ref for ref, mine in self.spaces.items()}

    @cached_property
    def reference_tensors(self) -> dict[str, str]:
        """Model i's tensor name -> model 0's."""
        return {mine: ref for ref, mine in self.tensors.items()}


def _attributes(node: onnx.NodeProto, depthwise: bool = False) -> list[tuple]:
    """Attributes that must agree; a depthwise Conv's group is its width, which may differ."""
    return sorted((a.name, onnx.helper.get_attribute_value(a).__repr__()) for a in node.attribute
                  if not (depthwise and a.name == "group"))


def _depthwise(node: onnx.NodeProto, shapes: dict[str, tuple]) -> bool:
    weight = shapes.get(node.input[1]) if len(node.input) > 1 else None
    return depthwise(node.op_type, weight, attr(node, "group", 1))


def _shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    return {i.name: tuple(i.dims) for i in model.graph.initializer}


def correspond(reference: tuple[str, onnx.ModelProto, SpaceGraph],
               other: tuple[str, onnx.ModelProto, SpaceGraph]) -> Correspondence:
    """How ``other`` lines up with ``reference``; raises when the architectures differ.

    Args:
        reference, other: (file name, canonical model, its spaces).
    """
    ref_path, ref, ref_graph = reference
    path, model, graph = other

    def differ(what: str) -> UnsupportedGraphError:
        return UnsupportedGraphError(f"{path}: {what} (compared with {ref_path}); the models differ in "
                                     "architecture: merge models of one architecture, compare with onnxmerge inspect")

    if len(ref.graph.node) != len(model.graph.node):
        raise differ(f"{len(model.graph.node)} nodes instead of {len(ref.graph.node)}")
    tensors = {a.name: b.name for a, b in zip(ref.graph.input, model.graph.input)}
    tensors.update({a.name: b.name for a, b in zip(ref.graph.output, model.graph.output)})
    params: dict[str, str] = {}
    ref_shapes, shapes = _shapes(ref), _shapes(model)
    widths_may_differ = {use.name for use in ref_graph.params}
    for index, (a, b) in enumerate(zip(ref.graph.node, model.graph.node)):
        where = f"node {index} ({b.name or b.op_type})"
        depthwise = _depthwise(a, ref_shapes) and _depthwise(b, shapes)
        if (a.op_type != b.op_type or _attributes(a, depthwise) != _attributes(b, depthwise)
                or len(a.input) != len(b.input)):
            raise differ(f"{where} is {b.op_type} {_attributes(b)} where the reference has {a.op_type} {_attributes(a)}")
        for x, y in zip(a.input, b.input):
            same = (len(ref_shapes.get(x, ())) == len(shapes.get(y, ())) if x in widths_may_differ
                    else ref_shapes.get(x) == shapes.get(y))
            if (x in ref_shapes) != (y in shapes) or not same:
                raise differ(f"{where} input {y!r} has shape {shapes.get(y)} instead of {ref_shapes.get(x)}")
            (params if x in ref_shapes else tensors)[x] = y
        tensors.update(zip(a.output, b.output))
    spaces = _match_spaces(ref_graph, graph, params, differ)
    return Correspondence(tensors, params, spaces)


def _match_spaces(ref: SpaceGraph, graph: SpaceGraph, params: dict[str, str], differ) -> dict[int, int]:
    if len(ref.spaces) != len(graph.spaces):
        raise differ(f"{len(graph.spaces)} feature spaces instead of {len(ref.spaces)}")
    spaces = {a.id: b.id for a, b in zip(ref.spaces, graph.spaces)}
    uses = {(p.name, p.axis): p for p in graph.params}
    for use in ref.params:
        mine = uses.get((params.get(use.name), use.axis))
        if mine is None or mine.role != use.role or _renamed(use.layout, spaces) != mine.layout:
            raise differ(f"parameter {params.get(use.name)!r} axis {use.axis} belongs to other feature spaces")
    return spaces


def _renamed(layout: Layout | int, spaces: dict[int, int]) -> Layout | int:
    if isinstance(layout, int):
        return layout
    if isinstance(layout, Atom):
        return Atom(spaces[layout.space])
    if isinstance(layout, Grid):
        return Grid(tuple(_renamed(f, spaces) for f in layout.factors))
    if isinstance(layout, Concat | Interleave):
        return type(layout)(tuple(_renamed(p, spaces) for p in layout.parts))
    raise TypeError(layout)
