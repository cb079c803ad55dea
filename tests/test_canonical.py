"""Canonicalisation keeps the function and removes the exporter idioms the rules rely on."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxmerge import api
from onnxmerge.rewrite.heads import split_trunk
from onnxmerge.stages.prepare import lockstep_batches, prepare
from onnxmerge.stages.statistics import plan_units
from onnxmerge.sources import read_data, read_models
from onnxmerge.graph.canonical import canonicalize, export_like
from onnxmerge.graph.ir import import_graph, renamed_copy
from onnxmerge.graph.shapes import SMALL_CONSTANT, _skeleton, infer_graph_shapes, infer_shapes
from onnxmerge.graph.surgery import drop_shapes
from tests.helpers import model, run_all, weights, with_opset


def test_weights_computed_from_constants_are_folded_and_permutable():
    """A Conv weight made by ConstantOfShape * constant and an Identity alias: both folded."""
    n = helper.make_node
    nodes = [n("ConstantOfShape", ["shape"], ["ones"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
             n("Mul", ["ones", "scale"], ["w_made"]), n("Identity", ["w_made"], ["w_alias"]),
             n("Conv", ["y", "w_alias"], ["z"], kernel_shape=[1, 1])]
    inits = [numpy_helper.from_array(np.array([16, 16, 1, 1], np.int64), "shape"),
             numpy_helper.from_array(weights((16, 16, 1, 1)), "scale")]
    m = model(nodes, inits)
    canonical = canonicalize(m)
    assert {node.op_type for node in canonical.graph.node} == {"Conv", "GlobalAveragePool", "Flatten"}
    x = np.random.default_rng(0).standard_normal((2, 8, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(run_all(canonical, x)[0], run_all(m, x)[0], atol=1e-5)
    _, graph = api.analyse(m)
    assert len(graph.free_spaces) == 2 and not graph.barriers


def test_initializers_listed_as_graph_inputs_are_constants():
    m = model([helper.make_node("Relu", ["y"], ["z"])], [])
    old = onnx.ModelProto()
    old.CopyFrom(m)
    for init in old.graph.initializer:  # old IR style: every weight is also a graph input
        old.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    old.ir_version = 3
    canonical = canonicalize(old)
    assert [i.name for i in canonical.graph.input] == ["x"]
    _, graph = api.analyse(old)
    assert graph.free_spaces and not graph.barriers
    assert len(old.graph.input) > 1  # the caller's model is untouched


def test_batch_norm_fold_matches_kept(zoo_files):
    from onnxmerge.io import load_model
    path, x = zoo_files.get("resnet_basic", "legacy_bn")
    kept, folded = canonicalize(load_model(path), bn="keep"), canonicalize(load_model(path), bn="fold")
    assert any(n.op_type == "BatchNormalization" for n in kept.graph.node)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    np.testing.assert_allclose(run_all(folded, x)[0], run_all(kept, x)[0], atol=1e-4)


# --- exporter idioms: one hand-built graph per pass, outputs unchanged, idiom gone --------------

N = helper.make_node
RNG = np.random.default_rng(5)


def graph_model(nodes, inits: dict[str, np.ndarray], in_shape, out_shape, *, opset=17):
    """x -> nodes -> out (float32), with the given constants."""
    graph = helper.make_graph(
        nodes, "idiom", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, list(out_shape))],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def canonical_ops(m: onnx.ModelProto, x: np.ndarray) -> list[str]:
    """The canonical model's ops, after checking it computes what ``m`` does."""
    canonical = canonicalize(m)
    for expected, got in zip(run_all(m, x), run_all(canonical, x)):
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert [o.name for o in canonical.graph.output] == [o.name for o in m.graph.output]
    return [n.op_type for n in canonical.graph.node]


def w(*shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32) * 0.5


def image(channels=3, batch=2) -> np.ndarray:
    return RNG.standard_normal((batch, 8, 8, channels)).astype(np.float32)


def test_aliases_are_dropped():
    """skl2onnx's float -> float Cast, an Identity writing the output, inference Dropout, an
    identity Transpose and a reshape to the same shape: all return their input."""
    nodes = [N("Cast", ["x"], ["c"], to=TensorProto.FLOAT), N("Gemm", ["c", "w", "b"], ["g"], transB=1),
             N("Dropout", ["g"], ["d"]), N("Transpose", ["d"], ["t"], perm=[0, 1]),
             N("Reshape", ["t", "shape"], ["r"]), N("Identity", ["r"], ["out"])]
    m = graph_model(nodes, {"w": w(8, 64), "b": w(8), "shape": np.array([-1, 8])}, ["N", 64], ["N", 8])
    assert canonical_ops(m, w(3, 64)) == ["Gemm"]


