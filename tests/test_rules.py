"""One small model per row of the op-rule table, checked by the permutation oracle.

Each model is input -> Conv (makes a free 16-channel space) -> the op under test -> a
consumer -> output. Permuting every free space must leave the output unchanged, the op must
not be a barrier, and the Conv weights must have moved.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxmerge import api
from onnxmerge.graph.facts import FACTS
from onnxmerge.graph.rules import BINARY, RULES, UNARY, einsum_labels
from tests.helpers import const, weights, model, run_all

RNG = np.random.default_rng(0)
C = 16


def unary(op: str, **attrs):
    if op == "Gelu":  # added in opset 20
        return model([helper.make_node("Gelu", ["y"], ["z"])], [], opset=20)
    # keep each op in its domain: (0, 1) for inverse trig, > 1 for Acosh/Log/Sqrt
    pre = {"Acos": "Sigmoid", "Asin": "Sigmoid", "Atanh": "Sigmoid"}.get(op)
    nodes, inits, source = [], [], "y"
    if pre:
        nodes.append(helper.make_node(pre, ["y"], ["y0"]))
        source = "y0"
    if op in ("Acosh", "Log", "Sqrt", "Reciprocal"):
        nodes += [helper.make_node("Abs", ["y"], ["ya"]), helper.make_node("Add", ["ya", "one5"], ["y0"])]
        inits.append(const("one5", np.float32(1.5)))
        source = "y0"
    if op in ("Not", "IsInf", "IsNaN"):
        if op == "Not":
            nodes.append(helper.make_node("Greater", [source, "zero"], ["yb"]))
            inits.append(const("zero", np.float32(0)))
            source = "yb"
        nodes += [helper.make_node(op, [source], ["zb"]), helper.make_node("Cast", ["zb"], ["z"], to=TensorProto.FLOAT)]
        return model(nodes, inits)
    if op == "CastLike":
        nodes.append(helper.make_node(op, [source, "like"], ["z"]))
        inits.append(const("like", np.zeros(1, np.float32)))
        return model(nodes, inits)
    extra = {"Cast": {"to": TensorProto.FLOAT}, "Softmax": {"axis": 1}, "LogSoftmax": {"axis": 1},
             "Hardmax": {"axis": 1}}.get(op, {})
    nodes.append(helper.make_node(op, [source], ["z"], **extra, **attrs))
    return model(nodes, inits)


def binary(op: str):
    """op(y, per-channel constant) and op(y, y2) where y2 comes from a second conv branch."""
    nodes = [helper.make_node("Conv", ["x", "w3"], ["y2"], kernel_shape=[1, 1], name="conv3")]
    inits = [const("w3", weights((C, 8, 1, 1))), const("k", np.abs(weights((C, 1, 1))) + 0.5)]
    if op in ("And", "Or", "Xor", "BitwiseAnd"):
        kind = TensorProto.BOOL if op != "BitwiseAnd" else TensorProto.INT32
        nodes += [helper.make_node("Greater", ["y", "y2"], ["g1"]), helper.make_node("Cast", ["g1"], ["a"], to=kind),
                  helper.make_node("Greater", ["y2", "k"], ["g2"]), helper.make_node("Cast", ["g2"], ["b"], to=kind),
                  helper.make_node(op, ["a", "b"], ["r"]), helper.make_node("Cast", ["r"], ["z"], to=TensorProto.FLOAT)]
        return model(nodes, inits)
    if op in ("Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual"):
        nodes += [helper.make_node(op, ["y", "y2"], ["r"]), helper.make_node("Cast", ["r"], ["r2"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["r2", "k"], ["z"])]
        return model(nodes, inits)
    if op == "Where":
        nodes += [helper.make_node("Greater", ["y", "k"], ["cond"]), helper.make_node("Where", ["cond", "y", "y2"], ["z"])]
        return model(nodes, inits)
    if op == "Pow":
        nodes += [helper.make_node("Abs", ["y"], ["ya"]), helper.make_node("Pow", ["ya", "k"], ["z"])]
        return model(nodes, inits)
    if op == "PRelu":
        nodes.append(helper.make_node("PRelu", ["y", "k"], ["z"]))
        return model(nodes, inits)
    if op in ("Sum", "Mean", "Max", "Min"):
        nodes.append(helper.make_node(op, ["y", "y2", "k"], ["z"]))
        return model(nodes, inits)
    nodes += [helper.make_node(op, ["y", "k"], ["t"]), helper.make_node(op, ["t", "y2"], ["z"])]
    return model(nodes, inits)


def special_cases() -> dict[str, onnx.ModelProto]:
    n = helper.make_node
    cases = {
        "Expand": model([n("Expand", ["y", "shape"], ["z"])], [const("shape", np.array([1, C, 4, 4], np.int64))]),
        "BatchNormalization": model([n("BatchNormalization", ["y", "s", "b", "m", "v"], ["z"])],
                                    [const("s", weights(C)), const("b", weights(C)), const("m", weights(C)),
                                     const("v", np.abs(weights(C)) + 0.5)]),
        "InstanceNormalization": model([n("InstanceNormalization", ["y", "s", "b"], ["z"])],
                                       [const("s", weights(C)), const("b", weights(C))]),
        "LayerNormalization": model([n("Transpose", ["y"], ["yt"], perm=[0, 2, 3, 1]),
                                     n("LayerNormalization", ["yt", "s", "b"], ["ln"], axis=-1),
                                     n("Transpose", ["ln"], ["z"], perm=[0, 3, 1, 2])],
                                    [const("s", weights(C)), const("b", weights(C))]),
        "GroupNormalization": model([n("GroupNormalization", ["y", "s", "b"], ["z"], num_groups=4)],
                                    [const("s", weights(C)), const("b", weights(C))], opset=21),
        "Conv": model([n("Conv", ["y", "wg"], ["z"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=4)],
                      [const("wg", weights((32, 4, 3, 3)))], out_shape=(None, 32)),
        "ConvTranspose": model([n("ConvTranspose", ["y", "wt", "bt"], ["z"], kernel_shape=[2, 2], strides=[2, 2])],
                               [const("wt", weights((C, 24, 2, 2))), const("bt", weights(24))], out_shape=(None, 24)),
        "Gemm": model([n("GlobalAveragePool", ["y"], ["g"]), n("Flatten", ["g"], ["f"]),
                       n("Gemm", ["f", "wm", "bm"], ["z"], alpha=0.5, beta=2.0)],
                      [const("wm", weights((C, 32))), const("bm", weights(32))], head="fc", out_shape=(None, 32)),
        "MatMul": model([n("Transpose", ["y"], ["yt"], perm=[0, 2, 3, 1]), n("MatMul", ["yt", "wm"], ["mm"]),
                         n("Transpose", ["mm"], ["z"], perm=[0, 3, 1, 2])],
                        [const("wm", weights((C, 24)))], out_shape=(None, 24)),
        "Einsum": model([n("Einsum", ["y", "we"], ["z"], equation="nchw,cd->ndhw")], [const("we", weights((C, 24)))],
                        out_shape=(None, 24)),
        "Gather": model([n("ReduceMax", ["y"], ["r"], axes=[2, 3], keepdims=0), n("Gather", ["r", "idx"], ["z"], axis=0)],
                        [const("idx", np.array([0], np.int64))], in_shape=(3, 8, 4, 4), head="fc", out_shape=(None, C),
                        opset=17),
        "Concat": model([n("Conv", ["x", "w3"], ["y2"], kernel_shape=[1, 1]), n("Concat", ["y", "y2"], ["z"], axis=1)],
                        [const("w3", weights((8, 8, 1, 1)))], out_shape=(None, 24)),
        "Split": model([n("Split", ["y", "sizes"], ["s1", "s2"], axis=1), n("Relu", ["s2"], ["r2"]),
                        n("Concat", ["r2", "s1"], ["z"], axis=1)], [const("sizes", np.array([6, 10], np.int64))]),
        "Slice": model([n("Slice", ["y", "st", "en", "ax"], ["z"])],
                       [const("st", np.array([4], np.int64)), const("en", np.array([12], np.int64)),
                        const("ax", np.array([1], np.int64))], out_shape=(None, 8)),
        "Transpose": model([n("Transpose", ["y"], ["t"], perm=[0, 2, 3, 1]), n("Softmax", ["t"], ["r"], axis=3),
                            n("Transpose", ["r"], ["z"], perm=[0, 3, 1, 2])], []),
        "Reshape": model([n("Reshape", ["y", "sh"], ["r"]), n("Softmax", ["r"], ["s"], axis=2),
                          n("Reshape", ["s", "back"], ["z"])],
                         [const("sh", np.array([0, 4, 4, 16], np.int64)), const("back", np.array([0, C, 4, 4], np.int64))]),
        "Flatten": model([n("Flatten", ["y"], ["z"])], [], head="fc", out_shape=(None, C * 16)),
        "Squeeze": model([n("ReduceMean", ["y", "axes"], ["r"], keepdims=1), n("Squeeze", ["r", "axes"], ["s"]),
                          n("Unsqueeze", ["s", "axes"], ["z"])], [const("axes", np.array([3], np.int64))]),
        "Unsqueeze": model([n("Unsqueeze", ["y", "ax"], ["u"]), n("Relu", ["u"], ["r"]), n("Squeeze", ["r", "ax"], ["z"])],
                           [const("ax", np.array([2], np.int64))]),
        "Pad": model([n("Pad", ["y", "pads"], ["z"], mode="reflect")],
                     [const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))]),
        "DepthToSpace": model([n("DepthToSpace", ["y"], ["z"], blocksize=2)], [], out_shape=(None, C // 4)),
        "SpaceToDepth": model([n("SpaceToDepth", ["y"], ["z"], blocksize=2)], [], out_shape=(None, C * 4)),
        "Resize": model([n("Resize", ["y", "", "scales"], ["z"], mode="nearest")],
                        [const("scales", np.array([1, 1, 2, 2], np.float32))]),
        "Upsample": model([n("Upsample", ["y", "scales"], ["z"], mode="nearest")],
                          [const("scales", np.array([1, 1, 2, 2], np.float32))], opset=9),
        "Shape": model([n("Shape", ["y"], ["s"]), n("Reshape", ["y", "s"], ["z"])], []),
        "Size": model([n("Size", ["y"], ["s"]), n("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
                       n("Div", ["y", "sf"], ["z"])], []),
        "ConstantOfShape": model([n("Shape", ["y"], ["s"]), n("ConstantOfShape", ["s"], ["o"],
                                                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [2.0])),
                                  n("Mul", ["y", "o"], ["z"])], []),
        "Range": model([n("Range", ["r0", "r1", "r2"], ["rg"]), n("Reshape", ["rg", "sh"], ["rs"]),
                        n("Cast", ["rs"], ["rf"], to=TensorProto.FLOAT), n("Add", ["y", "rf"], ["z"])],
                       [const("r0", np.int64(0)), const("r1", np.int64(4)), const("r2", np.int64(1)),
                        const("sh", np.array([1, 1, 1, 4], np.int64))]),
    }
    for op in ("ArgMax", "ArgMin"):  # positions along the reduced (spatial) axis
        cases[op] = model([n(op, ["y"], ["a"], axis=3, keepdims=1), n("Cast", ["a"], ["af"], to=TensorProto.FLOAT),
                           n("Mul", ["y", "af"], ["z"])], [])
    for op in ("MaxPool", "AveragePool", "LpPool"):
        cases[op] = model([n(op, ["y"], ["z"], kernel_shape=[2, 2])], [])
    for op in ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"):
        cases[op] = model([n(op, ["y"], ["z"])], [])
    for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
               "ReduceLogSumExp", "ReduceSumSquare"):
        cases[op] = model([n("Sigmoid", ["y"], ["ys"]), n(op, ["ys", "axes"], ["z"], keepdims=1)],
                          [const("axes", np.array([3], np.int64))])
    for op, extra in (("ZipMap", {"classlabels_int64s": list(range(5))}), ("ArrayFeatureExtractor", {})):
        cases[f"ai.onnx.ml.{op}"] = with_ml_output(model([n("Relu", ["y"], ["z"])], []), op, **extra)
    return cases


def with_ml_output(m: onnx.ModelProto, op: str, **attrs) -> onnx.ModelProto:
    """``m`` with a second output made by an ai.onnx.ml op reading its first, as skl2onnx's
    ZipMap (probabilities keyed by class) and ArrayFeatureExtractor (picking columns)."""
    inputs = ["out"] if op == "ZipMap" else ["out", "picked"]
    if op == "ArrayFeatureExtractor":
        m.graph.initializer.append(const("picked", np.array([0, 3], np.int64)))
    m.graph.node.append(helper.make_node(op, inputs, ["ml_out"], domain="ai.onnx.ml", **attrs))
    if op == "ZipMap":
        entry = helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))
        m.graph.output.append(helper.make_value_info("ml_out", helper.make_sequence_type_proto(entry)))
    else:
        m.graph.output.append(helper.make_tensor_value_info("ml_out", TensorProto.FLOAT, ["N", 2]))
    m.opset_import.append(helper.make_opsetid("ai.onnx.ml", 1))
    return m


def all_cases() -> dict[str, onnx.ModelProto]:
    cases = {op: unary(op) for op in (*UNARY, "Softmax", "LogSoftmax", "Hardmax")}
    cases.update({op: binary(op) for op in BINARY})
    cases.update(special_cases())
    return cases


CASES = all_cases()


def run(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return run_all(m, x)[0]


def test_every_rule_has_a_case():
    assert sorted(RULES) == sorted(CASES)


@pytest.mark.parametrize("op", sorted(CASES))
def test_permutation_preserves_outputs(op):
    m = CASES[op]
    onnx.checker.check_model(m, full_check=True)
    batch = 3 if op == "Gather" else 2
    x = RNG.standard_normal((batch, 8, 4, 4)).astype(np.float32)
    canonical, graph = api.analyse(m)
    assert graph.barriers == []
    assert graph.free_spaces, "the conv output space should be free"
    permuted = api.permute(m, seed=3)
    expected, got = run(m, x), run(permuted, x)
    np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, np.abs(expected).max()), rtol=0)
    before = {i.name: numpy_helper.to_array(i) for i in canonical.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in permuted.graph.initializer}
    assert not np.array_equal(before["w1"], after["w1"])


def test_unknown_op_is_a_barrier():
    n = helper.make_node
    m = model([n("LRN", ["y"], ["z"], size=3)], [])  # normalises over neighbouring channels
    _, graph = api.analyse(m)
    assert [(b.op, b.reason) for b in graph.barriers] == [("LRN", "no rule for op LRN")]
    conv_space = next(s for s in graph.spaces if any(p.name == "w1" and p.axis == 0 for p in s.producers))
    assert conv_space.fixed


EINSUMS = {  # equation, constant operand shape (None: y again), output width
    "ellipsis": ("...chw,cd->...dhw", (C, 24), 24),
    "channels_last_kernel": ("nchw,hwcd->ndhw", (4, 4, C, 24), 24),
    "per_channel_scale": ("nchw,c->nchw", (C,), C),
    "two_activations": ("nchw,nchw->nchw", None, C),
    "heads_grid": ("nchw,cgd->ngdhw", (C, 4, 6), None),
}


def einsum_case(equation: str, operand: tuple | None, width: int | None) -> onnx.ModelProto:
    """y -> Einsum(y, constant or y) -> z; a [N, g, d, H, W] output is reshaped to g*d channels."""
    n = helper.make_node
    second, inits = ("y", []) if operand is None else ("we", [const("we", weights(operand))])
    nodes = [n("Einsum", ["y", second], ["z" if width else "e"], equation=equation)]
    if width is None:
        width = operand[1] * operand[2]
        nodes.append(n("Reshape", ["e", "sh"], ["z"]))
        inits.append(const("sh", np.array([0, width, 4, 4], np.int64)))
    return model(nodes, inits, out_shape=(None, width))


@pytest.mark.parametrize("case", sorted(EINSUMS))
def test_einsum_equations_are_permuted_not_barriers(case):
    """Einsum's spaces read from the equation (an ellipsis, a kernel contracting two labels, a
    label kept with a constant, two activations, a projection to a grid) under the oracle."""
    m = einsum_case(*EINSUMS[case])
    x = RNG.standard_normal((2, 8, 4, 4)).astype(np.float32)
    _, graph = api.analyse(m)
    assert graph.barriers == [] and graph.free_spaces
    expected = run(m, x)
    for seed in range(2):
        np.testing.assert_allclose(run(api.permute(m, seed=seed), x), expected,
                                   atol=1e-4 * max(1.0, np.abs(expected).max()), rtol=0)
    if case == "heads_grid":  # the projection's outer label is a block of a grid, its inner one not
        assert sorted(graph.table.widths[s] for s in graph.kept) == [4]


@pytest.mark.parametrize("equation,shapes", [("bij,bjk", [(2, 3, 4), (2, 4, 5)]), ("ij,jk", [(3, 4), (4, 5)]),
                                             ("...ij,...jk", [(2, 1, 3, 4), (6, 4, 5)]), ("ji", [(3, 4)]),
                                             ("i...,i...->...", [(3, 2, 5), (3, 1, 5)]), ("bij->bi", [(2, 3, 4)])])
def test_einsum_labels_give_numpys_output_shape(equation, shapes):
    """The labels read from an equation (implicit output, ellipses broadcast) name the axes of
    numpy's result."""
    operands = [RNG.standard_normal(shape) for shape in shapes]
    terms, output = einsum_labels(equation, [len(shape) for shape in shapes])
    sizes = {}
    for term, shape in zip(terms, shapes):
        for label, size in zip(term, shape):
            sizes[label] = max(sizes.get(label, 1), size)
    assert tuple(sizes[label] for label in output) == np.einsum(equation, *operands).shape


