"""Writing reports: JSON written atomically beside its target."""

from __future__ import annotations

import json
import os
import tempfile


def write_json(data: dict, path: str | os.PathLike) -> None:
    """Write ``data`` as indented JSON; the file appears complete or not at all."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".onnxmerge-", suffix=".json")
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(data, stream, indent=2, default=float)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
