"""Public CNNs (torchvision and timm) and transformers (Hugging Face, torchvision, timm, torch)
as test models for onnxmerge (issues 13 and 12).

Plain module, shared by ``tests/test_public_zoo.py`` and ``scripts/zoo_table.py``.

Importing torchvision: PyPI's torchvision wheel is a CUDA build whose C++ ops do not load with
the CPU torch, and ``import torchvision`` then dies registering fake kernels for ``nms`` and
``qnms`` (``torchvision/_meta_registrations.py``: "operator torchvision::nms does not exist").
The model definitions need none of those ops, so ``import_torchvision`` skips exactly those two
registrations while the ops are missing. The shim lives here, in test code, never in onnxmerge.

Public API
----------
MODELS : dict[str, Spec]           the CNN matrix: "tv_<name>" (torchvision) and "timm_<name>"
EXPORTERS : tuple[str, ...]        legacy_folded (BN folded, the default), legacy_bn, dynamo
TRANSFORMERS : dict[str, Spec]     the transformer matrix (small configs, random weights)
TRANSFORMER_EXPORTERS              legacy (dynamo=False, opset 17, folded), dynamo
FAMILIES : dict[str, (registry, exporters)]   "cnn" and "transformers"
ORACLES : tuple[str, ...]          permute, merge_self, widen, deepen, merge_random
TOLERANCE                          1e-4: relative error = max|got - expected| / max|expected|
build(name, seed) -> nn.Module     random weights, randomised BN statistics and constants
export(name, exporter, path, seed) writes the .onnx file (checked against torch, rtol 1e-4)
sample_input(name, batch, seed) -> float32 images, or int64 token ids [N, T]
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
    library: str                      # "torchvision", "timm", "transformers" or "torch"
    ctor: Callable[[], nn.Module]
    size: int = SIZE                  # images: height and width
    kind: str = "image"               # "image" [N, 3, size, size], "tokens" [N, T] int64, "sequence" [N, T, D]


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


# --------------------------------------------------------------------------
# the transformer matrix (issue 12): small configs, random weights, nothing downloaded
# --------------------------------------------------------------------------

TOKENS = 16         # sequence length T of token inputs
VOCAB = 100         # token ids are drawn from [FIRST_TOKEN, VOCAB)
FIRST_TOKEN = 3     # above the special ids (pad 0 / 1, RoBERTa's position ids skip its pad id)
WIDTH = 64          # hidden size of every transformer
IMAGE = 32          # transformer image inputs: 32 x 32, patch 8
TRANSFORMER_CALIB = 32
TRANSFORMER_EXPORTERS = ("legacy", "dynamo")


def import_transformers():
    """``import transformers`` (its vision models may import torchvision: shim first)."""
    with contextlib.suppress(ImportError):
        import_torchvision()
    with torchvision_shim():
        return importlib.import_module("transformers")


class HFOutput(nn.Module):
    """A Hugging Face model called on one positional input, returning one field of its output
    (``last_hidden_state`` or ``logits``) as a plain tensor, so that both exporters see a
    one-input, one-output function."""

    def __init__(self, model: nn.Module, field: str):
        super().__init__()
        self.model = model
        self.field = field

    def forward(self, x):
        return getattr(self.model(x, return_dict=True), self.field)


_BERT = dict(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             vocab_size=VOCAB, max_position_embeddings=32)
_VIT = dict(image_size=IMAGE, patch_size=8, num_channels=3, hidden_size=WIDTH, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=128)


def _hf(config: str, model: str, field: str, kind: str = "tokens", model_kwargs=None, **config_kwargs) -> Spec:
    def ctor():
        tf = import_transformers()
        cfg = getattr(tf, config)(**config_kwargs)
        return HFOutput(getattr(tf, model)(cfg, **(model_kwargs or {})), field)
    return Spec("transformers", ctor, IMAGE, kind)


def _tv_vit() -> nn.Module:
    import_torchvision()   # the shim first: the submodule import below would import torchvision bare
    from torchvision.models.vision_transformer import VisionTransformer
    return VisionTransformer(image_size=IMAGE, patch_size=8, num_layers=2, num_heads=4, hidden_dim=WIDTH,
                             mlp_dim=128, num_classes=10)


def _timm_vit() -> nn.Module:
    """timm's ViT (fused qkv Linear) at the small size."""
    return import_timm().create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMAGE, patch_size=8,
                                      depth=2, embed_dim=WIDTH, num_heads=4, mlp_ratio=2.0, num_classes=10)


