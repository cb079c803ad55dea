"""The package layers import downwards only (docs/architecture.md): graph < calib < match <
rewrite < stages; no lower layer imports a higher one."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "onnxmerge"
ORDER = ["graph", "calib", "match", "rewrite", "stages"]
IMPORT = re.compile(r"^\s*from \.\.(\w+)", re.M)


def test_layers_import_downwards_only():
    upward = []
    for rank, layer in enumerate(ORDER):
        for path in (PACKAGE / layer).glob("*.py"):
            for target in IMPORT.findall(path.read_text()):
                if target in ORDER and ORDER.index(target) > rank:
                    upward.append(f"{layer}/{path.name} imports {target}")
    assert upward == []
