"""Slices of a space are parts of it and are resized with it: a conv's output chunked in three
(``conv2(x).chunk(3)`` gating ``conv3(sigmoid(e + f) * g) + x``) keeps valid Slice bounds when
widened or merged at other widths."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from onnxmerge import api
from onnxmerge.io import load_model, save_model
from tests import zoo
from tests.helpers import run_all, outputs_close

EXPORTERS = ["legacy_folded", "legacy_bn"]


def export(tmp_path, exporter: str, width: int = 16, seed: int = 0) -> str:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = zoo._randomize_norms(zoo.ChunkGate(width), seed)
    path = tmp_path / f"chunk_{exporter}_{width}.onnx"
    zoo.EXPORTERS[exporter](model, torch.randn(zoo.IMG), path)
    return str(path)


def calibration(tmp_path) -> tuple[str, np.ndarray]:
    x = np.random.default_rng(0).standard_normal((64, *zoo.IMG[1:])).astype(np.float32)
    np.save(tmp_path / "calib.npy", x)
    return str(tmp_path / "calib.npy"), x


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_widen_resizes_chunks(tmp_path, exporter):
    path = export(tmp_path, exporter)
    _, x = calibration(tmp_path)
    model = load_model(path)
    wider = api.widen(model, factor=1.5, seed=1)
    assert sum(i.dims[0] == 72 for i in wider.graph.initializer if len(i.dims) == 4)  # conv2 is 1.5 x 48 wide
    outputs_close(run_all(model, x), run_all(wider, x))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_merge_with_permuted_and_widened_self_gives_self(tmp_path, exporter):
    path = export(tmp_path, exporter)
    calib, x = calibration(tmp_path)
    expected = run_all(load_model(path), x)
    for name, copy in (("permuted", api.permute(load_model(path), seed=3)),
                       ("widened", api.widen(load_model(path), factor=1.5, seed=2))):
        save_model(copy, tmp_path / f"{name}.onnx")
        # alpha 1 as in test_widen: a feature's two copies join its cluster
        result = api.merge([path, str(tmp_path / f"{name}.onnx")], calibration=calib,
                           options=api.MergeOptions(method="zip", alpha=1.0, repair="none"))
        outputs_close(expected + expected, run_all(result.model, x))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_merge_with_twice_as_wide_design_runs(tmp_path, exporter):
    calib, x = calibration(tmp_path)
    paths = [export(tmp_path, exporter), export(tmp_path, exporter, width=32, seed=1)]
    result = api.merge(paths, calibration=calib, options=api.MergeOptions(method="zip", width=1.5))
    outputs = run_all(result.model, x)
    assert [o.shape for o in outputs] == [(64, zoo.NUM_CLASSES)] * 2
    assert all(np.isfinite(o).all() for o in outputs)


def test_widen_resizes_slices_on_negative_axes():
    """A Slice naming the channel axis as -3 (of NCHW) is resized like one naming axis 1."""
    rng = np.random.default_rng(0)

    def const(name, value):
        return helper.make_tensor(name, onnx.TensorProto.FLOAT if value.dtype.kind == "f" else onnx.TensorProto.INT64,
                                  value.shape, value.reshape(-1).tolist())

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], kernel_shape=[1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Slice", ["r", "starts", "ends", "axes"], ["s"]),
             helper.make_node("Conv", ["s", "w2", "b2"], ["y"], kernel_shape=[1, 1])]
    inits = [const("w1", rng.standard_normal((12, 3, 1, 1))), const("b1", rng.standard_normal(12)),
             const("starts", np.array([-8])), const("ends", np.array([-2])), const("axes", np.array([-3])),
             const("w2", rng.standard_normal((5, 6, 1, 1))), const("b2", rng.standard_normal(5))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 5, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((8, 3, 4, 4)).astype(np.float32)
    outputs_close(run_all(model, x), run_all(api.widen(model, factor=2.0, seed=1), x))
