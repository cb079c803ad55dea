"""The digits sample's scripts as modules (its data split, training loop, export, table rows, output folder),
so the mixed sample reuses them instead of repeating them."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

DIGITS = Path(__file__).resolve().parent.parent / "digits"


def load(script: str) -> ModuleType:
    """``samples/digits/<script>.py`` imported as a module."""
    path = DIGITS / f"{script}.py"
    spec = importlib.util.spec_from_file_location(f"digits_{script}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
