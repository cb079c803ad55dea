"""The main job: merge the shipped digits models every way and print the accuracy table.

Runs the same `onnxmerge` commands a user would (printed as it goes), in this process, and
writes the merged models and reports into a temporary folder (or --out).
Run from the repo root: python samples/digits/run.py
"""

from __future__ import annotations

import argparse
import shlex
import tempfile
from pathlib import Path

from onnxmerge import api
from onnxmerge.cli import main as onnxmerge

HERE = Path(__file__).resolve().parent
REL = HERE.relative_to(Path.cwd()) if HERE.is_relative_to(Path.cwd()) else HERE
A, B, B_WIDE = REL / "resnet_a.onnx", REL / "resnet_b.onnx", REL / "resnet_b_wide.onnx"
CALIB, TEST = REL / "calib.npz", REL / "test.npz"
TASKS = ("0-4", "5-9")

MERGES = {  # name -> (second model, extra merge options)
    "average": (B, ["--method", "average"]),
    "permute": (B, ["--method", "permute"]),
    "zip (full)": (B, ["--method", "zip"]),
    "zip (partial, 5 of 11 layers)": (B, ["--method", "zip", "--zip-layers", "5"]),
    "zip, no repair": (B, ["--method", "zip", "--repair", "none"]),
    "zip, BN folded + REPAIR": (B, ["--method", "zip", "--bn", "fold"]),
    "zip, A + 2x wide B (full)": (B_WIDE, ["--method", "zip"]),
    "zip, A + 2x wide B (partial 5/11)": (B_WIDE, ["--method", "zip", "--zip-layers", "5"]),
}


def run(*args: str) -> None:
    print("$ onnxmerge " + " ".join(shlex.quote(str(a)) for a in args), flush=True)
    if onnxmerge([str(a) for a in args]) != 0:
        raise SystemExit(f"onnxmerge {args[0]} failed")


def row(name: str, result: dict) -> str:
    tasks = [result["tasks"].get(t) for t in TASKS]
    cells = [f"{v:7.1%}" if v is not None else "      -" for v in [result["joint"], *tasks, result["average"]]]
    return f"| {name:34} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="keep the merged models here")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="onnxmerge-digits-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = [row("model A (0-4)", api.evaluate([str(A)], str(TEST), tasks=TASKS[0])[0]),
            row("model B (5-9)", api.evaluate([str(B)], str(TEST), tasks=TASKS[1])[0]),
            row("model 2x wide B (5-9)", api.evaluate([str(B_WIDE)], str(TEST), tasks=TASKS[1])[0]),
            row("ensemble A+B", api.evaluate([str(A), str(B)], str(TEST), tasks=",".join(TASKS), ensemble=True)[0]),
            row("ensemble A+wide B", api.evaluate([str(A), str(B_WIDE)], str(TEST), tasks=",".join(TASKS),
                                                  ensemble=True)[0])]
    for name, (second, options) in MERGES.items():
        target = out / ("".join(c if c.isalnum() else "_" for c in name).strip("_") + ".onnx")
        run("merge", A, second, "--calib", CALIB, *options, "-o", target, "--report", target.with_suffix(".json"))
        run("eval", target, "--data", TEST, "--tasks", ",".join(TASKS))
        rows.append(row(name, api.evaluate([str(target)], str(TEST), tasks=",".join(TASKS))[0]))
    print()
    print(f"| {'model':34} |   joint | task {TASKS[0]} | task {TASKS[1]} | average |")
    print(f"|{'-' * 36}|---------|----------|----------|---------|")
    print("\n".join(rows))
    print(f"\nmerged models and reports in {out}")


if __name__ == "__main__":
    main()
