"""Transformers as real exporters write them (issue 12): small plain-torch models exported by
torch's legacy exporter at opsets 14 and 17 (and dynamo), checked by the oracles: ``permute``
and ``widen`` keep the outputs, a merge with a permuted copy gives the model back, and their
attention spaces are free."""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from onnxmerge import api
from onnxmerge.graph.layout import Concat
from onnxmerge.inspection import describe
from onnxmerge.io import load_model, save_model
from tests.helpers import run_all, outputs_close

D, HEADS = 32, 4


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.3 * torch.randn(d))
        self.eps = eps

    def forward(self, x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Encoder(nn.Module):
    """Pre-norm encoder layers on [N, T, D]; ``norm`` is LayerNorm or RMSNorm; heads split
    by ``view(n, t, heads, head_dim)`` with n and t read from the tensor, or as Hugging Face's
    BERT does, ``view(*x.shape[:-1], -1, head_dim)`` (``infer_heads``)."""

    def __init__(self, norm=nn.LayerNorm, fin: int = 16, layers: int = 2, infer_heads: bool = False):
        super().__init__()
        self.infer_heads = infer_heads
        self.embed = nn.Linear(fin, D)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            norm1=norm(D), q=nn.Linear(D, D), k=nn.Linear(D, D), v=nn.Linear(D, D), o=nn.Linear(D, D),
            norm2=norm(D), fc1=nn.Linear(D, 2 * D), fc2=nn.Linear(2 * D, D))) for _ in range(layers))
        self.norm = norm(D)
        self.head = nn.Linear(D, 5)

    def heads(self, x):
        if self.infer_heads:
            return x.view(*x.shape[:-1], -1, D // HEADS).transpose(1, 2)
        return x.view(x.size(0), x.size(1), HEADS, D // HEADS).transpose(1, 2)

    def joined(self, z):
        return z.reshape(*z.shape[:2], -1) if self.infer_heads else z.reshape(z.size(0), z.size(1), D)

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            y = b["norm1"](x)
            q, k, v = (self.heads(b[m](y)) for m in "qkv")
            z = (torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // HEADS), -1) @ v).transpose(1, 2)
            x = x + b["o"](self.joined(z))
            x = x + b["fc2"](torch.relu(b["fc1"](b["norm2"](x))))
        return self.head(self.norm(x).mean(1))


def _randomized(model: nn.Module) -> nn.Module:
    """Norm affines away from (1, 0), so that a misplaced scale or bias shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return model.eval()


def build(kind: str) -> nn.Module:
    torch.manual_seed(12)
    return _randomized({"layernorm": lambda: Encoder(), "rmsnorm": lambda: Encoder(RMSNorm),
                        "bert": lambda: Encoder(infer_heads=True)}[kind]())


SHAPES = {"layernorm": (2, 8, 16), "rmsnorm": (2, 8, 16), "bert": (2, 16, 16)}


def export(model: nn.Module, shape: tuple, path, *, opset: int = 17, dynamo: bool = False,
           dynamic: tuple[int, ...] = (0,)) -> str:
    """Export with the given axes dynamic and check onnxruntime against torch."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    names = {0: "batch", 1: "seq"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            dims = {k: torch.export.Dim(names[k], min=2, max=4096) for k in dynamic}
            torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False, opset_version=opset,
                              input_names=["input"], output_names=["output"], dynamic_shapes=(dims,),
                              verbose=False, report=False)
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["output"], dynamic_axes={"input": {k: names[k] for k in dynamic}},
                              do_constant_folding=True)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(run_all(load_model(path), x.numpy())[0], expected, atol=1e-4, rtol=1e-3)
    return str(path)


def inputs(shape: tuple, count: int = 64) -> np.ndarray:
    return np.random.default_rng(3).standard_normal((count, *shape[1:])).astype(np.float32)


def check_oracles(path: str, x: np.ndarray, other: str | None = None, tmp_path=None) -> dict:
    """permute and widen keep the outputs; merging ``path`` with a permuted copy of ``other``
    (the same function, maybe another export) gives the model back (zip and permute). Returns
    the zip merge's report."""
    model = load_model(path)
    expected = run_all(model, x)
    outputs_close(expected, run_all(api.permute(model, seed=1), x))
    outputs_close(expected, run_all(api.widen(model, factor=1.5, seed=1), x))
    save_model(api.permute(load_model(other or path), seed=2), tmp_path / "permuted.onnx")
    np.save(tmp_path / "calib.npy", x)
    report = {}
    for method in ("permute", "zip"):
        result = api.merge([path, str(tmp_path / "permuted.onnx")], calibration=str(tmp_path / "calib.npy"),
                           options=api.MergeOptions(method=method, repair="none"))
        outputs_close(expected + expected, run_all(result.model, x))
        report = result.report
    return report


def free_and_barriers(path: str) -> tuple[int, int]:
    _, graph = api.analyse(load_model(path))
    return len(graph.free_spaces), len(graph.barriers)


# --- 1. LayerNorm and RMSNorm written as elementwise ops -------------------------------------


@pytest.fixture(scope="module")
def layernorm_exports(tmp_path_factory) -> dict[str, str]:
    folder, model = tmp_path_factory.mktemp("layernorm"), build("layernorm")
    return {name: export(model, SHAPES["layernorm"], folder / f"{name}.onnx", opset=opset, dynamo=dynamo)
            for name, opset, dynamo in (("legacy14", 14, False), ("legacy17", 17, False), ("dynamo18", 18, True))}


def test_decomposed_layer_norm_is_the_op(layernorm_exports):
    """The opset-14 export's ReduceMean/Sub/Pow/Sqrt/Div chains become LayerNormalization (the
    model raised to opset 17): its canonical graph is the opset-17 export's, op by op."""
    (old, old_graph), (new, new_graph) = (api.analyse(load_model(layernorm_exports[name]))
                                          for name in ("legacy14", "legacy17"))
    ops = [node.op_type for node in old.graph.node]
    assert ops == [node.op_type for node in new.graph.node] and ops.count("LayerNormalization") == 5
    assert not old_graph.barriers and len(old_graph.free_spaces) == len(new_graph.free_spaces)


def test_opset_14_and_17_exports_merge_together(layernorm_exports, tmp_path):
    x = inputs(SHAPES["layernorm"])
    report = check_oracles(layernorm_exports["legacy14"], x, layernorm_exports["legacy17"], tmp_path)
    assert report["weight_layers"] == {"merged": 13, "total": 14}


@pytest.mark.parametrize("opset", [14, 17])
def test_rms_norm_stays_free_and_is_no_pool(opset, tmp_path):
    """RMSNorm has no op before opset 23: its mean over the channels (the last axis of
    [N, T, D]) stays a reduction, never a pool over a tracked axis."""
    path = export(build("rmsnorm"), SHAPES["rmsnorm"], tmp_path / "rms.onnx", opset=opset)
    canonical, graph = api.analyse(load_model(path))
    assert "GlobalAveragePool" not in {node.op_type for node in canonical.graph.node}
    assert not graph.barriers
    check_oracles(path, inputs(SHAPES["rmsnorm"]), tmp_path=tmp_path)


def test_mean_over_the_length_of_a_conv1d_is_still_a_pool(tmp_path):
    """[N, C, L] from a Conv1d: the last axis carries no channels, so its mean is a pool."""
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Conv1d(8, 8, 3))
    pooled = _MeanLast(model).eval()
    path = export(pooled, (2, 4, 12), tmp_path / "conv1d.onnx")
    canonical, graph = api.analyse(load_model(path))
    assert "GlobalAveragePool" in {node.op_type for node in canonical.graph.node} and not graph.barriers


