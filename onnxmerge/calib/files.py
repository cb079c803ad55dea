"""Data in one or more ``.npy``/``.npz`` files (shards of one data set, e.g. on shared storage),
read as one: array ``key`` is the files' ``key`` arrays one after the other along axis 0.

- Every file holds the same arrays (names); each array has one dtype and one sample shape (its
  shape past axis 0) in all files, and within each file every array used has the same number
  of samples. Each is checked from the headers before any data is read (calib/arrays.py reads
  and checks a single file), and a file that differs is named with the array.
- A ``.npy`` and an uncompressed ``.npz`` member are memory-mapped only while they are read
  (``Mapped``): a set of thousands of files holds no file open, and the pages read leave this
  process at once. A compressed member is read into memory when first used.
- ``Files.piece`` describes samples ``rows`` as the files, their sizes and the sample range
  of each: a few hundred bytes to send to a Ray worker (calib/distributed.py), which opens the
  files itself (``Piece``, shared storage) and checks that they are the ones the driver read.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..errors import CalibrationError
from .arrays import SINGLE, ArrayFile, Member, describe, mapped

FIX = "save the inputs with numpy.save or numpy.savez"
_SAME = "save every calibration file with the same arrays, dtypes and sample shapes"
_WORKER = ("every Ray worker reads the calibration files at the paths the driver read them "
           "(shared storage, docs/scale.md)")


def label(paths: Sequence[str]) -> str:
    """How messages name a data set of these files."""
    return paths[0] if len(paths) == 1 else f"{paths[0]} .. {paths[-1]} ({len(paths)} files)"


class Mapped:
    """Samples ``start:stop`` of an array that can be memory-mapped, mapped while indexed only:
    ``mapped[rows]`` (a slice or indices of those samples) is an array of those samples, a view
    of a mapping of its own for a slice. A mapping keeps a file descriptor, so holding one per
    file would stop sets of more files than the process may open.

    Attributes:
        shape, dtype, ndim: of the samples ``start:stop``.
    """

    def __init__(self, path: str, member: Member, start: int = 0, stop: int | None = None):
        self.path, self.member = path, member
        self.start, self.stop = start, member.shape[0] if stop is None else stop
        self.dtype = member.dtype
        self.shape = (self.stop - self.start, *member.shape[1:])
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def window(self, start: int, stop: int) -> "Mapped":
        """Samples ``start:stop`` of these, still unread."""
        return Mapped(self.path, self.member, self.start + start, self.start + min(stop, len(self)))

    def __getitem__(self, rows: slice | np.ndarray) -> np.ndarray:
        return mapped(self.path, self.member)[self.start:self.stop][rows]  # a slice: a view, unmapped when dropped


class Joined:
    """Arrays of several files as one along axis 0, read only where indexed: ``joined[rows]``
    (a slice or indices of samples) is a new array of those samples, read from the files that
    hold them.

    Attributes:
        shape, dtype, ndim: as of the concatenation.
    """

    def __init__(self, parts: list[Mapped | np.ndarray]):
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


def _joined(parts: list[Mapped | np.ndarray]) -> Mapped | np.ndarray | Joined:
    return parts[0] if len(parts) == 1 else Joined(parts)


def _window(part: Mapped | np.ndarray, start: int, stop: int) -> Mapped | np.ndarray:
    """Samples ``start:stop`` of a part; one read into memory is copied, so that the samples
    left out are freed."""
    return part.window(start, stop) if isinstance(part, Mapped) else part[start:stop].copy()


def _part(path: str, key: str, fix: str) -> tuple[Member, Mapped | np.ndarray]:
    """Array ``key`` of one file: its checked header, and the array as ``Mapped`` when it can be
    memory-mapped, else read (a compressed .npz member, or no data); the file is left closed."""
    file = ArrayFile(path, fix)
    try:
        member = file.member(key)
        return member, Mapped(path, member) if member.offset is not None and member.nbytes else file.get(key)
    finally:
        file.close()


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
        self.paths = list(paths)
        self.path = label(self.paths)
        names = []
        for path in self.paths:
            file = ArrayFile(path, FIX)
            file.close()
            names.append([key for key in file.keys if key not in exclude])
            if set(names[-1]) != set(names[0]):
                raise CalibrationError(f"{path}: arrays {_names(names[-1])} where {self.paths[0]} has "
                                       f"{_names(names[0])}; {_SAME}")
        self.keys = names[0]
        self._parts: dict[str, list[Mapped | np.ndarray]] = {}
        self._counts: tuple[str, list[int]] | None = None  # an array read first and its samples per file
        self._limit: int | None = None

    def get(self, key: str) -> Mapped | np.ndarray | Joined:
        """Array ``key`` of all files: one file's own array, or a ``Joined`` of several."""
        if key not in self._parts:
            self._parts[key] = self._read(key)
        return _joined(self._parts[key])

    def parts(self, key: str) -> list[tuple[str, Mapped | np.ndarray]]:
        """Array ``key`` of each file (the samples in use) with the file's path."""
        self.get(key)
        return list(zip(self.paths, self._parts[key]))

    def _read(self, key: str) -> list[Mapped | np.ndarray]:
        members, parts = zip(*(_part(path, key, FIX) for path in self.paths))
        first = members[0]
        for path, member in zip(self.paths[1:], members[1:]):
            if (member.dtype, member.shape[1:]) != (first.dtype, first.shape[1:]):
                raise CalibrationError(f"{path}: {describe(key)} has dtype {member.dtype} and samples of shape "
                                       f"{member.shape[1:]} where {self.paths[0]} has {first.dtype} and "
                                       f"{first.shape[1:]}; {_SAME}")
        counts = [member.shape[0] for member in members]
        if len(self.paths) > 1 and self._counts is not None:
            other, known = self._counts
            for path, count, want in zip(self.paths, counts, known):
                if count != want:
                    raise CalibrationError(f"{path}: {describe(key)} has {count} samples and {describe(other)} "
                                           f"{want}; give every input the same samples along axis 0 in each file")
        self._counts = self._counts or (key, counts)
        return list(parts) if self._limit is None else _cut(list(parts), self._limit)

    def truncate(self, count: int) -> None:
        """Use only the first ``count`` samples (of every array, read or not)."""
        self._limit = count
        self._parts = {key: _cut(parts, count) for key, parts in self._parts.items()}

    def close(self) -> None:
        """Nothing to close: the files are open only while read."""

    def piece(self, rows: slice | np.ndarray, keys: list[str]) -> tuple["Piece", np.ndarray | None]:
        """Samples ``rows`` (a slice of step 1, or indices) of arrays ``keys`` as a ``Piece``:
        the files (absolute paths) from the one of the lowest sample to the one of the highest,
        each with its range of samples, and the rows within the piece (None: all of it, in order)."""
        if isinstance(rows, slice):
            low, high, local = rows.start, rows.stop, None
        else:
            low, high = int(rows.min()), int(rows.max()) + 1
            local = rows - low
        ranges, start = [], 0
        for path, part in zip(self.paths, self._parts[keys[0]]):
            if start < high and start + len(part) > low:
                # absolute: a worker's working folder need not be the driver's
                ranges.append((os.path.abspath(path), os.path.getsize(path), max(low - start, 0),
                               min(high - start, len(part))))
            start += len(part)
        layout = {key: (self.get(key).dtype, self.get(key).shape[1:]) for key in keys}
        return Piece(ranges, layout), local


