"""onnxmerge.io: safe loading of untrusted files, atomic saving, external data, hashing."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxmerge import io
from onnxmerge.errors import InvalidModelError, OnnxMergeError, UnsupportedGraphError


def tiny_model(opset: int = 17) -> onnx.ModelProto:
    """x[1,64] -> MatMul(W[64,32]) -> Relu -> y[1,32]; W is 8 KiB, above the external threshold."""
    weight = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
         helper.make_node("Relu", ["h"], ["y"], name="relu")],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        [numpy_helper.from_array(weight, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def run(model_or_path) -> np.ndarray:
    source = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) \
        else str(model_or_path)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    return session.run(None, {"x": x})[0]


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def same_model(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """Equal protos, ignoring an explicit data_location=DEFAULT left by loading external data."""
    copies = []
    for model in (a, b):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        for tensor in copy.graph.initializer:
            tensor.ClearField("data_location")
        copies.append(copy.SerializeToString())
    return copies[0] == copies[1]


def save_external(model: onnx.ModelProto, path, location: str = "weights.bin") -> None:
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)


def set_location(path, **entries: str) -> None:
    """Rewrite the external_data entries of every external tensor of the model file at ``path``."""
    model = onnx.load_model(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            current = {e.key: e.value for e in tensor.external_data} | entries
            del tensor.external_data[:]
            for key, value in current.items():
                tensor.external_data.add(key=key, value=value)
    path.write_bytes(model.SerializeToString())


def expect_refusal(path, error_class) -> str:
    """Load ``path``; assert the error class, a one-line message naming the file, file unchanged."""
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(error_class) as caught:
        io.load_model(path)
    message = str(caught.value)
    assert "\n" not in message and path.name in message and "; " in message, message
    assert (path.read_bytes() if path.is_file() else None) == before
    return message


def expect_refusal_after(path, entries: dict[str, str]) -> str:
    """Rewrite the external data entries of the model at ``path``, then expect_refusal."""
    set_location(path, **entries)
    return expect_refusal(path, InvalidModelError)


# ---------------------------------------------------------------- round trips


def test_round_trip_single_file(tmp_path):
    model = tiny_model()
    path = tmp_path / "m.onnx"
    io.save_model(model, path)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]
    loaded = io.load_model(path)
    assert loaded.SerializeToString() == model.SerializeToString()
    assert io.model_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_round_trip_external_data(tmp_path):
    model = tiny_model()
    before = model.SerializeToString()
    path = tmp_path / "m.onnx"
    io.save_model(model, path, external_data=True)
    assert model.SerializeToString() == before  # the caller's proto is untouched
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    skeleton = onnx.load_model(str(path), load_external_data=False)
    entries = {e.key: e.value for e in skeleton.graph.initializer[0].external_data}
    assert entries["location"] == "m.onnx.data"
    assert path.stat().st_size < 1024 < (tmp_path / "m.onnx.data").stat().st_size
    loaded = io.load_model(path)
    assert all(t.data_location == TensorProto.DEFAULT for t in loaded.graph.initializer)
    assert same_model(loaded, model)
    for name, array in initializers(model).items():
        np.testing.assert_array_equal(initializers(loaded)[name], array)
    np.testing.assert_array_equal(run(path), run(model))
    np.testing.assert_array_equal(run(loaded), run(model))


def test_loads_sidecar_written_by_onnx(tmp_path):
    path = tmp_path / "m.onnx"
    save_external(tiny_model(), path)  # onnx.save_model converts the proto it is given
    loaded = io.load_model(path)
    assert all(t.data_location == TensorProto.DEFAULT and not t.external_data
               for t in loaded.graph.initializer)
    np.testing.assert_array_equal(initializers(loaded)["W"], initializers(tiny_model())["W"])
    np.testing.assert_array_equal(run(loaded), run(tiny_model()))


def test_external_data_in_subfolder_allowed(tmp_path):
    (tmp_path / "data").mkdir()
    path = tmp_path / "m.onnx"
    save_external(tiny_model(), path, location="data/w.bin")
    np.testing.assert_array_equal(initializers(io.load_model(path))["W"], initializers(tiny_model())["W"])


def test_typed_field_initializer_goes_external(tmp_path):
    model = tiny_model()
    weight = initializers(model)["W"]
    model.graph.initializer[0].CopyFrom(
        helper.make_tensor("W", TensorProto.FLOAT, weight.shape, weight.ravel().tolist()))
    io.save_model(model, tmp_path / "m.onnx", external_data=True)
    np.testing.assert_array_equal(initializers(io.load_model(tmp_path / "m.onnx"))["W"], weight)


def test_automatic_external_data_above_limit(tmp_path, monkeypatch):
    model = tiny_model()
    io.save_model(model, tmp_path / "small.onnx")
    assert sorted(os.listdir(tmp_path)) == ["small.onnx"]
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", model.ByteSize() - 1)
    io.save_model(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").is_file()
    assert same_model(io.load_model(tmp_path / "big.onnx"), model)
    with pytest.raises(OnnxMergeError, match="external_data"):
        io.save_model(model, tmp_path / "forced.onnx", external_data=False)
    assert not any(name.startswith("forced") or name.startswith(".forced") for name in os.listdir(tmp_path))


def test_load_checks_models_over_the_limit_by_path(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    save_external(tiny_model(), path)
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 4096)  # the loaded model (8 KiB of weights) is "too big"
    calls = []
    real_check = onnx.checker.check_model
    monkeypatch.setattr(onnx.checker, "check_model", lambda model, *a, **k: (calls.append(model),
                                                                             real_check(model, *a, **k)))
    np.testing.assert_array_equal(initializers(io.load_model(path))["W"], initializers(tiny_model())["W"])
    assert calls == [str(path)]


def test_file_over_the_limit_refused(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    io.save_model(tiny_model(), path)
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 1024)
    assert "external data" in expect_refusal(path, InvalidModelError)


def test_save_refuses_unloaded_external_data(tmp_path):
    save_external(tiny_model(), tmp_path / "m.onnx")
    skeleton = onnx.load_model(str(tmp_path / "m.onnx"), load_external_data=False)
    with pytest.raises(InvalidModelError, match="load_model"):
        io.save_model(skeleton, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


# ---------------------------------------------------------------- bad inputs


def test_nonexistent_path(tmp_path):
    assert "not found" in expect_refusal(tmp_path / "missing.onnx", InvalidModelError)


def test_directory(tmp_path):
    (tmp_path / "dir.onnx").mkdir()
    expect_refusal(tmp_path / "dir.onnx", InvalidModelError)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    expect_refusal(path, InvalidModelError)


def test_random_bytes(tmp_path):
    path = tmp_path / "random.onnx"
    path.write_bytes(np.random.default_rng(3).bytes(4096))
    expect_refusal(path, InvalidModelError)


def test_text_file(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\nbut a text file\n")
    expect_refusal(path, InvalidModelError)


@pytest.mark.parametrize("keep", [0.5, -3, -1], ids=["half", "last_3_bytes", "last_byte"])
def test_truncated_model(tmp_path, keep):
    data = tiny_model().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: int(len(data) * keep)] if isinstance(keep, float) else data[:keep])
    expect_refusal(path, InvalidModelError)


@pytest.mark.parametrize("cut", ["before_graph", "before_opset"], ids=str)
def test_truncated_at_field_boundary(tmp_path, cut):
    """A cut between two fields still parses; the structure or checker checks must catch it."""
    model = tiny_model()
    data = model.SerializeToString()
    if cut == "before_graph":
        prefix = onnx.ModelProto(ir_version=model.ir_version).SerializeToString()
    else:
        prefix = onnx.ModelProto(ir_version=model.ir_version, graph=model.graph).SerializeToString()
    assert data.startswith(prefix) and len(prefix) < len(data)
    path = tmp_path / "cut.onnx"
    path.write_bytes(prefix)
    expect_refusal(path, InvalidModelError)


def test_missing_external_file(tmp_path):
    path = tmp_path / "m.onnx"
    save_external(tiny_model(), path)
    (tmp_path / "weights.bin").unlink()
    assert "not found" in expect_refusal(path, InvalidModelError)


def test_external_parent_escape_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "m.onnx"
    save_external(tiny_model(), path)
    os.replace(folder / "weights.bin", tmp_path / "outside.bin")
    set_location(path, location="../outside.bin")
    assert "outside the model's folder" in expect_refusal(path, InvalidModelError)


def test_external_absolute_path_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "m.onnx"
    save_external(tiny_model(), path)
    set_location(path, location=str(folder / "weights.bin"))  # exists, even inside the folder
    assert "outside the model's folder" in expect_refusal(path, InvalidModelError)


def test_external_location_with_nul_byte_refused(tmp_path):
    path = tmp_path / "m.onnx"
    save_external(tiny_model(), path)
    expect_refusal_after(path, {"location": "weights\0.bin"})


def test_external_symlink_escape_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "m.onnx"
    save_external(tiny_model(), path)
    os.replace(folder / "weights.bin", tmp_path / "outside.bin")
    os.symlink(tmp_path / "outside.bin", folder / "weights.bin")
    assert "outside the model's folder" in expect_refusal(path, InvalidModelError)


@pytest.mark.parametrize("entries", [{"offset": "8000"}, {"length": "9000"}, {"offset": "100000"}],
                         ids=["offset_plus_length", "length", "offset"])
def test_external_past_end_of_file(tmp_path, entries):
    path = tmp_path / "m.onnx"
    save_external(tiny_model(), path)
    assert "past the end" in expect_refusal_after(path, entries)


def test_external_malformed_offset(tmp_path):
    path = tmp_path / "m.onnx"
    save_external(tiny_model(), path)
    expect_refusal_after(path, {"offset": "-5"})


def test_ir_version_too_new(tmp_path):
    model = tiny_model()
    model.ir_version = onnx.IR_VERSION + 1
    path = tmp_path / "new_ir.onnx"
    path.write_bytes(model.SerializeToString())
    message = expect_refusal(path, UnsupportedGraphError)
    assert str(onnx.IR_VERSION + 1) in message and str(onnx.IR_VERSION) in message


@pytest.mark.parametrize("opset", [onnx.defs.onnx_opset_version() + 1, 6], ids=["too_new", "too_old"])
def test_opset_out_of_range(tmp_path, opset):
    path = tmp_path / "opset.onnx"
    path.write_bytes(tiny_model(opset).SerializeToString())
    message = expect_refusal(path, UnsupportedGraphError)
    assert f"opset {opset}" in message and f"{io.MIN_OPSET}..{onnx.defs.onnx_opset_version()}" in message


def test_checker_failure(tmp_path):
    model = tiny_model()
    model.graph.node[1].input[0] = "nowhere"  # Relu reads a tensor nothing produces
    path = tmp_path / "broken.onnx"
    path.write_bytes(model.SerializeToString())
    assert "onnx.checker" in expect_refusal(path, InvalidModelError)


def test_sha256_covers_the_external_data(tmp_path):
    """A recipe refuses a changed weights file: its model's sha256 covers the sidecar too."""
    model = tiny_model()
    path = tmp_path / "m.onnx"
    io.save_model(model, path, external_data=True)
    sidecars = [p for p in tmp_path.iterdir() if p.name != "m.onnx"]
    assert sidecars
    before = io.model_sha256(path)
    assert before != hashlib.sha256(path.read_bytes()).hexdigest()
    data = bytearray(sidecars[0].read_bytes())
    data[-1] ^= 0xFF  # same length, one weight changed
    sidecars[0].write_bytes(bytes(data))
    assert io.model_sha256(path) != before


