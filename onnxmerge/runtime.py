"""onnxruntime, imported where a command first runs or folds a model.

onnxruntime comes with an extra, ``[cpu]`` (onnxruntime) or ``[gpu]`` (onnxruntime-gpu), never
both. Without it ``import onnxmerge`` and ``onnxmerge --help`` work, and a command that needs it
stops with one line saying what to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError

INSTALL = "pip install 'onnxmerge[cpu]' (or 'onnxmerge[gpu]' on a CUDA machine; never both)"


def import_optional(name: str, missing: str, install: str) -> ModuleType:
    """The module ``name`` of an optional extra.

    Raises:
        MissingDependencyError: it cannot be imported: ``missing`` (what is not installed), the
            import error, and ``install`` (the command that installs it).
    """
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise MissingDependencyError(f"{missing} ({error}); {install}") from None


def import_onnxruntime() -> ModuleType:
    """The onnxruntime module.

    Raises:
        MissingDependencyError: onnxruntime cannot be imported; the message names the extra.
    """
    onnxruntime = import_optional("onnxruntime", "onnxruntime is not installed", INSTALL)
    # every session onnxmerge opens, and graphsurgeon's constant folding, import it here first:
    # no usage events are queued from users' machines
    onnxruntime.disable_telemetry_events()
    return onnxruntime
