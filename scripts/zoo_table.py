"""Run the public CNN matrix (tests/public_zoo.py) and write docs/zoo.md.

One row per model x exporter, one column per oracle; each cell "ok" (relative error at most
1e-4), the measured relative error (max |got - expected| / max |expected|), or the one-line
error message. Each model x exporter runs in its own single-threaded process with a time
limit; results are kept in docs/zoo.json as they come, so a run can be resumed (--resume).

    python scripts/zoo_table.py [--models a,b] [--exporters legacy_folded,...] [--timeout 300]
                                [--resume] [--render-only]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXPENSIVE = {"tv_resnet50", "tv_resnext50_32x4d", "tv_wide_resnet50_2", "tv_convnext_tiny", "tv_densenet121"}
COLUMNS = {"permute": "permute", "merge_self": "zip(A, permute(A))", "widen": "widen 1.5",
           "deepen": "deepen 1", "merge_random": "zip(A, B) random inits"}


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {text[0] if text else ''}"
    return line if len(line) <= 220 else line[:217] + "..."


def worker(name: str, exporter: str, out: Path) -> None:
    """Export ``name`` with ``exporter`` (two random inits) and run every oracle; append one
    JSON line per step to ``out``."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from tests import public_zoo as pz

    def emit(step, **fields):
        with open(out, "a") as f:
            f.write(json.dumps({"model": name, "exporter": exporter, "step": step, **fields}) + "\n")

    tmp = Path(tempfile.mkdtemp(prefix=f"zoo_{name}_{exporter}_"))
    clock = time.perf_counter()
    try:
        a = pz.export(name, exporter, tmp / "a.onnx", seed=0)
        b = pz.export(name, exporter, tmp / "b.onnx", seed=1)
    except Exception as error:  # noqa: BLE001 - failures are data
        emit("export", status="error", message=one_line(error), seconds=time.perf_counter() - clock)
        return
    emit("export", status="ok", seconds=time.perf_counter() - clock,
         mb=round(os.path.getsize(a) / 2**20, 1))
    x = pz.sample_input(name)
    for oracle in pz.ORACLES:
        folder = tmp / oracle
        folder.mkdir()
        clock = time.perf_counter()
        try:
            result = pz.run_oracle(oracle, a, x, folder, other=b)
        except Exception as error:  # noqa: BLE001
            emit(oracle, status="error", message=one_line(error), seconds=time.perf_counter() - clock)
            continue
        emit(oracle, status="ok" if result.ok else "mismatch", error=result.error, zipped=result.zipped,
             note=result.note, seconds=result.seconds)


def load_results(path: Path) -> dict:
    rows: dict = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                rows.setdefault((record["model"], record["exporter"]), {})[record["step"]] = record
    return rows


def cell(record: dict | None) -> str:
    if record is None:
        return "-"
    if record["status"] == "error":
        return record["message"].replace("|", "\\|").replace("\n", " ")
    if record.get("error") is None or record["status"] == "ok":
        return "ok"
    return f"{record['error']:.1e}"


