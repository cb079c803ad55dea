"""What the Python API accepts as models and as data, turned into what the pipeline reads.

A model is a path to an ONNX file or an ``onnx.ModelProto`` already in memory; data is a path
to a ``.npz``/``.npy`` file, a list of such paths (shards of one data set, read in order), a
numpy array (the sole input), a dict of arrays (by input name), or an iterable of such batches
(a torch ``DataLoader`` yielding tensors works: anything with a ``numpy()`` method is
converted). Each model and data set gets a name for messages and a sha256 for the merged
model's metadata and its recipe.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Union

import numpy as np
import onnx

from .calib.files import label
from .errors import CalibrationError, InvalidModelError
from .graph.quantized import read_as_float
from .io import check_loaded_model, load_model, model_sha256, model_sha256_in_memory

ModelLike = Union[str, os.PathLike, onnx.ModelProto]
DataLike = Union[str, os.PathLike, np.ndarray, Mapping, Iterable]


@dataclass(frozen=True)
class Source:
    """One model of a command.

    Attributes:
        name: the path as given, or ``model <i>`` for a model given in memory (messages, report).
        model: the checked model, never modified by onnxmerge.
        path: the file it was read from, None for a model given in memory.
        given: the ModelProto as the caller gave it (what ``sha256`` hashes), None for a file.
    """

    name: str
    model: onnx.ModelProto
    path: str | None
    given: onnx.ModelProto | None = None

    @cached_property
    def sha256(self) -> str:
        """Hex sha256 of the file, or of the ModelProto as given; computed when first asked
        (only a merge records it), since hashing reads the whole file again."""
        return model_sha256(self.path) if self.path else model_sha256_in_memory(self.given)

    @property
    def file_name(self) -> str:
        """The file name without folders (what metadata and recipes store), or ``name``."""
        return os.path.basename(self.path) if self.path else self.name


def read_models(models: Iterable[ModelLike]) -> list[Source]:
    """Each model read and checked once: a file given twice is read (and warned about) once.

    Raises:
        InvalidModelError: an entry is neither a path nor a ModelProto, or fails the checks of
            ``io.load_model``.
        UnsupportedGraphError: a QOperator-quantized model (see graph/quantized.py).
    """
    if isinstance(models, (str, os.PathLike, onnx.ModelProto)):
        raise InvalidModelError("models: give a list of models (paths or onnx.ModelProto), not a single one")
    sources: list[Source] = []
    read: dict[str, onnx.ModelProto] = {}  # by real path
    for index, item in enumerate(models):
        if isinstance(item, onnx.ModelProto):
            name = f"model {index}"
            copy = check_loaded_model(name, item)
            read_as_float(name, copy)
            sources.append(Source(name, copy, None, item))
        elif isinstance(item, (str, os.PathLike)):
            path = os.fspath(item)
            key = os.path.realpath(path)
            if key not in read:
                model = load_model(path)
                read_as_float(path, model)
                read[key] = model
            sources.append(Source(path, read[key], path))
        else:
            raise InvalidModelError(f"model {index}: a {type(item).__name__} is neither a path nor an onnx.ModelProto; "
                                    "give the .onnx file's path or the loaded model")
    return sources


@dataclass(frozen=True)
class Data:
    """A data set as the calibration and evaluation readers take it.

    Attributes:
        name: the path as given, the paths (``first .. last (n files)``), or ``arrays`` for data given in memory.
        content: the path, the paths (two or more, in sample order), or the arrays by name
            (``""`` for a single unnamed array).
    """

    name: str
    content: str | tuple[str, ...] | dict[str, np.ndarray]

    @property
    def paths(self) -> tuple[str, ...]:
        """The files read, in order; none for data given in memory."""
        if isinstance(self.content, str):
            return (self.content,)
        return () if isinstance(self.content, dict) else self.content

    def arrays_sha256(self) -> str:
        """Hex sha256 of the arrays given in memory: their names, dtypes, shapes and bytes (read
        in full: computed only for a recipe)."""
        return _digest(self.content)


def read_data(data: DataLike, what: str = "calibration") -> Data:
    """The data of one argument: a path, or a list of paths, is kept (files are read lazily,
    .npy memory-mapped); arrays, dicts and iterables of batches are gathered in memory (batches
    concatenated along axis 0).

    Raises:
        CalibrationError: an empty iterable, batches whose names differ, or items that are
            not arrays.
    """
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        return Data(path, path)
    if isinstance(data, (list, tuple)) and data and all(isinstance(item, (str, os.PathLike)) for item in data):
        if len(data) == 1:
            return read_data(data[0], what)
        paths = tuple(os.fspath(item) for item in data)
        return Data(label(paths), paths)
    if isinstance(data, Mapping) or _is_array(data):
        arrays = _arrays(data, what)
    elif isinstance(data, Iterable):
        arrays = _concatenated([_arrays(batch, what) for batch in data], what)
    else:
        raise CalibrationError(f"{what}: a {type(data).__name__} is not data; give a .npz/.npy path, a numpy array, "
                               "a dict of arrays by input name, or an iterable of such batches")
    return Data("arrays", arrays)


def _is_array(value: object) -> bool:
    return isinstance(value, np.ndarray) or hasattr(value, "numpy")


def _as_array(value: object, what: str, name: str) -> np.ndarray:
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):  # a torch tensor (on the CPU)
        value = value.detach().cpu().numpy() if hasattr(value, "detach") else value.numpy()
    if not isinstance(value, np.ndarray) or value.dtype == object:
        raise CalibrationError(f"{what}: {name or 'the data'} is a {type(value).__name__}, not a numeric array; "
                               "give numpy arrays (or tensors)")
    return value


def _arrays(batch: object, what: str) -> dict[str, np.ndarray]:
    """One batch as arrays by input name; a bare array (or a tuple whose first item is one,
    as a DataLoader of (inputs, labels) yields) has the name ``""``: the models' sole input."""
    if isinstance(batch, Mapping):
        return {str(name): _as_array(value, what, str(name)) for name, value in batch.items()}
    if isinstance(batch, (tuple, list)) and batch and _is_array(batch[0]):
        batch = batch[0]
    return {"": _as_array(batch, what, "")}


def _concatenated(batches: list[dict[str, np.ndarray]], what: str) -> dict[str, np.ndarray]:
    if not batches:
        raise CalibrationError(f"{what}: the iterable yielded no batches; give at least one batch of samples")
    names = set(batches[0])
    for index, batch in enumerate(batches[1:], 1):
        if set(batch) != names:
            raise CalibrationError(f"{what}: batch {index} has inputs {sorted(batch)} where batch 0 has "
                                   f"{sorted(names)}; yield the same inputs in every batch")
    try:
        return {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}
    except ValueError as error:
        raise CalibrationError(f"{what}: batches do not stack along axis 0 ({error}); "
                               "yield batches of one shape apart from the batch size") from error


def _digest(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
