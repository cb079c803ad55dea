"""Where the time goes in a full merge of a ResNet-50-width pair (channels up to 2048).

Issue 4's target: the zipping step is no longer the dominant cost. Two randomly initialised
ResNet-50s (BN kept) are merged with zip and BN reset on a few random images; prints each
stage's time from the merge report and the share of the matching step.
Run: python benchmarks/bench_merge_wide.py [--samples 32] [--size 112]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_analyse import resnet50
from onnxmerge import api


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--size", type=int, default=112, help="image side")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            path = Path(tmp) / f"resnet50_{seed}.onnx"
            torch.onnx.export(resnet50(), (torch.zeros(1, 3, args.size, args.size),), path, dynamo=False,
                              opset_version=17, input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "N"}, "output": {0: "N"}},
                              training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
            paths.append(str(path))
        calib = Path(tmp) / "calib.npy"
        np.save(calib, np.random.default_rng(0).standard_normal((args.samples, 3, args.size, args.size)).astype(np.float32))
        start = time.perf_counter()
        result = api.merge(paths, calibration=str(calib), options=api.MergeOptions(batch_size=16, provider="cpu"))
        wall = time.perf_counter() - start
    widths = max(max(row["widths"]) for row in result.report["spaces"])
    timings = result.report["timings"]
    print(f"ResNet-50 pair, {len(result.report['spaces'])} matched spaces (widest {widths}), "
          f"{args.samples} images {args.size}x{args.size}, {result.report['provider']}")
    print("  ".join(f"{k[:-2]} {v:.2f} s" for k, v in timings.items()) + f"  total {wall:.2f} s")
    print(f"matching share of the merge: {timings['match_s'] / wall:.1%}")


if __name__ == "__main__":
    main()