def _torch_encoder() -> nn.Module:
    """On the [N, T, 64] input itself: the residual stream is the graph input's space."""
    layer = nn.TransformerEncoderLayer(WIDTH, 4, dim_feedforward=128, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


class EmbeddedEncoder(nn.Module):
    """``nn.TransformerEncoder`` between an input projection and a classifier on the mean token,
    the usual way it is used: the residual stream is a hidden space."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(WIDTH, WIDTH)
        self.encoder = _torch_encoder()
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


TRANSFORMERS: dict[str, Spec] = {
    "hf_bert": _hf("BertConfig", "BertModel", "last_hidden_state", model_kwargs=dict(add_pooling_layer=False),
                   **_BERT),
    "hf_bert_cls": _hf("BertConfig", "BertForSequenceClassification", "logits", num_labels=5, **_BERT),
    "hf_distilbert": _hf("DistilBertConfig", "DistilBertModel", "last_hidden_state", vocab_size=VOCAB, dim=WIDTH,
                         n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=32),
    "hf_distilbert_cls": _hf("DistilBertConfig", "DistilBertForSequenceClassification", "logits", num_labels=5,
                             vocab_size=VOCAB, dim=WIDTH, n_layers=2, n_heads=4, hidden_dim=128,
                             max_position_embeddings=32),
    "hf_roberta": _hf("RobertaConfig", "RobertaModel", "last_hidden_state",
                      model_kwargs=dict(add_pooling_layer=False), **dict(_BERT, max_position_embeddings=34)),
    "hf_roberta_cls": _hf("RobertaConfig", "RobertaForSequenceClassification", "logits", num_labels=5,
                          **dict(_BERT, max_position_embeddings=34)),
    "hf_gpt2": _hf("GPT2Config", "GPT2Model", "last_hidden_state", vocab_size=VOCAB, n_positions=32, n_embd=WIDTH,
                   n_layer=2, n_head=4, n_inner=128, bos_token_id=1, eos_token_id=2),
    "hf_t5_encoder": _hf("T5Config", "T5EncoderModel", "last_hidden_state", vocab_size=VOCAB, d_model=WIDTH, d_kv=16,
                         d_ff=128, num_layers=2, num_heads=4),
    "hf_vit": _hf("ViTConfig", "ViTModel", "last_hidden_state", "image", dict(add_pooling_layer=False), **_VIT),
    "hf_vit_cls": _hf("ViTConfig", "ViTForImageClassification", "logits", "image", num_labels=10, **_VIT),
    "hf_deit_cls": _hf("DeiTConfig", "DeiTForImageClassification", "logits", "image", num_labels=10, **_VIT),
    "tv_vit": Spec("torchvision", _tv_vit, IMAGE),
    "timm_vit": Spec("timm", _timm_vit, IMAGE),
    "torch_encoder": Spec("torch", _torch_encoder, IMAGE, "sequence"),
    "torch_encoder_cls": Spec("torch", EmbeddedEncoder, IMAGE, "sequence"),
}

FAMILIES = {"cnn": (MODELS, EXPORTERS), "transformers": (TRANSFORMERS, TRANSFORMER_EXPORTERS)}


def spec(name: str) -> Spec:
    return MODELS[name] if name in MODELS else TRANSFORMERS[name]


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
        model = spec(name).ctor()
    zoo._randomize_norms(model, base)
    _randomize_constants(model, base)
    return model.eval()


def sample_input(name: str, batch: int | None = None, seed: int = 1) -> np.ndarray:
    """``batch`` (default: the calibration count) inputs of model ``name``: standard normal
    images or sequences (float32), or token ids in [FIRST_TOKEN, VOCAB) (int64, [N, TOKENS])."""
    found = spec(name)
    transformer = name in TRANSFORMERS
    batch = batch or (TRANSFORMER_CALIB if transformer else CALIB)
    g = torch.Generator().manual_seed(seed * 7919 + len(name))
    if found.kind == "tokens":
        return torch.randint(FIRST_TOKEN, VOCAB, (batch, TOKENS), generator=g).numpy().astype(np.int64)
    if found.kind == "sequence":
        return torch.randn((batch, TOKENS, WIDTH), generator=g).numpy().astype(np.float32)
    size = found.size
    return torch.randn((batch, 3, size, size), generator=g).numpy().astype(np.float32)


def export(name: str, exporter: str, path, seed: int = 0) -> str:
    """Export ``build(name, seed)`` with one of ``tests.zoo.EXPORTERS`` (CNNs) or
    ``TRANSFORMER_EXPORTERS`` (input ``input``, output ``output``, dynamic batch; checked against
    torch in onnxruntime with rtol 1e-4)."""
    model = build(name, seed)
    example = torch.as_tensor(sample_input(name, batch=2, seed=0))
    path = os.fspath(path)
    if name in TRANSFORMERS:
        _export_transformer(model, example, path, dynamo=exporter == "dynamo")
    else:
        zoo.EXPORTERS[exporter](model, example, path)
    return path


def _export_transformer(model: nn.Module, x: torch.Tensor, path: str, *, dynamo: bool) -> None:
    """``torch.onnx.export`` with dynamo=False (opset 17, constant folding) or dynamo=True
    (its default opset), batch axis dynamic; then onnxruntime must give torch's output on a
    batch of 3 (another size than the example's) within 1e-4 relative."""
    import logging
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(model, (x,), path, dynamo=True, external_data=False, input_names=["input"],
                              output_names=["output"], dynamic_shapes=({0: batch},), verbose=False, report=False)
        else:
            torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, input_names=["input"],
                              output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                              do_constant_folding=True, training=torch.onnx.TrainingMode.EVAL)
    if os.path.exists(path + ".data"):
        raise RuntimeError(f"the export wrote a sidecar {path}.data")
    from onnxmerge.io import load_model
    check = torch.cat([x, x[:1]])
    with torch.no_grad():
        expected = model(check).numpy()
    got = run_all(load_model(path), check.numpy())
    error = relative_error([expected], got[:1])
    if not error <= TOLERANCE:
        raise zoo.ExportMismatch(f"{path}: onnxruntime differs from torch by {error:.2e} relative")


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
