"""Train the fine-tunes sample's models and write them with their data (run from the repo root).

Fine-tunes of one pre-trained model (issue 17), on scikit-learn's digits (8x8 images): a base
ResNet-style CNN (stem 16, stages of one block at 16 and 32 channels) trained briefly on all
ten classes, then fine-tuned, all layers, on class subsets, each with a new head of its own.
Exported in eval mode with torch's legacy exporter (BatchNormalization folded into the convs).
Writes into samples/finetunes/:
  base.onnx                 the pre-trained model, a 10-class head
  ft_a.onnx, ft_b.onnx      fine-tunes on classes 0-4 and 5-9 (5-class heads)
  ft_x.onnx, ft_y.onnx, ft_z.onnx   fine-tunes on classes 0-2, 3-5 and 6-9
  calib.npz                 500 training images of all classes, array "input"
  test.npz                  the held-out images ("input") and labels ("y")
Deterministic (fixed seeds, one thread). Needs torch and scikit-learn: pip install -e .[cpu,torch,dev]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "mixed"))
import digits_sample  # noqa: E402  (samples/mixed/digits_sample.py: the digits scripts as modules)

HERE = Path(__file__).resolve().parent
DIGITS = digits_sample.load("make")
BASE_EPOCHS = 2        # "pre-training": short, so the fine-tunes have something to add
TUNE_EPOCHS = 4
TUNES = {"ft_a": ([0, 1, 2, 3, 4], 1), "ft_b": ([5, 6, 7, 8, 9], 2),  # file stem -> (classes, seed)
         "ft_x": ([0, 1, 2], 3), "ft_y": ([3, 4, 5], 4), "ft_z": ([6, 7, 8, 9], 5)}


def fine_tune(base: nn.Module, x: np.ndarray, y: np.ndarray, classes: list[int], seed: int) -> nn.Module:
    """A copy of ``base`` with a new head for ``classes``, every layer trained on them."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    model.net[-1] = nn.Linear(model.net[-1].in_features, len(classes))
    return DIGITS.train(model, x, y, classes, seed, epochs=TUNE_EPOCHS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x_train, x_test, y_train, y_test = DIGITS.data()
    torch.manual_seed(0)
    base = DIGITS.train(DIGITS.ResNet(width=16, blocks=1, classes=10), x_train, y_train, list(range(10)), 0,
                        epochs=BASE_EPOCHS)
    DIGITS.export_folded(base, args.out / "base.onnx")
    print(f"base: accuracy {DIGITS.accuracy(base, x_test, y_test, list(range(10))):.3f}")
    for name, (classes, seed) in TUNES.items():
        model = fine_tune(base, x_train, y_train, classes, seed)
        DIGITS.export_folded(model, args.out / f"{name}.onnx")
        print(f"{name}: task accuracy {DIGITS.accuracy(model, x_test, y_test, classes):.3f}")
    DIGITS.save_data(args.out, x_train, x_test, y_test)


if __name__ == "__main__":
    main()
