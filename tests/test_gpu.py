"""The CUDA provider: sessions really run on the GPU, and merges computed there agree with CPU ones.

These tests need onnxruntime-gpu and a usable GPU; elsewhere they are skipped (onnxruntime
silently falls back to CPU, which ``open_session(..., "cuda")`` refuses).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxmerge import api
from onnxmerge.calib.sessions import open_session
from onnxmerge.errors import CalibrationError
from onnxmerge.io import load_model
from tests.helpers import permuted_copies, run_all, outputs_close, statistics_plan


def _cuda_usable() -> bool:
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    probe = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    try:
        open_session(probe, "cuda")
    except CalibrationError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _cuda_usable(), reason="needs onnxruntime-gpu and a usable GPU")


def test_auto_runs_on_cuda(zoo_files):
    path, _ = zoo_files.get("resnet_basic", "legacy_bn")
    session, ran = open_session(load_model(path), "auto")
    assert ran == "cuda" and session.get_providers()[0] == "CUDAExecutionProvider"


@pytest.mark.parametrize("method", ["permute", "zip"])
def test_merge_with_permuted_self_on_cuda_gives_self(zoo_files, tmp_path, method):
    path, x, calib, (copy,) = permuted_copies(zoo_files, tmp_path, "resnet_basic", "legacy_bn")
    result = api.merge([path, copy], calibration=calib,
                       options=api.MergeOptions(method=method, repair="none", provider="cuda"))
    assert result.report["provider"] == "cuda"
    expected = run_all(load_model(path), x)
    outputs_close(expected + expected, run_all(result.model, x))


def test_statistics_on_cuda_equal_those_on_cpu(zoo_files, tmp_path):
    path, _, calib, (copy,) = permuted_copies(zoo_files, tmp_path, "resnet_basic", "legacy_bn")
    on = {provider: api.calibrate([path, copy], calib, provider=provider)
          for provider in ("cpu", "cuda")}
    assert on["cuda"][1]["provider"] == "cuda" and on["cpu"][1]["provider"] == "cpu"
    for key, cpu in on["cpu"][0].items():
        gpu = on["cuda"][0][key]
        assert gpu.count == cpu.count
        scale = np.abs(cpu.outer).max()
        np.testing.assert_allclose(gpu.outer, cpu.outer, rtol=0, atol=1e-3 * scale)


def test_bn_reset_on_cuda_matches_cpu(zoo_files, tmp_path):
    path, x, calib, (copy,) = permuted_copies(zoo_files, tmp_path, "resnet_basic", "legacy_bn")
    merged = {provider: api.merge([path, copy], calibration=calib, options=api.MergeOptions(provider=provider))
              for provider in ("cpu", "cuda")}
    assert "on cuda" in merged["cuda"].report["repair"]
    outputs = {provider: run_all(result.model, x) for provider, result in merged.items()}
    outputs_close(outputs["cpu"], outputs["cuda"])


def test_moments_accumulated_on_the_gpu_equal_those_added_on_the_host(zoo_files, tmp_path):
    """With CUDA running, the moments stay on the device (``calib.device``) by default."""
    from onnxmerge.calib.capture import collect_statistics
    path, _, calib, (copy,) = permuted_copies(zoo_files, tmp_path, "resnet_basic", "legacy_folded")
    models, per_model, widths, batches = statistics_plan([path, copy], calib)
    runs = {flag: collect_statistics(models, per_model, batches(), widths, "cuda", on_device=flag)
            for flag in (None, False)}
    assert runs[None][1] == runs[False][1] == "cuda"
    for device, host in zip(runs[None][0], runs[False][0]):
        assert device.count == host.count
        np.testing.assert_allclose(device.outer, host.outer, rtol=0, atol=1e-6 * np.abs(host.outer).max())
