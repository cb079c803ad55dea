"""Merge fine-tunes of one base with every same-base method and print the accuracy tables.

Runs the `onnxmerge merge --base ...` commands a user would (printed as it goes), in this
process, and writes the merged models into a temporary folder (or --out). Two fine-tunes
(classes 0-4 and 5-9) are merged with every method at its defaults and a small grid; three
fine-tunes (0-2, 3-5, 6-9) with the main ones. Joint accuracy: argmax over all heads, one
classifier over the ten digits. Run from the repo root: python samples/finetunes/run.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "mixed"))
import digits_sample  # noqa: E402  (samples/mixed/digits_sample.py: the digits scripts as modules)

import onnxmerge  # noqa: E402

HERE = Path(__file__).resolve().parent
REL = HERE.relative_to(Path.cwd()) if HERE.is_relative_to(Path.cwd()) else HERE
BASE, CALIB, TEST = REL / "base.onnx", REL / "calib.npz", REL / "test.npz"
DIGITS = digits_sample.load("run")
REFERENCE = "linear (plain average)"
PAIR = ([REL / "ft_a.onnx", REL / "ft_b.onnx"], "0-4,5-9")
TRIPLE = ([REL / "ft_x.onnx", REL / "ft_y.onnx", REL / "ft_z.onnx"], "0-2,3-5,6-9")
PAIR_MERGES = {  # row name -> merge options
    REFERENCE: ["--method", "linear"],
    "slerp, t 0.5": ["--method", "slerp"],
    "task arithmetic, scale 1.0 (default)": ["--method", "task-arithmetic"],
    "task arithmetic, scale 0.3": ["--method", "task-arithmetic", "--scale", "0.3"],
    "task arithmetic, scale 0.7": ["--method", "task-arithmetic", "--scale", "0.7"],
    "ties, density 0.2, scale 1 (default)": ["--method", "ties"],
    "ties, density 0.5, scale 0.5": ["--method", "ties", "--density", "0.5", "--scale", "0.5"],
    "ties, density 0.8, scale 0.5": ["--method", "ties", "--density", "0.8", "--scale", "0.5"],
    "dare, drop 0.9, scale 1 (default)": ["--method", "dare"],
    "dare, drop 0.3, scale 0.5": ["--method", "dare", "--drop-rate", "0.3", "--scale", "0.5"],
    "dare then ties, drop 0.3, scale 0.5": ["--method", "dare", "--drop-rate", "0.3", "--scale", "0.5",
                                            "--dare-then", "ties"],
    "regmean, alpha 0.5 (default)": ["--method", "regmean", "--calib", CALIB],
    "regmean, alpha 0.9": ["--method", "regmean", "--alpha", "0.9", "--calib", CALIB],
    "regmean + REPAIR": ["--method", "regmean", "--calib", CALIB, "--repair", "repair"],
    "zip (aligned, no base) + REPAIR": ["--method", "zip", "--calib", CALIB],
}
TRIPLE_MERGES = {name: PAIR_MERGES[name] for name in (
    REFERENCE, "task arithmetic, scale 0.3", "ties, density 0.5, scale 0.5", "regmean, alpha 0.5 (default)",
    "zip (aligned, no base) + REPAIR")}


def table(title: str, models: list[Path], tasks: str, merges: dict[str, list], out: Path) -> None:
    names = tasks.split(",")
    rows = [("base (10-class head)", onnxmerge.evaluate([str(BASE)], str(TEST))[0]),
            *((f"fine-tune {m.stem} ({t})", onnxmerge.evaluate([str(m)], str(TEST), tasks=t)[0])
              for m, t in zip(models, names)),
            ("ensemble of the fine-tunes", onnxmerge.evaluate([str(m) for m in models], str(TEST), tasks=tasks,
                                                              ensemble=True)[0])]
    for name, options in merges.items():
        stem = "_".join("".join(c if c.isalnum() else " " for c in name).split())
        target = out / f"{len(models)}_{stem}.onnx"
        base = [] if options[1] in ("linear", "slerp", "regmean", "zip") else ["--base", BASE]
        DIGITS.run("merge", *models, *base, *options, "-o", target)
        rows.append((name, onnxmerge.evaluate([str(target)], str(TEST), tasks=tasks)[0]))
    print(f"\n{title}\n")
    print(f"| {'model':40} |   joint | " + " | ".join(f"task {n}" for n in names) + " | average |")
    print(f"|{'-' * 42}|---------|" + "|".join("-" * (len(n) + 7) for n in names) + "|---------|")
    for name, result in rows:
        cells = [f"{result['joint']:7.1%}",
                 *(f"{'-' if result['tasks'].get(n) is None else format(result['tasks'][n], '.1%'):>{len(n) + 5}}"
                   for n in names), f"{result['average']:7.1%}"]
        print(f"| {name:40} | " + " | ".join(cells) + " |")
    merged = dict(rows[len(models) + 2:])
    best = max((n for n in merged if n != REFERENCE), key=lambda n: merged[n]["joint"])
    gain = merged[best]["joint"] - merged[REFERENCE]["joint"]
    print(f"\nbest merge: {best}, {merged[best]['joint']:.1%} joint, {gain * 100:+.1f} points over plain averaging")


def main() -> None:
    out = DIGITS.output_folder(__doc__.splitlines()[0], "onnxmerge-finetunes-")
    table("Two fine-tunes (classes 0-4 and 5-9)", *PAIR, PAIR_MERGES, out)
    table("Three fine-tunes (classes 0-2, 3-5 and 6-9)", *TRIPLE, TRIPLE_MERGES, out)
    print(f"\nmerged models in {out}")


if __name__ == "__main__":
    main()
