"""onnxmerge: aligned (permutation / ZipIt!-style) merging of neural networks at the ONNX graph
level, including networks of different widths and depths.

    import onnxmerge
    result = onnxmerge.merge(["a.onnx", "b.onnx"], calibration=inputs)  # paths or ModelProto; arrays or files
    result.save("merged.onnx")

The public functions (docs/api.md) are ``merge``, ``run`` (a recipe file), ``inspect``,
``permute``, ``widen``, ``deepen``, ``align``, ``calibrate`` and ``evaluate``; errors a user can
fix are ``OnnxMergeError`` and its subclasses. Everything else is internal.
"""

from __future__ import annotations

import importlib

from .errors import CalibrationError, InvalidModelError, OnnxMergeError, RecipeError, UnsupportedGraphError

__version__ = "0.1.0"

# Public name -> the module defining it, imported on first use so that `import onnxmerge` and
# `onnxmerge --help` stay fast (the pipeline pulls in onnxruntime, scipy and graph tools).
_LAZY = {
    "merge": "api", "run": "api", "inspect": "models", "permute": "models", "widen": "models", "deepen": "models",
    "align": "api", "calibrate": "api", "evaluate": "api", "MergeResult": "results",
    "MergeOptions": "options", "Recipe": "recipe", "read_recipe": "recipe",
    "describe_alignment": "depth", "save_stats": "calib.stats", "load_stats": "calib.stats",
    "load_model": "io", "save_model": "io",
}
__all__ = ["__version__", "OnnxMergeError", "InvalidModelError", "UnsupportedGraphError", "CalibrationError",
           "RecipeError", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'onnxmerge' has no attribute {name!r}")
    module = importlib.import_module(f".{_LAZY[name]}", __name__)
    value = getattr(module, "describe" if name == "describe_alignment" else name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
