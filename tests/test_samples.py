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
    # the shape the literature reports: aligned merging beats plain averaging, the ensemble bounds it
    assert rows["average"] < rows["zip (full)"] <= rows["ensemble A+B"]
    # a merge as wide as 2x wide B holds both models' widths: it may beat their ensemble (98.0 vs 95.1)
    assert rows["average"] < rows["zip, A + 2x wide B (full)"]
    # depth: every alignment merges into a working model far above averaging
    depth = [name for name in rows if name.startswith(("depth", "VGG depth"))]
    assert len(depth) == 9 and all(rows[name] > rows["average"] for name in depth)
    assert len(list(tmp_path.glob("*.onnx"))) == 18


def test_hard_sample_files():
    """The shipped hard pair loads, its calibration and test files fit its input, and each model
    alone scores far above chance (20 %) on its own task (no merging: see samples/hard/run.py)."""
    import numpy as np
    import onnx

    from onnxmerge import api

    hard = ROOT / "samples" / "hard"
    calib, test = np.load(hard / "calib.npz"), np.load(hard / "test.npz")
    assert calib["input"].shape == (500, 1, 28, 28) and calib["input"].dtype == np.float32
    assert test["input"].shape[1:] == (1, 28, 28) and test["input"].dtype == np.float32
    assert test["y"].shape == (len(test["input"]),) and set(test["y"].tolist()) == set(range(10))
    for name, task in (("resnet_a", "0-4"), ("resnet_b", "5-9")):
        model = onnx.load(str(hard / f"{name}.onnx"))
        onnx.checker.check_model(model)
        dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        assert dims[1:] == [1, 28, 28] and isinstance(dims[0], str)  # dynamic batch axis
        assert not any(node.op_type == "BatchNormalization" for node in model.graph.node)  # exported folded
        assert api.evaluate([str(hard / f"{name}.onnx")], str(hard / "test.npz"), tasks=task)[0]["tasks"][task] > 0.9
