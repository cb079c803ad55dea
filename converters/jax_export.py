"""Export a JAX/Flax function to a mergeable ONNX file and check it against JAX.

Environment:
    python -m venv /work/venvs/jax
    /work/venvs/jax/bin/pip install jax jaxlib flax jax2onnx onnxruntime
(measured here: jax 0.10.2, flax 0.12.8, jax2onnx 0.17.1, Python 3.11; jax2onnx brings its
own CPU onnxruntime, which is why it gets an environment of its own.)

Command:
    python converters/jax_export.py MODEL -o model.onnx [--nchw] [--opset N]

MODEL is a spec ``module:function`` / ``file.py:function``; the function returns
``(apply_fn, params, example_input)`` and the model computes ``apply_fn(params, x)``. For a
Flax linen module that is ``(module.apply, variables, x)`` with the module built for inference
(``BatchNorm(use_running_average=True)``, no dropout).

Settings, chosen so onnxmerge can read the parameters back: jax2onnx traces
``x -> apply_fn(params, x)`` with a symbolic batch axis ``batch``; the parameters are
constants of the trace and come out as initializers. Opset 21 (jax2onnx defaults to 23, which
onnxruntime before 1.20 cannot run). jax2onnx recognises linen's inference BatchNorm and
writes BatchNormalization; Flax is NHWC, so each Conv is wrapped in Transposes, mean pooling
becomes ReduceSum + Div and Dense becomes Gemm (MatMul + Add on inputs of rank > 2).
``--nchw`` (``inputs_as_nchw``) makes the ONNX input NCHW, as PyTorch's, with one Transpose
into the NHWC graph. The input is renamed ``input``, the outputs ``output``, ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

if __package__:  # imported as converters.jax_export
    from . import designs
    from .checks import (Tolerance, finish, output_names, name_batch_axis, refresh_value_info, rename_io,
                         save_model, verify)
    from .specs import (ConverterError, base_parser, call_spec, load_inputs, run_main,
                        sample_input, save_sample)
else:  # run as a script: converters/ is on sys.path
    import designs
    from checks import (Tolerance, finish, output_names, name_batch_axis, refresh_value_info, rename_io,
                        save_model, verify)
    from specs import (ConverterError, base_parser, call_spec, load_inputs, run_main,
                       sample_input, save_sample)

DEFAULT_OPSET = 21
ApplyFn = Callable[[Any, Any], Any]


def load_function(spec: str) -> tuple[ApplyFn, Any, np.ndarray]:
    """``(apply_fn, params, example_input)`` from a spec."""
    loaded = call_spec(spec)
    if not (isinstance(loaded, tuple) and len(loaded) == 3 and callable(loaded[0])):
        raise ConverterError(f"{spec} returned {type(loaded).__name__}, in MODEL; "
                             "return (apply_fn, params, example_input)")
    apply_fn, params, example = loaded
    return apply_fn, params, np.asarray(example, dtype=np.float32)


def jax_outputs(apply_fn: ApplyFn, params: Any, x: np.ndarray) -> list[np.ndarray]:
    result = apply_fn(params, x)
    results = result if isinstance(result, (tuple, list)) else [result]
    return [np.asarray(r, dtype=np.float32) for r in results]



def to_nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def export_jax(apply_fn: ApplyFn, params: Any, sample_shape: tuple[int, ...], path: str | Path,
               *, nchw: bool = False, opset: int | None = None,
               check_input: np.ndarray | None = None,
               tolerance: Tolerance = Tolerance()) -> dict[str, float]:
    """Export ``x -> apply_fn(params, x)`` with jax2onnx, check it and write ``path``.

    Args:
        sample_shape: one sample's shape as JAX sees it (NHWC for images), no batch axis.
        nchw: make the ONNX input NCHW (the function still gets NHWC).
        check_input: the comparison batch in JAX's layout; random normal when None.

    Returns:
        The max abs difference per output name.

    Raises:
        ConverterError: jax2onnx cannot convert it, a non-mergeable export or a difference.
    """
    from jax2onnx import to_onnx

    if nchw and len(sample_shape) != 3:
        raise ConverterError(f"--nchw needs image inputs (H, W, C), the sample shape is "
                             f"{sample_shape}, in MODEL; drop --nchw")
    if check_input is None:
        check_input = sample_input(sample_shape, batch=3, seed=0)
    references = jax_outputs(apply_fn, params, check_input)
    names = output_names(len(references))
    try:
        model = to_onnx(lambda x: apply_fn(params, x), [("batch", *sample_shape)],
                        opset=opset or DEFAULT_OPSET, inputs_as_nchw=[0] if nchw else None)
    except NotImplementedError as error:  # jax2onnx's answer to a primitive it lacks
        raise ConverterError(f"jax2onnx cannot convert ({error}), in MODEL; "
                             "see jax2onnx's list of supported primitives") from None
    rename_io(model, ["input"], names)
    name_batch_axis(model)
    model = refresh_value_info(model)  # its NCHW pass leaves NHWC shapes on NCHW tensors
    onnx_input = to_nchw(check_input) if nchw else check_input
    diffs = verify(model, onnx_input, dict(zip(names, references)), tolerance, "jax2onnx export")
    save_model(model, path)
    return diffs


def _linen_cnn():
    import flax.linen as nn

    class CNN(nn.Module):
        """The ``cnn`` design in Flax's NHWC."""

        @nn.compact
        def __call__(self, x):
            for index, filters in enumerate(designs.CNN_CHANNELS[1:], start=1):
                x = nn.Conv(filters, (3, 3), padding=1, name=f"conv{index}")(x)
                x = nn.BatchNorm(use_running_average=True, epsilon=designs.BN_EPSILON,
                                 name=f"bn{index}")(x)
                x = nn.relu(x)
            return nn.Dense(designs.CLASSES, name="fc")(x.mean(axis=(1, 2)))

    return CNN()


