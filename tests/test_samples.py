"""README's main job runs end to end and prints the table it documents."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_digits_main_job(tmp_path):
    done = subprocess.run([sys.executable, "samples/digits/run.py", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = {m.group(1).strip(): float(m.group(2)) for m in re.finditer(r"^\| (.+?) \|\s+([\d.]+)%", done.stdout, re.M)}
    assert {"average", "permute", "zip (full)", "ensemble A+B"} <= set(rows)
    # the shape the literature reports: aligned merging beats plain averaging, the ensemble bounds all
    assert rows["average"] < rows["zip (full)"] <= rows["ensemble A+B"]
    assert rows["average"] < rows["zip, A + 2x wide B (full)"] <= rows["ensemble A+wide B"]
    # depth: every alignment merges into a working model far above averaging
    depth = [name for name in rows if name.startswith(("depth", "VGG depth"))]
    assert len(depth) == 9 and all(rows[name] > rows["average"] for name in depth)
    assert len(list(tmp_path.glob("*.onnx"))) == 18
