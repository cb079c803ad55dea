"""Merge cost of a ResNet-20-size pair (CIFAR layout: 3 stages x 3 basic blocks, 16/32/64
channels, 32x32 inputs), measured against the cheapest thing a merge must do anyway.

Prints, for N calibration samples:
- baseline: onnxruntime time to run both models over the N samples (batch 64),
- merge wall time (zip, BN reset on all samples, then on --repair-samples of them) and the ratio
  merge / baseline (target <= 2.0),
- peak resident memory of a whole merge process with N and 10 N samples (target: < 10 % growth).
Run: python benchmarks/bench_merge.py [--samples 1000] [--width 1] [--provider cpu] [--repair-samples 256 ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build_pair(folder: Path, width: int) -> list[str]:
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                                      nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
            self.short = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

        def forward(self, x):
            return torch.relu(self.body(x) + self.short(x))

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        layers, c_in = [nn.Conv2d(3, 16 * width, 3, 1, 1, bias=False), nn.BatchNorm2d(16 * width), nn.ReLU()], 16 * width
        for stage, c_out in enumerate((16 * width, 32 * width, 64 * width)):
            for b in range(3):
                layers.append(Block(c_in, c_out, 2 if stage and b == 0 else 1))
                c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10)]
        model = nn.Sequential(*layers).eval()
        path = folder / f"resnet20_{seed}.onnx"
        torch.onnx.export(model, (torch.zeros(2, 3, 32, 32),), path, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "N"}, "output": {0: "N"}},
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
        paths.append(str(path))
    return paths


def inference_time(paths: list[str], data: np.ndarray, provider: str) -> float:
    from onnxmerge.calib.sessions import open_session
    from onnxmerge.io import load_model

    sessions = [open_session(load_model(p), provider)[0] for p in paths]
    start = time.perf_counter()
    for session in sessions:
        for k in range(0, len(data), 64):
            session.run(None, {"input": data[k:k + 64]})
    return time.perf_counter() - start


def merge_in_subprocess(paths: list[str], calib: str, out: str, provider: str, repair_samples: int | None) -> dict:
    """Wall time and peak RSS (MiB) of one merge, in its own process. Peak RSS is VmHWM: a
    child's ru_maxrss keeps the parent's size at fork, VmHWM starts afresh at exec."""
    code = ("import json, resource, sys, time\n"
            "from onnxmerge import api\nfrom onnxmerge.io import save_model\n"
            "start = time.perf_counter()\n"
            f"result = api.merge({paths!r}, calibration={calib!r}, options=api.MergeOptions(provider={provider!r}, repair_samples={repair_samples!r}))\n"
            f"save_model(result.model, {out!r})\n"
            "wall = time.perf_counter() - start\n"
            "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
            "print(json.dumps({'wall': wall, 'rss': int(hwm.split()[1]) / 1024,"
            " 'timings': result.report['timings'], 'provider': result.report['provider'],"
            " 'repair': result.report['repair']}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--width", type=int, default=1, help="channel multiplier (ZipIt! uses 4 and more)")
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--repair-samples", type=int, nargs="*", default=[256],
                        help="extra rows: merges whose BN reset uses this many samples (default 256)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = build_pair(folder, args.width)
        rows = []
        for factor in (1, 10):
            data = rng.standard_normal((args.samples * factor, 3, 32, 32)).astype(np.float32)
            calib = folder / f"calib{factor}.npy"
            np.save(calib, data)
            baseline = inference_time(paths, data, args.provider)
            for repair_samples in [None, *args.repair_samples]:
                merged = merge_in_subprocess(paths, str(calib), str(folder / "merged.onnx"), args.provider,
                                             repair_samples)
                rows.append((len(data), repair_samples, baseline, merged))
    print(f"ResNet-20 x{args.width} pair, provider {rows[0][3]['provider']}")
    print(f"{'samples':>7} {'reset on':>8} {'2x inference s':>14} {'merge s':>8} {'ratio':>6} {'peak RSS MiB':>12}  stages")
    for samples, repair_samples, baseline, merged in rows:
        stages = " ".join(f"{k[:-2]} {v:.2f}" for k, v in merged["timings"].items())
        print(f"{samples:7d} {repair_samples or samples:8d} {baseline:14.2f} {merged['wall']:8.2f} "
              f"{merged['wall'] / baseline:6.2f} {merged['rss']:12.0f}  {stages}")
    small, large = (next(r[3] for r in rows if r[0] == n and r[1] is None) for n in (args.samples, 10 * args.samples))
    print(f"peak memory growth from {args.samples} to {10 * args.samples} samples: "
          f"{large['rss'] / small['rss'] - 1:+.1%} (target < 10%)")


if __name__ == "__main__":
    main()