def _linen_mlp():
    import flax.linen as nn

    class MLP(nn.Module):
        """The ``mlp`` design."""

        @nn.compact
        def __call__(self, x):
            count = len(designs.MLP_SIZES) - 1
            for index, units in enumerate(designs.MLP_SIZES[1:], start=1):
                x = nn.Dense(units, name=f"fc{index}")(x)
                x = nn.relu(x) if index < count else x
            return x

    return MLP()


def example_cnn() -> tuple[ApplyFn, Any, np.ndarray]:
    """A function for MODEL: ``converters/jax_export.py:example_cnn`` (input NHWC)."""
    weights = designs.cnn_weights()
    params, stats = {}, {}
    for index in (1, 2):
        # Flax kernels are HWIO, the design's OIHW
        params[f"conv{index}"] = {"kernel": weights[f"conv{index}.weight"].transpose(2, 3, 1, 0),
                                  "bias": weights[f"conv{index}.bias"]}
        params[f"bn{index}"] = {"scale": weights[f"bn{index}.weight"],
                                "bias": weights[f"bn{index}.bias"]}
        stats[f"bn{index}"] = {"mean": weights[f"bn{index}.running_mean"],
                               "var": weights[f"bn{index}.running_var"]}
    params["fc"] = {"kernel": weights["fc.weight"].T, "bias": weights["fc.bias"]}
    variables = jax.tree_util.tree_map(jax.numpy.asarray, {"params": params, "batch_stats": stats})
    x = designs.to_nhwc(designs.fixture_input("cnn", batch=2))
    return _linen_cnn().apply, variables, x


def example_mlp() -> tuple[ApplyFn, Any, np.ndarray]:
    """A function for MODEL: ``converters/jax_export.py:example_mlp``."""
    weights = designs.mlp_weights()
    params = {f"fc{i}": {"kernel": weights[f"fc{i}.weight"].T, "bias": weights[f"fc{i}.bias"]}
              for i in range(1, len(designs.MLP_SIZES))}
    variables = jax.tree_util.tree_map(jax.numpy.asarray, {"params": params})
    return _linen_mlp().apply, variables, designs.fixture_input("mlp", batch=2)


def write_fixtures(folder: Path) -> dict[str, dict[str, float]]:
    """``jax_{cnn,mlp}.onnx`` and ``.npz`` in ``folder``; the cnn's ONNX input is NCHW."""
    results = {}
    for design, factory in (("cnn", example_cnn), ("mlp", example_mlp)):
        apply_fn, params, example = factory()
        x = designs.fixture_input(design)
        jax_x = designs.to_nhwc(x) if design == "cnn" else x
        path = folder / f"jax_{design}.onnx"
        results[path.name] = export_jax(apply_fn, params, example.shape[1:], path,
                                        nchw=design == "cnn", check_input=jax_x)
        y = jax_outputs(apply_fn, params, jax_x)[0]
        save_sample(path.with_suffix(".npz"), x, {"output": y}, "output")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("model", help="module:function or file.py:function returning "
                        "(apply_fn, params, example_input)")
    parser.add_argument("--nchw", action="store_true",
                        help="NCHW ONNX input for an NHWC image model (x in --inputs stays NHWC)")
    args = parser.parse_args(argv)
    apply_fn, params, example = load_function(args.model)
    sample_shape = tuple(example.shape[1:])
    check_input = (load_inputs(args.inputs) if args.inputs else
                   sample_input(sample_shape, batch=args.batch, seed=args.seed))
    diffs = export_jax(apply_fn, params, sample_shape, args.output, nchw=args.nchw,
                       opset=args.opset, check_input=check_input,
                       tolerance=Tolerance(args.rtol, args.atol))
    onnx_input = to_nchw(check_input) if args.nchw else check_input
    return finish(args, onnx_input, diffs, lambda: jax_outputs(apply_fn, params, check_input))


if __name__ == "__main__":
    raise SystemExit(run_main(main))
