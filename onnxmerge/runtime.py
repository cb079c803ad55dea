"""onnxruntime, imported where it is first needed (it is slow to import), with telemetry off."""

from __future__ import annotations


def runtime():
    """The onnxruntime module, its telemetry events disabled before any session exists.

    Every session onnxmerge opens goes through ``calib.capture.open_session``, which calls
    this; so does canonicalisation before onnx-graphsurgeon folds constants in onnxruntime.
    """
    import onnxruntime

    onnxruntime.disable_telemetry_events()  # no usage events queued from users' machines
    return onnxruntime
