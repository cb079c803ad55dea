"""Merging oracles: a model merged with function-preserving copies of itself is the model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxmerge import api
from onnxmerge.errors import OnnxMergeError
from onnxmerge.io import load_model, save_model
from tests.helpers import run_all, with_opset, ALL, CASES, IDS, outputs_close, permuted_copies

NO_REPAIR = api.MergeOptions(repair="none", method="permute")


@pytest.mark.parametrize("method", ["permute", "zip"])
@pytest.mark.parametrize("name,exporter", CASES)
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


@pytest.mark.parametrize("name, layers", [("resnet_basic", 0), ("resnet_basic", 3), ("resnet_basic", 6),
                                          ("transformer_encoder", 1), ("transformer_encoder", 5)])
def test_partial_zip_with_permuted_self(zoo_files, tmp_path, name, layers):
    """A partial merge with a permuted copy gives the model back from both heads, wherever the
    cut falls (for an encoder too, whose feature output is zipped)."""
    path, x, calib, (copy,) = permuted_copies(zoo_files, tmp_path, name, "legacy_folded")
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
        stats, meta = api.calibrate([path, copy], str(tmp_path / f"part{k}.npy"), options=options)
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


# every zoo model; the legacy BN-folded exports by default, the other exporters in the slow set
WEIGHT_CASES = [pytest.param(*pair, id=i, marks=[] if pair[1] in ("legacy_folded", "sklearn") else [pytest.mark.slow])
                for i, pair in zip(IDS, ALL)]


@pytest.mark.parametrize("name,exporter", WEIGHT_CASES)
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


def opset_model(opset: int, head: str) -> onnx.ModelProto:
    """x [N, 4] -> Gemm 8 -> Relu -> Gemm 6 -> head, written as the opset writes it.

    ``unsqueeze``: Unsqueeze to [N, 1, 6] (axes an attribute before opset 13, an input from 13),
    then Softmax over the last axis. ``softmax``: Reshape to [N, 2, 3], Softmax(axis=1), which
    normalises over the 6 values flattened from axis 1 on before opset 13, over axis 1 from 13.
    """
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("w1", (8, 4)), ("b1", (8,)), ("w2", (6, 8)), ("b2", (6,)))]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["z"], transB=1)]
    if head == "unsqueeze":
        shape = ["N", 1, 6]
        if opset >= 13:
            inits.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
            nodes.append(helper.make_node("Unsqueeze", ["z", "axes"], ["z3"]))
        else:
            nodes.append(helper.make_node("Unsqueeze", ["z"], ["z3"], axes=[1]))
        nodes.append(helper.make_node("Softmax", ["z3"], ["p"], axis=-1))
    else:
        shape = ["N", 2, 3]
        inits.append(numpy_helper.from_array(np.array([0, 2, 3], np.int64), "shape"))
        nodes += [helper.make_node("Reshape", ["z", "shape"], ["z3"]), helper.make_node("Softmax", ["z3"], ["p"], axis=1)]
    graph = helper.make_graph(nodes, head, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def opset_pair(tmp_path, head: str) -> tuple[list[str], str, np.ndarray]:
    x = np.random.default_rng(1).standard_normal((64, 4)).astype(np.float32)
    np.save(tmp_path / "calib.npy", x)
    paths = []
    for opset in (17, 11):
        save_model(opset_model(opset, head), tmp_path / f"opset{opset}.onnx")
        paths.append(str(tmp_path / f"opset{opset}.onnx"))
    return paths, str(tmp_path / "calib.npy"), x


def test_models_of_different_opsets_merge_at_the_newest(tmp_path):
    """The opset-11 model's Unsqueeze takes its axes as an attribute, which opset 17 does not
    know: copied as it is, its head would make the merged graph invalid."""
    paths, calib, x = opset_pair(tmp_path, "unsqueeze")
    result = api.merge(paths, calibration=calib, options=NO_REPAIR)
    assert [o.version for o in result.model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    outputs_close([run_all(load_model(p), x)[0] for p in paths], run_all(result.model, x))


def test_an_op_whose_meaning_changed_between_opsets_is_not_merged_silently(tmp_path):
    """Softmax(axis=1) on [N, 2, 3] means two things at opsets 11 and 17; the converter writes
    the old meaning with extra nodes after the last weight layer: separate heads keep each
    model's own meaning, shared heads (one head for both) stop."""
    paths, calib, x = opset_pair(tmp_path, "softmax")
    expected = [run_all(load_model(p), x)[0] for p in paths]
    assert not np.allclose(*expected)
    outputs_close(expected, run_all(api.merge(paths, calibration=calib, options=NO_REPAIR).model, x))
    with pytest.raises(OnnxMergeError, match="opset11.onnx"):
        api.merge(paths, calibration=calib, options=replace(NO_REPAIR, heads="shared"))


