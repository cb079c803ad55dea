"""Run the public CNN or transformer matrix (tests/public_zoo.py) and write docs/zoo.md.

One row per model x exporter, one column per oracle; each cell "ok" (relative error at most
1e-4), the measured relative error (max |got - expected| / max |expected|), or the one-line
error message. Each model x exporter runs in its own single-threaded process with a time
limit; results are kept in docs/zoo.json as they come, so a run can be resumed (--resume).
Both families share docs/zoo.json and docs/zoo.md: a run replaces its own rows in the store
and its own section ("# Public CNN matrix", "# Public transformer matrix") in the page.

    python scripts/zoo_table.py [--family cnn|transformers] [--models a,b] [--exporters legacy,...]
                                [--timeout 300] [--resume] [--render-only]
"""

from __future__ import annotations

import argparse
import json
import re
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXPENSIVE = {"tv_resnet50", "tv_resnext50_32x4d", "tv_wide_resnet50_2", "tv_convnext_tiny", "tv_densenet121"}
HEADINGS = {"cnn": "# Public CNN matrix", "transformers": "# Public transformer matrix"}
COLUMNS = {"permute": "permute", "merge_self": "zip(A, permute(A))", "widen": "widen 1.5",
           "deepen": "deepen 1", "merge_random": "zip(A, B) random inits"}


def one_line(error: BaseException, limit: int = 220) -> str:
    """``Type: first line``; an exporter's wrapper error (the dynamo exporter's ConversionError
    says only which step failed) is followed by its cause's first line."""
    def first(e: BaseException) -> str:
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0] if text else ''}"
    line = first(error)
    if error.__cause__ is not None and type(error).__name__ in ("ConversionError", "TorchExportError"):
        line += " <- " + first(error.__cause__)
    line = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", line).split())   # no terminal colours
    return line if len(line) <= limit else line[:limit - 3] + "..."


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
    clock = time.perf_counter()
    try:
        from onnxmerge import api
        summary = api.inspect(a)
        barriers = summary["barriers"]
        first = barriers[0] if barriers else None
        emit("inspect", status="ok", spaces=summary["summary"]["spaces"], free=summary["summary"]["free"],
             barriers=summary["summary"]["barriers"], nodes=summary["summary"]["nodes"],
             first_barrier=f"{first['op']} {first['node']}: {first['reason']}" if first else None,
             seconds=time.perf_counter() - clock)
    except Exception as error:  # noqa: BLE001
        emit("inspect", status="error", message=one_line(error), seconds=time.perf_counter() - clock)
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


def render(results: dict, models: list[str], exporters: list[str], command: str, tolerance: float,
           family: str = "cnn") -> str:
    if family == "transformers":
        return render_transformers(results, models, exporters, command, tolerance)
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
    return "\n".join(lines + _table_rows(results, models, exporters)) + "\n"


def _table_rows(results: dict, models: list[str], exporters: list[str], extra=lambda row: []) -> list[str]:
    """One table line per model and exporter with results: export and oracle cells, the zipped
    layer count, ``extra(row)``'s cells, the seconds."""
    lines = []
    for model in models:
        for exporter in exporters:
            row = results.get((model, exporter))
            if row is None:
                continue
            zipped = (row.get("merge_random") or {}).get("zipped") or "-"
            seconds = sum(r.get("seconds", 0) for r in row.values() if isinstance(r, dict))
            cells = [*_row_cells(row), zipped.replace(" layers zipped", ""), *extra(row), f"{seconds:.0f}"]
            lines.append(f"| {model} | {exporter} | " + " | ".join(cells) + " |")
    return lines


def _row_cells(row: dict) -> list[str]:
    export = row.get("export")
    cells = ["ok" if export and export["status"] == "ok" else cell(export)]
    cells += [cell(row.get(oracle)) for oracle in COLUMNS]
    if export and export["status"] == "ok":
        missing = [c for c, oracle in enumerate(COLUMNS, 1) if oracle not in row]
        for c in missing:
            cells[c] = (row.get("timeout") or row.get("done") or {}).get("message", "not run")
            break
    return cells