class _MeanLast(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x).mean(-1)


# --- 2. head reshapes whose targets are computed at run time ---------------------------------


@pytest.mark.parametrize("exporter,dynamic", [("legacy17", (0,)), ("legacy17", (0, 1)), ("dynamo18", (0, 1))],
                         ids=["legacy-batch", "legacy-batch+seq", "dynamo-batch+seq"])
def test_run_time_head_reshapes_are_resolved(exporter, dynamic, tmp_path):
    """``view(*x.shape[:-1], -1, head_dim)``: the target is Concat(Shape entries, -1, 8); its
    batch and sequence entries copy the input's dimensions (0 in the constant target), so the
    head count follows from the shape algebra and the heads are a grid, permuted whole and
    within, with a sequence length other than the export's."""
    path = export(build("bert"), SHAPES["bert"], tmp_path / "bert.onnx", opset=int(exporter[-2:]),
                  dynamo=exporter.startswith("dynamo"), dynamic=dynamic)
    _, graph = api.analyse(load_model(path))
    assert not graph.barriers
    assert sorted(graph.table.widths[s] for s in graph.block_spaces()) == [HEADS] * 2  # one per layer
    x = inputs((2, 16 if dynamic == (0,) else 11, 16))
    check_oracles(path, x, tmp_path=tmp_path)


# --- 3. the class token ----------------------------------------------------------------------


class ClassToken(nn.Module):
    """ViT's input: a constant [1, 1, D] token expanded over the batch and concatenated before
    the patch embeddings along the sequence axis, plus positional embeddings."""

    def __init__(self, patches: int = 4, fin: int = 12):
        super().__init__()
        self.embed = nn.Linear(fin, D)
        self.cls = nn.Parameter(torch.randn(1, 1, D))
        self.pos = nn.Parameter(0.5 * torch.randn(1, patches + 1, D))
        self.norm = nn.LayerNorm(D)
        self.fc = nn.Linear(D, D)
        self.head = nn.Linear(D, 5)

    def forward(self, x):
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], 1) + self.pos
        x = x + self.fc(torch.relu(self.norm(x)))
        return self.head(x[:, 0])


