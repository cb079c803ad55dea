"""Start-up cost of the command line: CPU time (user + sys) of `onnxmerge --help`, `--version`
and `inspect` on a sample model, each in a fresh child process, median of --runs.

Target (issue 16): `onnxmerge --help` under 1.5 s of CPU with torch installed. Baselines
measured in the same run: `python -c pass` (the interpreter) and `python -c "import onnx"` (the
floor any ONNX tool pays). The commands run as `python -m onnxmerge` from the repository root,
so the checkout's code is measured whatever is installed.
Run: python benchmarks/bench_startup.py [--runs 7]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = "samples/digits/resnet_a.onnx"
COMMANDS = {  # label -> arguments after the interpreter
    "python -c pass": ["-c", "pass"],
    'python -c "import onnx"': ["-c", "import onnx"],
    "onnxmerge --help": ["-m", "onnxmerge", "--help"],
    "onnxmerge --version": ["-m", "onnxmerge", "--version"],
    f"onnxmerge inspect {Path(SAMPLE).name}": ["-m", "onnxmerge", "inspect", SAMPLE],
}


def cpu_seconds(arguments: list[str]) -> float:
    """User + system CPU time of one child process running the interpreter with ``arguments``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, *arguments], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per command; the median is shown (default 7)")
    args = parser.parse_args()
    torch = "installed" if importlib.util.find_spec("torch") else "not installed"
    print(f"Python {sys.version.split()[0]}, torch {torch}, {os.cpu_count()} CPUs, median of {args.runs} runs")
    medians = {}
    for label, arguments in COMMANDS.items():
        cpu_seconds(arguments)  # warm the file cache: the first run of a command reads its files from disk
        medians[label] = statistics.median(cpu_seconds(arguments) for _ in range(args.runs))
    python, onnx = medians["python -c pass"], medians['python -c "import onnx"']
    print(f"{'command':34} {'CPU s':>6} {'/ python':>8} {'/ import onnx':>13}")
    for label, seconds in medians.items():
        print(f"{label:34} {seconds:6.2f} {seconds / python:8.1f} {seconds / onnx:13.2f}")


if __name__ == "__main__":
    main()