def test_nhwc_conv_chain_becomes_nchw():
    """tf2onnx without its optimiser: transposes around every conv, BatchNormalization as a
    per-channel Mul and Add in NHWC, global pooling as ReduceMean over H, W and a Dense as
    MatMul + Add. Only the input transpose remains and the chain reads like a channels-first
    export (Conv with bias, Relu, GlobalAveragePool, Flatten, Gemm)."""
    nodes = [N("Transpose", ["x"], ["t0"], perm=[0, 3, 1, 2]), N("Conv", ["t0", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4),
             N("Transpose", ["c1"], ["t1"], perm=[0, 2, 3, 1]), N("Mul", ["t1", "scale"], ["m1"]),
             N("Add", ["m1", "shift"], ["a1"]), N("Relu", ["a1"], ["r1"]),
             N("Transpose", ["r1"], ["t2"], perm=[0, 3, 1, 2]), N("Conv", ["t2", "w2", "b2"], ["c2"], kernel_shape=[1, 1]),
             N("Transpose", ["c2"], ["t3"], perm=[0, 2, 3, 1]), N("Relu", ["t3"], ["r2"]),
             N("ReduceMean", ["r2"], ["p"], axes=[1, 2], keepdims=0),
             N("MatMul", ["p", "dense"], ["mm"]), N("Add", ["mm", "bias"], ["out"])]
    inits = {"w1": w(16, 3, 3, 3), "scale": w(16) + 1, "shift": w(16), "w2": w(32, 16, 1, 1), "b2": w(32),
             "dense": w(32, 10), "bias": w(10)}
    m = graph_model(nodes, inits, ["N", 8, 8, 3], ["N", 10])
    assert canonical_ops(m, image()) == ["Transpose", "Conv", "Relu", "Conv", "Relu", "GlobalAveragePool",
                                         "Flatten", "Gemm"]


def test_transposes_pushed_through_a_residual_add_cancel():
    """Add of two NHWC branches: one transpose after the Add, which meets its inverse."""
    nodes = [N("Conv", ["x", "w1"], ["c1"], kernel_shape=[1, 1]), N("Conv", ["x", "w2"], ["c2"], kernel_shape=[1, 1]),
             N("Transpose", ["c1"], ["t1"], perm=[0, 2, 3, 1]), N("Transpose", ["c2"], ["t2"], perm=[0, 2, 3, 1]),
             N("Add", ["t1", "t2"], ["s"]), N("Sigmoid", ["s"], ["g"]), N("Transpose", ["g"], ["out"], perm=[0, 3, 1, 2])]
    m = graph_model(nodes, {"w1": w(16, 4, 1, 1), "w2": w(16, 4, 1, 1)}, ["N", 4, 8, 8], ["N", 16, 8, 8])
    assert canonical_ops(m, w(2, 4, 8, 8)) == ["Conv", "Conv", "Add", "Sigmoid"]


def test_one_channel_layout_transpose_is_a_reshape_and_cancels():
    """With one channel tf2onnx writes NHWC -> NCHW as a Reshape; onnxmerge's --input-layout
    puts the inverse Transpose in front: the pair becomes two reshapes, one, then nothing."""
    nodes = [N("Transpose", ["x"], ["nhwc"], perm=[0, 2, 3, 1]), N("Reshape", ["nhwc", "shape"], ["nchw"]),
             N("Conv", ["nchw", "w1", "b1"], ["out"], kernel_shape=[3, 3])]
    m = graph_model(nodes, {"shape": np.array([-1, 1, 8, 8]), "w1": w(16, 1, 3, 3), "b1": w(16)},
                    ["N", 1, 8, 8], ["N", 16, 6, 6])
    assert canonical_ops(m, w(2, 1, 8, 8)) == ["Conv"]


def test_a_constant_shared_behind_two_transposes_gets_one_initializer_per_use():
    """Two ops reading one constant through layout transposes (torch dynamo's attention scale on
    q and k): pushing each transpose makes one transposed constant per use, of one name; the
    graph, kept across rounds, reads them as the model holds them: one tensor, then untied."""
    nodes = [N("Conv", ["x", "w1"], ["c1"], kernel_shape=[1, 1]), N("Conv", ["x", "w2"], ["c2"], kernel_shape=[1, 1]),
             N("Relu", ["c1"], ["r1"]), N("Relu", ["c2"], ["r2"]),
             N("Transpose", ["r1"], ["t1"], perm=[0, 2, 3, 1]), N("Transpose", ["r2"], ["t2"], perm=[0, 2, 3, 1]),
             N("Mul", ["t1", "scale"], ["m1"]), N("Mul", ["t2", "scale"], ["m2"]), N("Add", ["m1", "m2"], ["s"]),
             N("Transpose", ["s"], ["out"], perm=[0, 3, 1, 2])]
    m = graph_model(nodes, {"w1": w(16, 4, 1, 1), "w2": w(16, 4, 1, 1), "scale": w(16) + 1},
                    ["N", 4, 8, 8], ["N", 16, 8, 8])
    assert canonical_ops(m, w(2, 4, 8, 8)) == ["Conv", "Conv", "Relu", "Relu", "Mul", "Mul", "Add"]
    canonical = canonicalize(m)
    scales = [node.input[1] for node in canonical.graph.node if node.op_type == "Mul"]
    assert len(set(scales)) == 2 and set(scales) <= {i.name for i in canonical.graph.initializer}


def test_a_constant_behind_two_different_transposes_keeps_each_value():
    """One constant read through two different layout transposes is transposed back two ways:
    two constants of different names (one name would keep one of them and change the function)."""
    nodes = [N("Conv", ["x", "w1"], ["c1"], kernel_shape=[1, 1]), N("Conv", ["x", "w2"], ["c2"], kernel_shape=[1, 1]),
             N("Relu", ["c1"], ["r1"]), N("Relu", ["c2"], ["r2"]),
             N("Transpose", ["r1"], ["t1"], perm=[0, 2, 3, 1]), N("Transpose", ["r2"], ["t2"], perm=[0, 3, 1, 2]),
             N("Mul", ["t1", "scale"], ["m1"]), N("Mul", ["t2", "scale"], ["m2"]), N("Add", ["m1", "m2"], ["out"])]
    m = graph_model(nodes, {"w1": w(8, 4, 1, 1), "w2": w(8, 4, 1, 1), "scale": w(8) + 1}, ["N", 4, 8, 8], ["N", 8, 8, 8])
    canonical_ops(m, w(2, 4, 8, 8))  # the canonical form computes the model's function


def test_graph_shapes_are_a_fresh_import_of_the_inferred_export_without_its_weights():
    """``infer_graph_shapes`` types each tensor as importing the inferred export would (shape
    arithmetic on the batch symbol included, which symbolic inference completes), inferring
    them on an export whose large weights are typed inputs: the skeleton inference always saw."""
    nodes = [N("Conv", ["x", "w1", "b1"], ["c"], kernel_shape=[3, 3], pads=[1] * 4), N("Shape", ["c"], ["shape"]),
             N("Gather", ["shape", "zero"], ["n"], axis=0), N("Mul", ["n", "two"], ["n2"]),
             N("Unsqueeze", ["n2", "zeros"], ["lead"]), N("Concat", ["lead", "rest"], ["target"], axis=0),
             N("Reshape", ["c", "target"], ["r"]), N("Relu", ["r"], ["out"])]
    inits = {"w1": w(64, 8, 3, 3), "b1": w(64), "zero": np.array(0), "two": np.array(2), "zeros": np.array([0]),
             "rest": np.array([-1])}
    m = graph_model(nodes, inits, ["N", 8, 4, 4], ["M", 512])
    graph = import_graph(m)
    full = export_like(graph, m)
    reference, skeleton = import_graph(infer_shapes(full)), _skeleton(full).SerializeToString()
    exported = []

    def export(g: gs.Graph) -> onnx.ModelProto:
        proto = export_like(g, m)
        exported.append(_skeleton(proto).SerializeToString())
        assert all(np.prod(i.dims) <= SMALL_CONSTANT for i in proto.graph.initializer)
        return proto

    drop_shapes(graph)  # what the graph knew is forgotten: inference alone types the tensors
    infer_graph_shapes(graph, export)
    assert exported == [skeleton]
    types = {name: (t.dtype, t.shape, t.type) for name, t in graph.tensors().items() if isinstance(t, gs.Variable)}
    assert types == {name: (t.dtype, t.shape, t.type) for name, t in reference.tensors().items()
                     if isinstance(t, gs.Variable)}
    assert types["c"][1] == ["N", 64, 4, 4] and types["r"][1] == ["2*N", 512]


def test_sum_divided_by_size_is_a_global_pool():
    """jax2onnx's mean: ReduceSum over H, W then Div by H * W; torch dynamo's: ReduceMean
    with keepdims and a Reshape to [N, C] computed from the input's shape (paddle2onnx)."""
    nodes = [N("Conv", ["x", "w1"], ["c"], kernel_shape=[1, 1]), N("ReduceSum", ["c", "axes"], ["s"], keepdims=0),
             N("Div", ["s", "size"], ["out"])]
    m = graph_model(nodes, {"w1": w(16, 4, 1, 1), "axes": np.array([2, 3]), "size": np.float32(64)},
                    ["N", 4, 8, 8], ["N", 16], opset=18)
    assert canonical_ops(m, w(2, 4, 8, 8)) == ["Conv", "GlobalAveragePool", "Flatten"]
    nodes = [N("Conv", ["x", "w1"], ["c"], kernel_shape=[1, 1]), N("ReduceMean", ["c", "axes"], ["p"], keepdims=1),
             N("Shape", ["p"], ["sh"]), N("Slice", ["sh", "zero", "one"], ["n"]), N("Concat", ["n", "minus"], ["target"], axis=0),
             N("Reshape", ["p", "target"], ["out"])]
    inits = {"w1": w(16, 4, 1, 1), "axes": np.array([-1, -2]), "zero": np.array([0]), "one": np.array([1]),
             "minus": np.array([-1])}
    m = graph_model(nodes, inits, ["N", 4, 8, 8], ["N", 16], opset=18)
    assert canonical_ops(m, w(2, 4, 8, 8)) == ["Conv", "GlobalAveragePool", "Flatten"]


def test_affine_after_weight_layers_is_folded():
    """Conv bias as a separate Add (paddle2onnx), BatchNormalization as Mul/Sub/Div by
    per-channel constants, a MatMul with a pre-transposed weight and its bias Add; a Mul that
    varies along the width and an Add to a Conv output that another node reads stay."""
    nodes = [N("Conv", ["x", "w1"], ["c1"], kernel_shape=[1, 1]), N("Add", ["bias", "c1"], ["a1"]),
             N("Mul", ["a1", "scale"], ["m1"]), N("Sub", ["m1", "shift"], ["s1"]), N("Div", ["s1", "norm"], ["d1"]),
             N("Mul", ["d1", "along_w"], ["m2"]), N("Conv", ["m2", "w2"], ["c2"], kernel_shape=[1, 1]),
             N("Add", ["c2", "b2"], ["a2"]), N("Relu", ["c2"], ["r2"]), N("Add", ["a2", "r2"], ["o"]),
             N("GlobalAveragePool", ["o"], ["p"]), N("Flatten", ["p"], ["f"]), N("MatMul", ["f", "dense"], ["mm"]),
             N("Add", ["mm", "dense_bias"], ["out"])]
    inits = {"w1": w(16, 4, 1, 1), "bias": w(1, 16, 1, 1), "scale": w(16, 1, 1), "shift": w(16, 1, 1),
             "norm": np.abs(w(16, 1, 1)) + 1, "along_w": w(8), "w2": w(16, 16, 1, 1), "b2": w(16, 1, 1),
             "dense": w(16, 10), "dense_bias": w(1, 10)}
    m = graph_model(nodes, inits, ["N", 4, 8, 8], ["N", 10])
    assert canonical_ops(m, w(2, 4, 8, 8)) == ["Conv", "Mul", "Conv", "Add", "Relu", "Add", "GlobalAveragePool",
                                               "Flatten", "Gemm"]
    canonical = canonicalize(m)
    assert all(len(n.input) == 3 for n in canonical.graph.node if n.op_type in ("Conv", "Gemm"))


def test_exporters_writing_one_layer_differently_agree():
    """Defaults left out or written, auto_pad or explicit pads, Gemm with transB = 0,
    alpha/beta and no bias vs MatMul, Softmax axis -1 vs 1: one canonical graph."""
    weight, dense = w(8, 3, 3, 3), w(8, 5)
    first = graph_model([N("Conv", ["x", "w1"], ["c"], auto_pad="SAME_UPPER"), N("GlobalAveragePool", ["c"], ["p"]),
                         N("Flatten", ["p"], ["f"]), N("Gemm", ["f", "dense"], ["g"], alpha=2.0),
                         N("Softmax", ["g"], ["out"])], {"w1": weight, "dense": dense / 2}, ["N", 3, 8, 8], ["N", 5])
    second = graph_model([N("Conv", ["x", "w1", "b1"], ["c"], kernel_shape=[3, 3], pads=[1] * 4, strides=[1, 1],
                            dilations=[1, 1], group=1),
                          N("GlobalAveragePool", ["c"], ["p"]), N("Flatten", ["p"], ["f"], axis=1),
                          N("MatMul", ["f", "dense"], ["g"]), N("Softmax", ["g"], ["out"], axis=1)],
                         {"w1": weight, "b1": np.zeros(8, np.float32), "dense": dense}, ["N", 3, 8, 8], ["N", 5])
    x = w(2, 3, 8, 8)
    assert canonical_ops(first, x) == canonical_ops(second, x)

    def layers(m):
        return [(n.op_type, sorted((a.name, str(helper.get_attribute_value(a))) for a in n.attribute))
                for n in canonicalize(m).graph.node]

    assert layers(first) == layers(second)


def transposed_decoder(encoder: bool = False) -> onnx.ModelProto:
    """Two ConvTranspose layers (the first grouped, biasless, followed by a per-channel Mul and
    bias Add as tf2onnx writes them), each followed by BatchNormalization; with ``encoder`` a
    Conv reads the input first, so the grouped layer's input channels are a free space."""
    bn = {f"{p}{k}": v for k in (1, 2) for p, v in zip(("g", "b", "m", "v"), (w(6), w(6), w(6), np.abs(w(6)) + 0.5))}
    first = "e" if encoder else "x"
    nodes = [N("Conv", ["x", "we", "be"], ["e"], kernel_shape=[1, 1])] if encoder else []
    nodes += [N("ConvTranspose", [first, "t1"], ["u1"], kernel_shape=[2, 2], strides=[2, 2], group=2),
              N("Mul", ["u1", "scale"], ["s1"]), N("Add", ["s1", "shift"], ["a1"]),
              N("BatchNormalization", ["a1", "g1", "b1", "m1", "v1"], ["n1"]), N("Relu", ["n1"], ["r1"]),
              N("ConvTranspose", ["r1", "t2", "tb2"], ["u2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
              N("BatchNormalization", ["u2", "g2", "b2", "m2", "v2"], ["out"])]
    inits = {"t1": w(4, 3, 2, 2), "scale": w(1, 6, 1, 1), "shift": w(6, 1, 1), "t2": w(6, 6, 3, 3), "tb2": w(6),
             "we": w(4, 4, 1, 1), "be": w(4), **bn}
    if not encoder:
        del inits["we"], inits["be"]
    return graph_model(nodes, inits, ["N", 4, 4, 4], ["N", 6, 8, 8])


def test_transposed_convolutions_fold_affine_and_batch_norm():
    m = transposed_decoder()
    x = w(2, 4, 4, 4)
    assert canonical_ops(m, x) == ["ConvTranspose", "BatchNormalization", "Relu", "ConvTranspose",
                                   "BatchNormalization"]
    folded = canonicalize(m, bn="fold")
    assert [n.op_type for n in folded.graph.node] == ["ConvTranspose", "Relu", "ConvTranspose"]
    np.testing.assert_allclose(run_all(folded, x)[0], run_all(m, x)[0], atol=1e-4, rtol=1e-4)


def test_grouped_layer_reading_a_fixed_input_permutes_exactly():
    """Its output channels are (fixed group) x (free channel within the group)."""
    m = transposed_decoder()
    x = w(8, 4, 4, 4)
    for bn in ("keep", "fold"):
        np.testing.assert_allclose(run_all(api.permute(m, seed=3, bn=bn), x)[0], run_all(m, x)[0], atol=1e-5)


def test_transposed_decoder_merged_with_its_permuted_copy_gives_it_back(tmp_path):
    from onnxmerge.io import load_model, save_model
    from tests.helpers import outputs_close
    decoder = transposed_decoder(encoder=True)
    save_model(decoder, tmp_path / "a.onnx")
    save_model(api.permute(load_model(tmp_path / "a.onnx"), seed=3, bn="fold"), tmp_path / "b.onnx")
    x = w(64, 4, 4, 4)
    np.save(tmp_path / "calib.npy", x)
    result = api.merge([str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")], calibration=str(tmp_path / "calib.npy"),
                       options=api.MergeOptions(method="permute", repair="none", bn="fold"))
    expected = run_all(decoder, x)
    outputs_close(expected + expected, run_all(result.model, x))


@pytest.mark.parametrize("opset", [17, 12], ids=["fused statistics graph", "features copied out"])
@pytest.mark.parametrize("method", ["permute", "zip"])
def test_grouped_layer_on_a_fixed_input_merges_with_its_permuted_copy(tmp_path, method, opset):
    """Its free channels within each fixed group are matched on statistics read with the groups
    as more samples (not as identity, which would average misaligned channels). The decoder's
    ops (ConvTranspose, BN, Relu, Mul, Add) mean the same at opsets 12 and 17."""
    from onnxmerge.io import save_model
    from tests.helpers import outputs_close
    decoder = with_opset(transposed_decoder(), opset)
    save_model(decoder, tmp_path / "a.onnx")
    save_model(api.permute(decoder, seed=3), tmp_path / "b.onnx")
    x = w(64, 4, 4, 4)
    np.save(tmp_path / "calib.npy", x)
    result = api.merge([str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")], calibration=str(tmp_path / "calib.npy"),
                       options=api.MergeOptions(method=method, repair="none"))
    expected = run_all(decoder, x)
    outputs_close(expected + expected, run_all(result.model, x))


def test_folded_statistics_in_the_graph_equal_numpy(tmp_path):
    """The fused graph's reading of a (group, channel) axis against ``to_samples`` in numpy."""
    from onnxmerge.calib.capture import collect_statistics
    from onnxmerge.io import save_model
    x = w(32, 4, 4, 4)
    np.save(tmp_path / "calib.npy", x)
    decoder, stats = transposed_decoder(), []
    for opset in (17, 12):
        save_model(with_opset(decoder, opset), tmp_path / f"d{opset}.onnx")
        members, _, _, calib, _, _ = prepare(read_models([str(tmp_path / f"d{opset}.onnx")] * 2), read_data(str(tmp_path / "calib.npy")),
                                               api.MergeOptions())
        split = split_trunk(members[0].model, members[0].graph, heads="separate", zip_layers=None)
        units, per_model, widths = plan_units(members, split)
        assert any(u.fold == (2, 1) for u in units)
        stats.append(collect_statistics([m.model for m in members], per_model, lockstep_batches(calib, 2, 16), widths,
                                        "cpu")[0])
    for fused, copied in zip(*stats):
        assert fused.count == copied.count
        np.testing.assert_allclose(fused.outer, copied.outer, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(fused.sum, copied.sum, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("producer", [None, "pytorch"])
def test_export_like_keeps_the_producer_fields_as_they_were(producer):
    """graphsurgeon writes producer_name and producer_version even where empty; a model exported
    through export_like serialises as the original did."""
    m = model([helper.make_node("Relu", ["y"], ["z"])], [])
    if producer:
        m.producer_name, m.producer_version = producer, "2.13"
    exported = export_like(import_graph(m), m)
    for field in ("producer_name", "producer_version"):
        assert exported.HasField(field) == m.HasField(field)
        assert getattr(exported, field) == getattr(m, field)


def test_export_like_without_provenance_writes_no_producer_nor_metadata():
    """A merged model is none of its sources': it keeps their IR version and opsets only."""
    m = model([helper.make_node("Relu", ["y"], ["z"])], [])
    m.producer_name, m.producer_version = "pytorch", "2.13"
    helper.set_model_props(m, {"author": "someone"})
    exported = export_like(import_graph(m), m, provenance=False)
    assert not exported.HasField("producer_name") and not exported.HasField("producer_version")
    assert list(exported.metadata_props) == []
    assert exported.ir_version == m.ir_version and list(exported.opset_import) == list(m.opset_import)


def test_a_renamed_copy_keeps_the_stored_encoding_and_leaves_the_original():
    """graphsurgeon renames a stored tensor in place on export: the copy holds its own, written
    as it was stored (float_data, not raw_data), and the source model keeps its name."""
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [1], [0.5])
    m = model([helper.make_node("Add", ["y", "bias"], ["z"])], [bias])
    graph = import_graph(m)
    add = next(node for node in graph.nodes if node.op == "Add")
    add.inputs[1] = renamed_copy(add.inputs[1], "bias_m0")
    stored = {t.name: t for t in export_like(graph, m).graph.initializer}
    assert list(stored["bias_m0"].float_data) == [0.5] and not stored["bias_m0"].raw_data
    assert "bias" not in stored and "bias" in {t.name for t in m.graph.initializer}
