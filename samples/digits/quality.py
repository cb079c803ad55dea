"""Quality matrix on the digits samples: joint accuracy of every merge method, BN kept (BN reset)
and folded (REPAIR), for --zip-layers 1, 3, 5, 7 and a full merge, on three pairs (A + B,
A + 2x wide B, deep A + B), with the output ensemble beside it.

Run from the repo root: python samples/digits/quality.py [--plot quality.png] [--methods zip,permute]
Prints a Markdown table (the one in README.md); --plot draws joint accuracy against N
(needs matplotlib: pip install 'onnxmerge[plot]').
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from onnxmerge import api
from onnxmerge.io import save_model

HERE = Path(__file__).resolve().parent
PAIRS = {"A + B": ("resnet_a", "resnet_b"), "A + 2x wide B": ("resnet_a", "resnet_b_wide"),
         "deep A + B": ("resnet_a_deep", "resnet_b")}
LAYERS = (1, 3, 5, 7, None)  # None: every layer
TASKS = "0-4,5-9"


def joint(paths: list[str], folder: Path, **options) -> float:
    """Joint accuracy of the merge of ``paths`` with these options (ensemble when options is empty)."""
    test = str(HERE / "test.npz")
    if not options:
        return api.evaluate(paths, test, tasks=TASKS, ensemble=True)[0]["joint"]
    result = api.merge(paths, calibration=str(HERE / "calib.npz"), options=api.MergeOptions(**options))
    target = folder / "merged.onnx"
    save_model(result.model, target)
    return api.evaluate([str(target)], test, tasks=TASKS)[0]["joint"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="zip,permute", help="comma-separated merge methods (default zip,permute)")
    parser.add_argument("--plot", help="PNG of joint accuracy against --zip-layers")
    args = parser.parse_args()
    methods = args.methods.split(",")
    folder = Path(tempfile.mkdtemp(prefix="onnxmerge-quality-"))
    header = ["pair", "method", "BN", *[f"N={n}" if n else "full" for n in LAYERS], "ensemble"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    curves = {}
    for pair, (a, b) in PAIRS.items():
        paths = [str(HERE / f"{a}.onnx"), str(HERE / f"{b}.onnx")]
        ensemble = joint(paths, folder)
        for method in methods:
            if method == "permute" and "wide" in pair:
                continue  # permute needs equal widths
            for bn in ("keep", "fold"):
                scores = [joint(paths, folder, method=method, bn=bn, zip_layers=n) for n in LAYERS]
                curves[(pair, method, bn)] = scores
                print(f"| {pair} | {method} | {bn} | " + " | ".join(f"{s:.1%}" for s in scores)
                      + f" | {ensemble:.1%} |", flush=True)
    if args.plot:
        plot(curves, args.plot)
        print(f"wrote {args.plot}")


def plot(curves: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, len(PAIRS), figsize=(5 * len(PAIRS), 4), sharey=True)
    ticks = [str(n) if n else "full" for n in LAYERS]
    for ax, pair in zip(axes, PAIRS):
        for (name, method, bn), scores in curves.items():
            if name == pair:
                ax.plot(ticks, scores, marker="o", label=f"{method}, BN {bn}")
        ax.set_title(pair)
        ax.set_xlabel("--zip-layers N")
        ax.legend()
    axes[0].set_ylabel("joint accuracy")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
