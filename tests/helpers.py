"""Helpers the test modules share: small ONNX models built in code, onnxruntime runs, output
comparisons and the zoo's parametrisation. Test modules import from here (or conftest
fixtures), never from each other."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.helper import make_node as N

from onnxmerge import api
from onnxmerge.calib.stats import SpaceStats
from onnxmerge.io import load_model, save_model
from tests import zoo

RNG = np.random.default_rng(0)
C = 16


def const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def weights(shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32) * 0.5


def model(nodes, inits, *, in_shape=("N", 8, 4, 4), out_shape=None, opset=18, head="pool") -> onnx.ModelProto:
    """x -> Conv(8->16) -> y; ``nodes`` map y to z; z -> head -> output."""
    body = [helper.make_node("Conv", ["x", "w1", "b1"], ["y"], kernel_shape=[1, 1], name="conv1")] + nodes
    inits = [const("w1", weights((C, in_shape[1], 1, 1))), const("b1", weights(C))] + inits
    if head == "pool":  # z [N, C', H, W] -> Conv 1x1 -> GlobalAveragePool -> Flatten
        width = (out_shape or (None, C))[1]
        body += [helper.make_node("Conv", ["z", "w2"], ["c2"], kernel_shape=[1, 1], name="conv2"),
                 helper.make_node("GlobalAveragePool", ["c2"], ["p"]),
                 helper.make_node("Flatten", ["p"], ["out"])]
        inits.append(const("w2", weights((5, width, 1, 1))))
    else:  # z [N, K] -> Gemm
        body += [helper.make_node("Gemm", ["z", "w2"], ["out"], transB=1, name="fc")]
        inits.append(const("w2", weights((5, out_shape[1]))))
    graph = helper.make_graph(body, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 5])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def with_opset(m: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """A copy of ``m`` labelled with another default-domain opset (for models whose ops mean the
    same at both versions; the callers say why theirs do)."""
    relabelled = onnx.ModelProto()
    relabelled.CopyFrom(m)
    for opset in relabelled.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = version
    return relabelled


def run_all(m: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    """Every output of a single-input model in onnxruntime (CPU)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


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


def with_domain_op(domain: str, op: str) -> onnx.ModelProto:
    """A conv net around one op no shape inference knows; its first weight (2 KiB) is large
    enough for onnxruntime's symbolic shape inference to save it in a data file."""
    m = model([N(op, ["y"], ["z"], domain=domain)], [], in_shape=("N", 32, 4, 4))
    m.opset_import.append(helper.make_opsetid(domain, 1))
    return m


def permuted_copies(zoo_files, tmp_path, name, exporter, seeds=(1,)):
    path, x = zoo_files.get(name, exporter)
    calib = tmp_path / "calib.npy"
    np.save(calib, x)
    copies = []
    for seed in seeds:
        copy = tmp_path / f"permuted{seed}.onnx"
        save_model(api.permute(load_model(path), seed=seed), copy)
        copies.append(str(copy))
    return path, x, str(calib), copies


def statistics_plan(paths: list[str], calib: str, batch_size: int = 16):
    """What ``collect_statistics`` takes for a full merge of ``paths`` on ``calib``: the
    canonical models, each model's capture units, the units' widths, and a function giving the
    batches (a fresh iterator at each call)."""
    from onnxmerge.rewrite.heads import split_trunk
    from onnxmerge.sources import read_data, read_models
    from onnxmerge.stages.prepare import lockstep_batches, prepare
    from onnxmerge.stages.statistics import plan_units
    members, _, _, data, _, _ = prepare(read_models(paths), read_data(calib), api.MergeOptions())
    split = split_trunk(members[0].model, members[0].graph, heads="separate", zip_layers=None)
    _, per_model, widths = plan_units(members, split)
    return [m.model for m in members], per_model, widths, lambda: lockstep_batches(data, len(paths), batch_size)


def near_constant_copies(seed: int = 9) -> tuple[SpaceStats, np.ndarray]:
    """Statistics of 8 nearly constant features (variance 1e-12 of E[x^2], 16 samples, as a
    pooled squeeze-excite tensor of a random network) and a permuted copy whose channel 0 varies
    at half the amplitude: live in model 0 (variance 2e-10 of E[x^2]), dead in model 1."""
    rng = np.random.default_rng(seed)
    level = rng.uniform(0.5, 2.0, 8) * rng.choice([-1.0, 1.0], 8)
    ratio = np.full(8, 1e-12)
    ratio[0] = 2e-10
    wiggle = rng.standard_normal((16, 8))
    wiggle = (wiggle - wiggle.mean(axis=0)) / wiggle.std(axis=0)
    first = level + wiggle * np.abs(level) * np.sqrt(ratio)
    copy = first.copy()
    copy[:, 0] = level[0] + 0.5 * (first[:, 0] - level[0])
    perm = rng.permutation(8)
    stats = SpaceStats.empty((8, 8))
    stats.update([first, copy[:, perm]])
    return stats, perm


def as_format_1(path) -> None:
    """Rewrite a statistics file as onnxmerge wrote it before format 2: the same statistics,
    no source moments."""
    with np.load(path) as arrays:
        kept = {key: arrays[key] for key in arrays.files if key != "__moments__" and not key.startswith("m")}
    kept["__format__"] = np.array("onnxmerge-stats-1")
    with open(path, "wb") as handle:
        np.savez(handle, **kept)


def similarity_formula(stats) -> np.ndarray:
    """``SpaceStats.similarity`` by its documented formulas on whole matrices (covariance,
    correlation, agreement), in the order the tiles apply them: the same numbers."""
    from onnxmerge.calib.stats import AFFINE_BAND, EQUAL_RTOL
    mu = stats.sum / stats.count
    second = stats.outer / stats.count
    cov = second - np.outer(mu, mu)
    cov = (cov + cov.T) / 2
    variance = np.diagonal(cov).copy()
    live = stats.live()
    std = np.where(live, np.sqrt(np.where(live, variance, 1.0)), 1.0)
    corr = cov / np.outer(std, std)
    corr[~live, :] = 0.0
    corr[:, ~live] = 0.0
    corr = np.clip(corr, -1.0, 1.0)
    np.fill_diagonal(corr, live.astype(np.float64))
    diagonal = np.diagonal(second)
    power = diagonal[:, None] + diagonal[None, :]
    agreement = np.ones_like(second)
    np.divide(second * 2.0, power, out=agreement, where=power > 0)
    agreement = np.clip(agreement, 0.0, 1.0)
    affine = (corr >= 1.0 - AFFINE_BAND) | np.outer(~live, ~live) | (agreement >= 1.0 - EQUAL_RTOL)
    return np.where(affine, 1.0 - AFFINE_BAND * (1.0 - agreement), corr)
