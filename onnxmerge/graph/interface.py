"""The task interface of models merged together: one input they all read, one opset.

Exporters of channels-last frameworks (Keras/TF) keep the NHWC input and transpose it to NCHW
inside the graph. ``channels_first_input`` gives such a model the channels-first input of the
others by inserting the inverse transpose in front; canonicalisation then cancels the pair.
"""

from __future__ import annotations

import logging

import onnx
import onnx.version_converter
import onnx_graphsurgeon as gs
from onnx import helper

from ..errors import RecipeError, UnsupportedGraphError
from ..io import default_opset
from .canonical import export_like
from .ir import import_graph
from .surgery import replace_input

log = logging.getLogger(__name__)

CHANNELS_LAST = {3: "NWC", 4: "NHWC", 5: "NDHWC"}


def channels_first(layout: str) -> str:
    """The channels-first order of a layout's axes: NHWC -> NCHW."""
    return "NC" + "".join(a for a in layout if a not in "NC")


def channels_first_input(model: onnx.ModelProto, layout: str, path: str) -> onnx.ModelProto:
    """A copy of ``model`` (whose only input has ``layout``, e.g. NHWC) that takes the
    channels-first input (NCHW) of the same name, transposed to ``layout`` inside the graph
    (``model`` itself when ``layout`` is channels-first)."""
    inputs = _graph_inputs(model)
    if len(inputs) != 1:
        raise RecipeError(f"{path}: --input-layout needs a model with one input, it has {len(inputs)}")
    source = inputs[0]
    dims = source.type.tensor_type.shape.dim
    layout = layout.upper()
    if sorted(layout) != sorted(set(layout)) or not {"N", "C"} <= set(layout) or len(layout) != len(dims):
        example = CHANNELS_LAST.get(len(dims), "NHWC")
        raise RecipeError(f"{path}: --input-layout {layout} does not describe input {source.name!r} of rank "
                          f"{len(dims)}; give one letter per axis, with N and C, e.g. {example}")
    target = channels_first(layout)
    if target == layout:
        return model
    graph = import_graph(model)
    given = next(t for t in graph.inputs if t.name == source.name)
    inner = gs.Variable(f"{source.name}_{layout.lower()}")
    for node in list(given.outputs):
        replace_input(node, given, inner)
    perm = [target.index(axis) for axis in layout]
    graph.nodes.insert(0, gs.Node("Transpose", f"{inner.name}_layout", {"perm": perm}, [given], [inner]))
    given.shape = [given.shape[layout.index(axis)] for axis in target]
    return export_like(graph, model)


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {init.name for init in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def describe_input(info: onnx.ValueInfoProto) -> str:
    tensor = info.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
    dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else "?"
    return f"{dtype} [{', '.join(str(d) for d in dims)}]"


def common_opset(models: list[tuple[str, onnx.ModelProto]]) -> list[onnx.ModelProto]:
    """The models at one default-domain opset, the newest among them: the merged graph holds
    nodes of every model under one opset, and ops such as Softmax, Squeeze or ReduceSum mean
    something else (or take other inputs) across opsets. Older models go through onnx's
    version converter; models already at that opset are returned as they are."""
    target = max(default_opset(model) for _, model in models)
    converted = []
    for path, model in models:
        if default_opset(model) == target:
            converted.append(model)
            continue
        try:
            newer = onnx.version_converter.convert_version(model, target)
        except Exception as error:  # the converter raises bare RuntimeErrors and assertion failures
            detail = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            raise UnsupportedGraphError(
                f"{path}: opset {default_opset(model)} while another model uses {target}, and onnx's "
                f"version converter cannot convert it ({detail}); export the models with the same opset") from error
        log.warning("%s: opset %d converted to %d, the newest of the models", path, default_opset(model), target)
        converted.append(newer)
    return converted


def check_same_inputs(models: list[tuple[str, onnx.ModelProto]]) -> None:
    """Raise unless every model reads inputs of the first model's types and shapes (unknown
    dimensions, such as the batch, match anything)."""
    ref_path, reference = models[0]
    expected = _graph_inputs(reference)
    for path, model in models[1:]:
        inputs = _graph_inputs(model)
        if len(inputs) != len(expected):
            raise UnsupportedGraphError(f"{path}: {len(inputs)} inputs but {ref_path} has {len(expected)}; "
                                        "models merged together must read the same inputs")
        for mine, theirs in zip(inputs, expected):
            if not _compatible(mine, theirs):
                raise UnsupportedGraphError(
                    f"{path}: input {mine.name!r} is {describe_input(mine)} but {ref_path} takes "
                    f"{describe_input(theirs)}; models merged together must read the same input"
                    + _layout_hint([(path, mine), (ref_path, theirs)]))


def _dims(info: onnx.ValueInfoProto) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]


def _compatible(a: onnx.ValueInfoProto, b: onnx.ValueInfoProto) -> bool:
    if a.type.tensor_type.elem_type != b.type.tensor_type.elem_type:
        return False
    da, db = _dims(a), _dims(b)
    return len(da) == len(db) and all(x is None or y is None or x == y for x, y in zip(da, db))


def _layout_hint(candidates: list[tuple[str, onnx.ValueInfoProto]]) -> str:
    """Suggest --input-layout when one input looks like the other with the channels last."""
    for path, info in candidates:
        dims = _dims(info)
        others = [_dims(other) for p, other in candidates if p != path]
        if len(dims) in CHANNELS_LAST and others and len(others[0]) == len(dims):
            moved = [dims[0], dims[-1], *dims[1:-1]]
            if moved == others[0] and dims[-1] != dims[1]:
                layout = CHANNELS_LAST[len(dims)]
                return f" (if {path} is channels-last, pass --input-layout {path}={layout})"
    return ""
