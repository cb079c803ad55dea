"""The repair's share of a merge's time: a ResNet-20-size pair (bench_merge's, BN kept in the
export) merged by zip with BN folded and REPAIR, with BN kept and BN reset, and with no repair.

Prints each merge's wall time (best of --repeat) and the repair's share: (t - t_none) / t, where
t_none is the same merge with --repair none, measured in the same run.
Run: cd benchmarks && python bench_repair.py [--samples 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_merge import build_pair


def best_time(paths: list[str], calib: str, repeat: int, **options) -> tuple[float, str]:
    from onnxmerge import api

    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = api.merge(paths, calibration=calib, options=api.MergeOptions(provider="cpu", **options))
        times.append(time.perf_counter() - start)
    return min(times), result.report["repair"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = build_pair(folder, 1)
        calib = folder / "calib.npy"
        np.save(calib, np.random.default_rng(0).standard_normal((args.samples, 3, 32, 32)).astype(np.float32))
        print(f"ResNet-20 pair, {args.samples} samples, cpu, best of {args.repeat}")
        for bn, repair in (("fold", "repair"), ("keep", "reset")):
            none, _ = best_time(paths, str(calib), args.repeat, bn=bn, repair="none")
            with_repair, line = best_time(paths, str(calib), args.repeat, bn=bn, repair=repair)
            print(f"BN {bn}: merge {with_repair:.2f} s, without repair {none:.2f} s, "
                  f"repair share {(with_repair - none) / with_repair:.1%}  [{line}]")


if __name__ == "__main__":
    main()
