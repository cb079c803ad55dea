"""Rewrite a model's parameters with per-space transforms."""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph.spaces import SpaceGraph
from .transform import Transform, transform_axis

TransformFor = Callable[[int, str], "Transform | None"]


def transform_parameters(model: onnx.ModelProto, graph: SpaceGraph,
                         transform_for: TransformFor) -> onnx.ModelProto:
    """Return a copy of ``model`` whose initializers are transformed along their space axes.

    Args:
        model: the canonical model ``graph`` was found in; not modified.
        graph: its spaces.
        transform_for: (space id, role) -> Transform, or None to leave the space as it is.
            Role is ``producer`` or ``consumer`` (see ``graph.rules``).
    """
    uses: dict[str, dict[int, tuple]] = {}
    for use in graph.params:
        uses.setdefault(use.name, {})[use.axis] = (use.layout, use.role)
    result = onnx.ModelProto()
    result.CopyFrom(model)
    for init in result.graph.initializer:
        if init.name not in uses:
            continue
        array = numpy_helper.to_array(init)
        for axis, (layout, role) in uses[init.name].items():
            array = transform_axis(array, axis, layout, lambda s, r=role: transform_for(s, r),
                                   graph.table.width)
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), init.name))
    return result
