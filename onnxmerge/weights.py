"""Weights that stay in their files, so that memory holds the tensors in use, not the models.

A model file with external data is loaded with its large tensors left there (``map_external``):
each such ``TensorProto`` keeps its offset and length but names its file by absolute path.
onnx and onnxruntime refuse absolute locations, so nothing reads these tensors behind this
module's back: ``read`` maps them (``np.memmap``, read-only: its pages leave memory with the
array), onnxruntime gets them as inputs it reads in place (``as_inputs``) or as external
initializers (``session_parts``), and ``raw_bytes`` lets ``io.save_model`` copy them into the
output's sidecar. Large tensors a merge computes go
to a temporary spill file the same way (``spill``), so a merged model is not held in memory
either. Small tensors (under ``MAPPED_MIN_BYTES``) are read into memory as usual: shape
computations read them, and they cost nothing.
"""

from __future__ import annotations

import atexit
import math
import mmap
import os
import re
import shutil
import socket
import tempfile

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import OnnxMergeError

# Read at each use, so that tests can lower it to send small models down the mapped path.
MAPPED_MIN_BYTES = 1 << 16
FEED_MIN_BYTES = 1 << 28
"""Mapped weights of at least this many bytes in all are fed to onnxruntime as inputs on the
CPU, read in place, instead of given as initializers, which it copies (twice the memory) but
can fuse into the layers (Conv with BatchNormalization, ...), a last-bit difference in the
outputs. Read at each use, so that tests can lower it."""
BAND_BYTES = 16 << 20
"""float64 bytes of rows that a step working a band at a time holds (``row_bands``): an (n, n)
statistic's, a same-base merge's tensor's. Read at each use, so that tests can lower it."""
_SESSION_LOCATION = "onnxmerge-mapped"  # the stub location onnxruntime sees; the values come from memory
_ALIGNMENT = 64  # spilled tensors start at offsets numpy can view as any dtype


def is_mapped(tensor: onnx.TensorProto) -> bool:
    """Whether ``tensor``'s data stays in a file this module reads (an absolute location)."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL and os.path.isabs(_location(tensor)[0])


def has_mapped(model: onnx.ModelProto) -> bool:
    """Whether any initializer of ``model``'s main graph is mapped."""
    return any(is_mapped(init) for init in model.graph.initializer)


def unreadable(model: onnx.ModelProto) -> str | None:
    """The first file of ``model``'s mapped tensors that cannot be read here, or None."""
    for init in model.graph.initializer:
        if is_mapped(init) and not os.access(_location(init)[0], os.R_OK):
            return _location(init)[0]
    return None


def mapped_bytes(model: onnx.ModelProto) -> int:
    """The bytes of ``model``'s mapped initializers."""
    return sum(length(init) for init in model.graph.initializer if is_mapped(init))


def _location(tensor: onnx.TensorProto) -> tuple[str, int, int | None]:
    entries = {entry.key: entry.value for entry in tensor.external_data}
    length = entries.get("length")
    return entries.get("location", ""), int(entries.get("offset", 0)), None if length is None else int(length)


RAW_LAYOUT = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                         onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
                         onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32,
                         onnx.TensorProto.UINT64, onnx.TensorProto.BOOL, onnx.TensorProto.COMPLEX64,
                         onnx.TensorProto.COMPLEX128})
"""Types whose raw data are numpy's little-endian bytes (bfloat16, 4- and 8-bit floats are not)."""


def read(tensor: onnx.TensorProto) -> np.ndarray:
    """The values of ``tensor`` (``numpy_helper.to_array``), a read-only memory map for a mapped one.

    Returns:
        An array of the tensor's dims and numpy dtype; for a mapped tensor a read-only
        ``np.memmap`` when its type has a numpy layout, else a copy in memory.
    """
    if not is_mapped(tensor):
        return numpy_helper.to_array(tensor)
    path, offset, _ = _location(tensor)
    shape = tuple(tensor.dims)
    if tensor.data_type in RAW_LAYOUT and int(np.prod(shape, dtype=np.int64)) > 0:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    return numpy_helper.to_array(_loaded(tensor))


def length(tensor: onnx.TensorProto) -> int:
    """A mapped tensor's size in bytes."""
    path, offset, size = _location(tensor)
    return size if size is not None else os.path.getsize(path) - offset


def raw_bytes(tensor: onnx.TensorProto) -> bytes:
    """A mapped tensor's data as raw bytes (one tensor in memory at a time)."""
    path, offset, length = _location(tensor)
    with open(path, "rb") as file:
        file.seek(offset)
        return file.read(-1 if length is None else length)


