"""How a converter is told what to convert: model specs, sample inputs and the shared command line.

A *spec* names a Python object as ``module:attribute`` (``mypkg.models:build``) or
``path/to/file.py:attribute`` (``converters/fixtures.py:torch_cnn``). When the attribute is
callable it is called without arguments; what it returns depends on the framework and is
documented in each converter.

Only the standard library and numpy are imported here, so every framework environment can use it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np


class ConverterError(Exception):
    """A problem the user can fix; printed as one line ``converter: <what>, <where>, <what to do>``."""


def load_object(spec: str) -> Any:
    """Import the object named by ``module:attribute`` or ``file.py:attribute``.

    Raises:
        ConverterError: the spec is malformed, the module cannot be imported or lacks the attribute.
    """
    module_part, sep, attribute = spec.rpartition(":")
    if not sep or not module_part or not attribute:
        raise ConverterError(
            f"model spec {spec!r} has no ':', expected module:attribute or file.py:attribute")
    module = _import_module(module_part, spec)
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ConverterError(
            f"module {module_part!r} has no attribute {attribute!r}, in spec {spec!r}; "
            "check the name after ':'") from None


def _import_module(name: str, spec: str):
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise ConverterError(f"no file {name}, in spec {spec!r}; give an existing .py file")
        # a unique module name so two specs from different folders never collide
        module_name = f"_converter_spec_{abs(hash(path.resolve()))}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        loader_spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        raise ConverterError(
            f"cannot import {name!r} ({error}), in spec {spec!r}; "
            "run from the folder that holds it or set PYTHONPATH") from None


def call_spec(spec: str) -> Any:
    """The object named by ``spec``, called without arguments when it is callable."""
    obj = load_object(spec)
    return obj() if callable(obj) else obj


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,8,8"`` -> ``(1, 8, 8)``: the shape of one sample, without the batch axis."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConverterError(
            f"input shape {text!r} is not comma-separated integers, in --input-shape; "
            "write it like 1,8,8 (no batch axis)") from None
    if not shape or min(shape) < 1:
        raise ConverterError(f"input shape {text!r} has a non-positive size, in --input-shape")
    return shape


def sample_input(sample_shape: tuple[int, ...], *, batch: int, seed: int) -> np.ndarray:
    """A deterministic float32 batch of standard-normal samples."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, *sample_shape)).astype(np.float32)


def load_inputs(path: str | Path) -> np.ndarray:
    """The array ``x`` of an ``.npz`` file (or the array of an ``.npy`` file), as float32."""
    path = Path(path)
    if not path.is_file():
        raise ConverterError(f"no inputs file {path}, in --inputs; give an .npz with an array 'x'")
    data = np.load(path)
    if isinstance(data, np.ndarray):
        return data.astype(np.float32)
    if "x" not in data.files:
        raise ConverterError(
            f"{path} has arrays {data.files} but no 'x', in --inputs; save the inputs as x=...")
    return data["x"].astype(np.float32)


def save_sample(path: str | Path, x: np.ndarray, outputs: dict[str, np.ndarray], output: str) -> None:
    """Write ``x``, the framework's main output ``y``, the main output's ONNX name and every output."""
    arrays = {f"out_{name}": value for name, value in outputs.items()}
    np.savez(path, x=x, y=outputs[output], output=np.array(output), **arrays)


def base_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every converter shares; the first line of ``doc`` is the description."""
    parser = argparse.ArgumentParser(
        description=(doc or "").strip().splitlines()[0] if doc else None,
        epilog="See docs/converters.md for the environment each converter needs.")
    parser.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=None,
                        help="default-domain opset (the converter's default keeps onnxruntime happy)")
    parser.add_argument("--inputs", default=None,
                        help="an .npz whose array 'x' holds the check inputs (default: random normal)")
    parser.add_argument("--batch", type=int, default=3,
                        help="random check batch size; not the export batch, to prove it is dynamic")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random check inputs")
    parser.add_argument("--rtol", type=float, default=1e-4,
                        help="allowed max abs diff relative to the largest reference output")
    parser.add_argument("--atol", type=float, default=1e-5, help="allowed max abs diff, absolute part")
    parser.add_argument("--save-sample", default=None,
                        help="also write an .npz with x, the framework outputs y and the output name")
    return parser


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a converter's ``main``; a ``ConverterError`` becomes one stderr line and exit code 1.

    The current folder joins ``sys.path``, as with ``python -m``: a script's own folder
    (converters/) is there instead, and specs and pickles name the user's modules.
    """
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return main(argv)
    except ConverterError as error:
        print(f"converter: error: {error}", file=sys.stderr)
        return 1
