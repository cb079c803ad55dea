"""The two small designs every framework builds for the test fixtures, with shared weights.

* ``cnn``: Conv(3->16, 3x3, pad 1) + BN + ReLU -> Conv(16->32, 3x3, pad 1) + BN + ReLU
  -> global average pool -> flatten -> Dense(32->10); one sample is 3x8x8 (NCHW).
* ``mlp``: Dense 64->32 + ReLU -> 32->16 + ReLU -> 16->10.

The weights are drawn once here with numpy, in PyTorch's layouts (Conv ``OIHW``, Dense
``(out, in)``), and every framework loads the same numbers in its own layout: the fixtures of
all frameworks compute the same function, up to float rounding and Keras's NHWC input layout.
BatchNorm statistics and affine parameters are random and far from the identity, so a
converter that drops or misplaces BN is caught.
"""

from __future__ import annotations

import numpy as np

SEED = 0
CNN_SAMPLE_SHAPE = (3, 8, 8)      # (channels, height, width): three, so NHWC exporters transpose
CNN_CHANNELS = (3, 16, 32)
MLP_SIZES = (64, 32, 16, 10)
CLASSES = 10
BN_EPSILON = 1e-5                 # PyTorch's default; Keras (1e-3) must be told
FIXTURE_BATCH = 3                 # the sample batch stored beside each fixture
DESIGNS = ("cnn", "mlp")


def _dense(rng: np.random.Generator, fan_in: int, fan_out: int) -> tuple[np.ndarray, np.ndarray]:
    weight = rng.standard_normal((fan_out, fan_in)) * np.sqrt(2.0 / fan_in)
    bias = 0.1 * rng.standard_normal(fan_out)
    return weight.astype(np.float32), bias.astype(np.float32)


def _batch_norm(rng: np.random.Generator, channels: int, prefix: str) -> dict[str, np.ndarray]:
    values = {
        "weight": 0.6 + 0.8 * rng.random(channels),
        "bias": 0.1 * rng.standard_normal(channels),
        "running_mean": 0.2 * rng.standard_normal(channels),
        "running_var": 0.5 + rng.random(channels),
    }
    return {f"{prefix}.{key}": value.astype(np.float32) for key, value in values.items()}


def cnn_weights() -> dict[str, np.ndarray]:
    """PyTorch ``state_dict`` names and layouts: ``conv1``, ``bn1``, ``conv2``, ``bn2``, ``fc``."""
    rng = np.random.default_rng(SEED)
    weights: dict[str, np.ndarray] = {}
    for index, (cin, cout) in enumerate(zip(CNN_CHANNELS, CNN_CHANNELS[1:]), start=1):
        fan_in = cin * 9
        kernel = rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / fan_in)
        weights[f"conv{index}.weight"] = kernel.astype(np.float32)
        weights[f"conv{index}.bias"] = (0.1 * rng.standard_normal(cout)).astype(np.float32)
        weights.update(_batch_norm(rng, cout, f"bn{index}"))
    weights["fc.weight"], weights["fc.bias"] = _dense(rng, CNN_CHANNELS[-1], CLASSES)
    return weights


def mlp_weights() -> dict[str, np.ndarray]:
    """PyTorch ``state_dict`` names and layouts: ``fc1``, ``fc2``, ``fc3``."""
    rng = np.random.default_rng(SEED + 1)
    weights: dict[str, np.ndarray] = {}
    for index, (fan_in, fan_out) in enumerate(zip(MLP_SIZES, MLP_SIZES[1:]), start=1):
        weights[f"fc{index}.weight"], weights[f"fc{index}.bias"] = _dense(rng, fan_in, fan_out)
    return weights


def fixture_input(design: str, batch: int = FIXTURE_BATCH) -> np.ndarray:
    """The stored sample input: NCHW images for ``cnn``, feature rows for ``mlp``."""
    rng = np.random.default_rng(SEED + 2)
    shape = CNN_SAMPLE_SHAPE if design == "cnn" else (MLP_SIZES[0],)
    return rng.standard_normal((batch, *shape)).astype(np.float32)


def to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