def self_contained(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``, or a copy of it whose mapped tensors hold their data (what one file holds)."""
    if not has_mapped(model):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for init in copy.graph.initializer:
        if is_mapped(init):
            init.CopyFrom(_loaded(init))
    return copy


def _loaded(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """A copy of a mapped tensor with its data in memory."""
    loaded = onnx.TensorProto()
    loaded.CopyFrom(tensor)
    loaded.raw_data = raw_bytes(tensor)
    del loaded.external_data[:]
    loaded.data_location = onnx.TensorProto.DEFAULT
    return loaded


def map_external(tensor: onnx.TensorProto, folder: str) -> None:
    """Leave ``tensor``'s checked external data in its file (in place): its location becomes
    the file's absolute path, resolved against ``folder`` (the model file's)."""
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = os.path.realpath(os.path.join(folder, entry.value))


def stays_mapped(tensor: onnx.TensorProto) -> bool:
    """Whether an external tensor is large enough to stay in its file at load."""
    length = _location(tensor)[2]
    return length is not None and length >= MAPPED_MIN_BYTES


def reference(value: np.ndarray, name: str) -> onnx.TensorProto | None:
    """A mapped tensor ``name`` for ``value`` when it is a whole memory map of a file (what
    ``read`` and ``Spill.store`` return, not a view or a computed array), else None."""
    if not isinstance(value, np.memmap) or not isinstance(value.base, mmap.mmap) or value.filename is None:
        return None
    proto = onnx.TensorProto(name=name, dims=value.shape, data_location=onnx.TensorProto.EXTERNAL,
                             data_type=helper.np_dtype_to_tensor_dtype(value.dtype.newbyteorder("=")))
    for key, text in (("location", value.filename), ("offset", value.offset), ("length", value.nbytes)):
        proto.external_data.add(key=key, value=str(text))
    return proto


def transient(value: np.ndarray) -> np.ndarray:
    """``value`` to read once: a memory map of a file (``reference``) is mapped afresh, so the
    pages read leave memory with the returned array instead of staying with ``value``."""
    mapped = reference(value, "")
    return value if mapped is None else read(mapped)


def tensor(value: np.ndarray, name: str) -> onnx.TensorProto:
    """An initializer ``name`` holding ``value``: a mapped tensor for a memory map (``reference``),
    else the array's copy."""
    return reference(value, name) or numpy_helper.from_array(np.asarray(value), name)


