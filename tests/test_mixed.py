"""Models of one design exported by different frameworks merge with each other.

The converter fixtures (tests/fixtures/converters/<framework>_<design>.onnx, made by
converters/ from one set of weights: docs/converters.md) compute the same function in every
framework, each written in its exporter's idioms. That gives real oracles:

- canonicalisation keeps each fixture's function: its outputs equal the framework's own
  (``y`` in the fixture's .npz), and every fixture of a design canonicalises to the same
  ops as the PyTorch export (BN folded, channels-last input made channels-first);
- ``inspect`` finds the PyTorch export's spaces in every fixture; ``permute`` keeps outputs;
- merging a fixture with a permuted copy of itself gives the fixture back (each head);
- across frameworks: merging the PyTorch export with a permuted copy of another framework's
  export must give back the shared function in both heads. A wrong canonical form (a BN or
  bias lost, a transpose pushed wrongly, weights matched by the wrong axis) breaks the match.
  scikit-learn's MLP ends in a Softmax, so its partner is the PyTorch export with one added
  (its heads then compute the same probabilities).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxmerge import api
from onnxmerge.cli import main
from onnxmerge.graph.canonical import canonicalize
from onnxmerge.graph.interface import channels_first_input
from onnxmerge.graph.postprocess import split_postprocessing
from onnxmerge.io import load_model, save_model
from tests.helpers import run_all

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "converters"
NAMES = sorted(p.stem for p in FIXTURES.glob("*.onnx"))
REFERENCE = {"cnn": "torch_cnn_legacy", "mlp": "torch_mlp_legacy"}
CHANNELS_LAST = {"keras_cnn": "NHWC"}  # Keras keeps its NHWC input
OTHERS = [name for name in NAMES if name not in REFERENCE.values() and name.split("_")[1] in REFERENCE]

pytestmark = pytest.mark.skipif(not NAMES, reason="no converter fixtures in tests/fixtures/converters")


def fixture(name: str) -> tuple[str, dict[str, np.ndarray]]:
    with np.load(FIXTURES / f"{name}.npz") as data:
        return str(FIXTURES / f"{name}.onnx"), {key: data[key] for key in data.files}


def reference_of(name: str) -> str:
    return REFERENCE[name.split("_")[1]]


def outputs(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    return dict(zip([o.name for o in model.graph.output], run_all(model, x)))


def close(got: np.ndarray, expected: np.ndarray) -> None:
    if expected.dtype.kind == "f":
        np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, float(np.abs(expected).max())), rtol=0)
    else:
        np.testing.assert_array_equal(got, expected)


def calibration(tmp_path: Path, x: np.ndarray) -> str:
    """64 random samples shaped like ``x`` (three would leave most correlations undetermined)."""
    path = tmp_path / "calib.npy"
    np.save(path, np.random.default_rng(0).standard_normal((64, *x.shape[1:])).astype(np.float32))
    return str(path)


def permuted(path: str, tmp_path: Path) -> str:
    copy = tmp_path / f"permuted_{Path(path).name}"
    save_model(api.permute(load_model(path), seed=4), copy)
    return str(copy)


def core_ops(name: str) -> list[str]:
    """Ops of the canonical network (BN folded, post-processing apart, input channels-first)."""
    path, _ = fixture(name)
    model = load_model(path)
    if name in CHANNELS_LAST:
        model = channels_first_input(model, CHANNELS_LAST[name], path)
    core, _ = split_postprocessing(canonicalize(model, bn="fold"))
    return [node.op_type for node in core.graph.node]


@pytest.mark.parametrize("name", NAMES)
def test_canonical_form_computes_the_framework_outputs(name):
    path, data = fixture(name)
    got = outputs(canonicalize(load_model(path)), data["x"])
    for key in (k for k in data if k.startswith("out_")):
        close(got[key[4:]], data[key])


@pytest.mark.parametrize("name", OTHERS)
def test_every_framework_canonicalises_to_the_torch_graph(name):
    assert core_ops(name) == core_ops(reference_of(name))  # scikit-learn's Softmax is post-processing


@pytest.mark.parametrize("name", NAMES)
def test_inspect_finds_the_torch_spaces(name):
    path, _ = fixture(name)
    report, reference = api.inspect(path), api.inspect(fixture(reference_of(name))[0])
    assert report["barriers"] == []
    assert [s["width"] for s in report["spaces"]] == [s["width"] for s in reference["spaces"]]
    assert report["summary"]["free"] == reference["summary"]["free"] > 0


@pytest.mark.parametrize("name", NAMES)
def test_permute_preserves_outputs(name, tmp_path):
    path, data = fixture(name)
    expected = outputs(load_model(path), data["x"])
    got = outputs(load_model(permuted(path, tmp_path)), data["x"])
    for key, value in expected.items():
        close(got[key], value)


@pytest.mark.parametrize("name", NAMES)
def test_merge_with_permuted_self_gives_self(name, tmp_path):
    """Each head of the merged model (labels included) is the fixture's own output."""
    path, data = fixture(name)
    result = api.merge([path, permuted(path, tmp_path)], calibration=calibration(tmp_path, data["x"]),
                       options=api.MergeOptions(method="zip", repair="none"))
    got = outputs(result.model, data["x"])
    assert list(got) == [f"{o.name}_m{i}" for i in range(2) for o in load_model(path).graph.output]
    for key in (k for k in data if k.startswith("out_")):
        for index in range(2):
            close(got[f"{key[4:]}_m{index}"], data[key])