def test_sha256_of_missing_file(tmp_path):
    with pytest.raises(InvalidModelError, match="missing.onnx"):
        io.model_sha256(tmp_path / "missing.onnx")


# ---------------------------------------------------------------- atomic saving


def test_save_into_missing_folder(tmp_path):
    with pytest.raises(OnnxMergeError) as caught:
        io.save_model(tiny_model(), tmp_path / "nowhere" / "m.onnx")
    assert "\n" not in str(caught.value) and "m.onnx" in str(caught.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("external_data", [False, True], ids=["single_file", "external_data"])
def test_failed_replace_leaves_nothing(tmp_path, monkeypatch, external_data):
    def fail(source, target):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OnnxMergeError, match="disk on fire"):
        io.save_model(tiny_model(), tmp_path / "m.onnx", external_data=external_data)
    assert os.listdir(tmp_path) == []


def test_failed_model_replace_removes_placed_sidecar(tmp_path, monkeypatch):
    real_replace = os.replace
    calls = []

    def second_fails(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise OSError("disk on fire")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(OnnxMergeError):
        io.save_model(tiny_model(), tmp_path / "m.onnx", external_data=True)
    assert [os.path.basename(c) for c in calls] == ["m.onnx.data", "m.onnx"]
    assert os.listdir(tmp_path) == []


def test_failed_serialization_leaves_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    io.save_model(tiny_model(), path)
    old = path.read_bytes()

    def broken_sidecar(model, file, location):
        file.write(b"partial")
        raise OSError("no space left on device")

    monkeypatch.setattr(io, "_write_sidecar", broken_sidecar)
    with pytest.raises(OnnxMergeError, match="no space"):
        io.save_model(tiny_model(), path, external_data=True)
    assert os.listdir(tmp_path) == ["m.onnx"] and path.read_bytes() == old


def test_saved_file_mode_is_not_owner_only(tmp_path):
    io.save_model(tiny_model(), tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").stat().st_mode & 0o777 == io._FILE_MODE