class Spill:
    """A temporary file that large computed tensors are written to as soon as they exist, and
    files of their own, beside it, for arrays held only for a while (``apart``)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, "spill.data")
        self._file = open(self.path, "ab")
        self._apart = 0

    def store(self, value: np.ndarray) -> np.memmap:
        """``value`` written to the file; a read-only memory map of it there.

        Raises:
            OnnxMergeError: the file cannot be written (a full disk), in one line.
        """
        return _written(self._file, self.path, value)

    def apart(self, value: np.ndarray) -> np.memmap:
        """``value`` written to a file of its own, which ``discard`` removes; a read-only memory
        map of it (errors as ``store``)."""
        self._apart += 1
        path = os.path.join(self.folder, f"apart-{self._apart}.data")
        with open(path, "wb") as file:
            return _written(file, path, value)


def discard(array: np.memmap) -> None:
    """Remove the file of an array ``Spill.apart`` wrote (its pages go when the last map of
    it is closed)."""
    os.remove(array.filename)


def _written(file, path: str, value: np.ndarray) -> np.memmap:
    """``value`` appended to the open ``file`` at ``path``; a read-only memory map of it there.

    Raises:
        OnnxMergeError: the file cannot be written (a full disk), in one line.
    """
    data = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
    try:
        file.write(b"\0" * (-file.tell() % _ALIGNMENT))
        offset = file.tell()
        file.write(data.reshape(-1).view(np.uint8))  # its buffer as it is: no bytes copy
        file.flush()
    except OSError as error:
        raise OnnxMergeError(f"{path}: cannot write the spill file of computed weights ({error.strerror or error}); "
                             "free space there or set TMPDIR to a folder with room for the merged model") from error
    return np.memmap(path, dtype=data.dtype, mode="r", offset=offset, shape=value.shape)


_spill: Spill | None = None


_SPILL_PREFIX = "onnxmerge-spill-"


def spill() -> Spill:
    """This process's spill file, in a temporary folder removed at exit (``TMPDIR`` chooses
    where: it needs room for the merged model), named with this host and process id so that a
    later process removes it if this one is killed (``sweep_spills``)."""
    global _spill
    if _spill is None:
        sweep_spills(tempfile.gettempdir())
        folder = tempfile.mkdtemp(prefix=f"{_SPILL_PREFIX}{socket.gethostname()}-{os.getpid()}-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _spill = Spill(folder)
    return _spill


def sweep_spills(folder: str) -> None:
    """Remove the spill folders in ``folder`` that processes of this host left when killed
    (SIGKILL skips the removal at exit): those named with this host and a process id that no
    longer runs. Another host's folders (a shared ``TMPDIR``) are left alone."""
    pattern = re.compile(rf"{re.escape(_SPILL_PREFIX + socket.gethostname())}-(\d+)-\w+")
    for entry in os.scandir(folder):
        found = pattern.fullmatch(entry.name)
        if found and entry.is_dir(follow_symlinks=False) and not _running(int(found.group(1))):
            shutil.rmtree(entry.path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it runs
        return True
    return True


def kept(value: np.ndarray, mapped: bool) -> np.ndarray:
    """A computed tensor as a merge keeps it: when the models are ``mapped`` and it is large,
    spilled (a memory map of the spill file, which ``tensor`` writes as a reference), else as it is."""
    if mapped and value.size and value.nbytes >= MAPPED_MIN_BYTES and value.dtype.kind in "biufc" \
            and reference(value, "") is None:  # already a file's memory map: nothing to write
        return spill().store(value)
    return value


def row_bands(shape: tuple[int, ...]) -> list:
    """Slices of axis 0 of an array of ``shape`` holding about ``BAND_BYTES`` in float64 each
    (``...``, the whole array, for a scalar): elementwise work on them holds a band of rows at
    a time, not the array."""
    if not shape:
        return [...]
    step = max(1, BAND_BYTES // (8 * max(int(np.prod(shape[1:], dtype=np.int64)), 1)))
    return [slice(start, min(shape[0], start + step)) for start in range(0, shape[0], step)]


def read_rows(array: np.ndarray, rows: slice) -> np.ndarray:
    """``array[rows]`` as a new array; from a memory map of a file (a spilled array) read with
    a plain file read, so that its pages are not mapped into this process's memory (a map's
    pages that were read count in its resident memory until it is closed)."""
    if not isinstance(array, np.memmap) or array.filename is None or not array.flags.c_contiguous:
        return np.array(array[rows])
    row_bytes = array.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))
    start, stop, _ = rows.indices(len(array))
    count = (stop - start) * row_bytes // array.itemsize
    values = np.fromfile(array.filename, dtype=array.dtype, count=count, offset=array.offset + start * row_bytes)
    return values.reshape((stop - start,) + array.shape[1:])


def tile_pairs(n: int) -> list[tuple[slice, slice]]:
    """The (rows, cols) square tiles on and above the diagonal of an (n, n) float64 matrix,
    each about ``BAND_BYTES``: work on a tile and its mirror image holds two tiles at a time."""
    side = max(1, math.isqrt(BAND_BYTES // 8))
    bands = [slice(start, min(n, start + side)) for start in range(0, n, side)]
    return [(rows, cols) for k, rows in enumerate(bands) for cols in bands[k:]]


def symmetrize(matrix: np.ndarray) -> None:
    """``matrix`` := (matrix + matrix^T) / 2 in place, a tile at a time (each pair of entries
    gets the number the whole-matrix expression gives it: a + b is b + a in floating point)."""
    for rows, cols in tile_pairs(len(matrix)):
        mean = (matrix[rows, cols] + matrix[cols, rows].T) / 2
        matrix[rows, cols] = mean
        matrix[cols, rows] = mean.T


def session_parts(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str], list[np.ndarray]]:
    """What onnxruntime opens ``model`` from on a GPU: a copy whose mapped initializers are
    external stubs it does not read, and their names and values (memory maps) to pass as
    external initializers (``SessionOptions.add_external_initializers``), which it copies to
    the device. ``model`` is not modified."""
    mapped = [init for init in model.graph.initializer if is_mapped(init)]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # mapped tensors hold no data: a copy of the weightless model
    for init in copy.graph.initializer:
        if is_mapped(init):
            for entry in init.external_data:
                if entry.key == "location":
                    entry.value = _SESSION_LOCATION
    return copy, [init.name for init in mapped], [np.ascontiguousarray(read(init)) for init in mapped]


def as_inputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """What onnxruntime runs ``model`` from on the CPU: a copy whose mapped initializers are
    graph inputs, and their values (memory maps) to feed with every run, which onnxruntime
    reads in place (initializers it is given it copies). ``model`` is not modified."""
    mapped = [init for init in model.graph.initializer if is_mapped(init)]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    kept_inits = [init for init in copy.graph.initializer if not is_mapped(init)]
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(kept_inits)
    copy.graph.input.extend(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)) for init in mapped)
    return copy, {init.name: read(init) for init in mapped}
