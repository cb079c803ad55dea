"""Session fixtures: each zoo model is exported once per exporter and shared by the tests."""

from __future__ import annotations

import numpy as np
import pytest

from tests import zoo


class ZooFiles:
    """Exports zoo models on first use; returns (path, calibration inputs)."""

    def __init__(self, folder):
        self.folder = folder
        self._cache: dict[tuple[str, str], tuple[str, np.ndarray]] = {}

    def get(self, name: str, exporter: str) -> tuple[str, np.ndarray]:
        key = (name, exporter)
        if key not in self._cache:
            path = self.folder / f"{name}_{exporter}.onnx"
            if exporter == "sklearn":
                zoo.sklearn_mlp(path)
                inputs = zoo._digits()[0][:256]
            else:
                zoo.export(name, exporter, path)
                inputs = zoo.sample_input(name, batch=128, seed=7)
            self._cache[key] = (str(path), inputs)
        return self._cache[key]


@pytest.fixture(scope="session")
def zoo_files(tmp_path_factory) -> ZooFiles:
    return ZooFiles(tmp_path_factory.mktemp("zoo"))
