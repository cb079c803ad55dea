"""Moments accumulated in the graph, where onnxruntime runs (``calib.device``: the GPU path of
``--provider cuda``), run here on the CPU through the same IOBinding, against the host's."""

from __future__ import annotations

import numpy as np
import pytest

from onnxmerge.calib.capture import collect_statistics
from onnxmerge.errors import CalibrationError
from tests.helpers import permuted_copies, statistics_plan


def _statistics(zoo_files, tmp_path, name: str, on_device: bool, batch_size: int = 16, scale: float = 1.0):
    path, x, calib, (copy,) = permuted_copies(zoo_files, tmp_path, name, "legacy_folded")
    np.save(calib, (x * scale).astype(x.dtype))
    models, per_model, widths, batches = statistics_plan([path, copy], calib, batch_size)
    return collect_statistics(models, per_model, batches(), widths, "cpu", on_device=on_device)


@pytest.mark.parametrize("name", ["resnet_basic", "transformer"])  # [N, C, L] units, and rows
def test_moments_accumulated_in_the_graph_equal_the_hosts(zoo_files, tmp_path, name):
    (device, ran), (host, _) = (_statistics(zoo_files, tmp_path, name, flag, batch_size=1) for flag in (True, False))
    assert ran == "cpu" and len(device) == len(host) > 0
    for on_device, on_host in zip(device, host):
        assert on_device.count == on_host.count and on_device.widths == on_host.widths
        np.testing.assert_array_equal(on_device.sum, on_host.sum)
        # the same operations in the same order; the blocks below the diagonal are transposes
        # of those above, where the host adds the shift's two cross terms the other way round
        np.testing.assert_allclose(on_device.outer, on_host.outer, rtol=1e-13, atol=0)
        upper = np.triu(np.ones(on_host.outer.shape, bool), 1) & (np.arange(on_host.width)[:, None] < on_host.widths[0])
        np.testing.assert_array_equal(on_device.outer[upper], on_host.outer[upper])


def test_non_finite_features_accumulated_in_the_graph_are_refused(zoo_files, tmp_path):
    with pytest.raises(CalibrationError, match="NaN or Inf"):
        _statistics(zoo_files, tmp_path, "mlp", True, scale=1e37)  # finite data whose features overflow float32
