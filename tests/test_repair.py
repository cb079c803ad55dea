"""BN reset: stored statistics must equal the statistics of each BN's input on the data."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxmerge.calib.capture import expose, open_session
from onnxmerge.graph.canonical import canonicalize
from onnxmerge.io import load_model
from onnxmerge.rewrite.repair import reset_batch_norm, train_mode
from tests.test_rules import with_opset


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
