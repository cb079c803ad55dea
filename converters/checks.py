"""What makes an exported file acceptable: it runs in onnxruntime, reproduces the framework and
stays mergeable (parameters as initializers, a dynamic batch axis, an opset onnxruntime runs).

Imports only numpy, onnx and onnxruntime, which every converter environment installs.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

if __package__:  # imported as converters.checks
    from .specs import ConverterError, save_sample
else:  # a converter run as a script (python converters/x.py) has converters/ on sys.path
    from specs import ConverterError, save_sample

# onnxruntime 1.18 and later run default-domain opset 21 (1.32, measured here, runs up to 26);
# the project allows onnxruntime>=1.17, which stops at 20: converters default to 17 (18 for
# torch's dynamo exporter, which needs it, 21 for jax2onnx).
MAX_OPSET = 21


@dataclass(frozen=True)
class Tolerance:
    """Allowed ``max|onnx - framework| <= atol + rtol * max|framework|`` per output."""

    rtol: float = 1e-4
    atol: float = 1e-5

    def limit(self, reference: np.ndarray) -> float:
        scale = float(np.abs(reference).max()) if reference.size else 0.0
        return self.atol + self.rtol * scale


def rename_io(model: onnx.ModelProto, inputs: list[str], outputs: list[str]) -> None:
    """Give the graph inputs and outputs stable names (in place), rewiring every use."""
    graph = model.graph
    mapping = {value.name: new for value, new in zip(graph.input, inputs)}
    mapping.update({value.name: new for value, new in zip(graph.output, outputs)})
    mapping = {old: new for old, new in mapping.items() if old != new}
    if not mapping:
        return
    for value in [*graph.input, *graph.output, *graph.value_info]:
        value.name = mapping.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [mapping.get(name, name) for name in node.input]
        node.output[:] = [mapping.get(name, name) for name in node.output]


def name_batch_axis(model: onnx.ModelProto, name: str = "batch") -> None:
    """Call the first axis of every graph input and output ``name`` (in place).

    Exporters leave it unnamed or write generated names (``unk__39``); one shared name tells
    readers and shape inference that inputs and outputs share the batch size.
    """
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = name


def refresh_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its intermediate shapes recomputed by onnx shape inference.

    Exporters that rewrite layouts after recording shapes (jax2onnx's NCHW pass) leave stale
    ``value_info`` (NHWC shapes on NCHW tensors); onnxruntime then warns and other tools trust
    the wrong shape.
    """
    del model.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16}


def check_mergeable(model: onnx.ModelProto, where: str) -> None:
    """Raise ``ConverterError`` unless the model is one onnxmerge can read parameters from."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset > MAX_OPSET:
        raise ConverterError(
            f"opset {opset} is above {MAX_OPSET}, in {where}; pass --opset {MAX_OPSET} or lower")
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            raise ConverterError(
                f"input {value.name!r} has a fixed batch size {dims[0].dim_value}, in {where}; "
                "export with a dynamic first axis")
    floats = [t for t in model.graph.initializer if t.data_type in _FLOAT_TYPES and len(t.dims) >= 1]
    if not floats:
        raise ConverterError(
            f"no float initializers, so no recoverable parameters, in {where}; "
            "export without inlining the weights into nodes")


def save_model(model: onnx.ModelProto, path: str | Path) -> Path:
    """Check and write ``model`` as one self-contained file; the target appears only when valid."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.checker.check_model(model)
    handle, temporary = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(handle)
    try:
        onnx.save_model(model, temporary)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it private; a model is not
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def run_onnx(model: onnx.ModelProto | str | Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """All outputs of ``model`` on CPU for the feed {first input: x}, by output name."""
    import onnxruntime as ort

    content = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # deterministic and polite on shared machines
    session = ort.InferenceSession(content, options, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    results = session.run(names, {session.get_inputs()[0].name: x})
    return dict(zip(names, results))


def compare(got: dict[str, np.ndarray], references: dict[str, np.ndarray], tolerance: Tolerance,
            where: str) -> dict[str, float]:
    """Max abs difference per reference output; ``ConverterError`` when one is above tolerance."""
    diffs = {}
    for name, reference in references.items():
        if name not in got:
            raise ConverterError(f"no output {name!r} in the ONNX model, in {where}; "
                                 f"it has {sorted(got)}")
        value = got[name]
        if value.shape != reference.shape:
            raise ConverterError(f"output {name!r} has shape {value.shape}, the framework's "
                                 f"{reference.shape}, in {where}; check the export settings")
        if not np.issubdtype(reference.dtype, np.floating):
            diff = float(np.count_nonzero(value != reference))  # labels: count of mismatches
        else:
            diff = float(np.abs(value.astype(np.float64) - reference.astype(np.float64)).max())
        limit = tolerance.limit(reference) if np.issubdtype(reference.dtype, np.floating) else 0.0
        if not diff <= limit:
            raise ConverterError(f"output {name!r} differs by {diff:.3g} > {limit:.3g} from the "
                                 f"framework, in {where}; the export changed the model")
        diffs[name] = diff
    return diffs


def verify(model: onnx.ModelProto, x: np.ndarray, references: dict[str, np.ndarray],
           tolerance: Tolerance, where: str) -> dict[str, float]:
    """Mergeability check plus onnxruntime-vs-framework comparison; returns diffs per output."""
    check_mergeable(model, where)
    return compare(run_onnx(model, x), references, tolerance, where)


def format_diffs(diffs: dict[str, float]) -> str:
    return ", ".join(f"max abs diff {name}: {value:.3g}" for name, value in diffs.items())


def output_names(count: int) -> list[str]:
    """The converters' output names: output, output_1, output_2, ..."""
    return ["output"] + [f"output_{i}" for i in range(1, count)]


def finish(args, onnx_input: np.ndarray, diffs: dict[str, float], framework_outputs, *,
           main: str | None = "output", note: str = "") -> int:
    """End of a converter's command: with --save-sample, store the input and the framework's
    outputs (``framework_outputs()``: a list named output, output_1, ..., or a dict whose last
    entry is the main output when ``main`` is None), then report the differences measured
    against the framework."""
    if args.save_sample:
        outputs = framework_outputs()
        if not isinstance(outputs, dict):
            outputs = dict(zip(output_names(len(outputs)), outputs))
        save_sample(args.save_sample, onnx_input, outputs, main or list(outputs)[-1])
    print(f"wrote {args.output}{note}: {format_diffs(diffs)}")
    return 0
