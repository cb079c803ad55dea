"""Hugging Face optimum's ONNX exports through onnxmerge's oracles (docs/zoo.md, issue 12).

optimum-onnx pins transformers below 4.58, so it cannot share an environment with the zoo extra;
the script runs in two steps, each in its own environment:

    # 1. in a venv with optimum:  pip install torch "transformers<4.58" optimum-onnx onnxruntime
    python scripts/optimum_rows.py export --out DIR
    # 2. in onnxmerge's venv
    python scripts/optimum_rows.py check --out DIR

``export`` saves two random initialisations (seeds 0 and 1) of five small Hugging Face models
(width 64, 2 layers, 4 heads) and exports each with ``optimum.exporters.onnx.main_export``:
batch and sequence (or image) axes dynamic, attention masks as inputs, opset 18. ``check``
prints a Markdown row per model: barriers, then permute, widen 1.5 and merge(A, permute(A))
(zip, permute, weight; no repair) as "ok" (relative error at most 1e-4) or the error, and the
layers zipped by a merge of the two initialisations, on 64 random inputs with padded rows.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

TASKS = {"bert": "feature-extraction", "bert_cls": "text-classification", "distilbert": "feature-extraction",
         "gpt2": "feature-extraction", "vit_cls": "image-classification"}


def build(name: str):
    """A random-weight Hugging Face model of ``name`` (imports transformers)."""
    import transformers as tf
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    if name in ("bert", "bert_cls"):
        config = tf.BertConfig(vocab_size=100, max_position_embeddings=32, num_labels=5, **small)
        return (tf.BertModel if name == "bert" else tf.BertForSequenceClassification)(config)
    if name == "distilbert":
        return tf.DistilBertModel(tf.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=100,
                                                      max_position_embeddings=32))
    if name == "gpt2":
        return tf.GPT2Model(tf.GPT2Config(vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=4, n_inner=128))
    return tf.ViTForImageClassification(tf.ViTConfig(image_size=32, patch_size=8, num_channels=3, num_labels=10,
                                                     **small))


def export(out: Path) -> None:
    import torch
    from optimum.exporters.onnx import main_export
    for name, task in TASKS.items():
        for seed in (0, 1):
            torch.manual_seed(seed)
            folder = out / f"{name}{seed}"
            build(name).save_pretrained(folder / "hf")
            main_export(str(folder / "hf"), output=str(folder), task=task)


def feeds(path: Path, count: int = 64) -> dict[str, np.ndarray]:
    """Random inputs for the model's inputs as optimum names them; a third of the rows padded."""
    import onnx
    rng = np.random.default_rng(0)
    mask = np.ones((count, 16), np.int64)
    mask[::3, 12:] = 0
    known = {"pixel_values": rng.standard_normal((count, 3, 32, 32)).astype(np.float32),
             "input_ids": rng.integers(3, 100, (count, 16)), "attention_mask": mask,
             "token_type_ids": np.zeros((count, 16), np.int64), "position_ids": np.tile(np.arange(16), (count, 1))}
    return {i.name: known[i.name] for i in onnx.load(str(path), load_external_data=False).graph.input}


def check(out: Path) -> None:
    import onnxruntime as ort
    from onnxmerge import api

    def run(path, x):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "onnxmerge", *args], capture_output=True, text=True)
        return "ok" if done.returncode == 0 else (done.stderr.strip().splitlines() or ["failed"])[-1]

    def verdict(got: list[np.ndarray], expected: np.ndarray) -> str:
        error = max(float(np.abs(g - expected).max()) for g in got) / float(np.abs(expected).max())
        return "ok" if error <= 1e-4 else f"{error:.1e}"

    print("| model | barriers | permute | widen 1.5 | merge(A, permute(A)): zip / permute / weight | zip(A, B) |")
    print("|---|---|---|---|---|---|")
    for name in TASKS:
        a, b = out / f"{name}0" / "model.onnx", out / f"{name}1" / "model.onnx"
        x = feeds(a)
        np.savez(out / f"{name}_calib.npz", **x)
        small = {k: v[:8] for k, v in x.items()}
        expected = run(a, small)[0]
        barriers = len(api.inspect(str(a))["barriers"])
        cells = {}
        for command, target in (("permute", out / f"{name}_p.onnx"), ("widen", out / f"{name}_w.onnx")):
            extra = ["--factor", "1.5"] if command == "widen" else []
            status = cli(command, str(a), *extra, "-o", str(target))
            cells[command] = verdict(run(target, small), expected) if status == "ok" else status
        merges = []
        for method in ("zip", "permute", "weight"):
            target = out / f"{name}_{method}.onnx"
            status = cli("merge", str(a), str(out / f"{name}_p.onnx"), "--calib", str(out / f"{name}_calib.npz"),
                         "--method", method, "--repair", "none", "-o", str(target))
            merges.append(verdict(run(target, small), expected) if status == "ok" else status)
        pair = api.merge([str(a), str(b)], calibration=str(out / f"{name}_calib.npz")).report["layers"]
        print(f"| {name} | {barriers} | {cells['permute']} | {cells['widen']} | {' / '.join(merges)} | {pair} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("export", "check"))
    parser.add_argument("--out", type=Path, required=True, help="folder of the exports")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (export if args.step == "export" else check)(args.out)


if __name__ == "__main__":
    main()
