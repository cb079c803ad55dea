"""Files as users bring them: QDQ- and QOperator-quantized models, float16 files with their
Casts appended out of order, old IR-3 files, and ops that make shape inference write files."""

from __future__ import annotations

import logging
import os
import tempfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxmerge import api
from onnxmerge.cli import main
from onnxmerge.graph.canonical import canonicalize
from onnxmerge.io import load_model, save_model
from tests.helpers import run_all, outputs_close, with_domain_op

N = helper.make_node


def cnn(opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv, BN, Relu, MaxPool -> Conv, Relu -> global pool -> Flatten -> Gemm:
    ops that mean the same from opset 8 on."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    nodes = [N("Conv", ["x", "conv1_w_0", "conv1_b_0"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4, name="conv1"),
             N("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["n1"], name="bn1"),
             N("Relu", ["n1"], ["r1"]), N("MaxPool", ["r1"], ["m1"], kernel_shape=[2, 2], strides=[2, 2]),
             N("Conv", ["m1", "conv2_w_0", "conv2_b_0"], ["c2"], kernel_shape=[3, 3], pads=[1] * 4, name="conv2"),
             N("Relu", ["c2"], ["r2"]), N("GlobalAveragePool", ["r2"], ["p"]), N("Flatten", ["p"], ["f"]),
             N("Gemm", ["f", "fc_w_0", "fc_b_0"], ["out"], transB=1, name="fc")]
    inits = {"conv1_w_0": w(16, 3, 3, 3), "conv1_b_0": w(16), "bn_s": w(16) + 1, "bn_b": w(16), "bn_m": w(16),
             "bn_v": np.abs(w(16)) + 0.5, "conv2_w_0": w(32, 16, 3, 3), "conv2_b_0": w(32), "fc_w_0": w(10, 32),
             "fc_b_0": w(10)}
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def images(batch: int = 32) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((batch, 3, 8, 8)).astype(np.float32)


def write(tmp_path, name: str, m: onnx.ModelProto) -> str:
    """Raw bytes, as other tools write them (io.save_model would not change them, but checks)."""
    path = tmp_path / name
    path.write_bytes(m.SerializeToString())
    return str(path)


def merge_with_permuted(tmp_path, path: str, x: np.ndarray, **options) -> onnx.ModelProto:
    """merge(path, permute(path)) on calibration ``x``, without repair."""
    save_model(api.permute(api.load(path), seed=3), tmp_path / "permuted.onnx")
    np.save(tmp_path / "calib.npy", x)
    result = api.merge([path, str(tmp_path / "permuted.onnx")], calibration=str(tmp_path / "calib.npy"),
                       options=api.MergeOptions(repair="none", **options))
    return result.model


# ------------------------------------------------------------------ quantized models


def quantized(tmp_path, fmt) -> str:
    """``cnn`` quantized by onnxruntime's static quantization in format ``fmt``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": images(8)}])

        def get_next(self):
            return next(self.batches, None)

    source = write(tmp_path, "float.onnx", cnn())
    target = str(tmp_path / f"{fmt}.onnx")
    quantize_static(source, target, Reader(), quant_format=getattr(QuantFormat, fmt))
    return target


def dequantized(path: str, name: str) -> np.ndarray:
    """(q - zero point) * scale of the weight ``name`` in the file at ``path``, per output channel."""
    values = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    zero = values[f"{name}_zero_point"].astype(np.float64).reshape(-1, 1, 1, 1)
    scale = values[f"{name}_scale"].astype(np.float64).reshape(-1, 1, 1, 1)
    return ((values[f"{name}_quantized"] - zero) * scale).astype(np.float32)


def test_qdq_model_merges_in_float_with_a_permuted_copy(tmp_path, caplog):
    path = quantized(tmp_path, "QDQ")
    before = open(path, "rb").read()
    x = images()
    caplog.set_level(logging.WARNING)
    float_form = canonicalize(load_model(path))
    # node by node the float model's graph: the Relus the quantizer removed are back
    assert [n.op_type for n in float_form.graph.node] == [n.op_type for n in canonicalize(cnn()).graph.node]
    weights = {t.name: numpy_helper.to_array(t) for t in float_form.graph.initializer}
    conv = next(n for n in float_form.graph.node if n.op_type == "Conv")
    np.testing.assert_allclose(weights[conv.input[1]], dequantized(path, "conv1_w_0"), rtol=1e-6)
    # the float form is the float model up to weight rounding (activation quantization dropped)
    outputs_close(run_all(cnn(), x), run_all(float_form, x), tolerance=0.05)

    merged = merge_with_permuted(tmp_path, path, x, method="zip")
    expected = run_all(float_form, x)
    outputs_close(expected + expected, run_all(merged, x))
    assert {numpy_helper.to_array(t).dtype for t in merged.graph.initializer if t.data_type != TensorProto.INT64} \
        == {np.dtype(np.float32)}
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in merged.graph.node}
    warnings = [r.getMessage() for r in caplog.records if "QDQ" in r.getMessage()]
    assert warnings and all("float" in w and "onnxruntime.quantization" in w for w in warnings)
    assert open(path, "rb").read() == before


def test_qoperator_model_is_refused_in_one_line(tmp_path, capsys):
    path = quantized(tmp_path, "QOperator")
    out = tmp_path / "out.onnx"
    for args in (["inspect", path], ["permute", path, "-o", str(out)], ["merge", path, path, "-o", str(out)]):
        assert main(args) == 1
        error = capsys.readouterr().err
        assert error.startswith(f"onnxmerge: error: {path}: node ") and error.count("\n") == 1, error
        assert "QLinearConv" in error and "; " in error
    assert not out.exists()


# ------------------------------------------------------------------ float16 files


def to_float16(m: onnx.ModelProto) -> onnx.ModelProto:
    """What onnxconverter-common's convert_float_to_float16(keep_io_types=True) writes: float16
    initializers, and Casts from and to float32 at the inputs and outputs, appended at the end
    of the node list (after the nodes that read them)."""
    half = onnx.ModelProto()
    half.CopyFrom(m)
    graph = half.graph
    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    del graph.value_info[:]
    casts = []
    for value in graph.input:
        for node in graph.node:
            node.input[:] = [f"{n}_half" if n == value.name else n for n in node.input]
        casts.append(N("Cast", [value.name], [f"{value.name}_half"], to=TensorProto.FLOAT16))
    for value in graph.output:
        for node in graph.node:
            node.output[:] = [f"{n}_half" if n == value.name else n for n in node.output]
        casts.append(N("Cast", [f"{value.name}_half"], [value.name], to=TensorProto.FLOAT))
    graph.node.extend(casts)
    return half


def half_outputs_close(expected: list[np.ndarray], got: list[np.ndarray]) -> None:
    outputs_close(expected, got, tolerance=2e-3)  # float16 rounding


def test_float16_file_with_appended_casts_loads_permutes_and_merges(zoo_files, tmp_path, capsys):
    """Weights stay float16: merging computes in float64 and casts back to each weight's type."""
    source, x = zoo_files.get("resnet_basic", "legacy_bn")
    half = to_float16(load_model(source))
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(half)  # the file as written is out of order
    path = write(tmp_path, "half.onnx", half)
    assert main(["inspect", path]) == 0
    assert "free" in capsys.readouterr().out
    expected = run_all(half, x)
    half_outputs_close(expected, run_all(api.permute(api.load(path), seed=3), x))
    for layers in (None, 3):  # partial: model 1's features reach its head through an unmerge MatMul
        merged = merge_with_permuted(tmp_path, path, x, method="zip", zip_layers=layers)
        half_outputs_close(expected + expected, run_all(merged, x))
        assert {t.data_type for t in merged.graph.initializer if t.data_type != TensorProto.INT64} \
            == {TensorProto.FLOAT16}


# ------------------------------------------------------------------ old files


def old_ir(m: onnx.ModelProto) -> onnx.ModelProto:
    """``m`` as the ONNX Model Zoo's classic files are: IR version 3, every initializer also a
    graph input."""
    old = onnx.ModelProto()
    old.CopyFrom(m)
    old.ir_version = 3
    old.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                           for t in old.graph.initializer)
    onnx.checker.check_model(old)
    return old


