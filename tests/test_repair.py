"""BN reset: stored statistics must equal the statistics of each BN's input on the data."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxmerge import api
from onnxmerge.calib.stats import combine_moments, save_stats
from onnxmerge.calib.capture import expose
from onnxmerge.calib.sessions import open_session
from onnxmerge.graph.canonical import canonicalize
from onnxmerge.io import load_model, save_model
from onnxmerge.rewrite.repair import RepairTarget, insert_repair, reset_batch_norm, train_mode
from tests.helpers import as_format_1, model, outputs_close, run_all, with_opset


def bn_input_stats(model: onnx.ModelProto, x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(data mean, data var, stored mean, stored var) for every BN, in eval mode."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    session, _ = open_session(expose(model, [n.input[0] for n in bns]), "cpu")
    values = session.run([n.input[0] for n in bns], {session.get_inputs()[0].name: x})
    return [(v.mean((0, 2, 3)), v.var((0, 2, 3)), inits[n.input[3]], inits[n.input[4]]) for n, v in zip(bns, values)]


def ort_train_mode(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The independent reference: onnxruntime's own BatchNormalization with training_mode=1
    (opset >= 14; CPU only), and its running-mean/var outputs (momentum 0: the batch statistics)."""
    train = onnx.ModelProto()
    train.CopyFrom(model)
    names = []
    for node in train.graph.node:
        if node.op_type == "BatchNormalization":
            node.output.extend([node.output[0] + "_mean", node.output[0] + "_var"])
            node.attribute.extend([helper.make_attribute("training_mode", 1), helper.make_attribute("momentum", 0.0)])
            names += node.output[1:]
    train.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    return train, names


# with_opset relabels the zoo ResNet: its ops (eval-mode BN, Conv, Relu, Add, pooling, Gemm)
# mean the same from 13 to 18, while ReduceMean, which the reset pass writes, takes its axes as
# an input from 18 and BN has no training_mode before 14


@pytest.mark.parametrize("opset", [17, 18])
def test_plain_op_train_mode_equals_onnxruntime_train_mode(zoo_files, opset):
    path, x = zoo_files.get("resnet_basic", "legacy_bn")
    model = with_opset(canonicalize(load_model(path)), opset)
    ours, measured = train_mode(model)
    reference, names = ort_train_mode(model)
    mine, _ = open_session(ours, "cpu")
    theirs, _ = open_session(reference, "cpu")
    outputs = [o.name for o in model.graph.output]
    got = mine.run(outputs + [n for pair in measured.values() for n in pair], {"input": x[:64]})
    want = theirs.run(outputs + names, {"input": x[:64]})
    assert len(got) == len(want) > len(outputs)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.reshape(-1), b.reshape(-1), rtol=1e-4, atol=1e-4)