def _cut(parts: list[Mapped | np.ndarray], count: int) -> list[Mapped | np.ndarray]:
    """The first ``count`` samples of the parts."""
    kept = []
    for part in parts:
        if count <= 0:
            break
        kept.append(part if len(part) <= count else _window(part, 0, count))
        count -= len(part)
    return kept


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
        self._arrays: dict[str, Mapped | np.ndarray | Joined] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": {}}  # what is sent is the description, never data read here

    def get(self, key: str) -> Mapped | np.ndarray | Joined:
        """Array ``key`` of the piece's samples, read from the files."""
        if key not in self._arrays:
            dtype, sample = self.layout[key]
            parts = []
            for path, size, start, stop in self.ranges:
                member, part = _part(path, key, _WORKER)
                if os.path.getsize(path) != size:
                    raise CalibrationError(f"{path}: {os.path.getsize(path)} bytes where the driver read {size}; "
                                           f"{_WORKER}")
                if member.dtype != dtype or member.shape[1:] != sample or member.shape[0] < stop:
                    raise CalibrationError(f"{path}: {describe(key)} has dtype {member.dtype} and shape {member.shape} "
                                           f"where the driver read {dtype}, samples of shape {sample} and at least "
                                           f"{stop} samples; {_WORKER}")
                parts.append(_window(part, start, stop))
            self._arrays[key] = _joined(parts)
        return self._arrays[key]


def _names(keys: list[str]) -> str:
    if keys == [SINGLE]:
        return "one unnamed array (a .npy)"
    return ", ".join(repr(key) for key in sorted(keys)) or "none"
