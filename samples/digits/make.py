"""Train the digits sample models and write them with their data (run from the repo root).

Pairs of small ResNet-style CNNs are trained on scikit-learn's bundled digits (8x8 images),
one on classes 0-4 and one on classes 5-9, and exported with torch's legacy exporter keeping
BatchNormalization. Writes into samples/digits/:
  resnet_a.onnx, resnet_b.onnx  same architecture (stem 32, stages 32 and 64), tasks 0-4 / 5-9
  resnet_b_wide.onnx            twice as wide (stem 64, stages 64 and 128), task 5-9
  resnet_a_deep.onnx            3 blocks per stage instead of 2, task 0-4
  vgg_a.onnx, vgg_b.onnx        plain VGG-style CNNs (conv-BN-ReLU, 2 per stage), tasks 0-4 / 5-9
  vgg_a_deep.onnx               3 conv layers per stage, task 0-4
  calib.npz                     500 training images of all classes, array "input"
  test.npz                      the held-out images ("input") and labels ("y")
Needs torch and scikit-learn: pip install -e .[cpu,torch,dev]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = Path(__file__).resolve().parent
TASKS = {"a": list(range(5)), "b": list(range(5, 10))}


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet(nn.Module):
    """stem -> stage of `blocks` blocks at `width` -> stage at 2*width (stride 2) -> pool -> linear;
    `widths` gives other stages (each after the first starting with stride 2)."""

    def __init__(self, width: int = 32, blocks: int = 2, classes: int = 5, widths: tuple[int, ...] | None = None):
        super().__init__()
        widths = widths or (width, 2 * width)
        layers = [nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
        c_in = widths[0]
        for stage, c_out in enumerate(widths):
            for b in range(blocks):
                layers.append(Block(c_in, c_out, 2 if stage and b == 0 else 1))
                c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class VGG(nn.Module):
    """`layers` conv-BN-ReLU per stage at `width`, max-pool, `layers` at 2*width -> pool -> linear."""

    def __init__(self, width: int = 32, layers: int = 2, classes: int = 5):
        super().__init__()
        modules: list[nn.Module] = []
        c_in = 1
        for stage, c_out in enumerate((width, 2 * width)):
            if stage:
                modules.append(nn.MaxPool2d(2))
            for _ in range(layers):
                modules += [nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
                c_in = c_out
        modules += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes)]
        self.net = nn.Sequential(*modules)

    def forward(self, x):
        return self.net(x)


MODELS = {  # file stem -> (task, builder, seed)
    "resnet_a": ("a", lambda: ResNet(32), 1),
    "resnet_b": ("b", lambda: ResNet(32), 2),
    "resnet_b_wide": ("b", lambda: ResNet(64), 2),
    "resnet_a_deep": ("a", lambda: ResNet(32, blocks=3), 3),
    "vgg_a": ("a", lambda: VGG(32), 4),
    "vgg_b": ("b", lambda: VGG(32), 5),
    "vgg_a_deep": ("a", lambda: VGG(32, layers=3), 6),
}


def data(seed: int = 0):
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    return train_test_split(x, digits.target, test_size=0.25, random_state=seed, stratify=digits.target)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, classes: list[int], seed: int, epochs: int = 15,
          one_cycle: bool = False) -> nn.Module:
    """Adam at 3e-3 on the samples of ``classes`` (labels renumbered 0..k-1), batches of 64;
    ``one_cycle``: the learning rate follows a one-cycle schedule peaking at 3e-3 (the hard sample)."""
    torch.manual_seed(seed)
    mask = np.isin(y, classes)
    inputs = torch.from_numpy(x[mask])
    targets = torch.from_numpy(np.searchsorted(classes, y[mask]))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = None
    if one_cycle:
        steps = epochs * math.ceil(len(inputs) / 64)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs))
        for start in range(0, len(order), 64):
            batch = order[start:start + 64]
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(inputs[batch]), targets[batch]).backward()
            optimiser.step()
            if schedule is not None:
                schedule.step()
    return model.eval()


def export(model: nn.Module, path: Path) -> None:
    torch.onnx.export(model, (torch.zeros(2, 1, 8, 8),), path, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "N"}, "output": {0: "N"}},
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)


def export_folded(model: nn.Module, path: Path, size: int = 8) -> None:
    """Eval-mode export, as users export: the legacy exporter folds each BatchNormalization into
    its conv (the hard and fine-tunes samples)."""
    torch.onnx.export(model, (torch.zeros(2, 1, size, size),), path, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "N"}, "output": {0: "N"}})


def save_data(out: Path, x_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> None:
    """calib.npz (500 training images drawn with seed 0, array "input") and test.npz."""
    pick = np.random.default_rng(0).choice(len(x_train), 500, replace=False)
    np.savez_compressed(out / "calib.npz", input=x_train[pick])
    np.savez_compressed(out / "test.npz", input=x_test, y=y_test)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, classes: list[int]) -> float:
    mask = np.isin(y, classes)
    with torch.no_grad():
        predicted = model(torch.from_numpy(x[mask])).argmax(1).numpy()
    return float((np.asarray(classes)[predicted] == y[mask]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    x_train, x_test, y_train, y_test = data()
    for name, (task, build, seed) in MODELS.items():
        torch.manual_seed(seed)
        model = train(build(), x_train, y_train, TASKS[task], seed)
        export(model, args.out / f"{name}.onnx")
        print(f"{name}: task accuracy {accuracy(model, x_test, y_test, TASKS[task]):.3f}")
    save_data(args.out, x_train, x_test, y_test)


if __name__ == "__main__":
    main()