def test_a_model_onnxruntime_refuses_is_one_error_not_a_traceback():
    from onnx import TensorProto, helper
    from onnxmerge.calib.sessions import open_session
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(OnnxMergeError, match=r"^onnxruntime cannot run the model \(.*NoSuchOp"):
        open_session(model, "cpu")


def test_models_before_opset_13_run_in_separate_sessions(zoo_files, tmp_path):
    """The fused statistics graph needs ReduceSum's axes input (opset 13); older models run
    each in its own session with their features copied out."""
    path, x, calib, (copy,) = permuted_copies(zoo_files, tmp_path, "mlp", "legacy_folded")
    paths = []
    for name, source in (("older", path), ("older_copy", copy)):
        # this MLP's Gemm, Relu and Flatten mean the same in 12 and 17
        save_model(with_opset(load_model(source), 12), tmp_path / f"{name}.onnx")
        paths.append(str(tmp_path / f"{name}.onnx"))
    from onnxmerge.calib import capture
    assert capture.moments_model([load_model(p) for p in paths], [[], []], []) is None
    result = api.merge(paths, calibration=calib, options=api.MergeOptions(method="permute", repair="none"))
    expected = run_all(load_model(path), x)
    outputs_close(expected + expected, run_all(result.model, x))


def depthwise_net(width: int, multiplier: int, seed: int = 0) -> onnx.ModelProto:
    """Conv(3 -> width) -> Relu -> depthwise Conv(width -> multiplier * width, groups = width)
    -> Relu -> Conv 1x1 (-> 8) -> global pool -> Flatten -> Gemm."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    n, wide = helper.make_node, multiplier * width
    nodes = [n("Conv", ["x", "w1", "b1"], ["a"], kernel_shape=[3, 3], pads=[1] * 4), n("Relu", ["a"], ["ar"]),
             n("Conv", ["ar", "w2", "b2"], ["d"], kernel_shape=[3, 3], pads=[1] * 4, group=width, name="depthwise"),
             n("Relu", ["d"], ["dr"]), n("Conv", ["dr", "w3", "b3"], ["e"], kernel_shape=[1, 1]),
             n("GlobalAveragePool", ["e"], ["p"]), n("Flatten", ["p"], ["f"]),
             n("Gemm", ["f", "w4", "b4"], ["out"], transB=1)]
    inits = {"w1": w(width, 3, 3, 3), "b1": w(width), "w2": w(wide, 1, 3, 3), "b2": w(wide), "w3": w(8, wide, 1, 1),
             "b3": w(8), "w4": w(5, 8), "b4": w(5)}
    graph = helper.make_graph(nodes, "depthwise", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def depthwise_pair(tmp_path, multiplier: int) -> tuple[list[str], str]:
    """A depthwise net at widths 8 and 16, and calibration images."""
    paths = []
    for width in (8, 16):
        save_model(depthwise_net(width, multiplier, seed=width), tmp_path / f"w{width}.onnx")
        paths.append(str(tmp_path / f"w{width}.onnx"))
    np.save(tmp_path / "calib.npy", np.random.default_rng(3).standard_normal((64, 3, 8, 8)).astype(np.float32))
    return paths, str(tmp_path / "calib.npy")


@pytest.mark.parametrize("method", ["zip", "permute", "weight", "average"])
def test_group_counts_that_differ_are_named_whatever_the_method(tmp_path, method):
    """A depthwise conv with channel multiplier 2 has one group per input channel: at two
    widths the group counts differ, which no method merges; the message says so, and does not
    send the user to --method zip."""
    paths, calib = depthwise_pair(tmp_path, multiplier=2)
    with pytest.raises(OnnxMergeError) as caught:
        api.merge(paths, calibration=calib, options=api.MergeOptions(method=method, repair="none"))
    message = str(caught.value)
    assert "[8, 16] groups" in message and "'depthwise'" in message and "--method zip" not in message, message


def test_unequal_widths_with_a_width_keeping_method_are_one_error(tmp_path):
    """With channel multiplier 1 the depthwise conv keeps its input's space: zip merges the two
    widths; weight matching (the default without data) refuses them in one line, no traceback."""
    paths, calib = depthwise_pair(tmp_path, multiplier=1)
    result = api.merge(paths, calibration=calib, options=api.MergeOptions(method="zip", repair="none"))
    onnx.checker.check_model(result.model, full_check=True)
    with pytest.raises(OnnxMergeError, match=r"--method weight needs equal widths .*; use --method zip"):
        api.merge(paths, options=api.MergeOptions(repair="none"))


@pytest.mark.parametrize("name", ["resnet20_option_a", "pixel_shuffle"])
def test_channel_pad_and_pixel_shuffle_near_the_input_merge_every_trunk_layer(zoo_files, tmp_path, name):
    """Option-A zero-channel shortcuts and PixelShuffle are no barriers: every layer but the
    classifier is zipped, and the merge with a permuted copy is the model."""
    path, x, calib, (copy,) = permuted_copies(zoo_files, tmp_path, name, "legacy_bn")
    for method in ("zip", "permute"):
        result = api.merge([path, copy], calibration=calib, options=api.MergeOptions(method=method, repair="none"))
        zipped, total = (int(k) for k in result.report["layers"].split()[:3:2])
        assert zipped == total - 1, result.report["layers"]
        expected = run_all(load_model(path), x)
        outputs_close(expected + expected, run_all(result.model, x))


def test_a_residual_stream_is_matched_on_every_tensor_written_or_summed_into_it(tmp_path):
    """The stream y -> y + conv(relu(y)) + bias is captured at the stem's output and, as
    companions, at the other weight layer's output and the residual sum, not at the ReLUs or the
    sum with a constant; merging the model with a permuted copy gives it back."""
    from onnxmerge.calib.capture import plan_captures
    from tests.helpers import const, model, weights
    nodes = [onnx.helper.make_node("Relu", ["y"], ["r"]),
             onnx.helper.make_node("Conv", ["r", "w3"], ["c"], kernel_shape=[1, 1], name="conv3"),
             onnx.helper.make_node("Add", ["c", "y"], ["s"]), onnx.helper.make_node("Add", ["s", "bias"], ["sb"]),
             onnx.helper.make_node("Relu", ["sb"], ["z"])]
    m = model(nodes, [const("w3", weights((16, 16, 1, 1))), const("bias", weights((1, 16, 1, 1)))])
    canonical, graph = api.analyse(m)
    units, _ = plan_captures(canonical, graph, {s.id for s in graph.free_spaces})
    stream = [u.tensor for u in units if u.spaces == (graph.layouts["y"][1].space,)]
    assert stream == ["y", "c", "s"]
    save_model(m, tmp_path / "m.onnx")
    save_model(api.permute(m, seed=3), tmp_path / "p.onnx")
    x = np.random.default_rng(0).standard_normal((64, 8, 4, 4)).astype(np.float32)
    result = api.merge([str(tmp_path / "m.onnx"), str(tmp_path / "p.onnx")], x, method="zip")
    assert ["y", "c", "s"] in [row["tensors"] for row in result.report["spaces"]]
    expected = run_all(m, x)
    outputs_close(expected + expected, run_all(result.model, x))


@pytest.mark.parametrize("method", ["zip", "permute"])
def test_a_space_no_tensor_shows_is_matched_from_the_weights(zoo_files, tmp_path, method):
    """The pair space of a depthwise conv with channel multiplier 2 after a grouped conv shows
    only inside a (group, channel, pair) grid that no capture reads; matched as the identity it
    merged unrelated features of the permuted copy."""
    from onnxmerge.calib.capture import plan_captures
    from onnxmerge.graph.canonical import canonicalize
    from onnxmerge.graph.spaces import find_spaces
    path, x, calib, (copy,) = permuted_copies(zoo_files, tmp_path, "groups_in_groups", "legacy_bn")
    canonical = canonicalize(load_model(path))
    graph = find_spaces(canonical)
    _, missing = plan_captures(canonical, graph, {s.id for s in graph.free_spaces})
    assert [graph.table.widths[s] for s in missing] == [2]
    result = api.merge([path, copy], calibration=calib, options=api.MergeOptions(method=method, repair="none"))
    expected = run_all(load_model(path), x)
    outputs_close(expected + expected, run_all(result.model, x))


def test_unequal_widths_at_a_space_no_tensor_shows_are_one_error(zoo_files, tmp_path):
    path, x = zoo_files.get("groups_in_groups", "legacy_bn")
    save_model(api.widen(load_model(path), factor=2.0, seed=5), tmp_path / "wide.onnx")
    np.save(tmp_path / "calib.npy", x)
    with pytest.raises(OnnxMergeError, match="no tensor the calibration can read.*equal widths"):
        api.merge([path, str(tmp_path / "wide.onnx")], calibration=str(tmp_path / "calib.npy"))


def test_a_cut_inside_a_residual_block_reaches_the_block_end():
    """--help's promise: a residual stream opened before the cut stays merged with the layers
    writing into it, so on the digits ResNet (stem, block conv1, conv2, ...) a cut after the
    first block's conv1 gives the model of the cut at that block's end."""
    digits = Path(__file__).resolve().parent.parent / "samples" / "digits"
    models = [str(digits / "resnet_a.onnx"), str(digits / "resnet_b.onnx")]
    inside, end = (api.merge(models, method="weight", repair="none", zip_layers=n) for n in (2, 3))
    assert inside.report["weight_layers"]["merged"] == end.report["weight_layers"]["merged"] == 3
    assert inside.model.graph == end.model.graph


@pytest.mark.parametrize("method", ["weight", "zip"])
def test_a_constant_that_is_not_finite_in_the_model_is_not_an_overflow(tmp_path, method):
    """An attention mask's -inf (GPT-2 writes one) carried into the merge is the model's own,
    not an overflow of the merge: the merge goes through and keeps the model's outputs."""
    from tests.helpers import const, model
    mask = np.zeros((1, 16, 1, 1), np.float32)
    mask[0, :3] = -np.inf
    m = model([onnx.helper.make_node("Relu", ["y"], ["r"]), onnx.helper.make_node("Add", ["r", "mask"], ["masked"]),
               onnx.helper.make_node("Relu", ["masked"], ["z"])], [const("mask", mask)])
    save_model(m, tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((32, 8, 4, 4)).astype(np.float32)
    merged = api.merge([str(tmp_path / "m.onnx")] * 2, x if method == "zip" else None, method=method, repair="none",
                       heads="shared")
    outputs_close(run_all(m, x), run_all(merged.model, x))
