"""Depth heterogeneity (method.md §5): blocks and stages, identity blocks (deepen), lifting and
merges of models of different depths. Oracles: deepen preserves outputs, and merging a model with
deepened (and permuted or widened) copies of itself gives the model back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onnxmerge import api
from onnxmerge.graph.canonical import canonicalize
from onnxmerge.stages.prepare import align_models, block_structures, cores
from onnxmerge.sources import read_models
from onnxmerge.errors import RecipeError, UnsupportedGraphError
from onnxmerge.graph.blocks import find_blocks
from onnxmerge.io import load_model, save_model
from tests import zoo
from tests.helpers import run_all, outputs_close, zoo_cases

DEEPEN = [("mlp", "legacy_folded"), ("mlp", "dynamo"), ("vgg_bn", "legacy_bn"), ("vgg_bn", "dynamo"),
          ("resnet_basic", "legacy_bn"), ("resnet_basic", "dynamo"), ("resnet_bottleneck", "legacy_bn"),
          ("resnet_bottleneck", "legacy_folded"), ("transformer", "dynamo"), ("transformer", "legacy_bn"),
          ("transformer_tanh_gelu", "legacy_folded")]


def _units_per_stage(model) -> list[int]:
    return [len(stage.units) for stage in find_blocks(canonicalize(model)).stages]


@pytest.mark.parametrize("name,exporter,expected", [
    ("resnet_basic", "legacy_bn", [3, 2, 1]), ("resnet_basic", "dynamo", [3, 2, 1]),
    ("vgg_bn", "legacy_bn", [2, 2, 1, 1]), ("mlp", "dynamo", [2, 1]), ("transformer", "dynamo", [3, 1])])
def test_stages(zoo_files, name, exporter, expected):
    path, _ = zoo_files.get(name, exporter)
    assert _units_per_stage(load_model(path)) == expected


def test_transformer_units_are_layers(zoo_files):
    path, _ = zoo_files.get("transformer", "dynamo")
    model = canonicalize(load_model(path))
    stage = find_blocks(model).stages[0]
    # embedding, then two layers of (attention block, MLP block)
    assert [len(u.blocks) for u in stage.units] == [1, 2, 2]
    attention, mlp = stage.units[1].blocks
    ops = [model.graph.node[i].op_type for i in attention.nodes]
    assert "Softmax" in ops and "Softmax" not in [model.graph.node[i].op_type for i in mlp.nodes]


def test_cuts_are_dominators(zoo_files):
    """Removing a cut's producer disconnects the output: every input-to-output path goes through it."""
    path, _ = zoo_files.get("resnet_basic", "dynamo")
    model = canonicalize(load_model(path))
    structure = find_blocks(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    for cut in structure.cuts[1:]:
        reached = {model.graph.input[0].name}
        for node in model.graph.node:
            if cut not in node.output and any(x in reached for x in node.input):
                reached.update(node.output)
        assert model.graph.output[0].name not in reached, cut
        assert cut in producers


@pytest.mark.parametrize("name,exporter", zoo_cases(DEEPEN))
def test_deepen_preserves_outputs(zoo_files, name, exporter):
    path, x = zoo_files.get(name, exporter)
    model = load_model(path)
    deeper = api.deepen(model, blocks=3, seed=2)
    assert sum(_units_per_stage(deeper)) == sum(_units_per_stage(model)) + 3
    outputs_close(run_all(model, x), run_all(deeper, x))


def test_deepen_refuses_models_without_repeated_blocks(tmp_path):
    path = tmp_path / "m.onnx"
    zoo.export("mobilenetv2", "dynamo", str(path))
    with pytest.raises(UnsupportedGraphError, match="no stage of repeated blocks"):
        api.deepen(load_model(path), blocks=1)
    with pytest.raises(RecipeError, match="at least one block"):
        api.deepen(load_model(path), blocks=0)


def _calibration(tmp_path, name: str) -> str:
    np.save(tmp_path / "calib.npy", zoo.sample_input(name, batch=64, seed=7))
    return str(tmp_path / "calib.npy")


MERGE_DEPTH = [("resnet_basic", "legacy_bn"), ("vgg_bn", "dynamo"), ("mlp", "legacy_folded"),
               ("transformer", "dynamo"), ("resnet_bottleneck", "dynamo")]


@pytest.mark.parametrize("name,exporter", MERGE_DEPTH, ids=[f"{m}-{e}" for m, e in MERGE_DEPTH])
@pytest.mark.parametrize("permuted", [False, True], ids=["plain", "permuted"])
def test_merge_with_deepened_copy_gives_self(zoo_files, tmp_path, name, exporter, permuted):
    path, x = zoo_files.get(name, exporter)
    model = load_model(path)
    deep = tmp_path / "deep.onnx"
    save_model(api.deepen(model, blocks=2, seed=4), deep)
    first = str(path)
    if permuted:
        first = str(tmp_path / "permuted.onnx")
        save_model(api.permute(model, seed=9), first)
    result = api.merge([first, str(deep)], calibration=_calibration(tmp_path, name),
                       options=api.MergeOptions(repair="none"))
    assert result.report["alignment"]["method"] == "sma"
    expected = run_all(model, x)
    outputs_close(expected + expected, run_all(result.model, x))


def test_three_depths_merge_gives_self(zoo_files, tmp_path):
    """A, A with one identity block, and that model with two more: the deeper models hold the
    shallower ones' blocks in order, so the alignment can place every block on its copy."""
    path, x = zoo_files.get("resnet_basic", "legacy_bn")
    model = load_model(path)
    middle = api.deepen(model, blocks=1, seed=1)
    paths = [str(path)]
    for k, deeper in enumerate([middle, api.deepen(middle, blocks=2, seed=2)]):
        paths.append(str(tmp_path / f"d{k}.onnx"))
        save_model(api.permute(deeper, seed=k), paths[-1])
    result = api.merge(paths, calibration=_calibration(tmp_path, "resnet_basic"),
                       options=api.MergeOptions(repair="none", alpha=1.0))
    expected = run_all(model, x)
    outputs_close(expected * 3, run_all(result.model, x))


def test_depth_and_width_together_give_self(zoo_files, tmp_path):
    # alpha 1, as for width alone (tests/test_widen.py): duplicated features must rejoin their copies
    path, x = zoo_files.get("resnet_basic", "legacy_bn")
    model = load_model(path)
    other = tmp_path / "deep_wide.onnx"
    save_model(api.permute(api.deepen(api.widen(model, factor=2.0, seed=1), blocks=2, seed=3), seed=5), other)
    result = api.merge([str(path), str(other)], calibration=_calibration(tmp_path, "resnet_basic"),
                       options=api.MergeOptions(repair="none", alpha=1.0, width="min"))
    expected = run_all(model, x)
    outputs_close(expected + expected, run_all(result.model, x))


@pytest.mark.parametrize("method", ["uniform", "head-tail", "lma"])
def test_other_alignments_merge_and_run(zoo_files, tmp_path, method):
    path, x = zoo_files.get("resnet_basic", "legacy_bn")
    deep = tmp_path / "deep.onnx"
    save_model(api.deepen(api.permute(load_model(path), seed=1), blocks=2, seed=4), deep)
    result = api.merge([str(path), str(deep)], calibration=_calibration(tmp_path, "resnet_basic"),
                       options=api.MergeOptions(align=method))
    assert result.report["alignment"]["method"] == method
    assert all(np.isfinite(o).all() for o in run_all(result.model, x))


def _resnet_and_deeper(zoo_files, tmp_path) -> tuple[str, str]:
    path, _ = zoo_files.get("resnet_basic", "legacy_bn")
    deep = tmp_path / "deep.onnx"
    save_model(api.deepen(load_model(path), blocks=1), deep)
    return path, str(deep)


def test_sma_needs_calibration(zoo_files, tmp_path):
    path, deep = _resnet_and_deeper(zoo_files, tmp_path)
    with pytest.raises(RecipeError, match="needs --calib"):
        api.merge([path, deep], options=api.MergeOptions(align="sma"))


def test_unmatched_stages_are_named(zoo_files):
    a, _ = zoo_files.get("resnet_basic", "legacy_bn")
    b, _ = zoo_files.get("vgg_bn", "legacy_bn")
    with pytest.raises(UnsupportedGraphError, match="stage"):
        api.merge([a, b], options=api.MergeOptions(align="uniform"))


def test_without_alignment_different_depths_are_refused(zoo_files, tmp_path):
    path, deep = _resnet_and_deeper(zoo_files, tmp_path)
    with pytest.raises(UnsupportedGraphError, match="architecture"):
        api.merge([path, deep], options=api.MergeOptions(align="none"))


def test_deepen_and_align_commands(zoo_files, tmp_path, capsys):
    from onnxmerge.cli import main
    path, x = zoo_files.get("resnet_basic", "legacy_bn")
    deep = tmp_path / "deep.onnx"
    assert main(["deepen", path, "-o", str(deep), "--blocks", "2", "--seed", "1"]) == 0
    outputs_close(run_all(load_model(path), x), run_all(load_model(str(deep)), x))
    calib = _calibration(tmp_path, "resnet_basic")
    plot = tmp_path / "cka.png"
    assert main(["align", path, str(deep), "--calib", calib, "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "stage 1:" in text and "<-id" in text and "CKA" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["align", path, str(deep), "--calib", calib, "--method", "lma", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    maps = report["maps"][path]
    assert report["method"] == "lma" and sum(m is None for s in maps for m in s["map"]) == 2
    assert len(report["cka"][path]) == report["units"][str(deep)]
    assert main(["merge", path, str(deep), "--calib", calib, "-o", str(tmp_path / "merged.onnx")]) == 0
    assert "depths aligned by sma (2 identity blocks inserted)" in capsys.readouterr().out


def test_align_errors_are_one_line(zoo_files, tmp_path, capsys):
    from onnxmerge.cli import main
    path, deep = _resnet_and_deeper(zoo_files, tmp_path)
    assert main(["align", path, str(deep)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("onnxmerge: error: the sma alignment") and "align --method uniform" in error and error.count("\n") == 1
    out = tmp_path / "merged.onnx"
    assert main(["merge", path, str(deep), "-o", str(out), "--align", "sma"]) == 1
    assert not out.exists()


def test_featureless_spaces_are_matched_among_the_other_models(zoo_files, tmp_path):
    """A merged with D = A plus one real extra block. At that position the lifted A has a zeroed
    residual branch, with no features: its spaces are matched within D only, so D's channels keep
    their order and, averaged with A's zeros, the merged first conv there is exactly half D's."""
    from onnx import numpy_helper
    path, x = zoo_files.get("resnet_basic", "legacy_bn")
    deeper = api.deepen(load_model(path), blocks=1, seed=0)
    rng = np.random.default_rng(0)
    for init in deeper.graph.initializer:
        if init.name.endswith("_deepen0"):
            value = numpy_helper.to_array(init)
            fresh = np.abs(rng.normal(1, 0.1, value.shape)) if "var" in init.name else rng.normal(0, 0.1, value.shape)
            init.CopyFrom(numpy_helper.from_array(fresh.astype(value.dtype), init.name))
    deep = tmp_path / "deep.onnx"
    save_model(deeper, deep)
    result = api.merge([str(path), str(deep)], calibration=_calibration(tmp_path, "resnet_basic"),
                       options=api.MergeOptions(repair="none"))
    extra = [n for n in deeper.graph.node if n.op_type == "Conv" and n.name.endswith("_deepen0")][0]
    merged = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    source = {i.name: numpy_helper.to_array(i) for i in deeper.graph.initializer}
    inner = [row for row in result.report["spaces"] if row["tensor"] == extra.output[0]]
    assert inner and inner[0]["within_model_merges"] == [0, 0]
    # the stream space feeding the block is A's = D's, so its input channels are in order too
    np.testing.assert_allclose(merged[extra.input[1]], source[extra.input[1]] / 2, rtol=1e-5, atol=1e-7)


def _tanh_mlp():
    """x -> (Gemm, Tanh) x2 -> Gemm: a repeated block whose Tanh has no identity."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    nodes, inits, source = [], [], "x"
    for k in range(2):
        nodes += [helper.make_node("Gemm", [source, f"w{k}", f"b{k}"], [f"g{k}"], transB=1, name=f"fc{k}"),
                  helper.make_node("Tanh", [f"g{k}"], [f"t{k}"], name=f"tanh{k}")]
        inits += [numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), f"w{k}"),
                  numpy_helper.from_array(rng.normal(size=8).astype(np.float32), f"b{k}")]
        source = f"t{k}"
    nodes.append(helper.make_node("Gemm", [source, "w9"], ["out"], transB=1, name="head"))
    inits.append(numpy_helper.from_array(rng.normal(size=(3, 8)).astype(np.float32), "w9"))
    graph = helper.make_graph(nodes, "tanh_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_block_without_exact_identity_is_named():
    with pytest.raises(UnsupportedGraphError, match=r"no exact identity for this block at Tanh 'tanh1_deepen0'"):
        api.deepen(_tanh_mlp(), blocks=1)


def test_calibrate_shards_serve_a_depth_merge(zoo_files, tmp_path):
    """calibrate lifts like merge does, so its statistics fit the lifted pair."""
    from onnxmerge.calib.stats import save_stats
    path, deep = _resnet_and_deeper(zoo_files, tmp_path)
    calib = _calibration(tmp_path, "resnet_basic")
    options = api.MergeOptions(align="uniform", repair="none")
    stats, meta = api.calibrate([path, deep], calib, options=options)
    save_stats(tmp_path / "stats.npz", stats, meta)
    from_stats = api.merge([path, deep], stats=[str(tmp_path / "stats.npz")], options=options)
    direct = api.merge([path, deep], calibration=calib, options=options)
    x = zoo.sample_input("resnet_basic")
    outputs_close(run_all(direct.model, x), run_all(from_stats.model, x))


def transformers(tmp_path, deep_layers: int, shallow_layers: int) -> tuple[str, str, np.ndarray]:
    """Two encoders of these depths (dynamo export), and calibration inputs saved as calib.npy."""
    import torch
    paths = []
    for layers, seed in ((deep_layers, 0), (shallow_layers, 1)):
        torch.manual_seed(seed)
        paths.append(str(tmp_path / f"t{layers}.onnx"))
        zoo.EXPORTERS["dynamo"](zoo.Transformer(layers=layers).eval(), torch.randn(2, 8, 16), paths[-1])
    x = zoo.sample_input("transformer", batch=64, seed=3)
    np.save(tmp_path / "calib.npy", x)
    return paths[0], paths[1], x


def test_transformers_of_different_depths_merge(tmp_path):
    """A 4-layer and a 2-layer encoder: attention heads of the deep model's extra layers, where the
    lifted model has no features, are matched within the deep model (a grid of heads)."""
    *paths, x = transformers(tmp_path, 4, 2)
    for method in ("sma", "lma"):
        result = api.merge(paths, calibration=str(tmp_path / "calib.npy"), options=api.MergeOptions(align=method))
        maps = result.report["alignment"]["maps"][paths[1]]
        assert [m for stage in maps for m in stage["map"]].count(None) == 2
        outputs = run_all(result.model, x[:4])
        assert len(outputs) == 2 and all(o.shape == (4, 10) and np.isfinite(o).all() for o in outputs)


def test_a_lone_transformer_layer_is_read_as_the_deeper_model_s_layer(tmp_path):
    """Alone, the 1-layer model's attention and MLP blocks repeat nothing and come out as
    separate stages; read in the 3-layer model's pattern they are one layer of its stage."""
    from onnxmerge.graph.blocks import lines_up, regroup_like
    from onnxmerge.graph.canonical import canonicalize
    deep_path, lone_path, _ = transformers(tmp_path, 3, 1)
    deep, lone = (find_blocks(canonicalize(load_model(p))) for p in (deep_path, lone_path))
    assert [len(s.units) for s in deep.stages] == [4, 1] and len(lone.stages) == 4 and not lines_up(deep, lone)
    regrouped = regroup_like(deep, lone)
    assert [len(s.units) for s in regrouped.stages] == [2, 1] and lines_up(deep, regrouped)
    assert regrouped.stages[0].units[1].signature == deep.stages[0].body_signature
    zoo.export("mlp", "dynamo", str(tmp_path / "mlp.onnx"))  # no transformer layer fits an MLP
    assert regroup_like(deep, find_blocks(canonicalize(load_model(tmp_path / "mlp.onnx")))) is None


def test_a_lone_transformer_layer_merged_with_itself_lifted_gives_it_back(tmp_path):
    """The 1-layer model lifted into the 3-layer topology (identity layers after its own) is
    the same function; merged with the 1-layer model, the alignment finds its layer and the
    merge gives the model back."""
    from onnxmerge.depth import lift_models
    deep_path, lone_path, x = transformers(tmp_path, 3, 1)
    calib = str(tmp_path / "calib.npy")
    named, _, _ = cores(read_models([deep_path, lone_path]), api.MergeOptions())
    alignment = align_models(named, block_structures(named), None, api.MergeOptions(align="head-tail"))
    lifted = tmp_path / "lone_lifted.onnx"
    save_model(lift_models(named, alignment)[1], lifted)
    expected = run_all(load_model(lone_path), x)
    outputs_close(expected, run_all(load_model(lifted), x))
    for method in ("sma", "lma"):
        result = api.merge([str(lifted), lone_path], calibration=calib,
                           options=api.MergeOptions(align=method, method="permute", repair="none"))
        outputs_close(expected + expected, run_all(result.model, x))


def _pooled_and_residual_stages(path) -> None:
    """A stage of conv-ReLU-MaxPool blocks (no exact identity: a max pool spreads values) and
    a stage of residual blocks (an identity: the branch zeroed)."""
    import torch
    from torch import nn

    class Residual(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

        def forward(self, x):
            return torch.relu(x + self.b(torch.relu(self.a(x))))

    torch.manual_seed(0)
    pooled = [nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 1, 1)) for _ in range(3)]
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), *pooled, nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                        *[Residual(32) for _ in range(3)], nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))
    torch.onnx.export(net.eval(), (torch.zeros(1, 3, 16, 16),), path, dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}})