def test_ir3_opset8_file_inspects_permutes_and_merges(tmp_path, capsys):
    original = old_ir(cnn(opset=8))
    path = write(tmp_path, "old.onnx", original)
    x = images()
    assert main(["inspect", path]) == 0
    assert "2 free" in capsys.readouterr().out
    out = tmp_path / "p.onnx"
    assert main(["permute", path, "-o", str(out)]) == 0
    permuted = load_model(out)
    assert [t.name for t in permuted.graph.input] == ["x"]
    expected = run_all(original, x)
    outputs_close(expected, run_all(permuted, x))
    for method in ("permute", "zip"):
        merged = merge_with_permuted(tmp_path, path, x, method=method)
        outputs_close(expected + expected, run_all(merged, x))


# ------------------------------------------------------------------ nothing written but the outputs


LITTER_CASES = {
    "custom domain": lambda tmp_path: write(tmp_path, "m.onnx", with_domain_op("my.domain", "Foo")),
    "com.microsoft": lambda tmp_path: write(tmp_path, "m.onnx", with_domain_op("com.microsoft", "Inverse")),
    "QOperator": lambda tmp_path: quantized(tmp_path, "QOperator"),
    "old IR": lambda tmp_path: write(tmp_path, "m.onnx", old_ir(cnn(opset=8))),
}


