"""Reading ``.npy`` and ``.npz`` files without trusting them (calibration data, statistics, test data).

Every array's header is read and checked before any of its data:

- the declared shape and dtype must fit in what the file (or zip member) really holds, so a
  header that declares 2^46 elements in a small file is refused, never allocated;
- arrays of Python objects are refused: they are pickles, which are never loaded
  (``allow_pickle`` stays False);
- a ``.npy`` file and an uncompressed ``.npz`` member (``numpy.savez``) are memory-mapped, so
  they take no memory up front whatever their size; a compressed member (``numpy.savez_compressed``)
  must be decompressed into memory, so it is refused when it would take more than half the
  available memory, or when it expands more than ``MAX_RATIO`` times to more than ``BOMB_BYTES``
  (a zip bomb; constant data, which compresses that well, is no use either).

Arrays are read only when asked for (``ArrayFile.get``), so arrays no caller uses are never read.
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from math import prod

import numpy as np

from ..errors import CalibrationError
from ..limits import available_memory, format_bytes

# what a cut or corrupt .npy/.npz raises on the way through zipfile, zlib and numpy's header reader
_CORRUPT = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, struct.error, NotImplementedError,
            RuntimeError)

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK"
SINGLE = ""  # the key of a .npy file's one array
MAX_RATIO = 100
BOMB_BYTES = 256 << 20
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # a zip local file header, up to the name (30 bytes)


@dataclass(frozen=True)
class Member:
    """One array of a file, as its header declares it.

    Attributes:
        key: the array's name (``SINGLE`` for a .npy).
        shape, dtype, fortran: from the header.
        offset: where the data starts in the file when it can be memory-mapped, else None
            (a compressed member).
    """

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int | None

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize


def mapped(path: str, member: Member) -> np.memmap:
    """The data of ``member`` of file ``path`` memory-mapped, read-only (``member.offset`` set, some data)."""
    return np.memmap(path, dtype=member.dtype, mode="r", offset=member.offset, shape=member.shape,
                     order="F" if member.fortran else "C")


def describe(key: str) -> str:
    return "the array" if key == SINGLE else f"array {key!r}"


class ArrayFile:
    """The arrays of one .npy or .npz file, their headers checked on first use.

    Args:
        path: the file.
        fix: the end of every error message: what to do (e.g. "save the inputs with numpy.savez").
    """

    def __init__(self, path: str | os.PathLike, fix: str):
        self.path, self.fix = str(path), fix
        self._zip: zipfile.ZipFile | None = None
        self._members: dict[str, Member] = {}
        self._loaded: dict[str, np.ndarray] = {}
        try:
            with open(self.path, "rb") as handle:
                magic = handle.read(len(NPY_MAGIC))
            self._size = os.path.getsize(self.path)
        except OSError as error:
            raise CalibrationError(f"{self.path}: cannot read ({error.strerror}); {fix}") from error
        if magic.startswith(NPY_MAGIC):
            self.kind, self.keys, self._infos = "npy", [SINGLE], {}
        elif magic.startswith(ZIP_MAGIC):
            self.kind = "npz"
            try:
                self._zip = zipfile.ZipFile(self.path)
            except _CORRUPT as error:
                raise self._error(f"cannot read as .npz ({error})") from error
            self._infos = {(info.filename[:-4] if info.filename.endswith(".npy") else info.filename): info
                           for info in self._zip.infolist() if not info.is_dir()}
            self.keys = list(self._infos)
        else:
            raise self._error("not a .npy or .npz file")

    def _error(self, text: str, key: str | None = None, fix: str | None = None) -> CalibrationError:
        where = "" if key is None else f"{describe(key)}: "
        return CalibrationError(f"{self.path}: {where}{text}; {fix or self.fix}")

    def member(self, key: str) -> Member:
        """The header of array ``key``, checked (see the module docstring)."""
        if key not in self._members:
            try:
                member = self._npy_member() if self.kind == "npy" else self._zip_member(key)
            except _CORRUPT as error:
                raise self._error(f"cannot read the array header ({error})", key) from error
            self._members[key] = member
        return self._members[key]

    def _header(self, stream, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
        version = np.lib.format.read_magic(stream)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(stream)
        if dtype.hasobject:
            raise self._error(f"holds Python objects (dtype {dtype}), i.e. a pickle, which onnxmerge never loads", key)
        if any(dim < 0 for dim in shape):
            raise self._error(f"its header declares the negative shape {shape}", key)
        return tuple(int(d) for d in shape), bool(fortran), dtype

    def _too_big(self, key: str, shape, dtype, held: int) -> CalibrationError:
        declared = prod(shape) * dtype.itemsize
        return self._error(f"its header declares {prod(shape)} elements of {dtype} (shape {shape}, "
                           f"{format_bytes(declared)}) but the file holds only {format_bytes(held)} for it: "
                           "the file is damaged or truncated", key)

    def _npy_member(self) -> Member:
        with open(self.path, "rb") as handle:
            shape, fortran, dtype = self._header(handle, SINGLE)
            offset = handle.tell()
        if prod(shape) * dtype.itemsize > self._size - offset:
            raise self._too_big(SINGLE, shape, dtype, self._size - offset)
        return Member(SINGLE, shape, dtype, fortran, offset)

    def _zip_member(self, key: str) -> Member:
        info = self._infos.get(key)
        if info is None:
            raise self._error(f"no such array (arrays found: {', '.join(map(repr, self.keys)) or 'none'})", key)
        if info.flag_bits & 0x1:
            raise self._error("the zip member is encrypted", key)
        with self._zip.open(info) as stream:
            if stream.read(len(NPY_MAGIC)) != NPY_MAGIC:
                raise self._error("is not a numpy array (no .npy header)", key)
            stream.seek(0)
            shape, fortran, dtype = self._header(stream, key)
            header = stream.tell()
        declared = prod(shape) * dtype.itemsize
        if declared > info.file_size - header:
            raise self._too_big(key, shape, dtype, max(0, info.file_size - header))
        if info.compress_type == zipfile.ZIP_STORED:
            with open(self.path, "rb") as handle:
                handle.seek(info.header_offset)
                fields = _LOCAL_HEADER.unpack(handle.read(_LOCAL_HEADER.size))
            if fields[0] != b"PK\x03\x04":
                raise self._error("the zip member's local header is damaged", key)
            offset = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1] + header
            if offset + declared > self._size:
                raise self._too_big(key, shape, dtype, max(0, self._size - offset))
            return Member(key, shape, dtype, fortran, offset)
        self._check_expansion(key, info)
        return Member(key, shape, dtype, fortran, None)

    def _check_expansion(self, key: str, info: zipfile.ZipInfo) -> None:
        """A compressed member is decompressed into memory: refuse zip bombs and members that
        would not fit, from the sizes the zip declares, before reading any data."""
        size, packed = info.file_size, max(1, info.compress_size)
        if size > BOMB_BYTES and size > MAX_RATIO * packed:
            raise self._error(f"the compressed member expands from {format_bytes(packed)} to {format_bytes(size)} "
                              f"({size // packed}x): a zip bomb, or constant data", key,
                              "save genuine data uncompressed with numpy.savez (it is then memory-mapped)")
        free = available_memory()
        if free is not None and size > free // 2:
            raise self._error(f"the compressed member decompresses to {format_bytes(size)}, more than half the "
                              f"{format_bytes(free)} of memory available", key,
                              "save it uncompressed with numpy.savez (it is then memory-mapped) or save fewer samples")

    def get(self, key: str) -> np.ndarray:
        """Array ``key``: memory-mapped (read-only) when it can be, else read into memory; kept."""
        if key not in self._loaded:
            member = self.member(key)
            try:
                self._loaded[key] = self._read(member)
            except _CORRUPT as error:
                raise self._error(f"cannot read the array ({error})", key) from error
        return self._loaded[key]

    def _read(self, member: Member) -> np.ndarray:
        if member.nbytes == 0:
            return np.empty(member.shape, member.dtype, order="F" if member.fortran else "C")
        if member.offset is not None:
            return mapped(self.path, member)
        if self._zip is None:
            raise ValueError("the file was closed before the array was read")
        with self._zip.open(self._infos[member.key]) as stream:
            return np.lib.format.read_array(stream, allow_pickle=False)

    def close(self) -> None:
        """Close the .npz file; arrays already read stay usable, others can no longer be read."""
        if self._zip is not None:
            self._zip.close()
            self._zip = None
