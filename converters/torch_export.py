"""Export a PyTorch model to a mergeable ONNX file and check it against torch with onnxruntime.

Environment (the project's own dev environment already has it):
    python -m venv /work/venvs/torch
    /work/venvs/torch/bin/pip install torch==2.13.0 onnx onnxruntime onnxscript

Command:
    python converters/torch_export.py MODEL -o model.onnx [--exporter legacy|dynamo]
                                      [--input-shape 1,8,8] [--opset N]

MODEL is either a spec ``module:factory`` / ``file.py:factory`` whose factory returns an
``nn.Module`` or a pair ``(module, example_input)``, or a file written by ``torch.save(module)``
(loaded with ``weights_only=False``: load only files you trust). Without an example input,
``--input-shape`` gives the shape of one sample (no batch axis).

Settings, chosen so onnxmerge can read the parameters back:
  * legacy (``dynamo=False``, opset 17): ``training=PRESERVE`` on an eval-mode module with
    ``do_constant_folding=False`` keeps every BatchNormalization node and names initializers
    after the parameters (``conv1.weight``); ``dynamic_axes`` makes the batch axis dynamic.
  * dynamo (opset 18): ``external_data=False`` writes one self-contained file; a ``Dim`` makes
    the batch dynamic. Its optimiser folds BN into the Conv weights but keeps the *parameter
    names* on the folded values, so match models by structure, never by name.
The single input is named ``input``, the outputs ``output`` (then ``output_1``, ...).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

if __package__:  # imported as converters.torch_export
    from . import designs
    from .checks import Tolerance, finish, output_names, save_model, verify
    from .specs import (ConverterError, base_parser, call_spec, load_inputs, parse_shape,
                        run_main, sample_input, save_sample)
else:  # run as a script: converters/ is on sys.path
    import designs
    from checks import Tolerance, finish, output_names, save_model, verify
    from specs import (ConverterError, base_parser, call_spec, load_inputs, parse_shape,
                       run_main, sample_input, save_sample)

EXPORTERS = ("legacy", "dynamo")
DEFAULT_OPSET = {"legacy": 17, "dynamo": 18}
EXPORT_BATCH = 2  # not 1: a batch of 1 lets exporters specialise the batch axis away


def load_model(source: str) -> tuple[torch.nn.Module, torch.Tensor | None]:
    """The module named by a spec or saved by ``torch.save``, and its example input if given."""
    if Path(source).is_file() and not source.endswith(".py"):
        try:
            loaded = torch.load(source, map_location="cpu", weights_only=False)
        except (ModuleNotFoundError, AttributeError) as error:  # the pickle names a class
            raise ConverterError(
                f"cannot unpickle {source} ({error}), in MODEL; run from the folder that "
                "defines the model's classes or put it on PYTHONPATH") from None
    else:
        loaded = call_spec(source)
    example = None
    if isinstance(loaded, tuple) and len(loaded) == 2:
        loaded, example = loaded
        example = torch.as_tensor(example, dtype=torch.float32)
    if not isinstance(loaded, torch.nn.Module):
        raise ConverterError(f"{source} gave a {type(loaded).__name__}, not an nn.Module; "
                             "return a module or (module, example_input) from the factory")
    return loaded.eval(), example


def torch_outputs(model: torch.nn.Module, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        result = model(torch.from_numpy(x))
    results = result if isinstance(result, (tuple, list)) else [result]
    return [r.detach().cpu().numpy() for r in results]



def _export_legacy(model, example, path: str, names: list[str], opset: int) -> None:
    axes = {name: {0: "batch"} for name in ["input", *names]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notice of the legacy exporter
        torch.onnx.export(
            model, (example,), path, dynamo=False, opset_version=opset,
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
            input_names=["input"], output_names=names, dynamic_axes=axes)


def _export_dynamo(model, example, path: str, names: list[str], opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    # it warns on every export that torchvision ops cannot be registered
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), path, dynamo=True, opset_version=opset, external_data=False,
            input_names=["input"], output_names=names, dynamic_shapes=({0: batch},),
            verbose=False, report=False)


def export_torch(model: torch.nn.Module, example: torch.Tensor, path: str | Path, *,
                 exporter: str = "legacy", opset: int | None = None,
                 check_input: np.ndarray | None = None,
                 tolerance: Tolerance = Tolerance()) -> dict[str, float]:
    """Export ``model`` to ``path`` and check it against torch on ``check_input``.

    Args:
        model: the module; it is put in eval mode.
        example: an input batch used for tracing (batch >= 2).
        path: the .onnx file; written only after the check passed.
        exporter: ``legacy`` or ``dynamo`` (see the module docstring).
        opset: default-domain opset; ``DEFAULT_OPSET[exporter]`` when None.
        check_input: the comparison batch; random normal of batch 3 when None.
        tolerance: allowed difference to torch.

    Returns:
        The max abs difference per output name.

    Raises:
        ConverterError: unknown exporter, a non-mergeable export or a difference above tolerance.
    """
    if exporter not in EXPORTERS:
        raise ConverterError(f"unknown exporter {exporter!r}, in --exporter; use one of {EXPORTERS}")
    model.eval()
    example = example.to(torch.float32)
    if check_input is None:
        check_input = sample_input(tuple(example.shape[1:]), batch=3, seed=0)
    references = torch_outputs(model, check_input)
    names = output_names(len(references))
    with tempfile.TemporaryDirectory() as folder:
        exported = str(Path(folder) / "model.onnx")
        export = _export_legacy if exporter == "legacy" else _export_dynamo
        export(model, example, exported, names, opset or DEFAULT_OPSET[exporter])
        onnx_model = onnx.load(exported)
    diffs = verify(onnx_model, check_input, dict(zip(names, references)), tolerance,
                   f"torch {exporter} export of {type(model).__name__}")
    save_model(onnx_model, path)
    return diffs


class DesignCNN(torch.nn.Module):
    """The ``cnn`` design of ``designs.py``."""

    def __init__(self) -> None:
        super().__init__()
        (c0, c1, c2), nn = designs.CNN_CHANNELS, torch.nn
        self.conv1, self.bn1 = nn.Conv2d(c0, c1, 3, padding=1), nn.BatchNorm2d(c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(c2, designs.CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class DesignMLP(torch.nn.Module):
    """The ``mlp`` design of ``designs.py``."""

    def __init__(self) -> None:
        super().__init__()
        sizes = designs.MLP_SIZES
        self.fc1, self.fc2, self.fc3 = (torch.nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _with_weights(model: torch.nn.Module, weights: dict[str, np.ndarray]) -> torch.nn.Module:
    state = {name: torch.from_numpy(value) for name, value in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not name.endswith("num_batches_tracked") for name in missing):
        raise RuntimeError(f"design weights do not fit: missing {missing}, unexpected {unexpected}")
    return model.eval()


def example_cnn() -> tuple[torch.nn.Module, torch.Tensor]:
    """A factory for MODEL: ``converters/torch_export.py:example_cnn``."""
    x = designs.fixture_input("cnn", batch=EXPORT_BATCH)
    return _with_weights(DesignCNN(), designs.cnn_weights()), torch.from_numpy(x)


def example_mlp() -> tuple[torch.nn.Module, torch.Tensor]:
    """A factory for MODEL: ``converters/torch_export.py:example_mlp``."""
    x = designs.fixture_input("mlp", batch=EXPORT_BATCH)
    return _with_weights(DesignMLP(), designs.mlp_weights()), torch.from_numpy(x)


def write_fixtures(folder: Path) -> dict[str, dict[str, float]]:
    """``torch_{cnn,mlp}_{legacy,dynamo}.onnx`` and ``.npz`` in ``folder``; diffs by file."""
    results = {}
    for design, factory in (("cnn", example_cnn), ("mlp", example_mlp)):
        model, example = factory()
        x = designs.fixture_input(design)
        for exporter in EXPORTERS:
            path = folder / f"torch_{design}_{exporter}.onnx"
            results[path.name] = export_torch(model, example, path, exporter=exporter, check_input=x)
            save_sample(path.with_suffix(".npz"), x, {"output": torch_outputs(model, x)[0]}, "output")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("model", help="module:factory, file.py:factory or a torch.save file")
    parser.add_argument("--exporter", choices=EXPORTERS, default="legacy")
    parser.add_argument("--input-shape", default=None,
                        help="one sample's shape without batch, e.g. 1,8,8 (when MODEL gives none)")
    args = parser.parse_args(argv)
    model, example = load_model(args.model)
    example = _example(example, args)
    check_input = (load_inputs(args.inputs) if args.inputs else
                   sample_input(tuple(example.shape[1:]), batch=args.batch, seed=args.seed))
    diffs = export_torch(model, example, args.output, exporter=args.exporter, opset=args.opset,
                         check_input=check_input, tolerance=Tolerance(args.rtol, args.atol))
    return finish(args, check_input, diffs, lambda: torch_outputs(model, check_input), note=f" ({args.exporter})")


def _example(example: torch.Tensor | None, args: argparse.Namespace) -> torch.Tensor:
    if args.input_shape:
        shape = parse_shape(args.input_shape)
        return torch.from_numpy(sample_input(shape, batch=EXPORT_BATCH, seed=args.seed))
    if example is None:
        raise ConverterError(f"{args.model} gives no example input, in MODEL; "
                             "pass --input-shape (one sample's shape, e.g. 1,8,8)")
    if example.shape[0] < EXPORT_BATCH:
        example = example.expand(EXPORT_BATCH, *example.shape[1:]).contiguous()
    return example


if __name__ == "__main__":
    raise SystemExit(run_main(main))
