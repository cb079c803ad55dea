"""Merging oracles: a model merged with function-preserving copies of itself is the model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxmerge import api
from onnxmerge.errors import OnnxMergeError
from onnxmerge.io import load_model, save_model
from tests.test_rules import run_all
from tests.test_zoo_oracles import ALL, IDS, outputs_close

NO_REPAIR = api.MergeOptions(repair="none", method="permute")


def permuted_copies(zoo_files, tmp_path, name, exporter, seeds=(1,)):
    path, x = zoo_files.get(name, exporter)
    calib = tmp_path / "calib.npy"
    np.save(calib, x)
    copies = []
    for seed in seeds:
        copy = tmp_path / f"permuted{seed}.onnx"
        save_model(api.permute(load_model(path), seed=seed), copy)
        copies.append(str(copy))
    return path, x, str(calib), copies


@pytest.mark.parametrize("method", ["permute", "zip"])
@pytest.mark.parametrize("name,exporter", ALL, ids=IDS)
def test_merge_with_permuted_self_gives_self(zoo_files, tmp_path, name, exporter, method):
    path, x, calib, (copy,) = permuted_copies(zoo_files, tmp_path, name, exporter)
    result = api.merge([path, copy], calibration=calib, options=api.MergeOptions(method=method, repair="none"))
    onnx.checker.check_model(result.model, full_check=True)
    expected = run_all(load_model(path), x)
    merged = run_all(result.model, x)
    assert [o.name for o in result.model.graph.output] == [
        f"{o.name}_m{i}" for i in range(2) for o in load_model(path).graph.output]
    outputs_close(expected + expected, merged)


@pytest.mark.parametrize("options", [api.MergeOptions(method="permute", repair="none"),
                                     api.MergeOptions(method="zip", alpha=1.0, repair="none")], ids=["permute", "zip"])
def test_three_permuted_copies_merge_to_the_original(zoo_files, tmp_path, options):
    # zip with the default alpha 0.5 rates a joined pair's link to the third copy at 0.5, below
    # strong within-model correlations, so exact recovery of three copies needs alpha 1
    path, x, calib, copies = permuted_copies(zoo_files, tmp_path, "resnet_basic", "legacy_bn", seeds=(1, 2))
    result = api.merge([path, *copies], calibration=calib, options=options)
    expected = run_all(load_model(path), x)
    outputs_close(expected * 3, run_all(result.model, x))


@pytest.mark.parametrize("name", ["mlp", "vgg_bn", "transformer"])
def test_shared_heads_and_self_average(zoo_files, tmp_path, name):
    path, x = zoo_files.get(name, "legacy_bn")
    calib = tmp_path / "calib.npy"
    np.save(calib, x)
    expected = run_all(load_model(path), x)
    shared = api.merge([path, path], calibration=str(calib), options=api.MergeOptions(heads="shared", repair="none"))
    assert [o.name for o in shared.model.graph.output] == [o.name for o in load_model(path).graph.output]
    outputs_close(expected, run_all(shared.model, x))
    average = api.merge([path, path], options=api.MergeOptions(method="average", repair="none"))
    outputs_close(expected + expected, run_all(average.model, x))


@pytest.mark.parametrize("layers", [0, 3, 6])
def test_partial_zip_with_permuted_self(zoo_files, tmp_path, layers):
    path, x, calib, (copy,) = permuted_copies(zoo_files, tmp_path, "resnet_basic", "legacy_folded")
    result = api.merge([path, copy], calibration=calib, options=api.MergeOptions(zip_layers=layers, repair="none"))
    assert result.report["layers"].startswith(f"{layers} of ")
    expected = run_all(load_model(path), x)
    outputs_close(expected + expected, run_all(result.model, x))


def test_bn_reset_on_merge_of_identical_models_keeps_a_valid_model(zoo_files, tmp_path):
    path, x = zoo_files.get("resnet_basic", "legacy_bn")
    calib = tmp_path / "calib.npy"
    np.save(calib, x)
    result = api.merge([path, path], calibration=str(calib), options=api.MergeOptions(repair="reset"))
    assert result.report["repair"].startswith("reset")
    outputs = run_all(result.model, x)
    assert all(np.isfinite(o).all() for o in outputs)
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5)


def test_bn_reset_on_a_subset_measures_exactly_the_drawn_samples(zoo_files, tmp_path):
    from onnxmerge.calib.data import input_specs, load_calibration
    from onnxmerge.rewrite.repair import reset_batch_norm
    path, x = zoo_files.get("resnet_basic", "legacy_bn")
    calib = tmp_path / "calib.npy"
    np.save(calib, x)
    subset = api.merge([path, path], calibration=str(calib), options=api.MergeOptions(repair_samples=40, seed=5))
    assert subset.report["repair"].endswith(f"40 of {len(x)} samples)")
    drawn = load_calibration(calib, [input_specs(load_model(path))]).shuffled(40, seed=5)
    plain = api.merge([path, path], calibration=str(calib), options=api.MergeOptions(repair="none", seed=5))
    expected, _ = reset_batch_norm(plain.model, lambda: [{"input": x[drawn]}], "cpu")
    values = {i.name: onnx.numpy_helper.to_array(i) for i in subset.model.graph.initializer}
    bns = [n for n in expected.graph.node if n.op_type == "BatchNormalization"]
    assert bns
    wanted = {i.name: onnx.numpy_helper.to_array(i) for i in expected.graph.initializer}
    for node in bns:
        for name in node.input[3:5]:
            np.testing.assert_allclose(values[name], wanted[name], rtol=1e-5, atol=1e-6)


def test_statistics_shards_add_up_to_one_run(zoo_files, tmp_path):
    from onnxmerge.calib.stats import save_stats
    path, x, calib, (copy,) = permuted_copies(zoo_files, tmp_path, "resnet_basic", "legacy_bn")
    options = api.MergeOptions(repair="none")
    whole = api.merge([path, copy], calibration=calib, options=options)
    shards = []
    for k, part in enumerate((x[:50], x[50:])):
        np.save(tmp_path / f"part{k}.npy", part)
        stats, meta = api.calibrate([path, copy], str(tmp_path / f"part{k}.npy"), options)
        save_stats(tmp_path / f"stats{k}.npz", stats, meta)
        shards.append(str(tmp_path / f"stats{k}.npz"))
    split = api.merge([path, copy], stats=shards, options=options)
    for a, b in zip(whole.model.graph.initializer, split.model.graph.initializer):
        np.testing.assert_allclose(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b), atol=1e-6)


def test_different_architectures_are_refused(zoo_files, tmp_path):
    a, x = zoo_files.get("resnet_basic", "legacy_bn")
    b, _ = zoo_files.get("vgg_bn", "legacy_bn")
    np.save(tmp_path / "calib.npy", x)
    with pytest.raises(OnnxMergeError, match="differ in architecture"):
        api.merge([a, b], calibration=str(tmp_path / "calib.npy"))


def test_mismatched_calibration_is_refused(zoo_files, tmp_path):
    a, _ = zoo_files.get("resnet_basic", "legacy_bn")
    np.save(tmp_path / "calib.npy", np.zeros((4, 3, 8, 8), np.float32))
    with pytest.raises(OnnxMergeError, match="calib.npy"):
        api.merge([a, a], calibration=str(tmp_path / "calib.npy"))


@pytest.mark.parametrize("name,exporter", [("resnet_basic", "legacy_bn"), ("vgg_bn", "dynamo"), ("mlp", "legacy_folded"),
                                           ("densenet", "legacy_bn")])
def test_data_free_weight_matching_recovers_a_permuted_copy(zoo_files, tmp_path, name, exporter):
    path, x, _, (copy,) = permuted_copies(zoo_files, tmp_path, name, exporter)
    result = api.merge([path, copy], options=api.MergeOptions(repair="none"))  # no data: weight matching
    assert result.report["method"] == "weight"
    expected = run_all(load_model(path), x)
    outputs_close(expected + expected, run_all(result.model, x))


def test_repair_restores_source_statistics_with_bn_folded(zoo_files, tmp_path):
    """REPAIR on a BN-free (folded) CNN: every repaired tensor's channel means in the merged
    model equal the average of the source models' matched channels, and the BN nodes it adds
    are folded back into the convolutions."""
    a, x = zoo_files.get("resnet_basic", "legacy_folded")
    b = tmp_path / "b.onnx"
    save_model(api.permute(load_model(a), seed=4), b)
    np.save(tmp_path / "calib.npy", x)
    plain = api.merge([a, str(b)], calibration=str(tmp_path / "calib.npy"), options=api.MergeOptions(repair="none"))
    repaired = api.merge([a, str(b)], calibration=str(tmp_path / "calib.npy"))
    assert repaired.report["repair"].startswith("REPAIR")
    assert not any(n.op_type == "BatchNormalization" for n in repaired.model.graph.node)
    # merging a model with a permuted copy: the sources' statistics are the merged ones already
    outputs_close(run_all(plain.model, x), run_all(repaired.model, x))


def test_provider_choice_is_reported_and_cuda_is_checked(zoo_files, tmp_path):
    import onnxruntime
    path, x = zoo_files.get("mlp", "legacy_folded")
    np.save(tmp_path / "calib.npy", x)
    result = api.merge([path, path], calibration=str(tmp_path / "calib.npy"), options=api.MergeOptions(provider="auto"))
    assert result.report["provider"] in ("cpu", "cuda")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert result.report["provider"] == "cpu"
        with pytest.raises(OnnxMergeError, match="CUDA provider is not usable"):
            api.merge([path, path], calibration=str(tmp_path / "calib.npy"), options=api.MergeOptions(provider="cuda"))


def test_a_model_onnxruntime_refuses_is_one_error_not_a_traceback():
    from onnx import TensorProto, helper
    from onnxmerge.calib.capture import open_session
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(OnnxMergeError, match=r"^onnxruntime cannot run the model \(.*NoSuchOp"):
        open_session(model, "cpu")


def test_models_of_different_opsets_use_separate_sessions(zoo_files, tmp_path):
    """One fused statistics graph needs one opset; otherwise each model runs on its own."""
    path, x, calib, (copy,) = permuted_copies(zoo_files, tmp_path, "mlp", "legacy_folded")
    newer = load_model(copy)
    for opset in newer.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 18  # Gemm and Relu mean the same in 17 and 18
    save_model(newer, tmp_path / "newer.onnx")
    result = api.merge([path, str(tmp_path / "newer.onnx")], calibration=calib,
                       options=api.MergeOptions(method="permute", repair="none"))
    expected = run_all(load_model(path), x)
    outputs_close(expected + expected, run_all(result.model, x))