def render_transformers(results: dict, models: list[str], exporters: list[str], command: str,
                        tolerance: float) -> str:
    lines = [
        HEADINGS["transformers"],
        "",
        "Produced by `" + command + "` (single-threaded, CPU, onnxruntime CPU provider).",
        "",
        "Small configurations with random weights (nothing downloaded; `tests/public_zoo.py`,",
        "`TRANSFORMERS`): width 64, 2 layers, 4 heads, MLP 128. Token models (Hugging Face BERT,",
        "DistilBERT, RoBERTa, GPT-2, T5 encoder) take `input_ids` [N, 16] int64 in [3, 100) (vocabulary",
        "100, no attention mask); the bare models output `last_hidden_state`, the `_cls` rows",
        "`*ForSequenceClassification(num_labels=5)` logits. Vision models (HF ViT / ViT",
        "classifier / DeiT classifier, torchvision `VisionTransformer`, timm `vit_tiny_patch16_224`",
        "with fused qkv) take 32 x 32 images, patch 8, 10 classes; `torch_encoder` is",
        "`nn.TransformerEncoder` (batch_first, 2 layers) on [N, 16, 64] float inputs, its output the",
        "last layer's; `torch_encoder_cls` the same between a Linear(64, 64) input projection and a",
        "Linear(64, 10) classifier on the mean token. Every",
        "LayerNorm affine is random, and every constant parameter (zero biases, T5's RMSNorm",
        "scales, class tokens) randomised. Exporters: `legacy` = `torch.onnx.export(dynamo=False,",
        "opset_version=17)` with constant folding, `dynamo` = `torch.onnx.export(dynamo=True)`; batch",
        "axis dynamic, each export checked against torch in onnxruntime on a batch of 3 (relative",
        "1e-4); an exporter's failure is recorded as such. 32 random inputs are the calibration data",
        "and the oracles' inputs.",
        "",
        "Oracles as for the CNNs above: `permute` (seed 11), `widen` (factor 1.5), `deepen` (1 block)",
        "must keep the outputs; `zip(A, permute(A))` (`--repair none`) must give the model's outputs",
        "from both heads; `zip(A, B)` merges two random initialisations (default repair) and passes",
        "when the merged model runs with finite outputs. A cell is `ok` when the relative error",
        f"max|got - expected| / max|expected| is at most {tolerance:g}, else that error, or the",
        "one-line error message. `free` is `onnxmerge inspect`'s free spaces of all spaces,",
        "`barriers` its barrier count and the first barrier (`op node: reason`); `zipped` the merge",
        "report's layer count for zip(A, B); `s` the seconds for export, inspect and all oracles.",
        "",
        "| model | exporter | export | " + " | ".join(COLUMNS.values()) + " | zipped | free | barriers | s |",
        "|---|---|---|" + "---|" * len(COLUMNS) + "---|---|---|---|",
    ]
    return "\n".join(lines + _table_rows(results, models, exporters, _inspect_cells)) + "\n"


def _inspect_cells(row: dict) -> list[str]:
    """The ``free`` and ``barriers`` cells of a transformer row, from its inspect record."""
    found = row.get("inspect") or {}
    if found.get("status") != "ok":
        return ["-", cell(found)] if found else ["-", "-"]
    barriers = str(found["barriers"])
    if found.get("first_barrier"):
        text = found["first_barrier"].replace("|", "\\|").replace("\n", " ")
        barriers += ": " + (text if len(text) <= 160 else text[:157] + "...")
    return [f"{found['free']} of {found['spaces']}", barriers]


def write_section(out: Path, family: str, text: str) -> None:
    """Replace ``family``'s section of the page (its heading up to the next family heading or
    the end), or append it; the other family's section stays as it is."""
    page = out.read_text() if out.exists() else ""
    heading = HEADINGS[family]
    start = page.find(heading + "\n")
    if start < 0:
        out.write_text(page.rstrip("\n") + ("\n\n" if page.strip() else "") + text)
        return
    ends = [page.find(h + "\n", start + 1) for f, h in HEADINGS.items() if f != family]
    ends = [e for e in ends if e > start]
    end = min(ends) if ends else len(page)
    rest = page[end:]
    out.write_text(page[:start] + text + ("\n" + rest if rest else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("cnn", "transformers"), default="cnn")
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

    registry, family_exporters = pz.FAMILIES[args.family]
    models = args.models.split(",") if args.models else list(registry)
    exporters = args.exporters.split(",") if args.exporters else list(family_exporters)
    store = Path(args.store)
    out = Path(args.out)
    if not args.render_only:
        results = load_results(store) if args.resume else {}
        if not args.resume:   # drop this run's rows, keep the others (the other family's)
            chosen = {(m, e) for m in models for e in exporters}
            kept = [line for line in (store.read_text().splitlines() if store.exists() else [])
                    if line.strip() and (json.loads(line)["model"], json.loads(line)["exporter"]) not in chosen]
            store.write_text("".join(line + "\n" for line in kept))
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
                write_section(out, args.family, render(results, models, exporters, _command(argv), pz.TOLERANCE,
                                                       args.family))
    results = load_results(store)
    write_section(out, args.family, render(results, list(registry), list(family_exporters), _command(argv),
                                           pz.TOLERANCE, args.family))
    return 0


def _command(argv) -> str:
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("--render-only", "--resume")]
    return "OMP_NUM_THREADS=1 python scripts/zoo_table.py" + "".join(f" {a}" for a in args)


if __name__ == "__main__":
    sys.exit(main())
