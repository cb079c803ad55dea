"""Data in one or more ``.npy``/``.npz`` files (shards of one data set, e.g. on shared storage),
read as one: array ``key`` is the files' ``key`` arrays one after the other along axis 0.

- Every file holds the same arrays (names); each array has one dtype and one sample shape (its
  shape past axis 0) in all files, and within each file every array used has the same number
  of samples. Each is checked from the headers before any data is read (calib/arrays.py reads
  and checks a single file), and a file that differs is named with the array.
- A ``.npy`` and an uncompressed ``.npz`` member stay memory-mapped; indexing the joined array
  (``Joined``) reads just the samples asked for, from the files that hold them.
- ``Files.piece`` describes samples ``rows`` as the files, their sizes and the sample range
  of each: a few hundred bytes to send to a Ray worker (calib/distributed.py), which opens the
  files itself (``Piece``, shared storage) and checks that they are the ones the driver read.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence

import numpy as np

from ..errors import CalibrationError
from .arrays import SINGLE, ArrayFile, describe

FIX = "save the inputs with numpy.save or numpy.savez"
_SAME = "save every calibration file with the same arrays, dtypes and sample shapes"
_WORKER = ("every Ray worker reads the calibration files at the paths the driver read them "
           "(shared storage, docs/scale.md)")


def label(paths: Sequence[str]) -> str:
    """How messages name a data set of these files."""
    return paths[0] if len(paths) == 1 else f"{paths[0]} .. {paths[-1]} ({len(paths)} files)"


def release(array) -> None:
    """Drop a memory-mapped array's pages from this process (they stay in the OS page cache):
    read pages count as resident memory, which would otherwise grow with the data set."""
    for part in array.parts if isinstance(array, Joined) else (array,):
        mapping = getattr(part, "_mmap", None)  # np.memmap keeps its mmap object here
        if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            mapping.madvise(mmap.MADV_DONTNEED)


class Joined:
    """Arrays of several files as one along axis 0, read only where indexed: ``joined[rows]``
    (a slice or indices of samples) is a new array of those samples, read from the files that
    hold them.

    Attributes:
        parts: the files' arrays, in order.
        shape, dtype, ndim: as of the concatenation.
    """

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self._starts = np.cumsum([0, *(len(part) for part in parts)])
        self.dtype = parts[0].dtype
        self.shape = (int(self._starts[-1]), *parts[0].shape[1:])
        self.ndim = len(self.shape)

    def __getitem__(self, rows: slice | np.ndarray) -> np.ndarray:
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(self.shape[0]))
        rows = np.asarray(rows)
        owner = np.searchsorted(self._starts, rows, side="right") - 1
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        for index in np.unique(owner):
            mine = owner == index
            out[mine] = self.parts[index][rows[mine] - self._starts[index]]
        return out


def _joined(parts: list[np.ndarray]):
    return parts[0] if len(parts) == 1 else Joined(parts)


def _cut(parts: list[np.ndarray], count: int) -> list[np.ndarray]:
    """The first ``count`` samples of the parts; a part read into memory (a compressed member)
    is copied, so that the samples dropped are freed, a memory map stays a view."""
    kept = []
    for part in parts:
        if count <= 0:
            break
        if len(part) > count:
            part = part[:count] if isinstance(part, np.memmap) else part[:count].copy()
        kept.append(part)
        count -= len(part)
    return kept


class Files:
    """The arrays of one or more files, as one data set (the module docstring); the interface
    calib/data.py reads: ``path``, ``keys``, ``get``, ``parts``, ``truncate``, ``close``.

    Args:
        paths: the files, in sample order.
        exclude: arrays that are no inputs (labels): never checked nor read.

    Raises:
        CalibrationError: a file cannot be read, or holds other arrays than the first file.
    """

    def __init__(self, paths: Sequence[str], exclude: tuple[str, ...] = ()):
        if not paths:
            raise CalibrationError("no calibration files given; give one or more .npz/.npy files")
        self.files = [ArrayFile(path, FIX) for path in paths]
        self.path = label([file.path for file in self.files])
        self.keys = [key for key in self.files[0].keys if key not in exclude]
        for file in self.files[1:]:
            keys = [key for key in file.keys if key not in exclude]
            if set(keys) != set(self.keys):
                raise CalibrationError(f"{file.path}: arrays {_names(keys)} where {self.files[0].path} has "
                                       f"{_names(self.keys)}; {_SAME}")
        self._parts: dict[str, list[np.ndarray]] = {}
        self._counts: tuple[str, list[int]] | None = None  # an array read first and its samples per file
        self._limit: int | None = None

    def get(self, key: str):
        """Array ``key`` of all files: a file's own array (memory-mapped when it can be) for one
        file, a ``Joined`` for several."""
        if key not in self._parts:
            self._parts[key] = self._read(key)
        return _joined(self._parts[key])

    def parts(self, key: str) -> list[tuple[str, np.ndarray]]:
        """Array ``key`` of each file (the samples in use) with the file's path."""
        self.get(key)
        return [(file.path, part) for file, part in zip(self.files, self._parts[key])]

    def _read(self, key: str) -> list[np.ndarray]:
        first = self.files[0].member(key)
        for file in self.files[1:]:
            member = file.member(key)
            if (member.dtype, member.shape[1:]) != (first.dtype, first.shape[1:]):
                raise CalibrationError(f"{file.path}: {describe(key)} has dtype {member.dtype} and samples of shape "
                                       f"{member.shape[1:]} where {self.files[0].path} has {first.dtype} and "
                                       f"{first.shape[1:]}; {_SAME}")
        counts = [file.member(key).shape[0] for file in self.files]
        if len(self.files) > 1 and self._counts is not None:
            other, known = self._counts
            for file, count, want in zip(self.files, counts, known):
                if count != want:
                    raise CalibrationError(f"{file.path}: {describe(key)} has {count} samples and {describe(other)} "
                                           f"{want}; give every input the same samples along axis 0 in each file")
        self._counts = self._counts or (key, counts)
        parts = [file.get(key) for file in self.files]
        return parts if self._limit is None else _cut(parts, self._limit)

    def truncate(self, count: int) -> None:
        """Use only the first ``count`` samples (of every array, read or not)."""
        self._limit = count
        self._parts = {key: _cut(parts, count) for key, parts in self._parts.items()}

    def close(self) -> None:
        """Close the .npz files; arrays already read stay usable."""
        for file in self.files:
            file.close()

    def piece(self, rows: slice | np.ndarray, keys: list[str]) -> tuple["Piece", np.ndarray | None]:
        """Samples ``rows`` (a slice of step 1, or indices) of arrays ``keys`` as a ``Piece``:
        the files (absolute paths) from the one of the lowest sample to the one of the highest,
        each with its range of samples, and the rows within the piece (None: all of it, in order)."""
        if isinstance(rows, slice):
            low, high, local = rows.start, rows.stop, None
        else:
            low, high = int(rows.min()), int(rows.max()) + 1
            local = rows - low
        lengths = [len(part) for part in self._parts[keys[0]]]
        ranges, start = [], 0
        for file, length in zip(self.files, lengths):
            if start < high and start + length > low:
                # absolute: a worker's working folder need not be the driver's
                ranges.append((os.path.abspath(file.path), os.path.getsize(file.path), max(low - start, 0),
                               min(high - start, length)))
            start += length
        layout = {key: (self.get(key).dtype, self.get(key).shape[1:]) for key in keys}
        return Piece(ranges, layout), local


