"""--zip-layers auto: the cut chosen from the loss measured on held-back calibration samples."""

from __future__ import annotations

import numpy as np
import pytest

from onnxmerge import api, tradeoff
from onnxmerge.calib.data import input_specs, load_calibration
from onnxmerge.cli import main
from onnxmerge.io import load_model, save_model
from tests.helpers import run_all, outputs_close


def test_a_permuted_copy_loses_nothing_at_any_cut_so_every_layer_is_merged(zoo_files, tmp_path):
    path, x = zoo_files.get("resnet_basic", "legacy_folded")
    save_model(api.permute(load_model(path), seed=2), tmp_path / "b.onnx")
    np.save(tmp_path / "calib.npy", x)
    result = api.merge([path, str(tmp_path / "b.onnx")], calibration=str(tmp_path / "calib.npy"),
                       options=api.MergeOptions(zip_layers="auto", repair="none"))
    auto = result.report["zip_layers_auto"]
    total = result.report["weight_layers"]["total"]
    assert [p["zip_layers"] for p in auto["curve"]] == list(range(1, total + 1))
    assert all(p["loss"] == 0 for p in auto["curve"]) and auto["chosen"] == total
    assert auto["held_out_samples"] == round(tradeoff.HOLD_OUT * len(x))
    sizes = [p["parameters"] for p in auto["curve"]]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]  # more zipped, smaller model
    expected = run_all(load_model(path), x)
    outputs_close(expected + expected, run_all(result.model, x))


def test_two_different_models_stop_where_the_loss_passes_the_budget(zoo_files, tmp_path):
    path, x = zoo_files.get("mlp", "legacy_folded")
    other = load_model(path)
    rng = np.random.default_rng(0)
    from onnx import numpy_helper
    for init in other.graph.initializer:
        value = numpy_helper.to_array(init)
        init.CopyFrom(numpy_helper.from_array((value + rng.normal(0, value.std() + 1e-3, value.shape)).astype(value.dtype),
                                              init.name))
    save_model(other, tmp_path / "b.onnx")
    np.save(tmp_path / "calib.npy", x)
    result = api.merge([path, str(tmp_path / "b.onnx")], calibration=str(tmp_path / "calib.npy"),
                       options=api.MergeOptions(zip_layers="auto", max_loss=0.0))
    auto = result.report["zip_layers_auto"]
    within = [p["zip_layers"] for p in auto["curve"] if p["loss"] <= 0.0]
    assert auto["chosen"] == (max(within) if within else 1)
    assert result.report["layers"].startswith(f"{auto['chosen']} of ")


def test_held_back_samples_are_disjoint_from_the_merge_samples(zoo_files, tmp_path):
    path, x = zoo_files.get("mlp", "legacy_folded")
    np.save(tmp_path / "calib.npy", np.arange(len(x))[:, None] * np.ones((1, x.shape[1]), np.float32))
    calib = load_calibration(tmp_path / "calib.npy", [input_specs(load_model(path))])
    fit, held = tradeoff.split_samples(calib, seed=0)
    seen = [np.concatenate([f["input"][:, 0] for f in part.batches(0, 16)]) for part in (fit, held)]
    assert len(set(seen[0]) & set(seen[1])) == 0 and sorted(np.concatenate(seen)) == list(range(len(x)))


def test_choose_takes_the_largest_cut_within_the_budget():
    points = [tradeoff.Point(n, loss, 0) for n, loss in [(1, 0.0), (2, 0.04), (3, 0.08), (4, 0.03), (5, 0.2)]]
    assert tradeoff.choose(points, 0.05).zip_layers == 4
    assert tradeoff.choose(points, 0.5).zip_layers == 5
    assert tradeoff.choose([tradeoff.Point(2, 0.3, 0), tradeoff.Point(1, 0.2, 0)], 0.1).zip_layers == 1


@pytest.mark.parametrize("command", [["merge", "-o", "OUT"], ["merge", "-o", "OUT", "--stats", "CALIB"],
                                     ["calibrate", "--calib", "CALIB", "-o", "OUT"]])
def test_auto_without_calibration_samples_is_one_line(zoo_files, tmp_path, capsys, command):
    path, x = zoo_files.get("mlp", "legacy_folded")
    np.save(tmp_path / "calib.npy", x)
    args = [str(tmp_path / "calib.npy") if a == "CALIB" else str(tmp_path / "out") if a == "OUT" else a
            for a in command]
    assert main([args[0], path, path, *args[1:], "--zip-layers", "auto"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("onnxmerge: error: ") and error.count("\n") == 1 and "auto" in error
    assert not (tmp_path / "out").exists()