def test_einsum_diagonal_is_a_barrier():
    n = helper.make_node
    m = model([n("Einsum", ["y"], ["d"], equation="nchh->nch"), n("Unsqueeze", ["d", "ax"], ["z"])],
              [const("ax", np.array([3], np.int64))])
    _, graph = api.analyse(m)
    assert [(b.op, b.reason) for b in graph.barriers] == [("Einsum", "a label repeated within an operand (a diagonal)")]


def test_channels_last_flatten_into_a_linear_layer():
    """Keras's Flatten of an NHWC map (tf2onnx: Transpose(0,2,3,1) -> Flatten -> Gemm): the
    channels are the fastest-varying axis of the flattened features, and permuting them must
    permute the Gemm's columns within every position."""
    n = helper.make_node
    m = model([n("Transpose", ["y"], ["yt"], perm=[0, 2, 3, 1]), n("Flatten", ["yt"], ["z"])], [],
              head="fc", out_shape=(None, C * 16))
    x = RNG.standard_normal((2, 8, 4, 4)).astype(np.float32)
    _, graph = api.analyse(m)
    assert graph.barriers == [] and graph.free_spaces
    expected = run(m, x)
    np.testing.assert_allclose(run(api.permute(m, seed=5), x), expected,
                               atol=1e-4 * max(1.0, np.abs(expected).max()), rtol=0)


