"""onnxruntime, imported where a command first runs or folds a model.

onnxruntime comes with an extra, ``[cpu]`` (onnxruntime) or ``[gpu]`` (onnxruntime-gpu), never
both. Without it ``import onnxmerge`` and ``onnxmerge --help`` work, and a command that needs it
stops with one line saying what to install.
"""

from __future__ import annotations

from types import ModuleType

from .errors import MissingDependencyError

INSTALL = "pip install 'onnxmerge[cpu]' (or 'onnxmerge[gpu]' on a CUDA machine; never both)"


def import_onnxruntime() -> ModuleType:
    """The onnxruntime module.

    Raises:
        MissingDependencyError: onnxruntime cannot be imported; the message names the extra.
    """
    try:
        import onnxruntime
    except ImportError as error:
        raise MissingDependencyError(f"onnxruntime is not installed ({error}); {INSTALL}") from None
    # every session onnxmerge opens, and graphsurgeon's constant folding, import it here first:
    # no usage events are queued from users' machines
    onnxruntime.disable_telemetry_events()
    return onnxruntime
