"""Hostile and broken models (issue 14): each is refused in one line naming the file, before
any output, or handled; no scratch file reaches the working directory; the merged model's
metadata holds file names only; sessions run with onnxruntime's telemetry off."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxmerge.cli import main

CHANNELS = 16


def _const(name: str, values: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)


def cnn(*, second_input_channels: int = CHANNELS, names: tuple[str, ...] = ("conv1", "relu1", "conv2", "relu2"),
        outputs: bool = True, weight_fill: float | None = None, opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """x [N,3,8,8] -> Conv 16 -> Relu -> Conv 16 (its weight reads ``second_input_channels``)
    -> Relu -> global pool -> Flatten -> Gemm 5; ``weight_fill`` goes into conv1's weight."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["y1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name=names[0]),
             helper.make_node("Relu", ["y1"], ["r1"], name=names[1]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name=names[2]),
             helper.make_node("Relu", ["y2"], ["r2"], name=names[3]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["out"], transB=1, name="fc")]
    w1 = rng.standard_normal((CHANNELS, 3, 3, 3))
    if weight_fill is not None:
        w1[0, 0, 0, 0] = weight_fill
    inits = [_const("w1", w1), _const("b1", rng.standard_normal(CHANNELS)),
             _const("w2", rng.standard_normal((CHANNELS, second_input_channels, 3, 3))),
             _const("b2", rng.standard_normal(CHANNELS)),
             _const("w3", rng.standard_normal((5, CHANNELS))), _const("b3", rng.standard_normal(5))]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 5])] if outputs else [],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def bfloat16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with bfloat16 weights, input and output (Conv takes no bfloat16 before opset 22)."""
    import ml_dtypes
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(ml_dtypes.bfloat16), init.name))
    for info in (model.graph.input[0], model.graph.output[0]):
        info.type.tensor_type.elem_type = TensorProto.BFLOAT16
    return model


def sequence_input() -> onnx.ModelProto:
    """A model whose input is a sequence of tensors (SequenceAt picks one)."""
    graph = helper.make_graph(
        [helper.make_node("SequenceAt", ["s", "i"], ["t"]), helper.make_node("Relu", ["t"], ["out"])], "seq",
        [helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.array(0, np.int64), "i")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def custom_op() -> onnx.ModelProto:
    """Conv -> a custom-domain op (no shape inference knows it: the symbolic fallback runs) -> Conv."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["y"], kernel_shape=[1, 1], name="conv1"),
             helper.make_node("Swish", ["y"], ["s"], domain="custom.ops", name="swish"),
             helper.make_node("Conv", ["s", "w2", "b2"], ["z"], kernel_shape=[1, 1], name="conv2"),
             helper.make_node("GlobalAveragePool", ["z"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["out"], name="flatten")]
    inits = [_const("w1", rng.standard_normal((8, 3, 1, 1))), _const("b1", rng.standard_normal(8)),
             _const("w2", rng.standard_normal((5, 8, 1, 1))), _const("b2", rng.standard_normal(5))]
    graph = helper.make_graph(nodes, "custom", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom.ops", 1)])
    model.ir_version = 8
    return model


def _save(model: onnx.ModelProto, path) -> str:
    path.write_bytes(model.SerializeToString())
    return str(path)


def _data(folder, samples: int = 32) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((samples, 3, 8, 8)).astype(np.float32)
    np.save(folder / "calib.npy", x)
    np.savez(folder / "test.npz", x=x, y=rng.integers(0, 5, samples))
    return str(folder / "calib.npy"), str(folder / "test.npz")


def _refused(args: list[str], capsys, *fragments: str) -> str:
    """Run the command; it must exit 1 with one ``onnxmerge: error:`` line holding ``fragments``."""
    assert main(args) == 1
    error = capsys.readouterr().err
    assert error.startswith("onnxmerge: error: ") and error.count("\n") == 1, error
    for fragment in fragments:
        assert fragment in error, error
    return error


def _listing(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
            for p in sorted(folder.iterdir())}


# --- invalid models: one line naming the file, before any output -----------------------------

@pytest.mark.parametrize("command", ["inspect", "permute", "widen", "merge", "eval"])
def test_a_conv_weight_that_does_not_fit_its_input_is_refused(tmp_path, capsys, command):
    """The second Conv's weight reads 8 channels of a 16-channel tensor: onnx.checker passes it,
    inspect called its spaces free, permute raised IndexError, merge and eval raised
    onnxruntime's Fail."""
    bad = _save(cnn(second_input_channels=8), tmp_path / "bad.onnx")
    good = _save(cnn(seed=1), tmp_path / "good.onnx")
    calib, test = _data(tmp_path)
    out = tmp_path / "out.onnx"
    args = {"inspect": ["inspect", bad], "permute": ["permute", bad, "-o", str(out)],
            "widen": ["widen", bad, "-o", str(out), "--factor", "1.5"],
            "merge": ["merge", bad, good, "-o", str(out), "--calib", calib, "--allow-few-samples"],
            "eval": ["eval", bad, "--data", test, "--labels", "y", "--tasks", "0-4"]}[command]
    error = _refused(args, capsys, "bad.onnx")
    assert ("'w2'" in error and "8" in error) if command != "eval" else "kernel channels" in error
    assert not out.exists()


def test_duplicate_node_names_are_refused(tmp_path, capsys):
    """onnxruntime refuses two nodes of one name; inspect reported such a model as valid."""
    path = _save(cnn(names=("conv1", "conv1", "conv2", "relu2")), tmp_path / "dup.onnx")
    _refused(["inspect", path], capsys, "dup.onnx", "'conv1'", "give every node its own name")


def test_a_model_with_no_outputs_is_refused(tmp_path, capsys):
    """inspect raised IndexError on it."""
    path = _save(cnn(outputs=False), tmp_path / "none.onnx")
    _refused(["inspect", path], capsys, "none.onnx", "no outputs")
    _refused(["permute", path, "-o", str(tmp_path / "out.onnx")], capsys, "none.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_inspect_describes_a_sequence_input_and_permute_copies_the_model(tmp_path, capsys):
    """inspect raised KeyError: 0 on a sequence input; permute blamed its own output."""
    path = _save(sequence_input(), tmp_path / "seq.onnx")
    assert main(["inspect", path, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["inputs"][0]["dtype"] == "sequence(float32)"
    assert main(["permute", path, "-o", str(tmp_path / "out.onnx")]) == 0


@pytest.mark.parametrize("command", ["permute", "widen"])
def test_a_bfloat16_conv_model_is_refused_as_invalid_input(tmp_path, capsys, command):
    """Conv takes no bfloat16 before opset 22: the input is invalid, and the error said the
    permuted or widened model failed the checker (an onnxmerge bug, it suggested)."""
    path = _save(bfloat16(cnn()), tmp_path / "bf16.onnx")
    extra = ["--factor", "2"] if command == "widen" else []
    error = _refused([command, path, "-o", str(tmp_path / "out.onnx"), *extra], capsys, "bf16.onnx", "bfloat16")
    assert "not a valid ONNX model" in error and "permuted" not in error and "widened" not in error
    assert not (tmp_path / "out.onnx").exists()


def test_a_bfloat16_model_valid_at_opset_22_is_permuted(tmp_path, capsys):
    path = _save(bfloat16(cnn(opset=22)), tmp_path / "bf16.onnx")
    assert main(["permute", path, "-o", str(tmp_path / "out.onnx")]) == 0


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("method", ["weight", "zip"])
def test_non_finite_weights_are_refused_naming_the_initializer(tmp_path, capsys, value, method):
    """--method weight raised scipy's ValueError on NaN or infinite weights."""
    bad = _save(cnn(weight_fill=value), tmp_path / "bad.onnx")
    good = _save(cnn(seed=1), tmp_path / "good.onnx")
    calib, _ = _data(tmp_path)
    extra = ["--calib", calib, "--allow-few-samples"] if method == "zip" else []
    _refused(["merge", good, bad, "-o", str(tmp_path / "m.onnx"), "--method", method, *extra], capsys,
             "bad.onnx", "'w1'", "NaN" if np.isnan(value) else "infinite")
    assert not (tmp_path / "m.onnx").exists()


def test_an_initializer_whose_data_does_not_fit_its_dims_is_refused(tmp_path, capsys):
    """onnx.checker lets dims that disagree with the data through; deepen raised numpy's ValueError."""
    model = cnn()
    model.graph.initializer[2].dims[1] = 4  # w2 holds 16 x 16 x 3 x 3 values
    path = _save(model, tmp_path / "cut.onnx")
    _refused(["inspect", path], capsys, "cut.onnx", "'w2'", "does not hold its data")


def test_an_onnxruntime_failure_while_running_is_one_line(tmp_path, capsys):
    """eval's onnxruntime errors were tracebacks; now one line with the file, and no C++ log line."""
    bad = _save(cnn(second_input_channels=8), tmp_path / "bad.onnx")
    _, test = _data(tmp_path)
    _refused(["eval", bad, "--data", test, "--tasks", "0-4"], capsys, "bad.onnx", "onnxruntime failed")


# --- outputs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [
    ["merge", "A", "B", "--calib", "CALIB", "-o", "FIFO"],
    ["merge", "A", "B", "--calib", "CALIB", "-o", "OUT", "--report", "FIFO"],
    ["calibrate", "A", "B", "--calib", "CALIB", "-o", "FIFO"],
    ["align", "A", "B", "--calib", "CALIB", "--plot", "FIFO"],
    ["permute", "A", "-o", "FIFO"], ["widen", "A", "-o", "LINK", "--factor", "2"],
    ["deepen", "A", "-o", "FIFO", "--blocks", "1"],
], ids=["merge", "report", "calibrate", "plot", "permute", "widen-link", "deepen"])
def test_an_output_that_is_no_regular_file_is_refused(tmp_path, capsys, monkeypatch, command):
    """As root, ``-o /dev/null`` replaced the device node with a regular file; a FIFO (or a link
    to one) stands for it here and must stay what it is."""
    a = _save(cnn(), tmp_path / "a.onnx")
    b = _save(cnn(seed=1), tmp_path / "b.onnx")
    calib, _ = _data(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "fifo", tmp_path / "link")
    names = {"A": a, "B": b, "CALIB": calib, "FIFO": str(tmp_path / "fifo"), "LINK": str(tmp_path / "link"),
             "OUT": str(tmp_path / "out.onnx")}
    before = sorted(p.name for p in tmp_path.iterdir())
    _refused([names.get(arg, arg) for arg in command], capsys, "not a regular file")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "fifo").is_fifo()


def test_the_dev_null_device_is_refused_as_output():
    from onnxmerge.errors import OnnxMergeError
    from onnxmerge.io import check_writable
    with pytest.raises(OnnxMergeError, match="not a regular file"):
        check_writable(os.devnull, "model")


def test_statistics_are_not_written_through_a_planted_temporary_name(tmp_path, capsys):
    """calibrate wrote its statistics to ``.<output>.<pid>.tmp`` first, following a link put
    there: the link's target was overwritten."""
    a = _save(cnn(), tmp_path / "a.onnx")
    b = _save(cnn(seed=1), tmp_path / "b.onnx")
    calib, _ = _data(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.symlink(victim, tmp_path / f".stats.npz.{os.getpid()}.tmp")
    assert main(["calibrate", a, b, "--calib", calib, "-o", str(tmp_path / "stats.npz"),
                 "--allow-few-samples"]) == 0
    assert victim.read_text() == "keep me"
    assert (tmp_path / "stats.npz").is_file() and not (tmp_path / "stats.npz").is_symlink()


# --- scratch files ---------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["inspect", "permute", "merge"])
def test_no_scratch_file_reaches_the_working_directory(tmp_path, capsys, monkeypatch, command):
    """onnxruntime's symbolic shape inference (the fallback for the custom op) saves
    ``sym_shape_infer_temp.onnx`` into the working directory when it cannot infer every
    shape: a link of that name must not be followed, and nothing may appear there."""
    models = tmp_path / "models"
    models.mkdir()
    path = _save(custom_op(), models / "custom.onnx")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "victim.txt").write_text("keep me")
    os.symlink("victim.txt", cwd / "sym_shape_infer_temp.onnx")
    monkeypatch.chdir(cwd)
    before = _listing(cwd)
    out = str(models / "out.onnx")
    args = {"inspect": ["inspect", path], "permute": ["permute", path, "-o", out],
            "merge": ["merge", path, path, "-o", out, "--method", "weight"]}[command]
    assert main(args) == 0
    assert _listing(cwd) == before and (cwd / "victim.txt").read_text() == "keep me"


# --- privacy ---------------------------------------------------------------------------------

def test_metadata_holds_file_names_only(tmp_path, capsys):
    """An absolute path given to --input-layout was stored in the merged model's options."""
    keras = os.path.join(os.path.dirname(__file__), "..", "samples", "mixed", "keras_cnn_a.onnx")
    torch = os.path.join(os.path.dirname(__file__), "..", "samples", "mixed", "torch_cnn_b.onnx")
    folder = tmp_path / "private-folder"
    folder.mkdir()
    for source, name in ((keras, "keras.onnx"), (torch, "torch.onnx")):
        (folder / name).write_bytes(open(source, "rb").read())
    out = tmp_path / "m.onnx"
    assert main(["merge", str(folder / "keras.onnx"), str(folder / "torch.onnx"), "-o", str(out),
                 "--input-layout", f"{folder / 'keras.onnx'}=NHWC", "--repair", "none"]) == 0
    metadata = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert not any("private-folder" in value for value in metadata.values()), metadata
    assert json.loads(metadata["onnxmerge.options"])["input_layout"] == [["keras.onnx", "NHWC"]]
    assert metadata["onnxmerge.input0.name"] == "keras.onnx"


def test_sessions_are_opened_with_telemetry_off(monkeypatch):
    import onnxruntime
    from onnxmerge.calib.sessions import open_session
    calls = []
    monkeypatch.setattr(onnxruntime, "disable_telemetry_events", lambda: calls.append(1))
    open_session(cnn(), "cpu")
    assert calls


# --- determinism -----------------------------------------------------------------------------

def test_the_same_merge_twice_gives_identical_bytes(tmp_path, capsys):
    samples = os.path.join(os.path.dirname(__file__), "..", "samples", "digits")
    outputs = []
    for run in range(2):
        out = tmp_path / f"m{run}.onnx"
        assert main(["merge", f"{samples}/vgg_a.onnx", f"{samples}/vgg_b.onnx", "--calib", f"{samples}/calib.npz",
                     "--max-samples", "64", "-o", str(out)]) == 0
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("command", [
    ["merge", "A", "B", "--stats", "STATS", "-o", "STATS"],
    ["merge", "A", "B", "--base", "BASE", "-o", "BASE"],
    ["merge", "A", "B", "--calib", "CALIB", "-o", "OUT", "--report", "CALIB"],
    ["align", "A", "B", "--calib", "CALIB", "--plot", "CALIB"],
    ["calibrate", "A", "B", "--calib", "CALIB", "-o", "B"],
    ["deepen", "A", "-o", "A", "--blocks", "1"],
], ids=["stats", "base", "report-calib", "plot-calib", "calibrate-model", "deepen"])
def test_every_input_is_protected_from_every_output(tmp_path, capsys, command):
    a = _save(cnn(), tmp_path / "a.onnx")
    b = _save(cnn(seed=1), tmp_path / "b.onnx")
    base = _save(cnn(seed=2), tmp_path / "base.onnx")
    calib, _ = _data(tmp_path)
    (tmp_path / "stats.npz").write_bytes(b"not read: the output check comes first")
    names = {"A": a, "B": b, "BASE": base, "CALIB": calib, "STATS": str(tmp_path / "stats.npz"),
             "OUT": str(tmp_path / "out.onnx")}
    before = _listing(tmp_path)
    _refused([names.get(arg, arg) for arg in command], capsys, "would overwrite")
    assert _listing(tmp_path) == before


def test_an_output_is_refused_when_it_is_an_input_models_external_data(tmp_path, capsys):
    """``-o a.onnx.data`` would replace the weights input a.onnx reads from its sidecar."""
    from pathlib import Path

    from onnxmerge.cli import main as run_cli

    model = onnx.load(str(Path(__file__).resolve().parent.parent / "samples" / "digits" / "resnet_a.onnx"))
    onnx.save_model(model, str(tmp_path / "a.onnx"), save_as_external_data=True, location="a.onnx.data",
                     size_threshold=0)
    sidecar = tmp_path / "a.onnx.data"
    before = sidecar.read_bytes()
    for args in (["permute", str(tmp_path / "a.onnx"), "-o", str(sidecar)],
                 ["merge", str(tmp_path / "a.onnx"), str(tmp_path / "a.onnx"), "-o", str(sidecar)]):
        assert run_cli(args) == 1
        assert "would overwrite" in capsys.readouterr().err
    assert sidecar.read_bytes() == before
