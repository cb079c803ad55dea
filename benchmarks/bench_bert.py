"""inspect and merge(A, permute(A)) of a 6-layer BERT (Hugging Face BertModel, hidden 256, 4 heads,
random weights, legacy export, output last_hidden_state), with the merge's time per stage:
analyse (loading and canonicalisation), calibrate (capture), match, rewrite (with REPAIR).

Needs the [zoo] extra (transformers; tests/public_zoo.py's torchvision shim is used for its import).
Run: cd benchmarks && python bench_bert.py [--samples 64] [--tokens 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def export_bert(path: Path, tokens: int) -> None:
    import torch
    sys.path.insert(0, str(ROOT))
    from tests import public_zoo

    transformers = public_zoo.import_transformers()
    config = transformers.BertConfig(hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
                                     intermediate_size=1024, vocab_size=1000, max_position_embeddings=tokens)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()

    class Hidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = model

        def forward(self, ids):
            return self.bert(input_ids=ids).last_hidden_state

    torch.onnx.export(Hidden().eval(), (torch.ones(2, tokens, dtype=torch.int64),), path, dynamo=False,
                      opset_version=17, input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "N"}, "output": {0: "N"}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    from onnxmerge import api
    from onnxmerge.io import load_model, save_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        export_bert(folder / "bert.onnx", args.tokens)
        start = time.perf_counter()
        report = api.inspect(folder / "bert.onnx")
        inspect_s = time.perf_counter() - start
        save_model(api.permute(load_model(folder / "bert.onnx"), seed=1), folder / "permuted.onnx")
        ids = np.random.default_rng(0).integers(3, 1000, (args.samples, args.tokens)).astype(np.int64)
        np.save(folder / "calib.npy", ids)
        start = time.perf_counter()
        merged = api.merge([str(folder / "bert.onnx"), str(folder / "permuted.onnx")], calibration=str(folder / "calib.npy"))
        merge_s = time.perf_counter() - start
    summary = report["summary"]
    print(f"6-layer BERT (hidden 256), {args.samples} x {args.tokens} tokens, cpu")
    print(f"inspect {inspect_s:.2f} s: {summary['free']} free spaces, {summary['barriers']} barriers")
    print(f"merge(A, permute(A)) {merge_s:.2f} s: {merged.report['layers']}, {merged.report['repair']}")
    for stage, seconds in merged.report["timings"].items():
        print(f"  {stage[:-2]:10} {seconds:6.2f} s  {seconds / merge_s:6.1%}")


if __name__ == "__main__":
    main()
