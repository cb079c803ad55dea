"""A model zoo built in code, used as test fixtures for onnxmerge.

Plain module (no pytest fixtures here).  Import it as ``from tests import zoo``.

Public API
----------
TORCH_MODELS : dict[str, () -> (nn.Module, input_shape)]
    Builders of eval-mode torch models with deterministic random weights.  The
    input shape is for batch 2.  Every BatchNorm / GroupNorm / LayerNorm gets
    non-trivial random statistics and affine parameters.
EXPORTERS : dict[str, (model, example_input, path) -> None]
    Write a single self-contained ``.onnx`` file with input ``input``, output
    ``output`` and a dynamic batch axis, then check it against torch in
    onnxruntime (raises ``ExportMismatch`` on a difference).
KNOWN_EXCLUSIONS : dict[(model, exporter), str]
    (model, exporter) pairs that cannot be exported, with the reason.
PAIRS : list[(model, exporter)]
    Every supported pair (all pairs minus the exclusions).
HAS_BATCHNORM : frozenset[str]
    Models that contain ``nn.BatchNorm2d``.
FEATURE_EXTRACTORS : tuple[str, ...]
    Models returning their features (hidden state, pooled vector), not class logits.
build(name) -> (model, input_shape)
sample_input(name, batch=4, seed=1) -> np.ndarray   (float32)
export(name, exporter, path) -> (str, np.ndarray)
torch_forward(model, x) -> np.ndarray
run_onnx(path, x) -> np.ndarray   (first output)
check_matches(path, model, x, rtol=1e-4) -> float   (max abs diff; raises
    ExportMismatch unless diff < rtol * max|torch output|)
sklearn_mlp(path) -> np.ndarray
sklearn_mlp_classifier() -> fitted MLPClassifier (cached), for reference outputs
"""

from __future__ import annotations

import functools
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "TORCH_MODELS",
    "EXPORTERS",
    "KNOWN_EXCLUSIONS",
    "PAIRS",
    "HAS_BATCHNORM",
    "FEATURE_EXTRACTORS",
    "ExportMismatch",
    "build",
    "sample_input",
    "export",
    "torch_forward",
    "run_onnx",
    "check_matches",
    "sklearn_mlp",
    "sklearn_mlp_classifier",
]

NUM_CLASSES = 10


# --------------------------------------------------------------------------
# helpers for deterministic, non-trivial normalisation layers
# --------------------------------------------------------------------------