class Piece:
    """Sample ranges of files that a ``Files`` checked, to be read by another process (a Ray
    worker): it holds the paths, sizes and ranges, and the arrays' dtypes and sample shapes,
    so it pickles small, and opens the files when first read, checking that each is the file
    the driver read (its size, the arrays' dtypes and sample shapes, enough samples).

    Attributes:
        path: what messages call the piece (the files and the samples).
        keys: the arrays it reads.
    """

    def __init__(self, ranges: list[tuple[str, int, int, int]], layout: dict[str, tuple[np.dtype, tuple[int, ...]]]):
        self.ranges, self.layout = ranges, layout
        self.keys = list(layout)
        first, last = ranges[0], ranges[-1]
        self.path = (f"{first[0]} [samples {first[2]}:{first[3]}]" if len(ranges) == 1 else
                     f"{first[0]} [samples {first[2]}:] .. {last[0]} [samples :{last[3]}] ({len(ranges)} files)")
        self._files: dict[str, ArrayFile] = {}
        self._arrays: dict[str, np.ndarray | Joined] = {}

    def __getstate__(self) -> dict:
        # what is sent is the description: files opened here are opened again where it is read
        return {**self.__dict__, "_files": {}, "_arrays": {}}

    def get(self, key: str):
        """Array ``key`` of the piece's samples, read from the files (memory-mapped where they can be)."""
        if key not in self._arrays:
            dtype, sample = self.layout[key]
            parts = []
            for path, size, start, stop in self.ranges:
                file = self._open(path, size)
                member = file.member(key)
                if member.dtype != dtype or member.shape[1:] != sample or member.shape[0] < stop:
                    raise CalibrationError(f"{path}: {describe(key)} has dtype {member.dtype} and shape {member.shape} "
                                           f"where the driver read {dtype}, samples of shape {sample} and at least "
                                           f"{stop} samples; {_WORKER}")
                parts.append(file.get(key)[start:stop])
            self._arrays[key] = _joined(parts)
        return self._arrays[key]

    def _open(self, path: str, size: int) -> ArrayFile:
        if path not in self._files:
            file = ArrayFile(path, _WORKER)
            if os.path.getsize(path) != size:
                raise CalibrationError(f"{path}: {os.path.getsize(path)} bytes where the driver read {size}; {_WORKER}")
            self._files[path] = file
        return self._files[path]


def _names(keys: list[str]) -> str:
    if keys == [SINGLE]:
        return "one unnamed array (a .npy)"
    return ", ".join(repr(key) for key in sorted(keys)) or "none"
