"""Calibration time on Ray with 1, 2 and 4 local workers (issue 18, docs/scale.md), against one
worker and against a run in one process, all measured in this run.

The model is CPU-bound: the ResNet-20 pair of bench_merge.py (3 stages x 3 basic blocks,
16/32/64 channels, BN kept, 32x32 inputs, random weights), calibrated on --samples random
images from a .npy file (memory-mapped: the driver reads each shard's rows once), batch 64,
onnxruntime on CPU. Ray is started once with num_cpus = the largest worker count (4 workers on
a 2-core machine are oversubscribed: said in the output); its start-up and a first run that
starts the workers (each imports onnxmerge and onnxruntime) are timed apart. Each timed figure
is the whole ``onnxmerge.calibrate`` call (models read and canonicalised on the driver, shards
cut and sent, statistics reduced), the best of --repeats rounds that run every configuration
in turn (load from elsewhere then falls on all alike). Every result is checked against the
in-process statistics (max relative difference printed).
Run: python benchmarks/bench_ray.py [--samples 4000] [--workers 1 2 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def best_times(runs: dict, rounds: int) -> tuple[dict, dict]:
    """Best wall time of each run over ``rounds`` rounds that call every run once in turn (so a
    burst of load from elsewhere falls on all of them alike), and each run's last result."""
    best, results = {name: float("inf") for name in runs}, {}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            results[name] = run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, results


def difference(reference: dict, stats: dict) -> float:
    """Largest relative difference of sums and outer products (relative to each array's largest entry)."""
    worst = 0.0
    for key, want in reference.items():
        have = stats[key]
        assert have.count == want.count, key
        for field in ("sum", "outer"):
            a, b = getattr(want, field), getattr(have, field)
            worst = max(worst, float(np.abs(a - b).max() / np.abs(a).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3, help="rounds over every configuration (best taken)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    import ray

    import onnxmerge
    from bench_merge import build_pair

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    slots = max(args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = build_pair(folder, 1)
        calib = folder / "calib.npy"
        np.save(calib, np.random.default_rng(0).standard_normal((args.samples, 3, 32, 32)).astype(np.float32))
        settings = dict(provider="cpu", batch_size=args.batch_size)

        onnxmerge.calibrate(paths, str(calib), max_samples=64, **settings)  # imports, first session
        start = time.perf_counter()
        ray.init(num_cpus=slots, include_dashboard=False, logging_level=logging.ERROR)
        startup_s = time.perf_counter() - start
        try:
            start = time.perf_counter()
            onnxmerge.calibrate(paths, str(calib), ray="local", ray_shards=slots, **settings)  # starts the workers
            first_s = time.perf_counter() - start
            runs = {0: lambda: onnxmerge.calibrate(paths, str(calib), **settings)}
            for workers in args.workers:
                runs[workers] = functools.partial(onnxmerge.calibrate, paths, str(calib), ray="local",
                                                  ray_shards=workers, **settings)
            best, results = best_times(runs, args.repeats)
        finally:
            ray.shutdown()
    single_s, reference = best.pop(0), results.pop(0)[0]
    rows = [(workers, best[workers], difference(reference, results[workers][0])) for workers in args.workers]

    print(f"ResNet-20 pair, {args.samples} samples of 3x32x32 (.npy), batch {args.batch_size}, onnxruntime cpu, "
          f"{cores} cores; Ray {ray.__version__} started with num_cpus={slots}: {startup_s:.1f} s, first run "
          f"(starts {slots} workers) {first_s:.1f} s, neither counted below; best of {args.repeats} rounds")
    one = next((s for w, s, _ in rows if w == 1), None)
    print(f"{'run':<42} {'calibrate s':>11} {'vs 1 worker':>11} {'vs in-process':>13} {'max rel diff':>12}")
    print(f"{'in process (no Ray)':<42} {single_s:11.2f} {'':>11} {'1.00x':>13} {0.0:12.1e}")
    for workers, seconds, diff in rows:
        label = f"Ray, {workers} worker{'s' if workers > 1 else ''}"
        if workers > cores:
            label += f" (oversubscribed, {cores} cores)"
        speedup = f"{one / seconds:10.2f}x" if one else f"{'-':>11}"
        print(f"{label:<42} {seconds:11.2f} {speedup} {single_s / seconds:12.2f}x {diff:12.1e}")


if __name__ == "__main__":
    main()
