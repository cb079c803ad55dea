"""Ranges of the numeric options, and how much memory a request may take.

Every numeric option has a range; a value outside it (NaN and infinities included) is refused
with one line naming the option, the value and the range. The CLI checks them while parsing
(``argument``: a usage error, exit 2) and the API functions check them again (``check_options``
and the ``check_*`` functions: ``RecipeError``), so a Python caller gets the same refusal.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Callable

from .choices import PARAMETERS
from .errors import RecipeError

MAX_SEED = 2**63 - 1
MAX_MULTIPLE = 1024.0
"""Largest ``widen --factor`` and ``merge --width`` multiple: a 1024 times wider model has a
million times the parameters of each layer (the memory check refuses most such requests anyway)."""
MAX_DEEPEN_PER_BLOCK = 8
"""deepen inserts at most this many identity blocks per block of the stages it can deepen:
far more than any use (each is a copy of a real block, so the model grows by that much) and few
enough to finish in seconds; run deepen again on its output for more."""


def _number(name: str, value, kind: type) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise RecipeError(f"{name} {value!r} is not {'a number' if kind is float else 'a whole number'}; "
                          f"give {'a number' if kind is float else 'an integer'}")
    if kind is float and not math.isfinite(value):
        raise RecipeError(f"{name} {value}: give a finite number")
    return value


def _range_text(low, high, low_open: bool, high_open: bool = False) -> str:
    if low is None and high is None:
        return "that is finite"
    if high is None:
        return f"{'above' if low_open else 'at least'} {low}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def check_range(name: str, value, low, high=None, *, kind: type = float, low_open: bool = False,
                high_open: bool = False) -> None:
    """Raise ``RecipeError`` unless ``value`` is a finite ``kind`` in [low, high] (open at the
    ends ``low_open`` and ``high_open`` say; no bound where ``low`` or ``high`` is None)."""
    _number(name, value, kind)
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    if not above or not below:
        raise RecipeError(f"{name} {value} is out of range: use a value "
                          f"{_range_text(low, high, low_open, high_open)}")


def check_seed(seed) -> None:
    check_range("--seed", seed, 0, MAX_SEED, kind=int)


def check_factor(factor) -> None:
    """``widen --factor``: a finite multiple in [1, MAX_MULTIPLE] (the memory it takes is checked later)."""
    _number("--factor", factor, float)
    if factor < 1:
        raise RecipeError(f"--factor {factor} would narrow the model; use a factor of at least 1")
    check_range("--factor", factor, 1.0, MAX_MULTIPLE)


def check_width(width) -> None:
    """``merge --width``: ``min``, None (the default) or a positive finite multiple."""
    if width is None or width == "min":
        return
    check_range("--width", width, 0, MAX_MULTIPLE, kind=float, low_open=True)


def check_options(options) -> None:
    """Every numeric field of ``api.MergeOptions`` in its range (the method parameters' ranges
    are ``choices.PARAMETERS``')."""
    for name, (_, _, _, allowed, bounds) in PARAMETERS.items():
        value = getattr(options, name)
        if bounds is not None:
            check_range(f"--{name.replace('_', '-')}", value, bounds[0], bounds[1], low_open=bounds[2],
                        high_open=bounds[3])
        elif allowed and value not in allowed:
            raise RecipeError(f"--{name.replace('_', '-')} {value!r}: use one of {', '.join(allowed)}")
    check_width(options.width)
    check_range("--max-loss", options.max_loss, 0.0, 1.0)
    check_range("--batch-size", options.batch_size, 1, kind=int)
    for name, value in (("--max-samples", options.max_samples), ("--repair-samples", options.repair_samples),
                        ("--ray-shards", options.ray_shards)):
        if value is not None:
            check_range(name, value, 1, kind=int)
    if options.zip_layers not in (None, "auto"):
        check_range("--zip-layers", options.zip_layers, 0, kind=int)
    check_seed(options.seed)


def argument(kind: type, low, high=None, *, low_open: bool = False, high_open: bool = False) -> Callable:
    """An argparse ``type=`` that reads a ``kind`` in the range (see ``check_range``)."""
    noun = "a number" if kind is float else "an integer"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        try:
            check_range("value", value, low, high, kind=kind, low_open=low_open, high_open=high_open)
        except RecipeError:
            where = "" if low is None and high is None else " " + _range_text(low, high, low_open, high_open)
            raise argparse.ArgumentTypeError(f"{text} is out of range: use {'a finite number' if kind is float else noun}"
                                             f"{where}") from None
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def available_memory() -> int | None:
    """Bytes of memory the system can still give (Linux MemAvailable, else free pages), or None."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(needed: int, what: str, fix: str) -> None:
    """Refuse, before allocating, a request estimated to need more than the available memory."""
    free = available_memory()
    if free is not None and needed > free:
        raise RecipeError(f"{what} would need about {format_bytes(needed)} of memory and {format_bytes(free)} "
                          f"is available; {fix}")


def format_bytes(count: int | float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if count < 1024 or unit == "PiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} EiB"  # not reached
