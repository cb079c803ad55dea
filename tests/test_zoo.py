"""Checks of the model zoo itself (tests/zoo.py): every (model, exporter) pair
exports to a valid, self-contained ONNX file with a dynamic batch axis that
reproduces the torch outputs in onnxruntime."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from tests import zoo
from tests.helpers import zoo_cases

BATCHES = (2, 3)


def _dim0(value_info) -> onnx.TensorShapeProto.Dimension:
    return value_info.type.tensor_type.shape.dim[0]


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_export_returns_one_self_contained_file_and_its_sample(exporter, tmp_path):
    path = tmp_path / "mlp.onnx"
    out, sample = zoo.export("mlp", exporter, path)
    assert out == str(path) and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    # sample batch from export(): deterministic float32, batch 2..4
    assert sample.dtype == np.float32 and 2 <= sample.shape[0] <= 4
    np.testing.assert_array_equal(sample, zoo.sample_input("mlp"))


@pytest.mark.parametrize("name,exporter", zoo_cases(zoo.PAIRS))
def test_export_pair(zoo_files, name, exporter):
    out, _ = zoo_files.get(name, exporter)  # the session's export, which every zoo test reads
    sample = zoo.sample_input(name)
    assert not os.path.exists(out + ".data")  # a single self-contained file
    proto = onnx.load(out)
    assert not any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer
    )
    onnx.checker.check_model(proto, full_check=True)

    # names and a symbolic batch axis on input and output
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["output"]
    for vi in (proto.graph.input[0], proto.graph.output[0]):
        d = _dim0(vi)
        assert d.dim_param and not d.HasField("dim_value"), (vi.name, d)


    # onnxruntime matches torch for several batch sizes (fresh, identical build)
    model, shape = zoo.build(name)
    for b in BATCHES:
        x = zoo.sample_input(name, batch=b, seed=b)
        assert x.shape == (b, *shape[1:])
        zoo.check_matches(out, model, x)
    zoo.check_matches(out, model, sample)

    ops = {n.op_type for n in proto.graph.node}
    if exporter == "legacy_bn" and name in zoo.HAS_BATCHNORM:
        n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        n_onnx = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
        assert n_onnx == n_bn, (n_onnx, n_bn)
    if exporter == "legacy_folded":
        assert "BatchNormalization" not in ops


@pytest.mark.parametrize("name", list(zoo.TORCH_MODELS))
def test_builder(name):
    m1, shape = zoo.TORCH_MODELS[name]()
    m2, shape2 = zoo.TORCH_MODELS[name]()
    assert shape == shape2 and shape[0] == 2
    assert not m1.training and all(not m.training for m in m1.modules())
    # deterministic weights, independent of the global RNG state
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    # normalisation layers are never identities
    for m in m1.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert (m.running_var > 0).all()
            assert m.running_mean.abs().min() > 0
            assert not torch.allclose(m.running_var, torch.ones_like(m.running_var))
            assert not torch.allclose(m.weight, torch.ones_like(m.weight))
            assert m.bias.abs().min() > 0
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            assert not torch.allclose(m.weight, torch.ones_like(m.weight))
            assert m.bias.abs().min() > 0
    x = torch.from_numpy(zoo.sample_input(name, batch=2))
    with torch.no_grad():
        y = m1(x)
    assert y.shape[0] == 2 and torch.isfinite(y).all()
    if name not in zoo.FEATURE_EXTRACTORS:
        assert y.shape == (2, zoo.NUM_CLASSES)
    assert y.std() > 1e-3   # outputs are not degenerate


def test_zoo_tables():
    assert set(zoo.EXPORTERS) == {"legacy_folded", "legacy_bn", "dynamo"}
    required = {
        "mlp", "vgg_bn", "resnet_basic", "resnet_bottleneck", "densenet", "inception",
        "mobilenetv2", "mobilenetv2_saturated", "resnext", "squeeze_excite", "shufflenet", "groupnorm_cnn", "transformer",
    }
    assert required <= set(zoo.TORCH_MODELS)
    for m, e in zoo.KNOWN_EXCLUSIONS:
        assert m in zoo.TORCH_MODELS and e in zoo.EXPORTERS
    expected = {(m, e) for m in zoo.TORCH_MODELS for e in zoo.EXPORTERS} - set(zoo.KNOWN_EXCLUSIONS)
    assert set(zoo.PAIRS) == expected
    assert zoo.HAS_BATCHNORM == {m for m in zoo.TORCH_MODELS
                                 if any(isinstance(layer, torch.nn.BatchNorm2d) for layer in zoo.build(m)[0].modules())}


def test_sklearn_mlp(tmp_path):
    path = tmp_path / "sk_mlp.onnx"
    x = zoo.sklearn_mlp(path)
    assert x.dtype == np.float32 and x.shape == (4, 64)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["label", "probabilities"]
    assert "ZipMap" not in {n.op_type for n in proto.graph.node}
    assert _dim0(proto.graph.input[0]).dim_param or not _dim0(proto.graph.input[0]).HasField("dim_value")

    clf = zoo.sklearn_mlp_classifier()
    X, _ = zoo._digits()
    for b in (*BATCHES, len(x)):
        xb = x if b == len(x) else X[10:10 + b]
        proba = zoo.run_onnx(path, xb, "probabilities")
        labels = zoo.run_onnx(path, xb, "label")
        assert proba.shape == (b, 10)
        np.testing.assert_allclose(proba, clf.predict_proba(xb), atol=1e-5)
        np.testing.assert_array_equal(labels, clf.predict(xb))
