"""Same-base methods (task arithmetic, TIES, DARE, SLERP, linear, RegMean): oracles and a direct
numpy computation on a small Conv + Gemm model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxmerge
from onnxmerge.match.regmean import Layer, merged_weight, patches

DIGITS = Path(__file__).resolve().parent.parent / "samples" / "digits"
SAME_BASE = ("task-arithmetic", "ties", "dare", "slerp", "linear", "regmean")
RNG = np.random.default_rng(0)
X = RNG.standard_normal((64, 2, 5, 5)).astype(np.float32)


def small(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Conv(2->4, 3x3, pad 1) -> Relu -> Flatten -> Gemm(100->3, transB) -> output."""
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "gw", "gb"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


BASE = {"cw": RNG.standard_normal((4, 2, 3, 3)), "cb": RNG.standard_normal(4) * 0.1,
        "gw": RNG.standard_normal((3, 100)) * 0.1, "gb": RNG.standard_normal(3) * 0.1}


def tuned(seed: int, size: float = 0.1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: v + size * rng.standard_normal(v.shape) * np.abs(v).mean() for k, v in BASE.items()}


def run(model: onnx.ModelProto) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": X})


def merged_outputs(models, method, base=None, calibration=None, **settings) -> list[np.ndarray]:
    result = onnxmerge.merge([small(m) for m in models], calibration, base=None if base is None else small(base),
                             method=method, heads="shared", repair="none", **settings)
    return run(result.model)


