"""Merge models trained in different frameworks (samples/mixed) and print the accuracy table.

Pairs: a scikit-learn MLP (digits 0-4) with a PyTorch MLP of another width (5-9), and a Keras
CNN (0-4, channels-last input) with a PyTorch CNN of the same design (5-9). Each merge is the
printed `onnxmerge merge` command; the merged CNN takes channels-first input, as the Keras
model does after `--input-layout`. Scores by `onnxmerge eval`, rows as in samples/digits/run.py.
Run from the repo root: python samples/mixed/run.py
"""

from __future__ import annotations

from pathlib import Path

from onnxmerge import api
from onnxmerge.graph.interface import channels_first_input
from onnxmerge.io import load_model, save_model

import digits_sample  # samples/mixed is on sys.path when this runs as a script

HERE = Path(__file__).resolve().parent



digits = digits_sample.load("run")  # run() prints and runs a command, row() formats
REL = HERE.relative_to(Path.cwd()) if HERE.is_relative_to(Path.cwd()) else HERE
TASKS = digits.TASKS
LAYOUTS = {"keras_cnn_a.onnx": "NHWC"}  # Keras keeps its channels-last input
MERGES = {"zip": [], "zip, 1.5x wide": ["--width", "1.5x"]}  # name -> merge options

PAIRS = {  # name -> (model A (0-4), its label, model B (5-9), its label, calibration, test data)
    "MLPs": (REL / "sklearn_mlp_a.onnx", "scikit-learn MLP A (0-4)", REL / "torch_mlp_b.onnx",
             "PyTorch MLP B (5-9)", REL / "calib.npz", REL / "test.npz"),
    "CNNs": (REL / "keras_cnn_a.onnx", "Keras CNN A (0-4)", REL / "torch_cnn_b.onnx", "PyTorch CNN B (5-9)",
             digits.CALIB, digits.TEST),
}


def channels_first(path: Path, out: Path) -> Path:
    """The model itself, or for a channels-last one a copy reading the channels-first test data."""
    if path.name not in LAYOUTS:
        return path
    target = out / f"{path.stem}_channels_first.onnx"
    save_model(channels_first_input(load_model(path), LAYOUTS[path.name], str(path)), target)
    return target


def main() -> None:
    out = digits.output_folder(__doc__.splitlines()[0], "onnxmerge-mixed-")
    rows = []
    for pair, (a, a_label, b, b_label, calib, test) in PAIRS.items():
        scored_a, both = channels_first(a, out), ",".join(TASKS)
        rows += [digits.row(a_label, api.evaluate([str(scored_a)], str(test), tasks=TASKS[0])[0]),
                 digits.row(b_label, api.evaluate([str(b)], str(test), tasks=TASKS[1])[0]),
                 digits.row(f"ensemble: {pair}", api.evaluate([str(scored_a), str(b)], str(test), tasks=both,
                                                              ensemble=True)[0])]
        layouts = [option for model in (a, b) if model.name in LAYOUTS
                   for option in ("--input-layout", f"{model.name}={LAYOUTS[model.name]}")]
        for merge, options in MERGES.items():
            target = out / ("".join(c if c.isalnum() else "_" for c in f"{merge} {pair}") + ".onnx")
            digits.run("merge", a, b, "--calib", calib, *layouts, *options, "-o", target,
                       "--report", target.with_suffix(".json"))
            digits.run("eval", target, "--data", test, "--tasks", both)
            rows.append(digits.row(f"{merge}: {pair}", api.evaluate([str(target)], str(test), tasks=both)[0]))
    digits.print_table(rows)
    print(f"\nmerged models and reports in {out}")


if __name__ == "__main__":
    main()
