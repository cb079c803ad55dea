"""Public CNNs (torchvision and timm) as test models for onnxmerge (issue 13).

Plain module, shared by ``tests/test_public_zoo.py`` and ``scripts/zoo_table.py``.

Importing torchvision: PyPI's torchvision wheel is a CUDA build whose C++ ops do not load with
the CPU torch, and ``import torchvision`` then dies registering fake kernels for ``nms`` and
``qnms`` (``torchvision/_meta_registrations.py``: "operator torchvision::nms does not exist").
The model definitions need none of those ops, so ``import_torchvision`` skips exactly those two
registrations while the ops are missing. The shim lives here, in test code, never in onnxmerge.

Public API
----------
MODELS : dict[str, Spec]           the matrix: "tv_<name>" (torchvision) and "timm_<name>"
EXPORTERS : tuple[str, ...]        legacy_folded (BN folded, the default), legacy_bn, dynamo
ORACLES : tuple[str, ...]          permute, merge_self, widen, deepen, merge_random
TOLERANCE                          1e-4: relative error = max|got - expected| / max|expected|
build(name, seed) -> nn.Module     random weights, randomised BN statistics and constants
export(name, exporter, path, seed) writes the .onnx file (checked against torch, rtol 1e-4)
sample_input(name, batch, seed) -> float32 array
run_oracle(oracle, path, x, tmp, other=None) -> OracleResult
"""

from __future__ import annotations

import contextlib
import importlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from tests import zoo

TOLERANCE = 1e-4
SIZE = 64           # input height and width
CALIB = 16          # calibration samples (onnxmerge's minimum)
EXPORTERS = ("legacy_folded", "legacy_bn", "dynamo")
ORACLES = ("permute", "merge_self", "widen", "deepen", "merge_random")

_MISSING_OPS = ("torchvision::nms", "torchvision::qnms")


# --------------------------------------------------------------------------
# importing torchvision and timm with the CPU torch
# --------------------------------------------------------------------------

def _op_exists(qualname: str) -> bool:
    namespace, name = qualname.split("::")
    try:
        getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return False
    return True


@contextlib.contextmanager
def torchvision_shim():
    """Within the block, ``torch.library.register_fake`` for nms/qnms is a no-op decorator
    while those ops are not registered (CUDA torchvision wheel on a CPU torch)."""
    original = torch.library.register_fake

    def register_fake(op, *args, **kwargs):
        if isinstance(op, str) and op in _MISSING_OPS and not _op_exists(op):
            if args and callable(args[0]):   # register_fake(op, fn)
                return args[0]
            return lambda fn: fn
        return original(op, *args, **kwargs)

    torch.library.register_fake = register_fake
    try:
        yield
    finally:
        torch.library.register_fake = original


def import_torchvision():
    """``import torchvision`` (ImportError when it is not installed)."""
    with torchvision_shim():
        return importlib.import_module("torchvision")


def import_timm():
    """``import timm`` (it imports torchvision, so the shim goes first)."""
    with contextlib.suppress(ImportError):
        import_torchvision()
    with torchvision_shim():
        return importlib.import_module("timm")


# --------------------------------------------------------------------------
# the matrix
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    library: str                      # "torchvision" or "timm"
    ctor: Callable[[], nn.Module]
    size: int = SIZE


def _tv(name: str, **kwargs) -> Spec:
    def ctor():
        return getattr(import_torchvision().models, name)(weights=None, num_classes=10, **kwargs)
    return Spec("torchvision", ctor)


def _timm(name: str, **kwargs) -> Spec:
    def ctor():
        return import_timm().create_model(name, pretrained=False, num_classes=10, **kwargs)
    return Spec("timm", ctor)


MODELS: dict[str, Spec] = {
    "tv_resnet18": _tv("resnet18"),
    "tv_resnet50": _tv("resnet50"),
    "tv_resnext50_32x4d": _tv("resnext50_32x4d"),
    "tv_wide_resnet50_2": _tv("wide_resnet50_2"),
    "tv_mobilenet_v2": _tv("mobilenet_v2"),
    "tv_mobilenet_v3_small": _tv("mobilenet_v3_small"),
    "tv_mnasnet0_5": _tv("mnasnet0_5"),
    "tv_efficientnet_b0": _tv("efficientnet_b0"),
    "tv_regnet_y_400mf": _tv("regnet_y_400mf"),
    "tv_convnext_tiny": _tv("convnext_tiny"),
    "tv_shufflenet_v2_x0_5": _tv("shufflenet_v2_x0_5"),
    "tv_squeezenet1_0": _tv("squeezenet1_0"),
    "tv_densenet121": _tv("densenet121"),
    "tv_googlenet": _tv("googlenet", aux_logits=False, init_weights=True),
    "timm_resnet10t": _timm("resnet10t"),
    "timm_efficientnet_b0": _timm("efficientnet_b0"),
    "timm_lcnet_050": _timm("lcnet_050"),
    "timm_mobilenetv3_small_050": _timm("mobilenetv3_small_050"),
    "timm_convnext_atto": _timm("convnext_atto"),
    "timm_regnetx_002": _timm("regnetx_002"),
    "timm_ghostnet_100": _timm("ghostnet_100"),
    "timm_mobilevitv2_050": _timm("mobilevitv2_050"),
}