def test_deepen_skips_stages_whose_block_has_no_identity(tmp_path):
    _pooled_and_residual_stages(tmp_path / "m.onnx")
    model = load_model(tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    for seed in range(4):  # seeds 1 and 2 drew the max-pool stage before
        deeper = api.deepen(model, blocks=2, seed=seed)
        assert len(deeper.graph.node) > len(canonicalize(model).graph.node)
        outputs_close(run_all(model, x), run_all(deeper, x))


def test_models_joined_by_a_tensor_every_layer_reads_are_told_why_depths_cannot_align(tmp_path):
    """An additive mask made once from an input and read by every layer (as Hugging Face
    encoders with an attention_mask input) leaves no cut between layers: a 3- and a 2-layer
    model are refused with that reason, not as different architectures."""
    import torch
    from torch import nn

    class Masked(nn.Module):
        def __init__(self, layers: int):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(layers))
            self.head = nn.Linear(8, 3)

        def forward(self, x, mask):
            bias = (1.0 - mask) * -1e4
            for layer in self.layers:
                x = torch.relu(layer(x) + bias)
            return self.head(x)

    paths = []
    for layers in (3, 2):
        paths.append(str(tmp_path / f"m{layers}.onnx"))
        torch.onnx.export(Masked(layers).eval(), (torch.randn(2, 8), torch.ones(2, 8)), paths[-1], dynamo=False,
                          input_names=["x", "mask"], dynamic_axes={"x": {0: "N"}, "mask": {0: "N"}})
    with pytest.raises(UnsupportedGraphError, match="no cut between their layers.*attention mask"):
        api.merge(paths, method="weight", repair="none")
