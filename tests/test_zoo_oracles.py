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
from tests.helpers import run_all, CASES, outputs_close


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