def _seed(name: str) -> int:
    return sum((i + 1) * ord(ch) for i, ch in enumerate(name)) % 100_000


def _randomize_constants(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter outside the norms whose entries are all equal (zero biases, layer-scale
    at 1e-6, ...) gets random values, so no channel is indistinguishable from another."""
    g = torch.Generator().manual_seed(seed + 30_000)
    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, norms):
                continue
            for param in module.parameters(recurse=False):
                flat = param.detach().reshape(-1)
                if flat.numel() < 2 or not bool((flat == flat[0]).all()):
                    continue
                if float(flat[0]) == 0.0:
                    param.copy_(0.1 * torch.randn(param.shape, generator=g))
                else:   # a scale such as layer-scale's gamma
                    param.copy_(0.6 + 0.8 * torch.rand(param.shape, generator=g))
    return model


def build(name: str, seed: int = 0) -> nn.Module:
    """Model ``name`` in eval mode: random weights (``seed`` picks the initialisation), random
    BN / GN / LN statistics and affine parameters, no constant parameter left."""
    base = _seed(name) + 1000 * seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(base)
        model = MODELS[name].ctor()
    zoo._randomize_norms(model, base)
    _randomize_constants(model, base)
    return model.eval()


def sample_input(name: str, batch: int = CALIB, seed: int = 1) -> np.ndarray:
    size = MODELS[name].size
    g = torch.Generator().manual_seed(seed * 7919 + len(name))
    return torch.randn((batch, 3, size, size), generator=g).numpy().astype(np.float32)


def export(name: str, exporter: str, path, seed: int = 0) -> str:
    """Export ``build(name, seed)`` with one of ``tests.zoo.EXPORTERS`` (input ``input``, output
    ``output``, dynamic batch; checked against torch in onnxruntime with rtol 1e-4)."""
    model = build(name, seed)
    example = torch.as_tensor(sample_input(name, batch=2, seed=0))
    path = os.fspath(path)
    zoo.EXPORTERS[exporter](model, example, path)
    return path


# --------------------------------------------------------------------------
# oracles
# --------------------------------------------------------------------------

@dataclass
class OracleResult:
    error: float | None = None      # relative error of a function-preservation oracle
    zipped: str | None = None       # merge_random: the report's "k of n layers zipped"
    seconds: float = 0.0
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None or self.error <= TOLERANCE


def run_all(model, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def relative_error(expected: list[np.ndarray], got: list[np.ndarray]) -> float:
    """max |got - expected| / max |expected| over all outputs (``inf`` on a shape mismatch)."""
    if len(expected) != len(got) or any(a.shape != b.shape for a, b in zip(expected, got)):
        return float("inf")
    diff = max(float(np.abs(b.astype(np.float64) - a).max()) for a, b in zip(expected, got))
    scale = max(float(np.abs(a).max()) for a in expected)
    return diff / max(scale, 1e-12)


def run_oracle(oracle: str, path: str, x: np.ndarray, tmp: Path, other: str | None = None) -> OracleResult:
    """Run one oracle on the model file ``path`` with inputs ``x`` (also the calibration data);
    ``other`` is a second random initialisation for ``merge_random``. Exceptions propagate."""
    from onnxmerge import api
    from onnxmerge.io import load_model, save_model

    clock = time.perf_counter()
    tmp = Path(tmp)
    model = load_model(path)
    expected = run_all(model, x)
    result = OracleResult()
    if oracle == "permute":
        result.error = relative_error(expected, run_all(api.permute(model, seed=11), x))
    elif oracle == "widen":
        result.error = relative_error(expected, run_all(api.widen(model, factor=1.5, seed=3), x))
    elif oracle == "deepen":
        result.error = relative_error(expected, run_all(api.deepen(model, blocks=1, seed=2), x))
    elif oracle in ("merge_self", "merge_random"):
        calib = tmp / "calib.npy"
        np.save(calib, x)
        if oracle == "merge_self":
            copy = tmp / "permuted.onnx"
            save_model(api.permute(model, seed=1), copy)
            options = api.MergeOptions(method="zip", repair="none")
        else:
            copy = Path(other)
            options = api.MergeOptions(method="zip")
        merged = api.merge([path, str(copy)], calibration=str(calib), options=options)
        got = run_all(merged.model, x)
        result.zipped = merged.report["layers"]
        result.note = merged.report["repair"]
        if oracle == "merge_self":
            result.error = relative_error(expected + expected, got)
        elif not all(np.isfinite(o).all() for o in got if o.dtype.kind == "f"):
            raise AssertionError("the merged model's outputs are not finite")
    else:
        raise ValueError(f"unknown oracle {oracle}")
    result.seconds = time.perf_counter() - clock
    return result
