"""Export a Keras 3 model (TensorFlow backend) to a mergeable ONNX file and check it against Keras.

Environment:
    python -m venv /work/venvs/tf
    /work/venvs/tf/bin/pip install tensorflow-cpu tf2onnx onnx onnxruntime
(measured here: tensorflow-cpu 2.21.0, keras 3.15.1, tf2onnx 1.17.0, Python 3.11.)

Command:
    python converters/keras_export.py MODEL -o model.onnx [--opset N]

MODEL is a ``.keras`` file (``keras.saving.load_model``; ``.h5`` works too) or a spec
``module:factory`` / ``file.py:factory`` returning a built ``keras.Model`` with one input.

Settings, chosen so onnxmerge can read the parameters back: Keras's own
``model.export(format="onnx")``, which on the TensorFlow backend traces the model in inference
mode and converts it with tf2onnx (Keras also patches tf2onnx for numpy 2, so this is the
route that works with current numpy). The input signature has a ``None`` batch axis and the
opset is 17. tf2onnx's optimiser folds inference-mode BatchNormalization into the Conv
weights and bias, and writes every weight as an initializer. The layout stays Keras's NHWC:
tf2onnx wraps each Conv in Transposes (a Reshape when a side has one channel), so the
canonicaliser sees NHWC<->NCHW transposes, Dense as MatMul + Add, and pooling as
GlobalAveragePool + Squeeze. The input is renamed ``input``, the outputs ``output``, ...
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter

import keras  # noqa: E402  (after the log level, which TensorFlow reads on import)
import numpy as np  # noqa: E402
import onnx  # noqa: E402

if __package__:  # imported as converters.keras_export
    from . import designs
    from .checks import Tolerance, finish, output_names, name_batch_axis, rename_io, save_model, verify
    from .specs import (ConverterError, base_parser, call_spec, load_inputs, run_main,
                        sample_input, save_sample)
else:  # run as a script: converters/ is on sys.path
    import designs
    from checks import Tolerance, finish, output_names, name_batch_axis, rename_io, save_model, verify
    from specs import (ConverterError, base_parser, call_spec, load_inputs, run_main,
                       sample_input, save_sample)

DEFAULT_OPSET = 17


def load_model(source: str) -> keras.Model:
    """The model in a ``.keras``/``.h5`` file or returned by a spec."""
    if source.endswith((".keras", ".h5")):
        if not Path(source).is_file():
            raise ConverterError(f"no file {source}, in MODEL; give a saved .keras file")
        model = keras.saving.load_model(source, compile=False)
    else:
        model = call_spec(source)
    if not isinstance(model, keras.Model):
        raise ConverterError(f"{source} gave a {type(model).__name__}, not a keras.Model, in MODEL; "
                             "return a built keras.Model from the factory")
    if len(model.inputs) != 1:
        raise ConverterError(f"{source} has {len(model.inputs)} inputs, in MODEL; "
                             "the converter handles single-input models")
    return model


def keras_outputs(model: keras.Model, x: np.ndarray) -> list[np.ndarray]:
    result = model(x, training=False)
    results = result if isinstance(result, (list, tuple)) else [result]
    return [np.asarray(keras.ops.convert_to_numpy(r)) for r in results]



def export_keras(model: keras.Model, path: str | Path, *, opset: int | None = None,
                 check_input: np.ndarray | None = None,
                 tolerance: Tolerance = Tolerance()) -> dict[str, float]:
    """Export ``model`` with ``model.export(format="onnx")``, check it and write ``path``.

    Returns the max abs difference per output name.

    Raises:
        ConverterError: a non-mergeable export or a difference above tolerance.
    """
    sample_shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    if check_input is None:
        check_input = sample_input(sample_shape, batch=3, seed=0)
    references = keras_outputs(model, check_input)
    names = output_names(len(references))
    signature = [keras.InputSpec(shape=(None, *sample_shape), dtype="float32")]
    with tempfile.TemporaryDirectory() as folder:
        exported = Path(folder) / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # Keras's numpy-2 patch of tf2onnx
            model.export(str(exported), format="onnx", input_signature=signature,
                         opset_version=opset or DEFAULT_OPSET, verbose=False)
        onnx_model = onnx.load(str(exported))
    rename_io(onnx_model, ["input"], names)
    name_batch_axis(onnx_model)
    diffs = verify(onnx_model, check_input, dict(zip(names, references)), tolerance,
                   f"keras export of {model.name}")
    save_model(onnx_model, path)
    return diffs


def example_cnn() -> keras.Model:
    """The ``cnn`` design in NHWC: ``converters/keras_export.py:example_cnn``."""
    layers, weights = keras.layers, designs.cnn_weights()
    channels, height, width = designs.CNN_SAMPLE_SHAPE
    inputs = keras.Input((height, width, channels), name="input")
    x = inputs
    for index, filters in enumerate(designs.CNN_CHANNELS[1:], start=1):
        conv = layers.Conv2D(filters, 3, padding="same", name=f"conv{index}")
        norm = layers.BatchNormalization(epsilon=designs.BN_EPSILON, name=f"bn{index}")
        x = layers.ReLU()(norm(conv(x)))
        # Keras kernels are HWIO, the design's OIHW
        conv.set_weights([weights[f"conv{index}.weight"].transpose(2, 3, 1, 0),
                          weights[f"conv{index}.bias"]])
        norm.set_weights([weights[f"bn{index}.{key}"]
                          for key in ("weight", "bias", "running_mean", "running_var")])
    x = layers.GlobalAveragePooling2D()(x)
    dense = layers.Dense(designs.CLASSES, name="fc")
    outputs = dense(x)
    dense.set_weights([weights["fc.weight"].T, weights["fc.bias"]])
    return keras.Model(inputs, outputs, name="cnn")


def example_mlp() -> keras.Model:
    """The ``mlp`` design: ``converters/keras_export.py:example_mlp``."""
    sizes, weights = designs.MLP_SIZES, designs.mlp_weights()
    inputs = keras.Input((sizes[0],), name="input")
    x = inputs
    for index, units in enumerate(sizes[1:], start=1):
        last = index == len(sizes) - 1
        dense = keras.layers.Dense(units, activation=None if last else "relu", name=f"fc{index}")
        x = dense(x)
        dense.set_weights([weights[f"fc{index}.weight"].T, weights[f"fc{index}.bias"]])
    return keras.Model(inputs, x, name="mlp")


def write_fixtures(folder: Path) -> dict[str, dict[str, float]]:
    """``keras_{cnn,mlp}.onnx`` and ``.npz`` in ``folder`` (the cnn's ``x`` is NHWC)."""
    results = {}
    for design, factory in (("cnn", example_cnn), ("mlp", example_mlp)):
        model = factory()
        x = designs.fixture_input(design)
        x = designs.to_nhwc(x) if design == "cnn" else x
        path = folder / f"keras_{design}.onnx"
        results[path.name] = export_keras(model, path, check_input=x)
        save_sample(path.with_suffix(".npz"), x, {"output": keras_outputs(model, x)[0]}, "output")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("model", help="a .keras file, module:factory or file.py:factory")
    args = parser.parse_args(argv)
    model = load_model(args.model)
    sample_shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    check_input = (load_inputs(args.inputs) if args.inputs else
                   sample_input(sample_shape, batch=args.batch, seed=args.seed))
    diffs = export_keras(model, args.output, opset=args.opset, check_input=check_input,
                         tolerance=Tolerance(args.rtol, args.atol))
    return finish(args, check_input, diffs, lambda: keras_outputs(model, check_input))


if __name__ == "__main__":
    raise SystemExit(run_main(main))
