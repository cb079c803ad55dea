"""The hard sample: how much an aligned merge loses on augmented 28x28 digits (issue 11).

Merges the shipped pair (ResNets with BN folded, model A on 0-4, model B on 5-9) with
onnxmerge's public API: full zip (REPAIR, the default repair of BN-folded models),
--zip-layers N for every N from 1 to the number of weight layers, --zip-layers auto and
permute, and prints a Markdown table of joint accuracy, per-task accuracy and the ratio of the
joint accuracy to the ensemble's. Each merge's CLI equivalent is printed as it runs.
Run from the repo root: python samples/hard/run.py [--out DIR] [--layers 1,4,16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import onnx

from onnxmerge import api
from onnxmerge.io import save_model

HERE = Path(__file__).resolve().parent
REL = HERE.relative_to(Path.cwd()) if HERE.is_relative_to(Path.cwd()) else HERE
A, B = REL / "resnet_a.onnx", REL / "resnet_b.onnx"
CALIB, TEST = REL / "calib.npz", REL / "test.npz"
TASKS = ("0-4", "5-9")


def weight_layers(path: Path) -> int:
    """Conv, Gemm and MatMul nodes of a source model (what --zip-layers counts)."""
    return sum(node.op_type in ("Conv", "Gemm", "MatMul") for node in onnx.load(str(path)).graph.node)


def row(name: str, result: dict, ensemble: float, seconds: float | None = None) -> str:
    tasks = [result["tasks"].get(t) for t in TASKS]
    cells = [f"{v:7.1%}" if v is not None else "      -" for v in [result["joint"], *tasks]]
    ratio = f"{result['joint'] / ensemble:6.1%}"
    took = f"{seconds:5.1f}" if seconds is not None else "    -"
    return f"| {name:28} | " + " | ".join(cells) + f" | {ratio} | {took} |"


def merge(name: str, options: dict, out: Path) -> tuple[dict, float, dict]:
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in options.items())
    print(f"$ onnxmerge merge {A} {B} --calib {CALIB} {flags} -o {name}.onnx", flush=True)
    clock = time.perf_counter()
    result = api.merge([str(A), str(B)], calibration=str(CALIB), options=api.MergeOptions(**options))
    seconds = time.perf_counter() - clock
    target = out / f"{name}.onnx"
    save_model(result.model, target)
    return api.evaluate([str(target)], str(TEST), tasks=",".join(TASKS))[0], seconds, result.report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="keep the merged models here")
    parser.add_argument("--layers", help="comma-separated --zip-layers N to run (default every N)")
    parser.add_argument("--no-auto", action="store_true", help="skip --zip-layers auto")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="onnxmerge-hard-"))
    out.mkdir(parents=True, exist_ok=True)
    total = weight_layers(A)
    ensemble = api.evaluate([str(A), str(B)], str(TEST), tasks=",".join(TASKS), ensemble=True)[0]
    rows = [row("model A (0-4)", api.evaluate([str(A)], str(TEST), tasks=TASKS[0])[0], ensemble["joint"]),
            row("model B (5-9)", api.evaluate([str(B)], str(TEST), tasks=TASKS[1])[0], ensemble["joint"]),
            row("ensemble A+B", ensemble, ensemble["joint"])]
    merges = {"zip (full)": dict(method="zip")}
    layers = [int(n) for n in args.layers.split(",")] if args.layers else range(1, total + 1)
    merges.update({f"zip, zip-layers {n}/{total}": dict(method="zip", zip_layers=n) for n in layers})
    if not args.no_auto:
        merges["zip, zip-layers auto"] = dict(method="zip", zip_layers="auto")
    merges["permute"] = dict(method="permute")
    for name, options in merges.items():
        stem = "".join(c if c.isalnum() else "_" for c in name)
        result, seconds, report = merge(stem, options, out)
        if options.get("zip_layers") == "auto":
            curve = report.get("zip_layers_auto", {})
            print(f"  auto: {curve}", flush=True)
        rows.append(row(name, result, ensemble["joint"], seconds))
        print(rows[-1], flush=True)
    print()
    print(f"| {'model':28} |   joint | task {TASKS[0]} | task {TASKS[1]} | / ens. | merge s |")
    print(f"|{'-' * 30}|---------|----------|----------|--------|---------|")
    print("\n".join(rows))
    print(f"\nmerged models in {out}")


if __name__ == "__main__":
    main()
