"""The framework converters (converters/) and the fixtures they wrote (tests/fixtures/converters/).

Only the project's own dev dependencies are needed: the committed fixtures of Keras, JAX and
Paddle are checked against the outputs those frameworks stored beside them, and the PyTorch
and scikit-learn converters themselves run here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import onnx
import pytest

from converters import designs, sklearn_export, torch_export
from converters.checks import MAX_OPSET, Tolerance, check_mergeable, compare, run_onnx
from converters.specs import ConverterError

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "converters"
FIXTURE_NAMES = (
    "torch_cnn_legacy", "torch_cnn_dynamo", "torch_mlp_legacy", "torch_mlp_dynamo",
    "keras_cnn", "keras_mlp", "jax_cnn", "jax_mlp", "paddle_cnn", "paddle_mlp", "sklearn_mlp",
)
NHWC_FIXTURES = {"keras_cnn"}  # the only fixture whose input is NHWC (Keras's own layout)
TOLERANCE = Tolerance(rtol=1e-4, atol=1e-5)


def _sample(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{name}.npz") as data:
        return {key: data[key] for key in data.files}


def _stored_outputs(sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key.removeprefix("out_"): value for key, value in sample.items()
            if key.startswith("out_")}


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def test_every_fixture_is_committed_and_small():
    onnx_files = {path.stem for path in FIXTURES.glob("*.onnx")}
    assert onnx_files == set(FIXTURE_NAMES)
    for name in FIXTURE_NAMES:
        for suffix in (".onnx", ".npz"):
            assert (FIXTURES / f"{name}{suffix}").stat().st_size < 200_000


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_is_valid_and_mergeable(name):
    model = onnx.load(FIXTURES / f"{name}.onnx")
    onnx.checker.check_model(model, full_check=True)
    check_mergeable(model, name)
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets.get("", opsets.get("ai.onnx")) <= MAX_OPSET
    assert [value.name for value in model.graph.input] == ["input"]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_onnxruntime_reproduces_the_framework(name):
    sample = _sample(name)
    stored = _stored_outputs(sample)
    got = run_onnx(FIXTURES / f"{name}.onnx", sample["x"])
    diffs = compare(got, stored, TOLERANCE, name)
    assert set(diffs) == set(stored) and str(sample["output"]) in stored
    np.testing.assert_array_equal(sample["y"], stored[str(sample["output"])])


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_batch_axis_is_dynamic(name):
    sample = _sample(name)
    output = str(sample["output"])
    for rows in (slice(0, 1), slice(0, 3)):
        got = run_onnx(FIXTURES / f"{name}.onnx", sample["x"][rows])[output]
        np.testing.assert_allclose(got, sample["y"][rows], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_every_framework_built_the_same_design(name):
    """The designs share weights, so all fixtures of one design compute one function."""
    design = "cnn" if "_cnn" in name else "mlp"
    sample = _sample(name)
    x = designs.fixture_input(design)
    expected_x = designs.to_nhwc(x) if name in NHWC_FIXTURES else x
    np.testing.assert_array_equal(sample["x"], expected_x)
    reference = _sample(f"torch_{design}_legacy")["y"]
    if name.startswith("sklearn"):
        reference = _softmax(reference.astype(np.float64))  # MLPClassifier ends in softmax
    np.testing.assert_allclose(sample["y"], reference, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("design", designs.DESIGNS)
def test_torch_converter_matches_torch_and_the_fixture(tmp_path, design, exporter):
    factory = {"cnn": torch_export.example_cnn, "mlp": torch_export.example_mlp}[design]
    model, example = factory()
    x = designs.fixture_input(design)
    path = tmp_path / "model.onnx"
    diffs = torch_export.export_torch(model, example, path, exporter=exporter, check_input=x)
    assert diffs["output"] < 1e-5
    stored = _sample(f"torch_{design}_{exporter}")
    np.testing.assert_allclose(run_onnx(path, x)["output"], stored["y"], rtol=1e-5, atol=1e-6)


def test_torch_legacy_export_keeps_batchnorm_and_parameter_names(tmp_path):
    model, example = torch_export.example_cnn()
    path = tmp_path / "cnn.onnx"
    torch_export.export_torch(model, example, path, exporter="legacy")
    exported = onnx.load(path)
    assert [n.op_type for n in exported.graph.node].count("BatchNormalization") == 2
    names = {t.name for t in exported.graph.initializer}
    assert {"conv1.weight", "bn1.running_mean", "bn2.running_var", "fc.bias"} <= names


def test_torch_converter_refuses_a_wrong_exporter(tmp_path):
    model, example = torch_export.example_mlp()
    with pytest.raises(ConverterError, match="unknown exporter 'jit'"):
        torch_export.export_torch(model, example, tmp_path / "m.onnx", exporter="jit")
    assert not (tmp_path / "m.onnx").exists()


def test_sklearn_converter_keeps_label_and_tensor_probabilities(tmp_path):
    estimator = sklearn_export.example_mlp()
    x = designs.fixture_input("mlp", batch=8)
    path = tmp_path / "mlp.onnx"
    diffs = sklearn_export.export_sklearn(estimator, path, check_input=x)
    assert diffs["label"] == 0 and diffs["probabilities"] < 1e-5
    exported = onnx.load(path)
    assert "ZipMap" not in {n.op_type for n in exported.graph.node}
    got = run_onnx(path, x)
    np.testing.assert_array_equal(got["label"], estimator.predict(x))
    assert got["probabilities"].dtype == np.float32 and got["probabilities"].shape == (8, 10)


def _run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_sklearn_command_converts_a_joblib_file(tmp_path):
    saved = tmp_path / "mlp.joblib"
    joblib.dump(sklearn_export.example_mlp(), saved)
    output, sample = tmp_path / "mlp.onnx", tmp_path / "sample.npz"
    result = _run_script("converters/sklearn_export.py", str(saved), "-o", str(output),
                         "--save-sample", str(sample))
    assert result.returncode == 0, result.stderr
    assert "max abs diff probabilities" in result.stdout
    with np.load(sample) as data:
        assert str(data["output"]) == "probabilities" and data["y"].shape == (3, 10)
        compare(run_onnx(output, data["x"]), {"probabilities": data["y"]}, TOLERANCE, "cli")


def test_torch_command_converts_a_factory_spec(tmp_path):
    output = tmp_path / "mlp.onnx"
    result = _run_script("converters/torch_export.py", "converters/torch_export.py:example_mlp",
                         "-o", str(output))
    assert result.returncode == 0, result.stderr
    assert "max abs diff output" in result.stdout and output.is_file()


@pytest.mark.parametrize("model, message", [
    ("no_such_file.joblib", "has no ':'"),
    ("converters/designs.py:nothing", "has no attribute 'nothing'"),
    ("not_a_module_xyz:build", "cannot import 'not_a_module_xyz'"),
], ids=["missing-file", "missing-attribute", "missing-module"])
def test_command_errors_are_one_line(tmp_path, model, message):
    result = _run_script("converters/sklearn_export.py", model, "-o", str(tmp_path / "m.onnx"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("converter: error:") and message in lines[0]


def test_mergeability_check_names_the_problem():
    model = onnx.load(FIXTURES / "torch_mlp_legacy.onnx")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 3
    with pytest.raises(ConverterError, match="fixed batch size 3"):
        check_mergeable(model, "m.onnx")
    model = onnx.load(FIXTURES / "torch_mlp_legacy.onnx")
    model.opset_import[0].version = MAX_OPSET + 1
    with pytest.raises(ConverterError, match=f"pass --opset {MAX_OPSET}"):
        check_mergeable(model, "m.onnx")


def test_comparison_refuses_a_changed_model():
    sample = _sample("torch_mlp_legacy")
    wrong = {"output": sample["y"] + 1e-2}
    with pytest.raises(ConverterError, match="differs by"):
        compare({"output": sample["y"]}, wrong, TOLERANCE, "m.onnx")


def test_onnxmerge_imports_no_framework_and_no_converter():
    code = ("import sys, onnxmerge, onnxmerge.api, onnxmerge.cli; "
            "print([m for m in ('converters', 'tensorflow', 'keras', 'jax', 'flax', 'paddle') "
            "if m in sys.modules])")
    result = _run_script("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