@pytest.mark.parametrize("case", LITTER_CASES)
def test_commands_write_nothing_but_their_outputs(tmp_path, monkeypatch, case):
    """Run in an empty working directory holding a symlink named like onnxruntime's temporary
    file: afterwards it holds the outputs and the untouched symlink, the temporary folder is
    empty, and the symlink's target is unchanged."""
    models = tmp_path / "models"
    models.mkdir()
    path = LITTER_CASES[case](models)
    given = sorted(os.listdir(models))
    temporary, work = tmp_path / "tmp", tmp_path / "work"
    temporary.mkdir()
    work.mkdir()
    target = tmp_path / "target"
    target.write_bytes(b"not onnxmerge's")
    (work / "sym_shape_infer_temp.onnx").symlink_to(target)
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    monkeypatch.chdir(work)
    main(["inspect", path])  # the exit status is not the point: refusals must not litter either
    main(["permute", path, "-o", "p.onnx"])
    main(["merge", path, path, "-o", "m.onnx"])
    written = sorted(os.listdir(work))
    assert set(written) - {"p.onnx", "m.onnx", "m.onnx.recipe.yaml"} == {"sym_shape_infer_temp.onnx"}, written
    assert os.listdir(temporary) == [] and sorted(os.listdir(models)) == given
    assert target.read_bytes() == b"not onnxmerge's"


@pytest.mark.parametrize("bn,repair", [("fold", "repair"), ("keep", "reset")])
def test_float16_merge_repairs_in_float16(zoo_files, tmp_path, bn, repair):
    """REPAIR's corrections and the BN reset's statistics are computed in the model's own type."""
    source, x = zoo_files.get("resnet_basic", "legacy_bn")
    path = write(tmp_path, "half.onnx", to_float16(load_model(source)))
    save_model(api.permute(api.load(path), seed=3), tmp_path / "permuted.onnx")
    np.save(tmp_path / "calib.npy", x)
    merged = api.merge([path, str(tmp_path / "permuted.onnx")], calibration=str(tmp_path / "calib.npy"),
                       options=api.MergeOptions(bn=bn, repair=repair)).model
    assert {t.data_type for t in merged.graph.initializer if t.data_type != TensorProto.INT64} == {TensorProto.FLOAT16}
    if repair == "repair":  # a permuted copy: REPAIR changes nothing beyond float16 rounding
        expected = run_all(canonicalize(api.load(path), bn="fold"), x)
        outputs_close(expected + expected, run_all(merged, x), tolerance=1e-2)
    else:
        assert all(np.isfinite(o).all() for o in run_all(merged, x))


def test_a_quantized_file_given_twice_is_warned_about_once(tmp_path, caplog):
    path = quantized(tmp_path, "QDQ")
    np.save(tmp_path / "calib.npy", images())
    caplog.set_level(logging.WARNING)
    api.merge([path, path], calibration=str(tmp_path / "calib.npy"))
    assert len([r for r in caplog.records if "QDQ" in r.getMessage()]) == 1
