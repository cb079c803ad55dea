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
A_DEEP = REL / "resnet_a_deep.onnx"
VGG_A, VGG_B, VGG_A_DEEP = REL / "vgg_a.onnx", REL / "vgg_b.onnx", REL / "vgg_a_deep.onnx"
CALIB, TEST = REL / "calib.npz", REL / "test.npz"
TASKS = ("0-4", "5-9")

MERGES = {  # name -> (first model, second model, extra merge options)
    "average": (A, B, ["--method", "average"]),
    "permute": (A, B, ["--method", "permute"]),
    "zip (full)": (A, B, ["--method", "zip"]),
    "zip (partial, 5 of 11 layers)": (A, B, ["--method", "zip", "--zip-layers", "5"]),
    "zip, no repair": (A, B, ["--method", "zip", "--repair", "none"]),
    "zip, BN folded + REPAIR": (A, B, ["--method", "zip", "--bn", "fold"]),
    "zip, A + 2x wide B (full)": (A, B_WIDE, ["--method", "zip"]),
    "zip, A + 2x wide B (partial 5/11)": (A, B_WIDE, ["--method", "zip", "--zip-layers", "5"]),
    "depth: deep A + B, SMA": (A_DEEP, B, ["--align", "sma"]),
    "depth: deep A + B, LMA": (A_DEEP, B, ["--align", "lma"]),
    "depth: deep A + B, uniform": (A_DEEP, B, ["--align", "uniform"]),
    "depth: deep A + B, head-tail": (A_DEEP, B, ["--align", "head-tail"]),
    "depth+width: deep A + wide B, SMA": (A_DEEP, B_WIDE, ["--align", "sma"]),
    "VGG: A + B (zip)": (VGG_A, VGG_B, []),
    "VGG depth: deep A + B, SMA": (VGG_A_DEEP, VGG_B, ["--align", "sma"]),
    "VGG depth: deep A + B, LMA": (VGG_A_DEEP, VGG_B, ["--align", "lma"]),
    "VGG depth: deep A + B, uniform": (VGG_A_DEEP, VGG_B, ["--align", "uniform"]),
    "VGG depth: deep A + B, head-tail": (VGG_A_DEEP, VGG_B, ["--align", "head-tail"]),
}
SOURCES = {  # name -> (models, tasks): single models and output ensembles
    "model A (0-4)": ([A], TASKS[0]),
    "model B (5-9)": ([B], TASKS[1]),
    "model 2x wide B (5-9)": ([B_WIDE], TASKS[1]),
    "model deep A (0-4)": ([A_DEEP], TASKS[0]),
    "ensemble A+B": ([A, B], ",".join(TASKS)),
    "ensemble A+wide B": ([A, B_WIDE], ",".join(TASKS)),
    "ensemble deep A+B": ([A_DEEP, B], ",".join(TASKS)),
    "VGG model A (0-4)": ([VGG_A], TASKS[0]),
    "VGG model deep A (0-4)": ([VGG_A_DEEP], TASKS[0]),
    "VGG model B (5-9)": ([VGG_B], TASKS[1]),
    "VGG ensemble A+B": ([VGG_A, VGG_B], ",".join(TASKS)),
    "VGG ensemble deep A+B": ([VGG_A_DEEP, VGG_B], ",".join(TASKS)),
}


def run(*args: str) -> None:
    print("$ onnxmerge " + " ".join(shlex.quote(str(a)) for a in args), flush=True)
    if onnxmerge([str(a) for a in args]) != 0:
        raise SystemExit(f"onnxmerge {args[0]} failed")


def row(name: str, result: dict) -> str:
    tasks = [result["tasks"].get(t) for t in TASKS]
    cells = [f"{v:7.1%}" if v is not None else "      -" for v in [result["joint"], *tasks, result["average"]]]
    return f"| {name:36} | " + " | ".join(cells) + " |"


def print_table(rows: list[str]) -> None:
    print()
    print(f"| {'model':36} |   joint | task {TASKS[0]} | task {TASKS[1]} | average |")
    print(f"|{'-' * 38}|---------|----------|----------|---------|")
    print("\n".join(rows))


def output_folder(description: str, prefix: str) -> Path:
    """The folder of ``--out`` (created), or a fresh temporary one named with ``prefix``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, help="keep the merged models here")
    out = parser.parse_args().out or Path(tempfile.mkdtemp(prefix=prefix))
    out.mkdir(parents=True, exist_ok=True)
    return out


def main() -> None:
    out = output_folder(__doc__.splitlines()[0], "onnxmerge-digits-")
    rows = [row(name, api.evaluate([str(m) for m in models], str(TEST), tasks=tasks, ensemble=len(models) > 1)[0])
            for name, (models, tasks) in SOURCES.items()]
    for name, (first, second, options) in MERGES.items():
        target = out / ("".join(c if c.isalnum() else "_" for c in name).strip("_") + ".onnx")
        run("merge", first, second, "--calib", CALIB, *options, "-o", target, "--report", target.with_suffix(".json"))
        run("eval", target, "--data", TEST, "--tasks", ",".join(TASKS))
        rows.append(row(name, api.evaluate([str(target)], str(TEST), tasks=",".join(TASKS))[0]))
    print_table(rows)
    print(f"\nmerged models and reports in {out}")


if __name__ == "__main__":
    main()