@pytest.mark.parametrize("exporter", ["legacy17", "dynamo18"])
def test_class_token_is_a_producer_of_the_channel_space(exporter, tmp_path):
    """The expanded token's D axis is the embeddings' channel space (the token a producer of
    it), not a barrier."""
    torch.manual_seed(3)
    path = export(_randomized(ClassToken()), (2, 4, 12), tmp_path / "vit.onnx", opset=int(exporter[-2:]),
                  dynamo=exporter.startswith("dynamo"))
    _, graph = api.analyse(load_model(path))
    assert not graph.barriers
    token = [use for use in graph.params if use.role == "producer" and use.name.endswith("cls")]
    assert len(token) == 1 and token[0].axis == 2
    check_oracles(path, inputs((2, 4, 12)), tmp_path=tmp_path)


# --- 4. packed q/k/v projections -------------------------------------------------------------


class PackedViT(nn.Module):
    """ClassToken's input, then pre-norm blocks whose attention has one packed q/k/v
    projection: ``nn.MultiheadAttention(batch_first=True)`` (``mha``: its [3D, D] in-projection
    reshaped to (3, D) and picked, its out-projection on [T*B, D]) or timm's fused qkv Linear
    reshaped to (B, N, 3, H, Dh), permuted and unbound (``timm``)."""

    def __init__(self, attention: str, patches: int = 4, fin: int = 12, layers: int = 2):
        super().__init__()
        self.attention = attention
        self.embed = nn.Linear(fin, D)
        self.cls = nn.Parameter(torch.randn(1, 1, D))
        self.pos = nn.Parameter(0.5 * torch.randn(1, patches + 1, D))
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            norm1=nn.LayerNorm(D), mha=nn.MultiheadAttention(D, HEADS, batch_first=True), qkv=nn.Linear(D, 3 * D),
            proj=nn.Linear(D, D), norm2=nn.LayerNorm(D), fc1=nn.Linear(D, 2 * D), fc2=nn.Linear(2 * D, D)))
            for _ in range(layers))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 5)

    def fused(self, block: nn.ModuleDict, x):
        n, t, _ = x.shape
        q, k, v = block["qkv"](x).reshape(n, t, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        z = torch.softmax(q @ k.transpose(-2, -1) * (D // HEADS) ** -0.5, -1) @ v
        return block["proj"](z.transpose(1, 2).reshape(n, t, D))

    def forward(self, x):
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], 1) + self.pos
        for b in self.blocks:
            y = b["norm1"](x)
            x = x + (b["mha"](y, y, y, need_weights=False)[0] if self.attention == "mha" else self.fused(b, y))
            x = x + b["fc2"](torch.relu(b["fc1"](b["norm2"](x))))
        return self.head(self.norm(x)[:, 0])


def packed_parts(graph) -> list[tuple]:
    """The q, k, v parts of each packed projection's output axis, as (head, within-head) spaces."""
    parts = []
    for use in graph.params:
        if use.role == "producer" and use.axis == 1 and isinstance(use.layout, Concat) and len(use.layout.parts) == 3:
            parts.append([(g.factors[0].space, g.factors[1].space) for g in use.layout.parts])
    return parts


@pytest.mark.parametrize("exporter", ["legacy17", "dynamo18"])
@pytest.mark.parametrize("attention", ["mha", "timm"])
def test_packed_qkv_is_three_parts_of_heads(attention, exporter, tmp_path):
    """The packed axis is Concat(q, k, v), each part (heads, head_dim): q and k share heads and
    head_dim (their product is contracted), v has its own head_dim and the heads; the size-3
    selector is no space, so no free space is narrower than the heads. The out-projection's
    [T*B, D] rows and the heads reshaped through the batch are followed too."""
    torch.manual_seed(5)
    path = export(_randomized(PackedViT(attention)), (2, 4, 12), tmp_path / "vit.onnx", opset=int(exporter[-2:]),
                  dynamo=exporter.startswith("dynamo"))
    canonical, graph = api.analyse(load_model(path))
    assert not graph.barriers
    assert sorted(s.width for s in graph.free_spaces) == [HEADS] * 2 + [D // HEADS] * 4 + [D, 2 * D, 2 * D]
    layers = packed_parts(graph)
    assert len(layers) == 2
    for (q_heads, q_dim), (k_heads, k_dim), (v_heads, v_dim) in layers:
        assert q_heads == k_heads == v_heads and q_dim == k_dim != v_dim
    report = describe(path, canonical, graph)
    assert all(space["structured"] for space in report["spaces"] if space["width"] in (HEADS, D // HEADS))
    check_oracles(path, inputs((2, 4, 12)), tmp_path=tmp_path)
