"""Every Python code block of README.md and docs/*.md runs, from a folder where the shipped
samples are where the docs say (the repository root's relative paths)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _blocks() -> list[tuple[str, str]]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [(f"{page.name}#{index}", code) for page in pages
            for index, code in enumerate(BLOCK.findall(page.read_text()))]


def test_the_docs_have_python_examples():
    assert any(name.startswith("api.md") for name, _ in _blocks())


@pytest.mark.parametrize("name, code", _blocks(), ids=[name for name, _ in _blocks()])
def test_code_block_runs(tmp_path, name, code):
    (tmp_path / "samples").symlink_to(ROOT / "samples")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{name} failed:\n{done.stderr[-3000:]}"
