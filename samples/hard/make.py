"""Train the hard sample's models and write them with their data (run from the repo root).

A harder pair than samples/digits (issue 11): scikit-learn's digits upscaled to 28x28 with random
shifts, rotations and Gaussian noise, and two small three-stage ResNets with stride-2 stages,
model A trained on classes 0-4 and model B on 5-9 from different seeds, exported in eval mode
(BatchNormalization folded into the convs, as users export them). Writes into samples/hard/:
  resnet_a.onnx, resnet_b.onnx  stem conv 3x3 + BN + ReLU, stages of 2 basic blocks at WIDTHS
                                (the second and third start with stride 2 and a 1x1 conv
                                shortcut), global average pool, linear head; tasks 0-4 / 5-9
  calib.npz                     500 augmented training images of all classes, array "input"
  test.npz                      the held-out images, augmented once ("input"), labels ("y")
Deterministic (fixed seeds, one thread). Needs torch and scikit-learn: pip install -e .[cpu,torch,dev]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "mixed"))
import digits_sample  # noqa: E402  (samples/mixed/digits_sample.py: the digits scripts as modules)

HERE = Path(__file__).resolve().parent
TASKS = {"a": list(range(5)), "b": list(range(5, 10))}
SIZE = 28            # images are upscaled from 8x8 to SIZE x SIZE (bilinear)
SHIFT = 4.0          # random shift, up to this many pixels in x and y
ROTATE = 15.0        # random rotation, up to this many degrees either way
NOISE = 0.3          # Gaussian noise std (pixels in [0, 1])
COPIES = 4           # augmented copies of each training image
WIDTHS = (16, 32, 64)
BLOCKS = 2           # basic blocks per stage
EPOCHS = 4
MODELS = {"resnet_a": ("a", 1), "resnet_b": ("b", 2)}  # file stem -> (task, seed)


DIGITS = digits_sample.load("make")
accuracy = DIGITS.accuracy  # a model's accuracy on its own task's test images


def ResNet(widths: tuple[int, ...] = WIDTHS, blocks: int = BLOCKS) -> nn.Module:  # noqa: N802 (the digits sample's)
    """stem -> stages of ``blocks`` blocks at ``widths`` (stride 2 from the second) -> pool -> linear (5 classes)."""
    return DIGITS.ResNet(widths=widths, blocks=blocks)


def augment(images: np.ndarray, copies: int, seed: int) -> np.ndarray:
    """``copies`` augmented 1 x SIZE x SIZE float32 versions of each 8x8 image in [0, 1], copy-major."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(images).float()[:, None].repeat(copies, 1, 1, 1)
    x = nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    n = len(x)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(ROTATE)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * SHIFT * 2 / SIZE  # grid units: [-1, 1] spans SIZE
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    x = nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = x + NOISE * torch.randn(x.shape, generator=generator)
    return x.numpy().astype(np.float32)


def data(seed: int = 0):
    """Augmented training images and labels, augmented test images and labels."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(digits.images / 16.0, digits.target, test_size=0.25,
                                                        random_state=seed, stratify=digits.target)
    return (augment(x_train, COPIES, seed=1), np.tile(y_train, COPIES),
            augment(x_test, 1, seed=2), y_test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--widths", default=",".join(map(str, WIDTHS)),
                        help="channels of the stem and stages, comma-separated (default %(default)s)")
    parser.add_argument("--blocks", type=int, default=BLOCKS, help="basic blocks per stage (default %(default)s)")
    args = parser.parse_args()
    widths = tuple(int(w) for w in args.widths.split(","))
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    x_train, y_train, x_test, y_test = data()
    for name, (task, seed) in MODELS.items():
        torch.manual_seed(seed)
        model = DIGITS.train(ResNet(widths, args.blocks), x_train, y_train, TASKS[task], seed, epochs=EPOCHS, one_cycle=True)
        DIGITS.export_folded(model, args.out / f"{name}.onnx", SIZE)
        print(f"{name}: task accuracy {accuracy(model, x_test, y_test, TASKS[task]):.3f}", flush=True)
    DIGITS.save_data(args.out, x_train, x_test, y_test)


if __name__ == "__main__":
    main()
