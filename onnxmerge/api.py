"""The Python API the CLI calls. Every function takes and returns ONNX models or plain data."""

from __future__ import annotations

import os

import numpy as np
import onnx

from . import inspection
from .errors import InvalidModelError
from .graph.canonical import canonicalize
from .graph.spaces import SpaceGraph, find_spaces
from .io import load_model
from .rewrite.apply import transform_parameters
from .rewrite.transform import Permutation


def analyse(model: onnx.ModelProto, *, bn: str = "keep") -> tuple[onnx.ModelProto, SpaceGraph]:
    """Canonicalise a model and find its feature spaces. The input is not modified."""
    canonical = canonicalize(model, bn=bn)
    return canonical, find_spaces(canonical)


def inspect(path: str | os.PathLike, *, bn: str = "keep") -> dict:
    """The ``onnxmerge inspect`` report of the model file at ``path`` (see inspection.py)."""
    canonical, graph = analyse(load_model(path), bn=bn)
    return inspection.describe(str(path), canonical, graph)


def permute(model: onnx.ModelProto, *, seed: int = 0, bn: str = "keep") -> onnx.ModelProto:
    """Return a function-preserving copy of ``model`` with every free space randomly permuted.

    Attention heads are permuted as whole heads and, jointly, within heads; grouped channels
    likewise by groups and within groups.
    """
    canonical, graph = analyse(model, bn=bn)
    rng = np.random.default_rng(seed)
    orders = {space.id: Permutation(rng.permutation(space.width)) for space in graph.free_spaces}
    permuted = transform_parameters(canonical, graph, lambda space, role: orders.get(space))
    check(permuted, "permuted model")
    return permuted


def check(model: onnx.ModelProto, what: str) -> None:
    """Full ONNX checks on a model onnxmerge produced; a failure here is an onnxmerge bug
    unless the input was already invalid, so name both."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as error:
        raise InvalidModelError(f"{what} fails onnx.checker: {str(error).splitlines()[0]}; "
                                "check the input with onnx.checker, else report this") from error