def with_softmax(path: str, tmp_path: Path) -> str:
    """The model with a Softmax after its output (the scores of scikit-learn's classifier)."""
    model = load_model(path)
    logits = model.graph.output[0]
    model.graph.node.append(helper.make_node("Softmax", [logits.name], ["probabilities"], axis=1))
    out = onnx.ValueInfoProto()
    out.CopyFrom(logits)
    out.name = "probabilities"
    model.graph.output[0].CopyFrom(out)
    target = tmp_path / f"{Path(path).stem}_softmax.onnx"
    save_model(model, target)
    return str(target)


@pytest.mark.parametrize("name", OTHERS)
def test_cross_framework_merge_gives_back_the_shared_function(name, tmp_path):
    """merge(torch export, permuted copy of another framework's export of the same weights):
    both heads compute the fixtures' function, on channels-first input."""
    reference, ref_data = fixture(reference_of(name))
    path, data = fixture(name)
    if name.startswith("sklearn"):
        reference = with_softmax(reference, tmp_path)
    layouts = ((f"permuted_{Path(path).name}", CHANNELS_LAST[name]),) if name in CHANNELS_LAST else ()
    result = api.merge([reference, permuted(path, tmp_path)], calibration=calibration(tmp_path, ref_data["x"]),
                       options=api.MergeOptions(method="zip", repair="none", input_layout=layouts))
    got = outputs(result.model, ref_data["x"])
    heads = [name for name in got if got[name].dtype.kind == "f"]
    assert len(heads) == 2
    for head in heads:
        close(got[head], data["y"])
    if "out_label" in data:
        close(got["label_m1"], data["out_label"])


def test_channels_last_model_without_input_layout_is_a_clear_error(tmp_path, capsys):
    torch_cnn, keras_cnn = fixture("torch_cnn_legacy")[0], fixture("keras_cnn")[0]
    target = tmp_path / "merged.onnx"
    calib = calibration(tmp_path, fixture("torch_cnn_legacy")[1]["x"])
    assert main(["merge", torch_cnn, keras_cnn, "--calib", calib, "-o", str(target)]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("onnxmerge: error: ")
    assert keras_cnn in error and torch_cnn in error and "8, 8, 3]" in error and "3, 8, 8]" in error
    assert f"--input-layout {keras_cnn}=NHWC" in error
    assert not target.exists()
    assert main(["merge", torch_cnn, keras_cnn, "--calib", calib, "-o", str(target),
                 "--input-layout", "keras_cnn.onnx=NHWC"]) == 0
    assert target.exists()


def test_input_layout_must_name_a_model(tmp_path, capsys):
    torch_cnn, keras_cnn = fixture("torch_cnn_legacy")[0], fixture("keras_cnn")[0]
    target = tmp_path / "merged.onnx"
    assert main(["merge", torch_cnn, keras_cnn, "-o", str(target), "--input-layout", "other.onnx=NHWC"]) == 1
    assert "other.onnx is none of the models" in capsys.readouterr().err
    assert main(["merge", torch_cnn, keras_cnn, "-o", str(target), "--input-layout", "keras_cnn.onnx=NCW"]) == 1
    assert "does not describe input" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["merge", torch_cnn, keras_cnn, "-o", str(target), "--input-layout", "NHWC"])
    assert usage.value.code == 2
    assert not target.exists()


def test_mixed_sample_runs(tmp_path):
    """samples/mixed/run.py merges models of different frameworks and prints its table."""
    done = subprocess.run([sys.executable, "samples/mixed/run.py", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = {m.group(1).strip(): float(m.group(2)) for m in re.finditer(r"^\| (.+?) \|\s+([\d.]+)%", done.stdout, re.M)}
    merged = [name for name in rows if name.startswith("zip")]
    assert len(merged) == 4 and {"ensemble: MLPs", "ensemble: CNNs"} <= set(rows)
    for name in merged:  # one merged model is far better than either expert alone (about 50 %)
        assert rows[name] > 60.0, name
    assert len(list(tmp_path.glob("*.onnx"))) == 5  # four merged models, one channels-first copy


def test_zipmap_classifier_keeps_labels_and_maps_per_model(tmp_path):
    """skl2onnx with zipmap=True: no float output at all, labels and a sequence of maps. The
    merged model exposes each model's probabilities (the ZipMap's input) and computes each
    model's label and map from them; merged with a permuted copy, all equal the original's."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    from tests import zoo

    clf = zoo.sklearn_mlp_classifier()
    path = tmp_path / "zipmap.onnx"
    path.write_bytes(convert_sklearn(clf, initial_types=[("input", FloatTensorType([None, 64]))],
                                     options={id(clf): {"zipmap": True}}).SerializeToString())
    x = zoo._digits()[0][:64]
    calib = tmp_path / "calib.npy"
    np.save(calib, x)
    result = api.merge([str(path), permuted(str(path), tmp_path)], calibration=str(calib),
                       options=api.MergeOptions(method="zip", repair="none"))
    expected = outputs(load_model(str(path)), x)
    got = outputs(result.model, x)
    exposed = [name for name in got if name not in {f"{k}_m{i}" for k in expected for i in range(2)}]
    assert len(exposed) == 2 and list(got) == [exposed[0], *(f"{k}_m0" for k in expected),
                                               exposed[1], *(f"{k}_m1" for k in expected)]
    for index in range(2):
        close(got[exposed[index]], clf.predict_proba(x).astype(np.float32))
        close(got[f"output_label_m{index}"], expected["output_label"])
        close(maps_as_array(got[f"output_probability_m{index}"]), maps_as_array(expected["output_probability"]))


def maps_as_array(maps: list[dict]) -> np.ndarray:
    return np.array([[entry[key] for key in sorted(entry)] for entry in maps], dtype=np.float32)
