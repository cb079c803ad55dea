"""Canonicalisation keeps the function and removes the exporter idioms the rules rely on."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxmerge import api
from onnxmerge.graph.canonical import canonicalize
from tests.test_rules import model, run_all, weights


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
