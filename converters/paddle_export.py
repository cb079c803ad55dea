"""Export a PaddlePaddle model to a mergeable ONNX file and check it against Paddle.

Environment:
    python -m venv /work/venvs/paddle
    /work/venvs/paddle/bin/pip install paddlepaddle paddle2onnx onnxruntime onnx-graphsurgeon sympy
(measured here: paddlepaddle 3.3.1, paddle2onnx 2.1.0, which pins onnx 1.17, Python 3.11.
paddle2onnx folds constants with Polygraphy, which pip-installs onnx-graphsurgeon and sympy
on first use when they are missing; installing them up front keeps that from happening.)

Command:
    python converters/paddle_export.py MODEL -o model.onnx [--input-shape 1,8,8] [--opset N]

MODEL is either a spec ``module:factory`` / ``file.py:factory`` whose factory returns a
``paddle.nn.Layer`` or ``(layer, example_input)``, or the path prefix of an inference model
saved with ``paddle.jit.save`` (``PREFIX.json`` or ``PREFIX.pdmodel`` plus
``PREFIX.pdiparams``), which needs ``--input-shape``.

Settings, chosen so onnxmerge can read the parameters back: the layer is saved with
``paddle.jit.save`` and an ``InputSpec`` whose batch axis is ``None`` (dynamic), then
converted by ``paddle2onnx.export`` at opset 17 with its optimiser on. Weights stay
initializers named after Paddle's parameters (``conv2d_0.w_0``); BatchNormalization is kept;
the Conv bias comes out as a separate Add of a [1, C, 1, 1] tensor, Linear as MatMul + Add,
``flatten`` as Shape/Slice/Concat/Reshape, and Paddle inserts Identity nodes. The input is
renamed ``input``, the outputs ``output``, ...
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("POLYGRAPHY_AUTOINSTALL_DEPS", "0")  # never pip-install at export time

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import paddle  # noqa: E402

if __package__:  # imported as converters.paddle_export
    from . import designs
    from .checks import Tolerance, finish, output_names, name_batch_axis, rename_io, save_model, verify
    from .specs import (ConverterError, base_parser, call_spec, load_inputs, parse_shape,
                        run_main, sample_input, save_sample)
else:  # run as a script: converters/ is on sys.path
    import designs
    from checks import Tolerance, finish, output_names, name_batch_axis, rename_io, save_model, verify
    from specs import (ConverterError, base_parser, call_spec, load_inputs, parse_shape,
                       run_main, sample_input, save_sample)

DEFAULT_OPSET = 17
PROGRAM_SUFFIXES = (".json", ".pdmodel")  # PIR programs (Paddle 3) and the older format


def saved_files(prefix: str) -> tuple[Path, Path] | None:
    """The (program, parameters) files of an inference model saved at ``prefix``, if any."""
    parameters = Path(prefix + ".pdiparams")
    for suffix in PROGRAM_SUFFIXES:
        if Path(prefix + suffix).is_file() and parameters.is_file():
            return Path(prefix + suffix), parameters
    return None


def load_layer(source: str) -> tuple[paddle.nn.Layer, np.ndarray | None]:
    """The layer named by a spec or saved at a prefix, and its example input if given."""
    if saved_files(source):
        return paddle.jit.load(source), None
    loaded = call_spec(source)
    example = None
    if isinstance(loaded, tuple) and len(loaded) == 2:
        loaded, example = loaded[0], np.asarray(loaded[1], dtype=np.float32)
    if not isinstance(loaded, paddle.nn.Layer):
        raise ConverterError(f"{source} gave a {type(loaded).__name__}, not a paddle.nn.Layer, "
                             "in MODEL; return a layer or (layer, example_input)")
    return loaded, example


def paddle_outputs(layer: paddle.nn.Layer, x: np.ndarray) -> list[np.ndarray]:
    layer.eval()
    with paddle.no_grad():
        result = layer(paddle.to_tensor(x))
    results = result if isinstance(result, (tuple, list)) else [result]
    return [r.numpy() for r in results]



def _convert_saved(program: Path, parameters: Path, target: Path, opset: int) -> onnx.ModelProto:
    import paddle2onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paddle2onnx.export(str(program), str(parameters), str(target), opset_version=opset,
                           auto_upgrade_opset=False, enable_optimize=True, verbose=False)
    return onnx.load(str(target))


def _convert(layer: paddle.nn.Layer, sample_shape: tuple[int, ...], source: str | None,
             opset: int) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as folder:
        files = saved_files(source) if source else None
        if files is None:
            prefix = str(Path(folder) / "model")
            spec = [paddle.static.InputSpec([None, *sample_shape], "float32", "input")]
            paddle.jit.save(layer, prefix, input_spec=spec)
            files = saved_files(prefix)
        return _convert_saved(*files, Path(folder) / "model.onnx", opset)


def export_paddle(layer: paddle.nn.Layer, sample_shape: tuple[int, ...], path: str | Path, *,
                  saved_prefix: str | None = None, opset: int | None = None,
                  check_input: np.ndarray | None = None,
                  tolerance: Tolerance = Tolerance()) -> dict[str, float]:
    """Save ``layer`` for inference, convert it with paddle2onnx, check it and write ``path``.

    Args:
        sample_shape: one sample's shape without the batch axis.
        saved_prefix: convert this saved inference model instead of saving ``layer`` again
            (``layer`` is then its ``paddle.jit.load``, used for the reference outputs).

    Returns:
        The max abs difference per output name.

    Raises:
        ConverterError: a non-mergeable export or a difference above tolerance.
    """
    layer.eval()
    if check_input is None:
        check_input = sample_input(sample_shape, batch=3, seed=0)
    references = paddle_outputs(layer, check_input)
    names = output_names(len(references))
    model = _convert(layer, sample_shape, saved_prefix, opset or DEFAULT_OPSET)
    rename_io(model, ["input"], names)
    name_batch_axis(model)
    diffs = verify(model, check_input, dict(zip(names, references)), tolerance,
                   "paddle2onnx export")
    save_model(model, path)
    return diffs


class DesignCNN(paddle.nn.Layer):
    """The ``cnn`` design of ``designs.py``."""

    def __init__(self) -> None:
        super().__init__()
        (c0, c1, c2), nn = designs.CNN_CHANNELS, paddle.nn
        self.conv1, self.bn1 = nn.Conv2D(c0, c1, 3, padding=1), nn.BatchNorm2D(c1)
        self.conv2, self.bn2 = nn.Conv2D(c1, c2, 3, padding=1), nn.BatchNorm2D(c2)
        self.pool, self.fc = nn.AdaptiveAvgPool2D(1), nn.Linear(c2, designs.CLASSES)

    def forward(self, x):
        x = paddle.nn.functional.relu(self.bn1(self.conv1(x)))
        x = paddle.nn.functional.relu(self.bn2(self.conv2(x)))
        return self.fc(paddle.flatten(self.pool(x), 1))


class DesignMLP(paddle.nn.Layer):
    """The ``mlp`` design of ``designs.py``."""

    def __init__(self) -> None:
        super().__init__()
        sizes = designs.MLP_SIZES
        self.fc1, self.fc2, self.fc3 = (paddle.nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x):
        relu = paddle.nn.functional.relu
        return self.fc3(relu(self.fc2(relu(self.fc1(x)))))


def _with_weights(layer: paddle.nn.Layer, weights: dict[str, np.ndarray]) -> paddle.nn.Layer:
    state = {}
    for name, value in weights.items():
        # Paddle names BN statistics _mean/_variance and stores Linear weights as (in, out)
        name = name.replace("running_mean", "_mean").replace("running_var", "_variance")
        state[name] = value.T if name.startswith("fc") and name.endswith("weight") else value
    expected = set(layer.state_dict())
    if expected != set(state):
        raise RuntimeError(f"design weights do not fit: {sorted(expected ^ set(state))}")
    layer.set_state_dict(state)
    layer.eval()
    return layer


def example_cnn() -> tuple[paddle.nn.Layer, np.ndarray]:
    """A factory for MODEL: ``converters/paddle_export.py:example_cnn``."""
    layer = _with_weights(DesignCNN(), designs.cnn_weights())
    return layer, designs.fixture_input("cnn", batch=2)


def example_mlp() -> tuple[paddle.nn.Layer, np.ndarray]:
    """A factory for MODEL: ``converters/paddle_export.py:example_mlp``."""
    return _with_weights(DesignMLP(), designs.mlp_weights()), designs.fixture_input("mlp", batch=2)


def write_fixtures(folder: Path) -> dict[str, dict[str, float]]:
    """``paddle_{cnn,mlp}.onnx`` and ``.npz`` in ``folder``; diffs by file."""
    results = {}
    for design, factory in (("cnn", example_cnn), ("mlp", example_mlp)):
        layer, example = factory()
        x = designs.fixture_input(design)
        path = folder / f"paddle_{design}.onnx"
        results[path.name] = export_paddle(layer, example.shape[1:], path, check_input=x)
        save_sample(path.with_suffix(".npz"), x, {"output": paddle_outputs(layer, x)[0]}, "output")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("model", help="module:factory, file.py:factory or a saved model prefix")
    parser.add_argument("--input-shape", default=None,
                        help="one sample's shape without batch, e.g. 1,8,8 (when MODEL gives none)")
    args = parser.parse_args(argv)
    layer, example = load_layer(args.model)
    if args.input_shape:
        sample_shape = parse_shape(args.input_shape)
    elif example is not None:
        sample_shape = tuple(example.shape[1:])
    else:
        raise ConverterError(f"{args.model} gives no example input, in MODEL; "
                             "pass --input-shape (one sample's shape, e.g. 1,8,8)")
    check_input = (load_inputs(args.inputs) if args.inputs else
                   sample_input(sample_shape, batch=args.batch, seed=args.seed))
    diffs = export_paddle(layer, sample_shape, args.output, opset=args.opset,
                          saved_prefix=args.model if saved_files(args.model) else None,
                          check_input=check_input, tolerance=Tolerance(args.rtol, args.atol))
    return finish(args, check_input, diffs, lambda: paddle_outputs(layer, check_input))


if __name__ == "__main__":
    raise SystemExit(run_main(main))
