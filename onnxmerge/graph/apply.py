"""Rewrite a model's parameters with per-space transforms."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .canonical import export_like
from .ir import import_graph
from .spaces import SpaceGraph
from .transform import Transform, transform_axis
from .. import weights

TransformFor = Callable[[int, str], "Transform | None"]


def transformed_arrays(model: onnx.ModelProto, graph: SpaceGraph, transform_for: TransformFor,
                       names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Parameters of ``model`` (all, or ``names``) transformed along their space axes.

    Args:
        model: the canonical model ``graph`` was found in; not modified.
        graph: its spaces.
        transform_for: (space id, role) -> Transform, or None to leave the space as it is.
            Role is ``producer`` or ``consumer`` (see ``graph.rules``).
        names: restrict to these initializers.
    """
    return dict(iter_transformed(model, graph, transform_for, names))


def iter_transformed(model: onnx.ModelProto, graph: SpaceGraph, transform_for: TransformFor,
                     names: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """``transformed_arrays`` one (name, array) at a time, each computed when asked for."""
    wanted = None if names is None else set(names)
    transformed = transformer(model, graph, transform_for)
    for init in model.graph.initializer:
        if wanted is None or init.name in wanted:
            yield init.name, transformed(init.name)


def transformer(model: onnx.ModelProto, graph: SpaceGraph, transform_for: TransformFor) -> Callable[[str], np.ndarray]:
    """A function giving one initializer of ``model`` by name, transformed as
    ``transformed_arrays`` says; the table of parameter uses is built once, here.

    Raises:
        KeyError: no initializer has that name.
    """
    uses: dict[str, dict[int, tuple]] = {}
    for use in graph.params:
        uses.setdefault(use.name, {})[use.axis] = (use.layout, use.role)
    initializers = {init.name: init for init in model.graph.initializer}

    def transformed(name: str) -> np.ndarray:
        array = weights.read(initializers[name])
        for axis, (layout, role) in uses.get(name, {}).items():
            array = transform_axis(array, axis, layout, lambda s, r=role: transform_for(s, r), graph.table.width)
        return array

    return transformed


def transformed_graph(model: onnx.ModelProto, graph: SpaceGraph, transform_for: TransformFor) -> gs.Graph:
    """``model``'s graph with its parameters transformed along their space axes; a model with
    mapped weights gets its large results spilled as they are computed (``weights.kept``)."""
    uses = {use.name for use in graph.params}
    mapped = weights.has_mapped(model)
    result = import_graph(model)
    tensors = result.tensors()
    for name, array in iter_transformed(model, graph, transform_for, uses):
        tensors[name].values = weights.kept(array, mapped)
    return result


def transform_parameters(model: onnx.ModelProto, graph: SpaceGraph,
                         transform_for: TransformFor) -> onnx.ModelProto:
    """A copy of ``model`` whose parameters are transformed along their space axes
    (``transformed_graph``)."""
    return export_like(transformed_graph(model, graph, transform_for), model)
