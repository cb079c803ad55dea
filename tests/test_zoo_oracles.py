"""Function-preservation oracles over the whole zoo (every model x exporter, and sklearn).

- permute: outputs unchanged, weights changed, no barrier, free spaces found.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxmerge import api
from onnxmerge.io import load_model
from tests import zoo
from tests.test_rules import run_all

ALL = zoo.PAIRS + [("sklearn_mlp", "sklearn")]
IDS = [f"{m}-{e}" for m, e in ALL]
SLOW_EXPORTERS = ("dynamo",)  # the slowest exports: their rows of the zoo matrices run in the slow set


def zoo_cases(pairs: list[tuple[str, str]] = ALL) -> list:
    """(model, exporter) parameters; those of SLOW_EXPORTERS, and the BN-kept exports of models
    without BatchNorm (the same graph as the folded export), are marked slow."""
    def slow(model: str, exporter: str) -> bool:
        return exporter in SLOW_EXPORTERS or (exporter == "legacy_bn" and model not in zoo.HAS_BATCHNORM)

    return [pytest.param(m, e, id=f"{m}-{e}", marks=[pytest.mark.slow] if slow(m, e) else []) for m, e in pairs]


CASES = zoo_cases()


def outputs_close(expected: list[np.ndarray], got: list[np.ndarray], tolerance: float = 1e-4) -> None:
    """Equal outputs, floats up to ``tolerance`` times their largest magnitude (at least 1)."""
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        if a.dtype.kind == "f":
            np.testing.assert_allclose(b, a, atol=tolerance * max(1.0, float(np.abs(a).max())), rtol=0)
        else:
            np.testing.assert_array_equal(b, a)


@pytest.mark.parametrize("name,exporter", CASES)
def test_permute_preserves_outputs(zoo_files, name, exporter):
    path, x = zoo_files.get(name, exporter)
    model = load_model(path)
    canonical, graph = api.analyse(model)
    assert graph.barriers == [], graph.barriers
    assert graph.free_spaces
    permuted = api.permute(model, seed=11)
    onnx.checker.check_model(permuted, full_check=True)
    outputs_close(run_all(model, x), run_all(permuted, x))
    before = {i.name: numpy_helper.to_array(i) for i in canonical.graph.initializer}
    changed = [n for n in before if not np.array_equal(before[n], numpy_helper.to_array(
        next(i for i in permuted.graph.initializer if i.name == n)))]
    assert changed, "permute should move weights"
    print(f"{name}/{exporter}: {len(graph.free_spaces)} free of {len(graph.spaces)} spaces")
