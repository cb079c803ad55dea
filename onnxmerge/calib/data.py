"""Calibration inputs: read .npz/.npy files, check them against every model's inputs, feed batches.
(Long because each rule below is a check with its own message.)

Rules (method.md §2 runs every model on the same samples):

- Several files are one data set, their samples in file order (calib/files.py: the same arrays,
  dtypes and sample shapes in each).
- A ``.npz`` holds one array per graph input name. A single array (a ``.npy``, or a ``.npz`` with
  exactly one array) feeds each model's sole input whatever the models call it, because exporters
  name inputs differently. Arrays no model asks for (labels, say) are ignored and never read.
- Axis 0 is the sample (batch) axis. Every other fixed dimension must match exactly.
- dtypes: a floating array is cast to the model's floating dtype (float64 data feeds a float32
  model; values that overflow the target are refused); an integer array is cast to the model's
  integer dtype when every value fits; integer vs floating (and anything else) is refused.
- No NaN or Inf, at least one sample, the same number of samples in every array used.
- Batches: all models step through the samples in lockstep with one batch size, so the feeds
  of one step hold the same samples. A model whose batch dimension is fixed to b (older exports
  use 1) must get exactly b samples per run, so then every model gets batches of b whatever
  size is asked for, and the last ``num_samples % b`` samples are dropped with a logged warning
  (padding would add fake samples to the statistics). Models with different fixed batch sizes
  cannot run in lockstep and are refused.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..errors import CalibrationError, UnsupportedGraphError
from .arrays import SINGLE as _SINGLE
from .arrays import describe as _describe
from .files import Files, Piece

log = logging.getLogger(__name__)

from ..choices import MIN_SAMPLES
_CHUNK_BYTES = 8 << 20  # value checks read big arrays in slices of about this size (their float64 copies stay small)


@dataclass(frozen=True)
class InputSpec:
    """One graph input of a model.

    Attributes:
        name: the graph input name.
        dtype: the numpy dtype onnxruntime expects.
        shape: one entry per axis, an int for a fixed dimension, None for a symbolic or unknown
            one; None when the model gives no shape at all.
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None

    @property
    def fixed_batch(self) -> int | None:
        """The batch (axis 0) size when the model fixes it, else None."""
        return self.shape[0] if self.shape else None


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs of ``model`` that are not initializers, in graph order.

    Raises:
        UnsupportedGraphError: an input is not a tensor or has an element type numpy lacks.
    """
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if value.type.WhichOneof("value") != "tensor_type":
            raise UnsupportedGraphError(f"graph input {value.name!r} is not a tensor; "
                                        "onnxmerge feeds only tensor inputs")
        tensor = value.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        except (KeyError, TypeError, ValueError) as error:
            name = onnx.TensorProto.DataType.Name(tensor.elem_type)
            raise UnsupportedGraphError(f"graph input {value.name!r} has element type {name}; "
                                        "onnxmerge feeds only numeric numpy types") from error
        shape = None
        if tensor.HasField("shape"):
            shape = tuple(dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None
                          for dim in tensor.shape.dim)
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


class _InMemory:
    """Arrays given in memory (the Python API), with the interface of ``files.Files``; ``path``
    is what messages call them."""

    def __init__(self, arrays: Mapping[str, np.ndarray], exclude: tuple[str, ...] = (),
                 label: str = "calibration arrays"):
        self.path = label
        self._loaded = {key: np.asarray(value) for key, value in arrays.items() if key not in exclude}
        self.keys = list(self._loaded)

    def get(self, key: str) -> np.ndarray:
        return self._loaded[key]

    def parts(self, key: str) -> list[tuple[str, np.ndarray]]:
        return [(self.path, self._loaded[key])]

    def truncate(self, count: int) -> None:
        self._loaded = {key: array[:count] for key, array in self._loaded.items()}

    def close(self) -> None:
        """Nothing to close: the arrays belong to the caller."""


def _label(names: list[str] | None, index: int) -> str:
    return f"model {index}" if names is None else names[index]


def _bind(arrays: Files | _InMemory, specs: list[InputSpec], model: str) -> list[tuple[InputSpec, str]]:
    """Which array feeds each input of one model: by name, or the single array for a sole input."""
    path = arrays.path
    if len(arrays.keys) == 1 and len(specs) == 1:
        return [(specs[0], arrays.keys[0])]
    if arrays.keys == [_SINGLE]:
        raise CalibrationError(f"{path}: {model} has {len(specs)} inputs ({', '.join(s.name for s in specs)}) "
                               "but a .npy holds one array; save a .npz with one array per input name")
    found = ", ".join(repr(k) for k in arrays.keys) or "none"
    for spec in specs:
        if spec.name not in arrays.keys:
            raise CalibrationError(f"{path}: no array for input {spec.name!r} of {model} (arrays found: {found}); "
                                   f"save it under that name with numpy.savez")
    return [(spec, spec.name) for spec in specs]


def _check_layout(path: str, spec: InputSpec, key: str, array: np.ndarray, model: str) -> None:
    """Rank, fixed non-batch dimensions and dtype kind of one array against one input."""
    where = f"{_describe(key)} for input {spec.name!r} of {model}"
    if array.ndim == 0:
        raise CalibrationError(f"{path}: {where} is a scalar; axis 0 must index the samples")
    if spec.shape is not None:
        if array.ndim != len(spec.shape):
            raise CalibrationError(f"{path}: {where} has shape {array.shape} (rank {array.ndim}) but the model "
                                   f"expects rank {len(spec.shape)} {_shape_text(spec.shape)}; reshape the data")
        for axis, (want, have) in enumerate(zip(spec.shape, array.shape)):
            if axis > 0 and want is not None and want != have:
                raise CalibrationError(f"{path}: {where} has shape {array.shape} but the model expects "
                                       f"{_shape_text(spec.shape)} (axis {axis}: {have} vs {want}); reshape the data")
    have, want = array.dtype, spec.dtype
    if have == want:
        return
    kinds = (have.kind, want.kind)
    if kinds[0] == "f" and kinds[1] == "f" or kinds[0] in "iu" and kinds[1] in "iu":
        return  # values are checked against the target range in _check_values
    raise CalibrationError(f"{path}: {where} has dtype {have} but the model expects {want}; "
                           f"convert the data to {want} (with the preprocessing the model expects)")


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if dim is None else str(dim) for dim in shape) + "]"


def _release(array: np.ndarray) -> None:
    """Drop a memory-mapped array's pages from this process (they stay in the OS page cache):
    read pages count as resident memory, which would otherwise grow with the data set. (Files
    are mapped only while read, files.Mapped; this is for arrays given in memory that are maps.)"""
    mapping = getattr(array, "_mmap", None)  # np.memmap keeps its mmap object here
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def _check_values(path: str, key: str, array: np.ndarray, targets: set[np.dtype],
                  seed: int = 0) -> tuple[np.ndarray, object]:
    """No NaN or Inf, and every value representable in each dtype the array is cast to.

    Returns:
        A random projection of each sample (equal for equal samples, different for different
        ones but for chance), and the array's one value when every value is the same, else None.
    """
    row_bytes = max(1, array[:1].nbytes)
    step = max(1, _CHUNK_BYTES // row_bytes)
    nan = inf = overflow = 0
    low, high = None, None
    weights = np.random.default_rng(seed).standard_normal(int(np.prod(array.shape[1:])))
    projection = np.zeros(array.shape[0])
    smallest = largest = None
    for start in range(0, array.shape[0], step):
        chunk = np.asarray(array[start:start + step])
        if chunk.size:
            with np.errstate(all="ignore"):
                projection[start:start + len(chunk)] = chunk.reshape(len(chunk), -1).astype(np.float64) @ weights
            smallest = chunk.min() if smallest is None else min(smallest, chunk.min())
            largest = chunk.max() if largest is None else max(largest, chunk.max())
        if chunk.dtype.kind == "f":
            nan += int(np.isnan(chunk).sum())
            inf += int(np.isinf(chunk).sum())
            for target in targets:
                if target != chunk.dtype and target.kind == "f":
                    with np.errstate(over="ignore"):
                        overflow += int((~np.isfinite(chunk.astype(target)) & np.isfinite(chunk)).sum())
        elif chunk.dtype.kind in "iu" and chunk.size:
            low = chunk.min() if low is None else min(low, chunk.min())
            high = chunk.max() if high is None else max(high, chunk.max())
        _release(array)
    what = _describe(key)
    if nan or inf:
        raise CalibrationError(f"{path}: {what} has {nan} NaN and {inf} Inf values; "
                               "drop or fix those samples")
    if overflow:
        raise CalibrationError(f"{path}: {what} has {overflow} values too large for "
                               f"{'/'.join(sorted(str(t) for t in targets))}; rescale the data")
    for target in targets:
        if low is not None and target.kind in "iu":
            info = np.iinfo(target)
            if low < info.min or high > info.max:
                raise CalibrationError(f"{path}: {what} has values in [{low}, {high}] that do not fit {target}; "
                                       f"save the data as {target}")
    return projection, (smallest.item() if smallest is not None and smallest == largest else None)


def check_variation(calib: "CalibrationSet", allow_few: bool = False) -> None:
    """Refuse calibration data whose statistics would be meaningless: every input constant
    (all-zero data merges to chance accuracy), or fewer than ``MIN_SAMPLES`` distinct samples
    (unless ``allow_few``); warn about a floating input that is constant while others vary.

    Raises:
        CalibrationError: one line naming the file and the array.
    """
    constant = calib.constant
    if constant and len(constant) == len(calib.keys):
        listed = ", ".join(f"{_describe(key)} is all {value!r}" for key, value in constant.items())
        raise CalibrationError(f"{calib.path}: the data is constant ({listed}): the models' features would not "
                               "vary, and a merge on them is near chance accuracy; give real input samples")
    if calib.distinct_samples < MIN_SAMPLES and not allow_few:
        raise CalibrationError(f"{calib.path}: only {calib.distinct_samples} distinct samples among "
                               f"{calib.num_samples} (the others repeat them): correlations and repair statistics "
                               f"need at least {MIN_SAMPLES} different samples; give more varied samples, or "
                               "--allow-few-samples to go on")
    for key, value in constant.items():
        if calib.dtypes[key].kind == "f":
            log.warning("%s: %s is all %r while the other inputs vary: the models see no variation there",
                        calib.path, _describe(key), value)


def _common_batch(path: str, specs_per_model: list[list[InputSpec]], names: list[str] | None) -> int | None:
    """The fixed batch size every model must run with, or None when all are dynamic."""
    fixed: dict[int, str] = {}
    for index, specs in enumerate(specs_per_model):
        for spec in specs:
            if spec.fixed_batch is not None:
                fixed.setdefault(spec.fixed_batch, f"{_label(names, index)} input {spec.name!r}")
    if len(fixed) > 1:
        listed = ", ".join(f"{size} ({where})" for size, where in fixed.items())
        raise CalibrationError(f"{path}: the models fix different batch sizes: {listed}; "
                               "export them with a dynamic batch dimension")
    return next(iter(fixed), None)


class CalibrationSet:
    """Checked calibration inputs of a set of models; see the module docstring for the rules.

    Attributes:
        path: what messages call the data: the file read, the files, or the arrays.
        num_samples: samples used (after ``max_samples``).
        fixed_batch: the batch size a model fixes (then every model runs with it), or None.
        keys: the arrays the models read; dtypes: their dtypes in the file.
        constant: the arrays whose values are all one value, with that value.
        distinct_samples: how many of the samples differ (all arrays together; see ``check_variation``).
    """

    def __init__(self, arrays: Files | Piece | _InMemory, bindings: list[list[tuple[InputSpec, str]]],
                 num_samples: int, fixed_batch: int | None):
        self.path = arrays.path
        self.num_samples = num_samples
        self.fixed_batch = fixed_batch
        self._arrays = arrays
        self._bindings = bindings
        self._rows: np.ndarray | None = None  # the file's rows a subset reads, else all
        self.keys: list[str] = list(dict.fromkeys(key for bound in bindings for _, key in bound))
        self.dtypes: dict[str, np.dtype] = {}
        self.constant: dict[str, object] = {}
        self.distinct_samples = num_samples

    def subset(self, rows: np.ndarray) -> "CalibrationSet":
        """The same inputs restricted to ``rows`` (indices of this set's samples, in this order)."""
        part = CalibrationSet(self._arrays, self._bindings, len(rows), self.fixed_batch)
        part._rows = np.asarray(rows) if self._rows is None else self._rows[np.asarray(rows)]
        return part

    def shard(self, start: int, stop: int) -> "CalibrationSet":
        """Samples ``start:stop`` of this set (in its order) as a set of their own, to send to
        another process (calib/distributed.py): data read from files is a ``files.Piece``, the
        files' paths and sample ranges, which that process reads itself; arrays given in memory
        are copied, just those rows. ``batches`` casts as for this set."""
        if not 0 <= start < stop <= self.num_samples:
            raise CalibrationError(f"{self.path}: samples {start}:{stop} of {self.num_samples}; "
                                   "give a non-empty range within the set")
        rows = slice(start, stop) if self._rows is None else self._rows[start:stop]
        if isinstance(self._arrays, Files):
            piece, local = self._arrays.piece(rows, self.keys)
            part = CalibrationSet(piece, self._bindings, stop - start, self.fixed_batch)
            part._rows, part.dtypes, part.constant = local, self.dtypes, self.constant
            return part
        arrays = {}
        for key in self.keys:
            source = self._arrays.get(key)
            arrays[key] = np.array(source[rows])  # a copy of these rows only
            _release(source)
        part = CalibrationSet(_InMemory(arrays, label=f"{self.path} [samples {start}:{stop}]"), self._bindings,
                              stop - start, self.fixed_batch)
        part.dtypes, part.constant = self.dtypes, self.constant  # hold for any rows of the set
        return part

    def samples_per_file(self) -> list[tuple[str, int]]:
        """Each file read (or the arrays given) with the samples used of it, in order."""
        return [(path, len(part)) for path, part in self._arrays.parts(self.keys[0])]

    @property
    def num_models(self) -> int:
        return len(self._bindings)

    def batch_size(self, requested: int) -> int:
        """The batch size ``batches`` really uses for a requested one (the same for every model)."""
        if requested < 1:
            raise CalibrationError(f"{self.path}: batch size {requested}; use a batch size of at least 1")
        return self.fixed_batch or requested

    def batches(self, model_index: int, batch_size: int,
                samples: np.ndarray | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Feeds for one model, keyed by its input names.

        Every model gets the same samples at the same step, so the iterators of several models
        can be zipped. Each feed is a fresh C-contiguous array in the model's dtype.

        Args:
            model_index: position of the model in ``specs_per_model`` of ``load_calibration``.
            batch_size: samples per feed; replaced by ``fixed_batch`` when a model fixes it.
            samples: indices of the samples to feed, in this order (default: all, in file order).
        """
        size = self.batch_size(batch_size)
        order = np.arange(self.num_samples) if samples is None else np.asarray(samples)
        stop = len(order) - len(order) % size if self.fixed_batch else len(order)
        bindings = self._bindings[model_index]
        for start in range(0, stop, size):
            chunk = order[start:start + size]
            if self._rows is not None:
                chunk = self._rows[chunk]
            elif samples is None:  # a slice reads a memory-mapped file without copying it all
                chunk = slice(int(chunk[0]), int(chunk[-1]) + 1)
            feed = {spec.name: np.array(self._arrays.get(key)[chunk], dtype=spec.dtype, order="C")
                    for spec, key in bindings}
            for _, key in bindings:
                _release(self._arrays.get(key))
            yield feed

    def shuffled(self, count: int | None, seed: int) -> np.ndarray:
        """Indices of ``count`` samples (default all) in a random order fixed by ``seed``, so
        that a batch mixes the whole set even when the file is sorted (by class, say); with a
        fixed batch size, rounded up to whole batches."""
        if count is not None and count < 1:
            raise CalibrationError(f"{self.path}: {count} samples asked for; use at least 1")
        if count is not None and self.fixed_batch:
            count = -(-count // self.fixed_batch) * self.fixed_batch
        return np.random.default_rng(seed).permutation(self.num_samples)[:count]


def load_calibration(path: str | Path | Sequence[str | Path] | Mapping[str, np.ndarray],
                     specs_per_model: list[list[InputSpec]], *, max_samples: int | None = None,
                     model_names: list[str] | None = None, exclude: tuple[str, ...] = (),
                     lockstep: bool = True) -> CalibrationSet:
    """Read calibration inputs and check them against every model's inputs.

    Args:
        path: a ``.npz`` (one array per input name, or a single array) or a ``.npy``; a list
            of such files, whose samples are read in order as one set (calib/files.py); or the
            arrays in memory by input name (``""`` for a single unnamed array), which are
            read, not copied.
        specs_per_model: ``input_specs`` of each model, in merge order.
        max_samples: use only the first this many samples.
        model_names: how error messages name the models (default ``model 0``, ``model 1``, ..., as outputs are
            suffixed ``_m0``, ``_m1``).
        exclude: arrays that are no inputs (labels), never bound nor read.
        lockstep: the models run in lockstep (a common fixed batch size, see the module
            docstring); False leaves each model's fixed batch size to the caller (``eval``).

    Returns:
        The checked set; every array in use is memory-mapped while read (.npy, uncompressed .npz)
        or loaded (compressed .npz).

    Raises:
        CalibrationError: unreadable file, missing input, wrong rank, fixed dimension or dtype,
            differing sample counts, NaN/Inf or overflowing values, no samples, or models that
            fix different batch sizes. The message names the file and says what to do.
    """
    if isinstance(path, Mapping):
        arrays = _InMemory(path, exclude)
    else:
        arrays = Files([os.fspath(path)] if isinstance(path, (str, os.PathLike)) else [os.fspath(p) for p in path],
                       exclude)
    path = arrays.path
    bindings = []
    for index, specs in enumerate(specs_per_model):
        model = _label(model_names, index)
        bound = _bind(arrays, specs, model)
        for spec, key in bound:
            _check_layout(path, spec, key, arrays.get(key), model)
        bindings.append(bound)
    used = list(dict.fromkeys(key for bound in bindings for _, key in bound))
    counts = {key: arrays.get(key).shape[0] for key in used}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{key!r}: {count}" for key, count in counts.items())
        raise CalibrationError(f"{path}: arrays have different numbers of samples ({listed}); "
                               "give every input the same samples along axis 0")
    if max_samples is not None and max_samples < 1:
        raise CalibrationError(f"{path}: max_samples={max_samples}; use at least 1 sample or leave it unset")
    num_samples = min(next(iter(counts.values()), 0), max_samples or np.iinfo(np.int64).max)
    if num_samples == 0:
        raise CalibrationError(f"{path}: no samples (axis 0 has length 0); give at least one sample")
    arrays.truncate(num_samples)
    fixed_batch = _common_batch(path, specs_per_model, model_names) if lockstep else None
    if fixed_batch is not None and num_samples < fixed_batch:
        raise CalibrationError(f"{path}: {num_samples} samples but the models run in fixed batches of "
                               f"{fixed_batch}; give at least {fixed_batch} samples")
    if fixed_batch is not None and num_samples % fixed_batch:
        log.warning("%s: %d samples are not a multiple of the fixed batch size %d; the last %d are dropped",
                    path, num_samples, fixed_batch, num_samples % fixed_batch)
    joint, constant = np.zeros(num_samples), {}
    for index, key in enumerate(used):
        targets = {spec.dtype for bound in bindings for spec, bound_key in bound if bound_key == key}
        checked = [_check_values(file, key, part, targets, seed=index) for file, part in arrays.parts(key) if len(part)]
        joint += np.concatenate([projection for projection, _ in checked])
        values = {value for _, value in checked}
        if len(values) == 1 and None not in values:
            constant[key] = values.pop()
    arrays.close()
    calib = CalibrationSet(arrays, bindings, num_samples, fixed_batch)
    calib.keys, calib.constant, calib.distinct_samples = used, constant, len(np.unique(joint))
    calib.dtypes = {key: arrays.get(key).dtype for key in used}
    return calib
