"""BN reset: stored statistics must equal the statistics of each BN's input on the data."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxmerge.calib.capture import expose, open_session
from onnxmerge.graph.canonical import canonicalize
from onnxmerge.io import load_model
from onnxmerge.rewrite.repair import _reset_layer_by_layer, reset_batch_norm


def bn_input_stats(model: onnx.ModelProto, x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(data mean, data var, stored mean, stored var) for every BN, in eval mode."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    session, _ = open_session(expose(model, [n.input[0] for n in bns]), "cpu")
    values = session.run([n.input[0] for n in bns], {session.get_inputs()[0].name: x})
    return [(v.mean((0, 2, 3)), v.var((0, 2, 3)), inits[n.input[3]], inits[n.input[4]]) for n, v in zip(bns, values)]


def test_layer_by_layer_reset_matches_every_bn_input(zoo_files):
    path, x = zoo_files.get("resnet_basic", "legacy_bn")
    model = canonicalize(load_model(path))
    reset, passes, _ = _reset_layer_by_layer(model, lambda: [{"input": x[:64]}, {"input": x[64:]}], "cpu")
    assert passes > 1
    for data_mean, data_var, mean, var in bn_input_stats(reset, x):
        np.testing.assert_allclose(mean, data_mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(var, data_var, rtol=1e-3, atol=1e-5)


def test_train_mode_reset_is_exact_for_the_first_bn_and_one_pass(zoo_files):
    path, x = zoo_files.get("resnet_basic", "legacy_bn")
    model = canonicalize(load_model(path))
    reset, passes, ran = reset_batch_norm(model, lambda: [{"input": x[:64]}, {"input": x[64:]}], "cpu")
    assert passes == 1 and ran == "cpu"
    first = bn_input_stats(reset, x)[0]
    np.testing.assert_allclose(first[2], first[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(first[3], first[1], rtol=1e-3, atol=1e-5)
    original = bn_input_stats(model, x)
    assert not np.allclose(original[0][2], first[2])  # the zoo's random statistics were replaced
