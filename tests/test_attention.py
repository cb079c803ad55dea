"""Transformers as real exporters write them (issue 12): small plain-torch models exported by
torch's legacy exporter at opsets 14 and 17 (and dynamo), a Keras MultiHeadAttention graph as
tf2onnx writes it (Einsum) and YOLOv10's attention, checked by the oracles: ``permute`` and
``widen`` keep the outputs, a merge with a permuted copy gives the model back, and their
attention spaces are free."""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from onnx import TensorProto, helper, numpy_helper

from onnxmerge import api
from onnxmerge.calib.capture import collect_statistics, expose, plan_captures
from onnxmerge.calib.stats import SpaceStats, to_samples
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


def check_oracles(path: str, x: np.ndarray, other: str | None = None, tmp_path=None,
                  methods: tuple[str, ...] = ("permute", "zip")) -> dict:
    """permute and widen keep the outputs; merging ``path`` with a permuted copy of ``other``
    (the same function, maybe another export) gives the model back (with each of ``methods``).
    Returns the last merge's report."""
    model = load_model(path)
    expected = run_all(model, x)
    outputs_close(expected, run_all(api.permute(model, seed=1), x))
    outputs_close(expected, run_all(api.widen(model, factor=1.5, seed=1), x))
    save_model(api.permute(load_model(other or path), seed=2), tmp_path / "permuted.onnx")
    np.save(tmp_path / "calib.npy", x)
    report = {}
    for method in methods:
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


# --- 5. attention written as Einsum ------------------------------------------------------------


KEY_DIM, VALUE_DIM = 8, 6


