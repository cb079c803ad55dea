"""Time to analyse (canonicalise + find feature spaces) a ResNet-50-size graph.

Target (issue 2): under 2 s on a 2-core machine for ~25 M parameters and 160+ nodes.
Baseline measured in the same run: onnx.load + onnx shape inference of the same file, the
floor any ONNX tool pays. Run: python benchmarks/bench_analyse.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import onnx
import torch
from torch import nn

from onnxmerge.api import analyse
from onnxmerge.io import load_model


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        c_out = width * 4
        self.body = nn.Sequential(
            nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.short = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                      if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x):
        return torch.relu(self.body(x) + self.short(x))


def resnet50() -> nn.Module:
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    c_in = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for b in range(blocks):
            layers.append(Bottleneck(c_in, width, stride if b == 0 else 1))
            c_in = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000)]
    return nn.Sequential(*layers).eval()


def timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for label, kwargs in (("BN folded", {}), ("BN kept", {"training": torch.onnx.TrainingMode.PRESERVE,
                                                            "do_constant_folding": False})):
            path = Path(tmp) / "resnet50.onnx"
            torch.onnx.export(resnet50(), (torch.randn(1, 3, 224, 224),), path, dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "N"}, "output": {0: "N"}}, **kwargs)
            model = load_model(path)
            params = sum(onnx.numpy_helper.to_array(i).size for i in model.graph.initializer)
            baseline = timed(lambda: onnx.shape_inference.infer_shapes(load_model(path)))
            total = timed(lambda: analyse(load_model(path)))
            canonical, graph = analyse(model)
            rows.append((label, len(model.graph.node), params, len(graph.spaces), len(graph.free_spaces),
                         baseline, total))
    print(f"{'graph':10} {'nodes':>5} {'params':>10} {'spaces':>6} {'free':>4} {'load+infer s':>12} "
          f"{'load+analyse s':>14} {'ratio':>5}")
    for label, nodes, params, spaces, free, baseline, total in rows:
        print(f"{label:10} {nodes:5d} {params:10d} {spaces:6d} {free:4d} {baseline:12.2f} {total:14.2f} "
              f"{total / baseline:5.1f}")


if __name__ == "__main__":
    main()
