"""Framework-to-ONNX converters that keep models mergeable; see docs/converters.md.

Each module runs in its own framework's environment and is also a script
(``python converters/<module>.py --help``). Nothing here is imported by onnxmerge.
"""