def channel_pad(before: int, after: int, opset: int = 18) -> onnx.ModelProto:
    """y -> Pad of the channel axis with zeros (ResNet option-A shortcut) -> z, plus the conv
    branch y2 of the padded width, so the padded blocks meet a free space."""
    n = helper.make_node
    wide = C + before + after
    pads = np.array([0, before, 0, 0, 0, after, 0, 0], np.int64)
    if opset < 11:
        pad_node, inits = n("Pad", ["y"], ["padded"], pads=[int(v) for v in pads]), []
    else:
        pad_node, inits = n("Pad", ["y", "pads"], ["padded"]), [const("pads", pads)]
    nodes = [pad_node, n("Conv", ["x", "w3"], ["y2"], kernel_shape=[1, 1], name="conv3"), n("Add", ["padded", "y2"], ["z"])]
    return model(nodes, inits + [const("w3", weights((wide, 8, 1, 1)))], out_shape=(None, wide), opset=opset)


def depth_to_space(mode: str) -> onnx.ModelProto:
    """y (16 channels) -> DepthToSpace(2) -> 4 channels -> a second conv, read by the head."""
    n = helper.make_node
    nodes = [n("DepthToSpace", ["y"], ["d"], blocksize=2, mode=mode), n("Conv", ["d", "w3"], ["z"], kernel_shape=[1, 1])]
    return model(nodes, [const("w3", weights((6, C // 4, 1, 1)))], out_shape=(None, 6))


CHANNEL_CASES = {"pad_both_sides": channel_pad(4, 4), "pad_after": channel_pad(0, 8),
                 "pad_opset_10": channel_pad(4, 4, opset=10),
                 "depth_to_space_dcr": depth_to_space("DCR"), "depth_to_space_crd": depth_to_space("CRD")}


@pytest.mark.parametrize("case", sorted(CHANNEL_CASES))
def test_channel_pad_and_depth_to_space_are_permuted_not_barriers(case):
    """The permutation oracle where a Pad or DepthToSpace reorders the channel axis; the conv
    before it must be permuted (a wrongly mapped space changes the output)."""
    m = CHANNEL_CASES[case]
    x = RNG.standard_normal((2, 8, 4, 4)).astype(np.float32)
    canonical, graph = api.analyse(m)
    assert graph.barriers == []
    expected = run(m, x)
    for seed in range(3):
        permuted = api.permute(m, seed=seed)
        np.testing.assert_allclose(run(permuted, x), expected, atol=1e-4 * max(1.0, np.abs(expected).max()), rtol=0)
    weights_after = {i.name: numpy_helper.to_array(i) for i in permuted.graph.initializer}
    assert not np.array_equal(numpy_helper.to_array(next(i for i in canonical.graph.initializer if i.name == "w1")),
                              weights_after["w1"])


def test_channel_pad_blocks_keep_their_width():
    """The padded blocks are spaces of their own whose width the pads fix: never widened."""
    _, graph = api.analyse(channel_pad(4, 4))
    assert sorted(graph.table.widths[s] for s in graph.kept) == [4, 4]
    assert graph.kept.keys() <= graph.block_spaces()


@pytest.mark.parametrize("mode", ["reflect", "edge"])
def test_channel_pad_copying_positions_is_a_barrier(mode):
    m = channel_pad(4, 4)
    next(node for node in m.graph.node if node.op_type == "Pad").attribute.append(helper.make_attribute("mode", mode))
    _, graph = api.analyse(m)
    assert graph.barriers[0].op == "Pad" and graph.barriers[0].reason.startswith(mode)


# What a one-node model of an op needs beyond one [2, 4, 4, 4] input: attributes, constant inputs.
NEEDS = {
    "Cast": ({"to": TensorProto.FLOAT}, []),
    "Concat": ({"axis": 1}, []),
    "DepthToSpace": ({"blocksize": 2}, []),
    "SpaceToDepth": ({"blocksize": 2}, []),
    "MaxPool": ({"kernel_shape": [2, 2]}, []),
    "AveragePool": ({"kernel_shape": [2, 2]}, []),
    "Split": ({"axis": 1, "num_outputs": 2}, []),
    "Gather": ({"axis": 1}, [np.array([2, 0])]),
    "PRelu": ({}, [np.full((4, 1, 1), 0.1, np.float32)]),
    "Reshape": ({}, [np.array([2, -1])]),
    "Expand": ({}, [np.array([2, 4, 4, 4])]),
    "Tile": ({}, [np.array([1, 2, 1, 1])]),
    "Slice": ({}, [np.array([1]), np.array([3]), np.array([1])]),
    "Unsqueeze": ({}, [np.array([0])]),
    "Resize": ({}, [None, np.array([1, 1, 2, 2], np.float32)]),
}


def one_op(op: str) -> onnx.ModelProto:
    """x -> op -> its outputs (opset 20: Gelu's first)."""
    attrs, constants = NEEDS.get(op, ({}, []))
    names = [f"c{k}" if c is not None else "" for k, c in enumerate(constants)]
    outputs = ["y0", "y1"] if op == "Split" else ["y0"]
    graph = helper.make_graph(
        [helper.make_node(op, ["x", *names], outputs, **attrs)], "one_op",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 4, 4])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, None) for y in outputs],
        [const(n, c) for n, c in zip(names, constants) if c is not None])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    m.ir_version = 9
    return m


def test_zero_and_sign_facts_hold_in_onnxruntime():
    """The facts depth lifting proves identities with: an op that preserves zero maps zeros to
    zeros, a non-negative op's output has no negative value (NaN aside: Sqrt), a sign-keeping
    op keeps non-negative inputs non-negative (each op with one data input)."""
    x = RNG.standard_normal((2, 4, 4, 4)).astype(np.float32)
    wrong = []
    for op, facts in sorted(FACTS.items()):
        checks = [(np.zeros_like(x), lambda y: np.all(y == 0), "zero")] if facts.zero == "preserves" else []
        checks += [(x, lambda y: not (y < 0).any(), "sign")] if facts.sign == "non-negative" else []
        checks += [(np.abs(x), lambda y: not (y < 0).any(), "sign")] if facts.sign == "keeps" else []
        for data, holds, fact in checks:
            wrong += [f"{op}: {fact}" for y in run_all(one_op(op), data) if not holds(y)]
    assert wrong == []