def render(results: dict, models: list[str], exporters: list[str], command: str, tolerance: float) -> str:
    lines = [
        "# Public CNN matrix",
        "",
        "Produced by `" + command + "` (single-threaded, CPU, onnxruntime CPU provider).",
        "",
        "Each model is built with random weights (`weights=None` / `pretrained=False`, 10 classes),",
        "random BatchNorm / GroupNorm / LayerNorm statistics and affine parameters, and every",
        "constant parameter (zero biases, layer-scale) randomised; input 16 x 3 x 64 x 64, standard",
        "normal; the same 16 samples are the calibration data. Exporters (`tests/zoo.py`):",
        "`legacy_folded` = `torch.onnx.export(dynamo=False)` with constant folding (BN folded into",
        "the convs, the default), `legacy_bn` = legacy with `do_constant_folding=False,",
        "training=PRESERVE` (BN kept), `dynamo` = `torch.onnx.export(dynamo=True)`; every export is",
        "checked against torch in onnxruntime (relative 1e-4) before the oracles run.",
        "",
        "Oracles (onnxmerge Python API): `permute` (seed 11) and `widen` (factor 1.5) and `deepen`",
        "(1 block) must leave the outputs unchanged; `zip(A, permute(A))` is `merge --method zip",
        "--repair none` of the model with a permuted copy, whose two heads must both give the",
        "model's outputs; `zip(A, B)` merges two random initialisations (default repair: BN reset",
        "with BN kept, REPAIR when folded), and passes when the merge runs, the merged model passes",
        "onnx.checker (full check) and runs in onnxruntime with finite outputs. A cell is `ok` when",
        f"the relative error max|got - expected| / max|expected| is at most {tolerance:g}, else that",
        "error, or the one-line error message. `zipped` is the merge report's layer count for",
        "zip(A, B); `s` the seconds for export and all oracles.",
        "",
        "| model | exporter | export | " + " | ".join(COLUMNS.values()) + " | zipped | s |",
        "|---|---|---|" + "---|" * len(COLUMNS) + "---|---|",
    ]
    for model in models:
        for exporter in exporters:
            row = results.get((model, exporter))
            if row is None:
                continue
            export = row.get("export")
            cells = ["ok" if export and export["status"] == "ok" else cell(export)]
            cells += [cell(row.get(oracle)) for oracle in COLUMNS]
            if export and export["status"] == "ok":
                missing = [c for c, oracle in enumerate(COLUMNS, 1) if oracle not in row]
                for c in missing:
                    cells[c] = (row.get("timeout") or row.get("done") or {}).get("message", "not run")
                    break
            zipped = (row.get("merge_random") or {}).get("zipped") or "-"
            seconds = sum(r.get("seconds", 0) for r in row.values() if isinstance(r, dict))
            lines.append(f"| {model} | {exporter} | " + " | ".join(cells)
                         + f" | {zipped.replace(' layers zipped', '')} | {seconds:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--exporters", default=None)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model x exporter")
    parser.add_argument("--resume", action="store_true", help="keep docs/zoo.json's finished rows")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--out", default=str(DOCS / "zoo.md"))
    parser.add_argument("--store", default=str(DOCS / "zoo.json"), help="the JSON-lines results file")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "EXPORTER", "JSONL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker[0], args.worker[1], Path(args.worker[2]))
        return 0
    sys.path.insert(0, str(ROOT))
    from tests import public_zoo as pz

    models = args.models.split(",") if args.models else list(pz.MODELS)
    exporters = args.exporters.split(",") if args.exporters else list(pz.EXPORTERS)
    store = Path(args.store)
    if not args.render_only:
        results = load_results(store) if args.resume else {}
        if not args.resume:
            store.write_text("")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        # cheap models first, so that a partial run covers most of the matrix
        order = sorted(models, key=lambda m: m in EXPENSIVE)
        for model in order:
            for exporter in exporters:
                if "done" in results.get((model, exporter), {}):
                    continue
                if (model, exporter) in results:   # unfinished: run again from the start
                    kept = [line for line in store.read_text().splitlines()
                            if not (json.loads(line)["model"] == model and json.loads(line)["exporter"] == exporter)]
                    store.write_text("".join(line + "\n" for line in kept))
                clock = time.perf_counter()
                status, code = "done", None
                try:
                    code = subprocess.run([sys.executable, __file__, "--worker", model, exporter, str(store)],
                                   env=env, timeout=args.timeout, check=False,
                                   stdout=subprocess.DEVNULL).returncode
                except subprocess.TimeoutExpired:
                    status = "timeout"
                record = {"model": model, "exporter": exporter, "step": status,
                          "seconds": 0.0}
                if status == "timeout":
                    record["message"] = f"timeout: over {args.timeout:.0f} s for this model x exporter"
                elif code:
                    record["message"] = f"worker process exited with code {code}"
                with open(store, "a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"{model} {exporter}: {status} in {time.perf_counter() - clock:.0f} s", flush=True)
                results = load_results(store)
                Path(args.out).write_text(render(results, models, exporters, _command(argv), pz.TOLERANCE))
    results = load_results(store)
    Path(args.out).write_text(render(results, list(pz.MODELS), list(pz.EXPORTERS), _command(argv), pz.TOLERANCE))
    return 0


def _command(argv) -> str:
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("--render-only", "--resume")]
    return "OMP_NUM_THREADS=1 python scripts/zoo_table.py" + "".join(f" {a}" for a in args)


if __name__ == "__main__":
    sys.exit(main())