def close(actual: list[np.ndarray], expected: dict[str, np.ndarray]) -> None:
    np.testing.assert_allclose(actual[0], run(small(expected))[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", SAME_BASE)
def test_a_model_merged_with_itself_gives_itself(method):
    models = [BASE, BASE]
    base = BASE if method in ("task-arithmetic", "ties", "dare") else None
    close(merged_outputs(models, method, base, X if method == "regmean" else None), BASE)


def test_task_arithmetic_scale_0_gives_the_base_and_one_fine_tune_at_scale_1_gives_it():
    close(merged_outputs([tuned(1), tuned(2)], "task-arithmetic", BASE, scale=0.0), BASE)
    close(merged_outputs([tuned(1)], "task-arithmetic", BASE, scale=1.0), tuned(1))


def test_ties_with_density_1_and_one_model_is_task_arithmetic():
    close(merged_outputs([tuned(1)], "ties", BASE, density=1.0, scale=0.7),
          {k: BASE[k] + 0.7 * (tuned(1)[k] - BASE[k]) for k in BASE})


def test_slerp_ends_are_the_models():
    close(merged_outputs([tuned(1), tuned(2)], "slerp", t=0.0), tuned(1))
    close(merged_outputs([tuned(1), tuned(2)], "slerp", t=1.0), tuned(2))


def test_regmean_of_one_model_returns_it_and_identical_grams_average():
    close(merged_outputs([tuned(1)], "regmean", calibration=X), tuned(1))
    layer = Layer("w", "x")
    gram = RNG.standard_normal((6, 6))
    gram = gram @ gram.T
    weights = [RNG.standard_normal((6, 3)) for _ in range(3)]
    np.testing.assert_allclose(merged_weight(weights, [gram] * 3, layer, 0.7), sum(weights) / 3, atol=1e-10)


def _trim(v: np.ndarray, density: float) -> np.ndarray:
    keep = int(np.ceil(density * v.size))
    order = np.argsort(-np.abs(v).ravel(), kind="stable")
    out = np.zeros(v.size)
    out[order[:keep]] = v.ravel()[order[:keep]]
    return out.reshape(v.shape)


def _elect(vectors: list[np.ndarray]) -> np.ndarray:
    total = sum(vectors)
    merged = np.zeros_like(total)
    for index in np.ndindex(total.shape):
        agreeing = [v[index] for v in vectors if v[index] != 0 and np.sign(v[index]) == np.sign(total[index])]
        merged[index] = np.mean(agreeing) if agreeing else 0.0
    return merged


def _slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    omega = np.arccos(np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b))
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def _regmean(models: list[dict], alpha: float) -> dict[str, np.ndarray]:
    """RegMean computed directly: conv inputs are the patches of X, the Gemm's the flattened
    Relu of each model's own conv output."""
    conv_rows = patches(X.astype(np.float64), ((3, 3), (1, 1, 1, 1), (1, 1), (1, 1)))
    expected = {k: sum(m[k] for m in models) / len(models) for k in ("cb", "gb")}
    g = conv_rows.T @ conv_rows
    g = alpha * g + (1 - alpha) * np.diag(np.diag(g))
    conv = [m["cw"].reshape(4, -1).T for m in models]
    expected["cw"] = np.linalg.solve(len(models) * g, sum(g @ w for w in conv)).T.reshape(4, 2, 3, 3)
    grams = []
    for m in models:  # the Gemm reads the flattened Relu of the model's own conv
        c = (conv_rows @ m["cw"].reshape(4, -1).T).reshape(64, 5, 5, 4) + m["cb"]
        rows = np.maximum(c, 0).transpose(0, 3, 1, 2).reshape(64, -1)
        gram = rows.T @ rows
        grams.append(alpha * gram + (1 - alpha) * np.diag(np.diag(gram)))
    expected["gw"] = np.linalg.lstsq(sum(grams), sum(g @ m["gw"].T for g, m in zip(grams, models)), rcond=None)[0].T
    return expected


CASES = {
    "task-arithmetic": (dict(scale=0.6), lambda a, b: {k: BASE[k] + 0.6 * (a[k] - BASE[k] + b[k] - BASE[k]) for k in BASE}),
    "ties": (dict(scale=0.8, density=0.3), lambda a, b: {
        k: BASE[k] + 0.8 * _elect([_trim(a[k] - BASE[k], 0.3), _trim(b[k] - BASE[k], 0.3)]) for k in BASE}),
    "slerp": (dict(t=0.3), lambda a, b: {k: _slerp(a[k], b[k], 0.3) for k in BASE}),
    "linear": (dict(weights=[1.0, 3.0]), lambda a, b: {k: (a[k] + 3 * b[k]) / 4 for k in BASE}),
    "regmean": (dict(alpha=0.8), lambda a, b: _regmean([a, b], 0.8)),
}


@pytest.mark.parametrize("method", CASES)
def test_each_method_matches_a_direct_numpy_computation(method):
    settings, expected = CASES[method]
    a, b = tuned(1, 0.3), tuned(2, 0.3)
    base = BASE if method in ("task-arithmetic", "ties") else None
    close(merged_outputs([a, b], method, base, X if method == "regmean" else None, **settings), expected(a, b))


def test_dare_drops_at_the_rate_and_rescales():
    """With one fine-tune, DARE's task vector keeps about 1 - drop_rate of its entries, each
    rescaled by 1 / (1 - drop_rate)."""
    a = tuned(1, 0.3)
    result = onnxmerge.merge([small(a)], base=small(BASE), method="dare", drop_rate=0.5, heads="shared", repair="none")
    merged = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    delta, vector = merged["gw"] - BASE["gw"], a["gw"] - BASE["gw"]
    kept = np.abs(delta) > 1e-6
    assert 0.4 < kept.mean() < 0.6
    np.testing.assert_allclose(delta[kept], 2 * vector[kept], rtol=1e-4)


def test_other_architectures_and_other_bases_are_refused():
    with pytest.raises(onnxmerge.UnsupportedGraphError, match="same-base methods merge fine-tunes"):
        onnxmerge.merge([str(DIGITS / "resnet_a.onnx"), str(DIGITS / "resnet_b_wide.onnx")], method="linear")
    with pytest.raises(onnxmerge.UnsupportedGraphError, match="no fine-tune of the base"):
        onnxmerge.merge([str(DIGITS / "resnet_b.onnx")], base=str(DIGITS / "resnet_a.onnx"), method="ties")


@pytest.mark.parametrize("settings, words", [
    (dict(method="ties"), "pass --base"), (dict(method="regmean"), "pass --calib"),
    (dict(method="ties", density=0.0, base=small(BASE)), "--density 0.0"), (dict(method="slerp", t=2.0), "--t 2.0"),
    (dict(method="linear", weights=[1.0]), "one non-negative weight per model"),
])
def test_bad_same_base_settings_give_one_line(settings, words):
    with pytest.raises(onnxmerge.OnnxMergeError, match=words):
        onnxmerge.merge([small(tuned(1)), small(tuned(2))], **settings)


def test_the_cli_parameters_are_the_method_dataclasses_fields():
    """choices.PARAMETERS (what the CLI, the API keywords and recipes offer) names exactly the
    parameter fields of the registered methods, with their defaults."""
    from dataclasses import fields

    from onnxmerge import choices, options
    from onnxmerge.match import METHODS

    declared = {}
    for method in METHODS:
        for item in fields(method.params):
            if item.name not in ("seed", "width"):  # options of their own
                declared.setdefault(item.name, (item.default, []))[1].append(method.name)
    assert {name: (default, tuple(methods)) for name, (default, methods) in declared.items()} == {
        name: (spec[0], spec[2]) for name, spec in choices.PARAMETERS.items()}
    defaults = {f.name: f.default for f in fields(options.MergeOptions)}
    assert all(defaults[name] == spec[0] for name, spec in choices.PARAMETERS.items())


@pytest.mark.parametrize("data", [False, True])
def test_align_first_undoes_a_permutation_before_combining(tmp_path, data):
    """A fine-tune and its permuted copy are refused as fine-tunes of one base, and with
    --align-first (weight matching, or activation matching with data) merge back into it."""
    a = str(DIGITS / "resnet_a.onnx")
    permuted = onnxmerge.permute(a, seed=5)
    calib = np.load(DIGITS / "calib.npz")["input"][:64] if data else None
    with pytest.raises(onnxmerge.UnsupportedGraphError, match="--align-first"):
        onnxmerge.merge([a, permuted], calib, method="linear")
    merged = onnxmerge.merge([a, permuted], calib, method="linear", align_first=True, heads="shared").model
    x = np.load(DIGITS / "test.npz")["input"][:50]
    session = ort.InferenceSession(onnx.load(a).SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": x})[0]
    actual = ort.InferenceSession(merged.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


def test_a_scale_that_overflows_the_weights_is_refused_in_one_line():
    with pytest.raises(onnxmerge.RecipeError, match="overflows float32 .*use a smaller --scale") as caught:
        onnxmerge.merge([small(tuned(1))], base=small(BASE), method="task-arithmetic", scale=1e300)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("settings, words", [
    (dict(method="slerp", base="BASE"), "--method slerp does not read it"),
    (dict(method="zip", align_first=True), "--align-first aligns models before a same-base method"),
])
def test_options_a_method_would_ignore_are_refused(settings, words):
    if settings.get("base") == "BASE":
        settings = {**settings, "base": small(BASE)}
    with pytest.raises(onnxmerge.RecipeError, match=words):
        onnxmerge.merge([small(tuned(1)), small(tuned(2))], X, **settings)


def test_the_report_says_merged_not_zipped_for_same_base_methods():
    result = onnxmerge.merge([small(tuned(1)), small(tuned(2))], method="linear")
    assert result.report["layers"].endswith("layers merged")


@pytest.mark.parametrize("method", ["task-arithmetic", "linear"])
def test_an_elementwise_method_given_a_row_at_a_time_gives_the_same_model(monkeypatch, method):
    """Elementwise combinations run a band of rows at a time (memory of a band, not a
    tensor); the merged weights are the same bits as from whole tensors."""
    from onnxmerge import weights
    a, b = tuned(1, 0.3), tuned(2, 0.3)
    base = small(BASE) if method == "task-arithmetic" else None

    def merged() -> dict[str, np.ndarray]:
        result = onnxmerge.merge([small(a), small(b)], base=base, method=method, heads="shared", repair="none")
        return {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}

    whole = merged()
    monkeypatch.setattr(weights, "BAND_BYTES", 1)  # one row per band
    bands = []
    real = weights.row_bands
    monkeypatch.setattr(weights, "row_bands", lambda shape: bands.append(len(real(shape))) or real(shape))
    banded = merged()
    assert max(bands) > 1  # the weights really went in several bands
    assert whole.keys() == banded.keys()
    for name, value in whole.items():
        np.testing.assert_array_equal(banded[name], value)
