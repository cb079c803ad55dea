"""Progress bars (tqdm, on stderr) for the loops that can take seconds: calibration batches,
CKA, BN reset and REPAIR passes, matching per capture unit, canonicalisation per model and
``--zip-layers auto`` cuts. Shown only when stderr is a terminal, never with ``--quiet``.
And the stage timings of a merge (``-v`` logs them, the report holds them)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("onnxmerge.api")
_quiet = False


def set_quiet(quiet: bool) -> None:
    """Hide (True) or allow (False, the default) progress bars for the rest of the process."""
    global _quiet
    _quiet = quiet


def progress(items: Iterable[T], what: str, total: int | None = None, unit: str = "it") -> Iterator[T] | Iterable[T]:
    """``items`` with a bar named ``what``; ``total`` when ``items`` has no length."""
    if _quiet or not sys.stderr.isatty():
        return items
    from tqdm import tqdm  # only when a bar is drawn: keeps start-up light

    return tqdm(items, desc=what, total=total, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)


def lap(timings: dict[str, float], stage: str, start: float) -> float:
    """Add the seconds since ``start`` (``time.perf_counter``) to ``timings[stage + "_s"]``,
    log them (``-v``) and return the time now."""
    now = time.perf_counter()
    timings[f"{stage}_s"] = timings.get(f"{stage}_s", 0.0) + now - start
    log.info("%s: %.2f s", stage, timings[f"{stage}_s"])
    return now