def _randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    """Give every BN / GN / LN random statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed + 10_000)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))  # in [0.5, 1.5)
                m.weight.copy_(0.6 + 0.8 * torch.rand(c, generator=g))  # in [0.6, 1.4)
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
            elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                if m.weight is not None:
                    m.weight.copy_(0.6 + 0.8 * torch.rand(m.weight.shape, generator=g))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


def _saturate_norms(model: nn.Module, seed: int) -> nn.Module:
    """Random norms, then per BN channel one of four kinds: zero scale (the pre-activation is
    constant), bias -10 (dead after ReLU6), bias +10 (saturated at 6) or left as it is. The
    channels after them carry little or no correlation to match on (constant or collinear), as
    in randomly initialised torchvision MobileNets."""
    _randomize_norms(model, seed)
    g = torch.Generator().manual_seed(seed + 20_000)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                kind = torch.randint(0, 4, (m.num_features,), generator=g)
                m.weight[kind == 0] = 0.0
                m.bias[kind == 1] -= 10.0
                m.bias[kind == 2] += 10.0
    return model


def _conv_bn(cin, cout, k=3, stride=1, groups=1, act: str | None = "relu") -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act == "relu":
        layers.append(nn.ReLU())
    elif act == "relu6":
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 32)
        self.fc3 = nn.Linear(32, NUM_CLASSES)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class VGGBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(3, 16), _conv_bn(16, 16), nn.MaxPool2d(2),   # 16x16 -> 8x8
            _conv_bn(16, 32), _conv_bn(32, 32), nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.flatten = nn.Flatten()                               # [32,4,4] -> 512
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, NUM_CLASSES)

    def forward(self, x):
        x = self.flatten(self.features(x))
        return self.fc2(F.relu(self.fc1(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            _conv_bn(cin, cout, k=1, stride=stride, act=None)
            if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, mid, stride=1, groups=1):
        super().__init__()
        cout = mid * self.expansion
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = (
            _conv_bn(cin, cout, k=1, stride=stride, act=None)
            if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    """With ``classify=False`` a feature extractor (torchvision's ``fc = Identity()``): it
    returns the pooled feature vector."""

    def __init__(self, stem: int, blocks: list[nn.Module], width: int, classify: bool = True):
        super().__init__()
        self.stem = _conv_bn(3, stem)
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, NUM_CLASSES) if classify else nn.Identity()

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _resnet_basic(classify: bool = True):
    blocks = [
        BasicBlock(16, 16), BasicBlock(16, 16),                # stage 1
        BasicBlock(16, 32, stride=2), BasicBlock(32, 32),      # stage 2 (1x1 conv-BN shortcut)
    ]
    return ResNet(16, blocks, 32, classify)


def _resnet_bottleneck():
    blocks = [
        Bottleneck(64, 16), Bottleneck(64, 16),                # stage 1: 64 -> 16 -> 64
        Bottleneck(64, 32, stride=2), Bottleneck(128, 32),     # stage 2: 64 -> 32 -> 128 (projection)
    ]
    return ResNet(64, blocks, 128)


def _resnext():
    blocks = [
        Bottleneck(64, 16, groups=4), Bottleneck(64, 16, groups=4),
        Bottleneck(64, 32, stride=2, groups=4),
    ]
    return ResNet(64, blocks, 128)


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.conv = _conv_bn(cin, growth)

    def forward(self, x):
        return torch.cat([x, self.conv(x)], dim=1)


class DenseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 32)
        # dense block 1: 32 -> 48 -> 64
        self.block1 = nn.Sequential(DenseLayer(32, 16), DenseLayer(48, 16))
        # transition: 1x1 conv + avgpool
        self.trans = nn.Sequential(_conv_bn(64, 32, k=1), nn.AvgPool2d(2))
        # dense block 2: 32 -> 48 -> 64
        self.block2 = nn.Sequential(DenseLayer(32, 16), DenseLayer(48, 16))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, NUM_CLASSES)

    def forward(self, x):
        x = self.block2(self.trans(self.block1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class InceptionBlock(nn.Module):
    def __init__(self, cin, b=16):
        super().__init__()
        self.b1 = _conv_bn(cin, b, k=1)
        self.b2 = nn.Sequential(_conv_bn(cin, b, k=1), _conv_bn(b, b, k=3))
        self.b3 = nn.Sequential(_conv_bn(cin, b, k=1), _conv_bn(b, b, k=5))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), _conv_bn(cin, b, k=1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)


class Inception(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 32)
        self.inc1 = InceptionBlock(32)   # -> 64
        self.pool1 = nn.MaxPool2d(2)
        self.inc2 = InceptionBlock(64)   # -> 64
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, NUM_CLASSES)

    def forward(self, x):
        x = self.inc2(self.pool1(self.inc1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, expand, stride=1):
        super().__init__()
        hid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            _conv_bn(cin, hid, k=1, act="relu6"),
            _conv_bn(hid, hid, k=3, stride=stride, groups=hid, act="relu6"),  # depthwise
            _conv_bn(hid, cout, k=1, act=None),
        )

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res else y


class MobileNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 16, act="relu6")
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 4),             # residual
            InvertedResidual(16, 32, 4, stride=2),   # downsample, no residual
            InvertedResidual(32, 32, 2),             # residual
        )
        self.head = _conv_bn(32, 64, k=1, act="relu6")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, NUM_CLASSES)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class SEModule(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(c, c // r, 1)
        self.expand = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = torch.sigmoid(self.expand(F.relu(self.reduce(self.pool(x)))))
        return x * s


class SEBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = _conv_bn(c, c)
        self.conv2 = _conv_bn(c, c, act=None)
        self.se = SEModule(c)

    def forward(self, x):
        return F.relu(x + self.se(self.conv2(self.conv1(x))))


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 32)
        self.block1 = SEBlock(32)
        self.block2 = SEBlock(32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, NUM_CLASSES)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class ChunkGate(nn.Module):
    """A gated residual block whose gates are ``chunk(3)`` of one conv (torch's legacy exporter
    writes Shape -> Gather -> Add -> Div -> Mul -> Slice, canonicalised to constant Slices)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = _conv_bn(3, width)
        self.conv2 = _conv_bn(width, 3 * width, act=None)
        self.conv3 = _conv_bn(width, width, act=None)
        self.fc = nn.Linear(width, NUM_CLASSES)

    def forward(self, x):
        x = self.stem(x)
        e, f, g = self.conv2(x).chunk(3, dim=1)
        x = self.conv3(torch.sigmoid(e + f) * g) + x
        return self.fc(x.mean((2, 3)))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin, branch=16, groups=2):
        super().__init__()
        self.groups = groups
        self.left = _conv_bn(cin, branch, k=3)
        self.right = nn.Sequential(_conv_bn(cin, branch, k=1), _conv_bn(branch, branch, k=3))
        self.fuse = _conv_bn(2 * branch, 2 * branch, k=1)

    def forward(self, x):
        y = torch.cat([self.left(x), self.right(x)], dim=1)
        return self.fuse(channel_shuffle(y, self.groups))


class ShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 16)
        self.unit1 = ShuffleUnit(16)   # -> 32
        self.unit2 = ShuffleUnit(32)   # -> 32
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, NUM_CLASSES)

    def forward(self, x):
        x = self.unit2(self.unit1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _conv_gn(cin, cout, act=True):
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(4, cout)]
    if act:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class GroupNormCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _conv_gn(3, 32)
        self.conv1 = _conv_gn(32, 32)
        self.conv2 = _conv_gn(32, 32, act=False)
        self.down = nn.MaxPool2d(2)
        self.conv3 = _conv_gn(32, 64)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, NUM_CLASSES)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.conv2(self.conv1(x)))   # residual
        x = self.conv3(self.down(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class EncoderLayer(nn.Module):
    def __init__(self, d=64, heads=4, gelu_approx="none"):
        super().__init__()
        self.h = heads
        self.dh = d // heads
        self.ln1 = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.act = nn.GELU(approximate=gelu_approx)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        n, t, d = x.shape
        y = self.ln1(x)
        q = self.q(y).view(n, t, self.h, self.dh).transpose(1, 2)
        k = self.k(y).view(n, t, self.h, self.dh).transpose(1, 2)
        v = self.v(y).view(n, t, self.h, self.dh).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.dh), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(n, t, d)
        x = x + self.o(y)
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    """With ``classify=False`` an encoder exported as a feature extractor: it returns the
    hidden state [N, T, D] (BERT's ``last_hidden_state``)."""

    def __init__(self, gelu_approx="none", t=8, fin=16, d=64, layers=2, classify=True):
        super().__init__()
        self.embed = nn.Linear(fin, d)
        self.pos = nn.Parameter(torch.zeros(1, t, d))
        self.layers = nn.Sequential(*[EncoderLayer(d, 4, gelu_approx) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, NUM_CLASSES) if classify else None

    def forward(self, x):
        x = self.embed(x) + self.pos
        x = self.ln(self.layers(x))
        return x if self.head is None else self.head(x[:, 0])


def _transformer(approx, classify=True):
    m = Transformer(approx, classify=classify)
    with torch.no_grad():
        m.pos.normal_(0.0, 0.5)   # torch.manual_seed is set by the builder wrapper
    return m


class OptionABlock(nn.Module):
    """CIFAR ResNet basic block with the option-A shortcut (He et al. 2016): where the width
    doubles, the input is subsampled and padded with zero channels on both sides, no weights."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.pad:
            x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + x)


class ResNet20A(nn.Module):
    """ResNet-20 for CIFAR (3 stages of 3 option-A blocks at 16, 32, 64 channels)."""

    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 16)
        blocks, cin = [], 16
        for cout in (16, 32, 64):
            for k in range(3):
                blocks.append(OptionABlock(cin, cout, 2 if k == 0 and cout != cin else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, NUM_CLASSES)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class PixelShuffleNet(nn.Module):
    """A sub-pixel upsampler (torch PixelShuffle, ONNX DepthToSpace CRD) near the input, then a
    classifier."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)  # 32 channels at 16x16 -> 8 at 32x32
        self.conv2 = _conv_bn(8, 16, stride=2)
        self.conv3 = _conv_bn(16, 16)
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x):
        x = self.conv3(self.conv2(F.relu(self.shuffle(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


class GroupsInGroups(nn.Module):
    """A grouped conv, then a depthwise conv with channel multiplier 2 (as FastViT's patch
    embeddings): the latter's output channels form (group, channel, pair) with a width-2 pair
    space that no tensor shows on its own."""

    def __init__(self):
        super().__init__()
        self.conv1 = _conv_bn(3, 8)
        self.conv2 = _conv_bn(8, 16, groups=2)
        self.conv3 = _conv_bn(16, 32, groups=16)
        self.conv4 = _conv_bn(32, 16, k=1)
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x):
        x = self.conv4(self.conv3(self.conv2(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


IMG = (2, 3, 16, 16)

_SPECS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (MLP, (2, 64)),
    "vgg_bn": (VGGBN, IMG),
    "resnet_basic": (_resnet_basic, IMG),
    "resnet_bottleneck": (_resnet_bottleneck, IMG),
    "densenet": (DenseNet, IMG),
    "inception": (Inception, IMG),
    "mobilenetv2": (MobileNetV2, IMG),
    "mobilenetv2_saturated": (MobileNetV2, IMG),
    "resnext": (_resnext, IMG),
    "squeeze_excite": (SqueezeExcite, IMG),
    "shufflenet": (ShuffleNet, IMG),
    "groupnorm_cnn": (GroupNormCNN, IMG),
    "resnet20_option_a": (ResNet20A, IMG),
    "pixel_shuffle": (PixelShuffleNet, IMG),
    "groups_in_groups": (GroupsInGroups, IMG),
    "transformer": (lambda: _transformer("none"), (2, 8, 16)),
    "transformer_tanh_gelu": (lambda: _transformer("tanh"), (2, 8, 16)),
    "transformer_encoder": (lambda: _transformer("none", classify=False), (2, 8, 16)),
    "resnet_features": (lambda: _resnet_basic(classify=False), IMG),
}

FEATURE_EXTRACTORS: tuple[str, ...] = ("transformer_encoder", "resnet_features")


_NORMS: dict[str, Callable[[nn.Module, int], nn.Module]] = {"mobilenetv2_saturated": _saturate_norms}


def _make_builder(name: str, ctor: Callable[[], nn.Module], shape: tuple[int, ...]):
    seed = sum((i + 1) * ord(ch) for i, ch in enumerate(name)) % 100_000

    def builder() -> tuple[nn.Module, tuple[int, ...]]:
        # seed the global RNG only for the duration of construction
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ctor()
        return _NORMS.get(name, _randomize_norms)(model, seed), shape

    builder.__name__ = f"build_{name}"
    return builder


TORCH_MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]] = {
    name: _make_builder(name, ctor, shape) for name, (ctor, shape) in _SPECS.items()
}

HAS_BATCHNORM: frozenset[str] = frozenset(
    name for name, b in TORCH_MODELS.items()
    if any(isinstance(m, nn.BatchNorm2d) for m in b()[0].modules())
)


def build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    return TORCH_MODELS[name]()


def sample_input(name: str, batch: int = 4, seed: int = 1) -> np.ndarray:
    """Deterministic float32 standard-normal input batch for model `name`."""
    _, shape = _SPECS[name]
    g = torch.Generator().manual_seed(seed * 7919 + len(name))
    return torch.randn((batch, *shape[1:]), generator=g).numpy().astype(np.float32)


# --------------------------------------------------------------------------
# exporters
# --------------------------------------------------------------------------

class ExportMismatch(AssertionError):
    """An exported ONNX model does not reproduce the torch outputs."""


def torch_forward(model: nn.Module, x) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(x))).numpy()


@functools.lru_cache(maxsize=None)
def _ort():
    import onnxruntime as ort
    ort.set_default_logger_severity(3)
    return ort


def run_onnx(path, x: np.ndarray, output: int | str = 0) -> np.ndarray:
    """Run the model at `path` on CPU with feed {first input: x}; return one output."""
    ort = _ort()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    out_name = names[output] if isinstance(output, int) else output
    return sess.run([out_name], {sess.get_inputs()[0].name: np.asarray(x, dtype=np.float32)})[0]


def check_matches(path, model: nn.Module, x, rtol: float = 1e-4) -> float:
    """Compare onnxruntime with torch: raise ExportMismatch unless
    max|onnx - torch| < rtol * max|torch output| (the output scale)."""
    x = np.asarray(x, dtype=np.float32)
    ref = torch_forward(model, x)
    got = run_onnx(path, x)
    if got.shape != ref.shape:
        raise ExportMismatch(f"{path}: output shape {got.shape} != torch {ref.shape}")
    diff = float(np.abs(got.astype(np.float64) - ref).max())
    tol = rtol * max(float(np.abs(ref).max()), 1e-6)
    if not diff < tol:
        raise ExportMismatch(f"{path}: max abs diff {diff:.3g} >= tolerance {tol:.3g}")
    return diff


_DYN_AXES = {"input": {0: "batch"}, "output": {0: "batch"}}


def _export_legacy(model, x, path, *, bn: bool):
    kwargs = dict(
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes=_DYN_AXES,
    )
    if bn:
        # PRESERVE keeps the module's (eval) mode; without constant folding the
        # BatchNormalization nodes are not merged into the preceding Conv.
        kwargs.update(training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    else:
        kwargs.update(training=torch.onnx.TrainingMode.EVAL, do_constant_folding=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), **kwargs)


def legacy_folded(model: nn.Module, x: torch.Tensor, path) -> None:
    model.eval()
    _export_legacy(model, x, path, bn=False)
    check_matches(path, model, x)


def legacy_bn(model: nn.Module, x: torch.Tensor, path) -> None:
    model.eval()
    _export_legacy(model, x, path, bn=True)
    check_matches(path, model, x)


def dynamo(model: nn.Module, x: torch.Tensor, path) -> None:
    model.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    # the exporter warns once per export that torchvision ops cannot be registered
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=True,
            external_data=False,   # one self-contained file, no .onnx.data sidecar
            input_names=["input"],
            output_names=["output"],
            dynamic_shapes=({0: batch},),
            verbose=False,
            report=False,
        )
    data = Path(str(path) + ".data")
    if data.exists():   # should not happen with external_data=False
        raise RuntimeError(f"dynamo export wrote a sidecar {data}")
    check_matches(path, model, x)


EXPORTERS: dict[str, Callable[[nn.Module, torch.Tensor, str], None]] = {
    "legacy_folded": legacy_folded,
    "legacy_bn": legacy_bn,
    "dynamo": dynamo,
}

# (model, exporter) -> reason.  Pairs listed here are not exported by the zoo.
KNOWN_EXCLUSIONS: dict[tuple[str, str], str] = {}

PAIRS: list[tuple[str, str]] = [
    (m, e) for m in TORCH_MODELS for e in EXPORTERS if (m, e) not in KNOWN_EXCLUSIONS
]


def export(name: str, exporter: str, path) -> tuple[str, np.ndarray]:
    """Build model `name`, export it with `exporter` to `path` (checked against
    torch) and return (path, a deterministic float32 sample batch of size 4)."""
    if (name, exporter) in KNOWN_EXCLUSIONS:
        raise ValueError(f"{name}/{exporter} is excluded: {KNOWN_EXCLUSIONS[name, exporter]}")
    model, shape = build(name)
    g = torch.Generator().manual_seed(0)
    example = torch.randn(shape, generator=g)
    path = os.fspath(path)
    EXPORTERS[exporter](model, example, path)
    return path, sample_input(name)


# --------------------------------------------------------------------------
# scikit-learn
# --------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target


@functools.lru_cache(maxsize=1)
def sklearn_mlp_classifier():
    """Tiny MLPClassifier(32, 16) fitted on all of load_digits (features / 16)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    X, y = _digits()
    clf = MLPClassifier(hidden_layer_sizes=(32, 16), max_iter=40, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X, y)
    return clf


def sklearn_mlp(path) -> np.ndarray:
    """Write the skl2onnx export of `sklearn_mlp_classifier()` to `path`.

    Input `input` float32 [None, 64]; outputs `label` (int64 [N]) and
    `probabilities` (float32 [N, 10], zipmap disabled).  Returns a
    deterministic float32 sample batch of 4 digits.
    """
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    clf = sklearn_mlp_classifier()
    onx = convert_sklearn(
        clf,
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={id(clf): {"zipmap": False}},
    )
    Path(path).write_bytes(onx.SerializeToString())
    X, _ = _digits()
    return X[[0, 1, 2, 3]].copy()