def test_reset_of_an_opset_13_model(zoo_files):
    """Opsets before 14 have no train-mode BN attribute; the plain-op pass needs none."""
    path, x = zoo_files.get("resnet_basic", "legacy_bn")
    reset, _ = reset_batch_norm(with_opset(canonicalize(load_model(path)), 13), lambda: [{"input": x}], "cpu")
    first = bn_input_stats(reset, x)[0]
    np.testing.assert_allclose(first[2], first[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(first[3], first[1], rtol=1e-3, atol=1e-5)


def test_train_mode_reset_is_exact_for_the_first_bn_and_one_pass(zoo_files):
    path, x = zoo_files.get("resnet_basic", "legacy_bn")
    model = canonicalize(load_model(path))
    reset, ran = reset_batch_norm(model, lambda: [{"input": x[:64]}, {"input": x[64:]}], "cpu")
    assert ran == "cpu"
    first = bn_input_stats(reset, x)[0]
    np.testing.assert_allclose(first[2], first[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(first[3], first[1], rtol=1e-3, atol=1e-5)
    original = bn_input_stats(model, x)
    assert not np.allclose(original[0][2], first[2])  # the zoo's random statistics were replaced


# REPAIR (BN-free merges): oracles on merges of a model with a permuted copy of itself, where
# the sources' statistics already are the merged model's, so REPAIR must change nothing


def _merge_with_permuted_self(zoo_files, tmp_path, name, exporter, **options):
    path, x = zoo_files.get(name, exporter)
    copy = tmp_path / "permuted.onnx"
    save_model(api.permute(load_model(path), seed=3), copy)
    np.save(tmp_path / "calib.npy", x)
    result = api.merge([path, str(copy)], calibration=str(tmp_path / "calib.npy"), options=api.MergeOptions(**options))
    return path, x, result


@pytest.mark.parametrize("batch_size", [16, 128])
@pytest.mark.parametrize("name", ["mlp", "resnet_basic", "resnet_bottleneck", "transformer"])
def test_repair_of_a_merge_with_a_permuted_self_changes_nothing(zoo_files, tmp_path, name, batch_size):
    path, x, result = _merge_with_permuted_self(zoo_files, tmp_path, name, "legacy_folded",
                                                repair="repair", batch_size=batch_size)
    assert result.report["repair"].startswith("REPAIR")
    expected = run_all(load_model(path), x)
    np.testing.assert_allclose(np.concatenate([o.ravel() for o in run_all(result.model, x)]),
                               np.concatenate([o.ravel() for o in expected + expected]), rtol=0,
                               atol=2e-5 * max(float(np.abs(o).max()) for o in expected))


@pytest.mark.parametrize("bn,repair", [("keep", "none"), ("fold", "repair")])
@pytest.mark.parametrize("layers", [1, 3, 5, 7, None])
def test_partial_merge_with_a_permuted_self_gives_self(zoo_files, tmp_path, layers, bn, repair):
    path, x, result = _merge_with_permuted_self(zoo_files, tmp_path, "resnet_basic", "legacy_bn",
                                                bn=bn, repair=repair, zip_layers=layers)
    expected = run_all(canonicalize(load_model(path), bn=bn), x)
    outputs_close(expected + expected, run_all(result.model, x))


def test_every_merged_conv_output_is_repaired_and_the_corrections_are_folded(zoo_files, tmp_path):
    path, _, result = _merge_with_permuted_self(zoo_files, tmp_path, "resnet_basic", "legacy_folded", zip_layers=4)
    outputs = {o.name for o in result.model.graph.output}
    convs = [n.output[0] for n in result.model.graph.node if n.op_type == "Conv"]
    assert sorted(result.report["repaired_tensors"]) == sorted(c for c in convs if c not in outputs)
    assert any(c.endswith("_m1") for c in convs)  # per-model layers after the cut are repaired too
    original = canonicalize(load_model(path))
    per_model = sum(1 for n in result.model.graph.node if n.output[0].endswith("_m1"))
    assert len(result.model.graph.node) == len(original.graph.node) + per_model  # no node added


def test_repair_of_a_layer_with_a_constant_channel_shifts_it_and_corrects_the_others():
    """A channel constant on the data (as a lifted block's zeroed residual branch gives) has zero
    variance: REPAIR only shifts it to its target mean, and every other channel, downstream ones
    included, gets its target mean and std (the guess once divided 0 by 0 there)."""
    dead = model([helper.make_node("Relu", ["y"], ["z"])], [])
    for init in dead.graph.initializer:
        if init.name in ("w1", "b1"):
            value = numpy_helper.to_array(init).copy()
            value[0] = 0.0
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    x = np.random.default_rng(1).standard_normal((64, 8, 4, 4)).astype(np.float32)
    targets = [RepairTarget(name, 1, 4, np.full(width, 0.5), np.full(width, 2.0)) for name, width in (("y", 16), ("c2", 5))]
    repaired, _ = insert_repair(dead, targets, lambda: [{"x": x[:32]}, {"x": x[32:]}], "cpu")
    head = next(n.input[0] for n in repaired.graph.node if n.op_type == "GlobalAveragePool")  # c2, corrected
    session, _ = open_session(expose(repaired, ["y", head]), "cpu")
    y, c2 = session.run(["y", head], {"x": x})
    np.testing.assert_array_equal(y[:, 0], 0.5)
    for value in (y[:, 1:], c2):
        np.testing.assert_allclose(value.mean((0, 2, 3)), 0.5, atol=1e-4)
        np.testing.assert_allclose(value.std((0, 2, 3)), 2.0, rtol=1e-4)


def _different_pair(zoo_files, tmp_path) -> tuple[str, str, np.ndarray]:
    """A folded ResNet, a copy with noise on its weights (a model REPAIR has work on), and the
    calibration samples, saved as ``calib.npy``."""
    path, x = zoo_files.get("resnet_basic", "legacy_folded")
    other = load_model(path)
    rng = np.random.default_rng(0)
    for init in other.graph.initializer:
        value = numpy_helper.to_array(init)
        if value.dtype.kind == "f" and value.size > 1:
            init.CopyFrom(numpy_helper.from_array((value + rng.normal(0, 0.3 * value.std(), value.shape)).astype(value.dtype), init.name))
    save_model(other, tmp_path / "other.onnx")
    np.save(tmp_path / "calib.npy", x)
    return path, str(tmp_path / "other.onnx"), x


def test_repair_does_not_depend_on_the_batch_size(zoo_files, tmp_path):
    """Two different models: each layer is measured on inputs repaired upstream, over all the
    samples pooled exactly, so batches of 8 and one batch of 128 give one model."""
    path, _, x = _different_pair(zoo_files, tmp_path)
    results = [api.merge([path, str(tmp_path / "other.onnx")], calibration=str(tmp_path / "calib.npy"),
                         options=api.MergeOptions(repair="repair", batch_size=size)).model for size in (8, 128)]
    unrepaired = api.merge([path, str(tmp_path / "other.onnx")], calibration=str(tmp_path / "calib.npy"),
                           options=api.MergeOptions(repair="none")).model
    small, large, plain = (run_all(model, x) for model in (*results, unrepaired))
    for a, b in zip(large, small):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * float(np.abs(a).max()))
    assert not all(np.allclose(a, b, atol=1e-3) for a, b in zip(plain, large))  # the repair did something


def test_source_moments_of_two_calibrate_shards_pool_to_those_of_one(zoo_files, tmp_path):
    """Shards split at a batch boundary (a batch's moments are float32 reductions in
    onnxruntime, so other splits agree to float32 rounding only): pooling is exact."""
    path, other, x = _different_pair(zoo_files, tmp_path)
    np.save(tmp_path / "first.npy", x[:64])
    np.save(tmp_path / "second.npy", x[64:])
    whole, *shards = (api.calibrate([path, other], str(tmp_path / name), batch_size=32, allow_few_samples=True)[0].moments
                      for name in ("calib.npy", "first.npy", "second.npy"))
    pooled = combine_moments(shards)
    assert [list(model) for model in pooled] == [list(model) for model in whole]
    assert len(whole[0]) == len(whole[1]) == 11  # every Conv and the Gemm, per model
    for mine, theirs in zip(pooled, whole):
        for tensor, moments in mine.items():
            assert moments.count == theirs[tensor].count == len(x)
            np.testing.assert_allclose(moments.mean, theirs[tensor].mean, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(moments.std, theirs[tensor].std, rtol=1e-9)


@pytest.mark.parametrize("old", [False, True], ids=["format-2", "format-1"])
def test_repair_from_a_statistics_file_gives_the_model_that_measuring_the_sources_gives(zoo_files, tmp_path, old):
    """Statistics of the same samples: REPAIR reads the sources' moments from the file (a
    format-1 file has none: they are measured as without the file); the report says which."""
    path, other, _ = _different_pair(zoo_files, tmp_path)
    calib = str(tmp_path / "calib.npy")
    save_stats(tmp_path / "s.npz", *api.calibrate([path, other], calib))
    if old:
        as_format_1(tmp_path / "s.npz")
    direct = api.merge([path, other], calib, repair="repair")
    from_stats = api.merge([path, other], calib, stats=[str(tmp_path / "s.npz")], repair="repair")
    assert direct.report["repair"].endswith("128 of 128 samples; source moments measured on them)")
    origin = "measured on them" if old else "from the statistics files, 128 samples"
    assert from_stats.report["repair"].endswith(f"; source moments {origin})")
    assert from_stats.report["repaired_tensors"] == direct.report["repaired_tensors"]
    expected = {i.name: numpy_helper.to_array(i) for i in direct.model.graph.initializer}
    got = {i.name: numpy_helper.to_array(i) for i in from_stats.model.graph.initializer}
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-6 * max(1.0, float(np.abs(value).max())), err_msg=name)
