"""The exceptions onnxmerge raises for problems a user can fix.

Every message says what is wrong, where (file, node, op, tensor, axis) and what to do.
The CLI prints them as one line ``onnxmerge: error: ...`` and exits 1; any other
exception is a bug: one line naming the command and the error, exit 70 (the traceback with -v).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class OnnxMergeError(Exception):
    """Base class of all user-facing onnxmerge errors."""


class InvalidModelError(OnnxMergeError):
    """The file is not a loadable, valid ONNX model (or refers to unsafe external data)."""


class UnsupportedGraphError(OnnxMergeError):
    """The model is valid ONNX but uses something onnxmerge cannot handle."""


class CalibrationError(OnnxMergeError):
    """Calibration inputs are missing, malformed or do not fit the models."""


class RecipeError(OnnxMergeError):
    """Options or a recipe are inconsistent."""


class MissingDependencyError(OnnxMergeError):
    """A package onnxmerge needs for this step is not installed; the message says what to install."""


@contextlib.contextmanager
def about(name: str) -> Iterator[None]:
    """Name the file in an error the body raises without it (the graph code knows no paths):
    ``node conv2: ...`` becomes ``model.onnx: node conv2: ...``."""
    try:
        yield
    except OnnxMergeError as error:
        text = str(error)
        if name in text or len(error.args) != 1 or isinstance(error, MissingDependencyError):
            raise  # a missing extra is no fault of the file
        raise type(error)(f"{name}: {text}") from error