def keras_mha_encoder(seed: int = 0, layers: int = 2, fin: int = 12) -> onnx.ModelProto:
    """Keras pre-norm encoder layers as tf2onnx writes MultiHeadAttention: its EinsumDense
    projections ``abc,cde->abde`` (kernel [D, H, K], bias [H, K]), scores
    ``aecd,abcd->acbe`` (key, query -> [N, H, T, S]), context ``acbe,aecd->abcd`` and output
    ``abcd,cde->abe`` (kernel [H, V, D]); Dense layers as MatMul + Add. Opset 17."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []

    def param(name: str, shape: tuple, scale: float = 0.4, mean: float = 0.0) -> str:
        inits.append(numpy_helper.from_array((mean + scale * rng.standard_normal(shape)).astype(np.float32), name))
        return name

    def dense(x: str, name: str, fan_in: int, fan_out: int) -> list[onnx.NodeProto]:
        return [helper.make_node("MatMul", [x, param(f"{name}_w", (fan_in, fan_out), fan_in ** -0.5)], [f"{name}_mm"]),
                helper.make_node("Add", [f"{name}_mm", param(f"{name}_b", (fan_out,))], [name])]

    def norm(x: str, name: str) -> onnx.NodeProto:
        return helper.make_node("LayerNormalization", [x, param(f"{name}_g", (D,), 0.3, 1.0), param(f"{name}_b", (D,))],
                                [name], axis=-1)

    def einsum_dense(x: str, name: str, equation: str, kernel: tuple, bias: tuple) -> list[onnx.NodeProto]:
        return [helper.make_node("Einsum", [x, param(f"{name}_kernel", kernel, D ** -0.5)], [f"{name}_e"],
                                 equation=equation),
                helper.make_node("Add", [f"{name}_e", param(f"{name}_bias", bias)], [name])]

    nodes, x = dense("input", "embed", fin, D), "embed"
    for l in range(layers):
        p = f"l{l}_"
        nodes.append(norm(x, p + "ln1"))
        for m, dim in (("q", KEY_DIM), ("k", KEY_DIM), ("v", VALUE_DIM)):
            nodes += einsum_dense(p + "ln1", p + m, "abc,cde->abde", (D, HEADS, dim), (HEADS, dim))
        inits.append(numpy_helper.from_array(np.float32(KEY_DIM ** -0.5), p + "scale"))
        nodes += [helper.make_node("Mul", [p + "q", p + "scale"], [p + "qs"]),
                  helper.make_node("Einsum", [p + "k", p + "qs"], [p + "scores"], equation="aecd,abcd->acbe"),
                  helper.make_node("Softmax", [p + "scores"], [p + "probs"], axis=-1),
                  helper.make_node("Einsum", [p + "probs", p + "v"], [p + "context"], equation="acbe,aecd->abcd")]
        nodes += einsum_dense(p + "context", p + "o", "abcd,cde->abe", (HEADS, VALUE_DIM, D), (D,))
        nodes += [helper.make_node("Add", [x, p + "o"], [p + "res1"]), norm(p + "res1", p + "ln2")]
        nodes += dense(p + "ln2", p + "fc1", D, 2 * D) + [helper.make_node("Relu", [p + "fc1"], [p + "act"])]
        nodes += dense(p + "act", p + "fc2", 2 * D, D) + [helper.make_node("Add", [p + "res1", p + "fc2"], [p + "out"])]
        x = p + "out"
    nodes += [norm(x, "final_ln"), helper.make_node("ReduceMean", ["final_ln"], ["pooled"], axes=[1], keepdims=0)]
    nodes += dense("pooled", "output", D, 5)
    for node in nodes:  # tf2onnx names every node
        node.name = node.output[0]
    graph = helper.make_graph(nodes, "keras_mha", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 6, fin])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


class EinsumBlock(nn.Module):
    """A pre-norm encoder layer whose attention products are ``torch.einsum``: q, k, v Linear
    layers viewed as [N, H, T, Dh], scores ``bhid,bhjd->bhij``, context ``bhij,bhjd->bhid`` and
    an output projection ``bhid,hde->bie`` by a [H, Dh, D] parameter."""

    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.wo = nn.Parameter(torch.randn(HEADS, D // HEADS, D) * D ** -0.5)
        self.bo = nn.Parameter(0.3 * torch.randn(D))
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x):
        n, t, _ = x.shape
        q, k, v = (m(self.norm1(x)).view(n, t, HEADS, D // HEADS).transpose(1, 2) for m in (self.q, self.k, self.v))
        attn = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(D // HEADS), -1)
        x = x + (torch.einsum("bhid,hde->bie", torch.einsum("bhij,bhjd->bhid", attn, v), self.wo) + self.bo)
        return x + self.fc2(torch.relu(self.fc1(self.norm2(x))))


class EinsumEncoder(nn.Module):
    def __init__(self, fin: int = 12, layers: int = 2):
        super().__init__()
        self.embed = nn.Linear(fin, D)
        self.blocks = nn.Sequential(*(EinsumBlock() for _ in range(layers)))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 5)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(x))).mean(1))


EINSUM_SHAPE = (2, 6, 12)


def einsum_model(kind: str, folder, seed: int = 0) -> str:
    """The Keras-style graph (``keras``) or the torch.einsum encoder (``torch``, legacy export
    at opset 17), saved under ``folder``."""
    path = folder / f"{kind}{seed}.onnx"
    if kind == "keras":
        save_model(keras_mha_encoder(seed), path)
        return str(path)
    torch.manual_seed(seed)
    return export(_randomized(EinsumEncoder()), EINSUM_SHAPE, path)


def head_grids(graph) -> list[tuple[int, int]]:
    """(heads, within-head) widths of the block spaces and the spaces on the axis after them."""
    return sorted((graph.table.widths[outer], graph.table.widths[inner]) for outer, inner in graph.axis_grids())


@pytest.mark.parametrize("kind", ["keras", "torch"])
def test_einsum_attention_keeps_its_spaces_free(kind, tmp_path):
    """Einsum's channel flow is read from its equation: no barrier, the heads are one block
    space per layer (q, k and v read them alike) and every attention space is free and
    structured in ``inspect``, captured from a tensor, not matched from the weights."""
    path = einsum_model(kind, tmp_path)
    canonical, graph = api.analyse(load_model(path))
    assert not graph.barriers
    assert sorted(graph.table.widths[s] for s in graph.block_spaces()) == [HEADS] * 2
    pairs = [(HEADS, KEY_DIM), (HEADS, VALUE_DIM)] if kind == "keras" else [(HEADS, D // HEADS)] * 2
    assert head_grids(graph) == sorted(pairs * 2)
    assert all(not graph.space(s).fixed for s in graph.block_spaces())
    report = describe(path, canonical, graph)
    head_dims = {KEY_DIM, VALUE_DIM} if kind == "keras" else {D // HEADS}
    assert all(space["free"] and space["structured"] for space in report["spaces"]
               if space["width"] in {HEADS} | head_dims)
    _, missing = plan_captures(canonical, graph, {s.id for s in graph.free_spaces})
    assert not missing


@pytest.mark.parametrize("kind", ["keras", "torch"])
def test_einsum_attention_oracles(kind, tmp_path):
    """permute and widen keep the outputs, merge(A, permute(A)) gives A with zip, permute and
    weight matching: the Einsum kernels are permuted (and widened) along the axes their
    equation gives them."""
    check_oracles(einsum_model(kind, tmp_path), inputs(EINSUM_SHAPE), tmp_path=tmp_path,
                  methods=("permute", "zip", "weight"))


@pytest.mark.parametrize("kind", ["keras", "torch"])
def test_einsum_attention_random_inits_merge(kind, tmp_path):
    """Two random initialisations zip at every weight layer but the classifier, every space
    matched on statistics (none from the weights)."""
    merge_random_inits([einsum_model(kind, tmp_path, seed) for seed in (0, 1)], inputs(EINSUM_SHAPE), tmp_path)


def merge_random_inits(paths: list[str], x: np.ndarray, tmp_path) -> None:
    """Zip two random initialisations: every weight layer but the classifier zipped, every
    space matched on statistics, finite outputs."""
    np.save(tmp_path / "calib.npy", x)
    result = api.merge(paths, calibration=str(tmp_path / "calib.npy"), options=api.MergeOptions(method="zip"))
    layers = result.report["weight_layers"]
    assert layers["merged"] == layers["total"] - 1
    assert all(row["tensor"] for row in result.report["spaces"])
    assert all(np.isfinite(out).all() for out in run_all(result.model, x))


# --- 6. YOLOv10's attention (PSA) --------------------------------------------------------------


def conv_bn(c_in: int, c_out: int, kernel: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out))


class YoloAttention(nn.Module):
    """Ultralytics' YOLOv10 Attention: a 1x1 qkv conv to C + 2*kd*heads channels viewed as
    (N, heads, 2*kd + hd, H*W) and split along dim 2 into q (kd), k (kd) and v (hd); the
    heads' products, softmax, and v reshaped back to [N, C, H, W] plus a depthwise 3x3
    positional conv of it, then a 1x1 projection."""

    def __init__(self, dim: int, heads: int = 2, ratio: float = 0.5):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.key_dim = int(self.head_dim * ratio)
        self.qkv = conv_bn(dim, dim + 2 * self.key_dim * heads)
        self.proj = conv_bn(dim, dim)
        self.pe = conv_bn(dim, dim, 3, dim)

    def forward(self, x):
        n, c, h, w = x.shape
        q, k, v = self.qkv(x).view(n, self.heads, 2 * self.key_dim + self.head_dim, h * w).split(
            [self.key_dim, self.key_dim, self.head_dim], dim=2)
        attn = ((q.transpose(-2, -1) @ k) * self.key_dim ** -0.5).softmax(-1)
        x = (v @ attn.transpose(-2, -1)).view(n, c, h, w) + self.pe(v.reshape(n, c, h, w))
        return self.proj(x)


class PSA(nn.Module):
    """A stem conv, YOLOv10's PSA block (half the channels through attention and a conv FFN,
    each residual, concatenated with the other half) and a pooled classifier."""

    def __init__(self, c: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.SiLU())
        self.cv1 = conv_bn(c, c)
        self.attn = YoloAttention(c // 2)
        self.ffn = nn.Sequential(conv_bn(c // 2, c), nn.SiLU(), conv_bn(c, c // 2))
        self.cv2 = conv_bn(c, c)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        a, b = self.cv1(self.stem(x)).chunk(2, 1)
        b = b + self.attn(b)
        b = b + self.ffn(b)
        return self.head(torch.relu(self.cv2(torch.cat([a, b], 1))).mean((2, 3)))


PSA_SHAPE = (2, 3, 6, 6)


def psa_model(folder, seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = PSA().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # away from (1, 0, 0), so that a misplaced one shows
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
                m.running_mean.normal_(0.0, 0.3)
    return export(model, PSA_SHAPE, folder / f"psa{seed}.onnx")


def test_yolo_attention_reads_q_and_k_with_their_heads(tmp_path):
    """The q/k feature axis lives only in [N, heads, kd, H*W] (the split of the reshaped qkv):
    read as a (heads, kd) grid it is captured, not matched from the weights."""
    path = psa_model(tmp_path)
    canonical, graph = api.analyse(load_model(path))
    assert not graph.barriers
    assert (2, 4) in head_grids(graph)  # heads x kd
    _, missing = plan_captures(canonical, graph, {s.id for s in graph.free_spaces})
    assert not missing


def test_yolo_attention_oracles(tmp_path):
    check_oracles(psa_model(tmp_path), inputs(PSA_SHAPE), tmp_path=tmp_path, methods=("permute", "zip", "weight"))


def test_yolo_attention_random_inits_merge(tmp_path):
    """The q/k axis too is matched on statistics (from the weights before: a permutation, never zipped)."""
    merge_random_inits([psa_model(tmp_path, seed) for seed in (0, 1)], inputs(PSA_SHAPE), tmp_path)


@pytest.mark.parametrize("kind", ["keras", "psa"])
def test_two_axis_grids_read_in_the_graph_equal_numpy(kind, tmp_path):
    """The fused statistics graph's reading of a grid on two axes ([N, T, H, K] at axes 2-3,
    [N, heads, kd, L] at axes 1-2) against ``to_samples`` of the tensor in numpy."""
    path = einsum_model("keras", tmp_path) if kind == "keras" else psa_model(tmp_path)
    x = inputs(EINSUM_SHAPE if kind == "keras" else PSA_SHAPE, 32)
    canonical, graph = api.analyse(load_model(path))
    units, _ = plan_captures(canonical, graph, {s.id for s in graph.free_spaces})
    units = [u for u in units if u.span == 2]
    widths = [[graph.table.widths[u.spaces[0]] * graph.table.widths[u.spaces[1]]] * 2 for u in units]
    fused, _ = collect_statistics([canonical] * 2, [units] * 2, [[{"input": x}] * 2], widths, "cpu")
    values = run_all(expose(canonical, [u.tensor for u in units]), x)[1:]
    for unit, width, stats, value in zip(units, widths, fused, values):
        copied = SpaceStats.empty(width)
        copied.update([to_samples(value, unit.axis, unit.fold, unit.span)] * 2)
        assert stats.count == copied.count
        # float32 products in the graph: equal up to their rounding, relative to the largest entry
        np.testing.assert_allclose(stats.outer, copied.outer, rtol=0, atol=1e-5 * np.abs(copied.outer).max())
        np.testing.assert_allclose(stats.sum, copied.sum, rtol=0, atol=1e-5 * np.abs(copied.sum).max())


# --- 7. dynamic batch, sequence and image axes, as Hugging Face optimum exports them ---------


class MaskedEncoder(nn.Module):
    """What optimum's exports of Hugging Face models hold with batch and sequence both dynamic:
    position ids sliced to the run-time length, a padding mask expanded to [N, 1, T, T] by a
    run-time Expand (ONNX's own inference names its dims afresh), and GPT-2's Conv1D, which
    runs on rows: (N, T, D) -> (N*T, D) and back to (N, T, 3D) by a target of run-time dims
    around the constant 3D."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(16, D)
        self.pos = nn.Embedding(32, D)
        self.register_buffer("position_ids", torch.arange(32)[None])
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, 5)

    def forward(self, x, mask):
        n, t, _ = x.shape
        h = self.embed(x) + self.pos(self.position_ids[:, :t])
        rows = self.qkv(h.reshape(-1, D)).reshape(n, t, 3 * D)
        q, k, v = (p.view(n, t, HEADS, D // HEADS).transpose(1, 2) for p in rows.split(D, -1))
        bias = ((1.0 - mask[:, None, None, :].float()) * -1e4).expand(n, 1, t, t)
        z = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // HEADS) + bias, -1) @ v
        h = h + self.o(z.transpose(1, 2).reshape(n, t, D))
        return self.head(self.norm(h).mean(1))


class PatchEncoder(nn.Module):
    """A ViT's patch embedding on images of any size: Conv (N, D, h, w) -> flatten(2) to
    (N, D, h*w), one reshape of two unknown dims into one."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, D, 4, stride=4)
        self.fc, self.norm, self.head = nn.Linear(D, D), nn.LayerNorm(D), nn.Linear(D, 5)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(h + self.fc(torch.relu(h))).mean(1))


def dynamic_export(model: nn.Module, feeds: dict[str, np.ndarray], axes: dict[str, dict[int, str]], path) -> str:
    """Legacy export with every named axis dynamic (optimum's way), checked against torch."""
    args = tuple(torch.from_numpy(v) for v in feeds.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), args, str(path), dynamo=False, opset_version=17, input_names=list(feeds),
                          output_names=["output"], dynamic_axes=axes)
    with torch.no_grad():
        np.testing.assert_allclose(_run(str(path), feeds)[0], model(*args).numpy(), atol=1e-4, rtol=1e-3)
    return str(path)


def _run(path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)


def _masked_feeds(count: int, tokens: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    mask = np.ones((count, tokens), np.int64)
    mask[::3, tokens - 3:] = 0  # padded rows
    return {"x": rng.standard_normal((count, tokens, 16)).astype(np.float32), "mask": mask}


@pytest.mark.parametrize("kind", ["masked", "patches"])
def test_dynamic_axes_as_optimum_exports_them(kind, tmp_path):
    """No barrier; permute, widen and merge(A, permute(A)) keep the outputs on a sequence
    length (image size) other than the export's. Before: the mask's Add and the rows' reshape
    (masked), the patch flatten (patches) were barriers, and widen left the run-time target's
    3D as it was."""
    torch.manual_seed(3)
    if kind == "masked":
        model, export_feeds, feeds = MaskedEncoder(), _masked_feeds(2, 12), _masked_feeds(48, 9)
        axes = {"x": {0: "batch", 1: "seq"}, "mask": {0: "batch", 1: "seq"}}
    else:
        model, feeds = PatchEncoder(), {"x": inputs((48, 3, 12, 16))}
        export_feeds, axes = {"x": inputs((2, 3, 16, 16))}, {"x": {0: "batch", 2: "h", 3: "w"}}
    path = dynamic_export(_randomized(model), export_feeds, axes, tmp_path / "m.onnx")
    assert not api.analyse(load_model(path))[1].barriers
    expected = _run(path, feeds)[0]
    for name, rewritten in (("permute", api.permute(load_model(path), seed=1)),
                            ("widen", api.widen(load_model(path), factor=1.5, seed=1))):
        save_model(rewritten, tmp_path / f"{name}.onnx")
        outputs_close([expected], _run(str(tmp_path / f"{name}.onnx"), feeds))
    np.savez(tmp_path / "calib.npz", **feeds)
    result = api.merge([path, str(tmp_path / "permute.onnx")], calibration=str(tmp_path / "calib.npz"),
                       method="zip", repair="none")
    save_model(result.model, tmp_path / "merged.onnx")
    assert result.report["weight_layers"]["merged"] == result.report["weight_layers"]["total"] - 1
    outputs_close([expected, expected], _run(str(tmp_path / "merged.onnx"), feeds))
