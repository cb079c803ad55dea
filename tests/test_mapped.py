"""Weights that stay in their files (issue 18, onnxmerge/weights.py): a model saved with
external data loads with its large tensors memory-mapped, analysis keeps them there, and
what onnxmerge computes from them equals what it computes from the same model in memory.
The digits models' tensors are small, so ``weights.MAPPED_MIN_BYTES`` is lowered to map them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxmerge import io, models, weights
from onnxmerge.calib.sessions import open_session
from onnxmerge.errors import InvalidModelError, OnnxMergeError
from onnxmerge.graph.canonical import canonicalize

DIGITS = Path(__file__).resolve().parent.parent / "samples" / "digits"
A, CALIB = str(DIGITS / "resnet_a.onnx"), str(DIGITS / "calib.npz")
MAPPED = 4096  # bytes: every conv weight of the digits models is at least this


@pytest.fixture
def external(tmp_path, monkeypatch) -> Path:
    """Digits model A saved with its weights in external data, mapped when loaded."""
    monkeypatch.setattr(weights, "MAPPED_MIN_BYTES", MAPPED)
    path = tmp_path / "a.onnx"
    io.save_model(io.load_model(A), path, external_data=True)
    return path


def _values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: np.asarray(weights.read(init)) for init in model.graph.initializer}


def _mapped(model: onnx.ModelProto) -> list[str]:
    return [init.name for init in model.graph.initializer if weights.is_mapped(init)]


def test_large_external_tensors_load_mapped_and_stay_mapped_through_analysis(external):
    loaded, in_memory = io.load_model(external), io.load_model(A)
    large = [i.name for i in in_memory.graph.initializer if i.data_type == onnx.TensorProto.FLOAT
             and 4 * int(np.prod(i.dims)) >= MAPPED]
    assert large and sorted(_mapped(loaded)) == sorted(large)
    assert loaded.ByteSize() < in_memory.ByteSize() // 4  # the weights are not in the protobuf
    expected = _values(in_memory)
    for name, value in _values(loaded).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    spilled = os.path.getsize(weights.spill().path)
    canonical = canonicalize(loaded)
    assert _mapped(canonical), "canonicalisation copied every mapped weight into memory"
    assert os.path.getsize(weights.spill().path) == spilled, "unchanged weights were written again"
    reference = canonicalize(in_memory)
    ours, theirs = _values(canonical), _values(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_permute_of_a_mapped_model_equals_the_in_memory_permute_and_leaves_its_files(external):
    files = {path: path.read_bytes() for path in (external, Path(f"{external}.data"))}
    ours, theirs = models.permute(external, seed=3), models.permute(A, seed=3)
    assert _mapped(ours), "the permuted weights were not spilled"
    assert list(ours.graph.node) == list(theirs.graph.node)
    expected = _values(theirs)
    for name, value in _values(ours).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    io.check_model(ours)  # onnx.checker on the graph, its mapped tensors' files in range
    x = np.load(CALIB)
    x = x[x.files[0]][:8]
    feed = {theirs.graph.input[0].name: x}
    for a, b in zip(open_session(ours, "cpu")[0].run(None, feed), open_session(theirs, "cpu")[0].run(None, feed)):
        np.testing.assert_array_equal(a, b)
    assert all(path.read_bytes() == data for path, data in files.items())


def test_spilled_tensors_read_back_and_are_written_by_reference():
    for value in (np.arange(40000, dtype=np.float32).reshape(200, 200), np.ones((3, 5000), np.float16)):
        spilled = weights.spill().store(value)
        np.testing.assert_array_equal(spilled, value)
        tensor = weights.tensor(spilled, "w")
        assert weights.is_mapped(tensor) and list(tensor.dims) == list(value.shape)
        np.testing.assert_array_equal(weights.read(tensor), value)
        # a view or a computed array is no whole file range: copied, not referenced
        assert not weights.is_mapped(weights.tensor(spilled[1:], "v"))
        assert not weights.is_mapped(weights.tensor(spilled * 2, "c"))
    assert weights.kept(np.ones(4, np.float32), mapped=True).base is None  # small: kept in memory


def test_a_mapped_model_saves_as_one_file_when_asked(external, tmp_path):
    loaded = io.load_model(external)
    io.save_model(loaded, tmp_path / "one.onnx", external_data=False)
    assert not Path(f"{tmp_path / 'one.onnx'}.data").exists()
    io.save_model(loaded, tmp_path / "two.onnx")  # mapped weights: external data by default
    for path in ("one.onnx", "two.onnx"):
        reloaded = io.load_model(tmp_path / path)
        expected = _values(io.load_model(A))
        for name, value in _values(reloaded).items():
            np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_external_data_of_the_wrong_length_is_refused(external):
    model = onnx.load(str(external), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                  and 4 * int(np.prod(t.dims)) >= MAPPED)
    length = next(entry for entry in tensor.external_data if entry.key == "length")
    length.value = str(int(length.value) - 4)
    onnx.save(model, str(external))
    with pytest.raises(InvalidModelError, match=f"tensor '{tensor.name}'.*bytes of external data"):
        io.load_model(external)


def test_large_mapped_weights_are_fed_in_place_and_compute_the_same(external, monkeypatch):
    """From ``weights.FEED_MIN_BYTES`` on, onnxruntime reads mapped weights in place, as inputs
    fed with every run (it copies initializers): the same outputs, up to the last bits its
    layer fusions change, and the weights are no inputs a caller sees."""
    monkeypatch.setattr(weights, "FEED_MIN_BYTES", 0)
    loaded, in_memory = io.load_model(external), io.load_model(A)
    fed, _ = open_session(loaded, "cpu")
    given, _ = open_session(in_memory, "cpu")
    assert [i.name for i in fed.get_inputs()] == [i.name for i in given.get_inputs()]
    x = np.load(CALIB)
    x = x[x.files[0]][:8]
    feed = {in_memory.graph.input[0].name: x}
    for ours, theirs in zip(fed.run(None, feed), given.run(None, feed)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_spill_folders_of_killed_processes_are_swept(tmp_path):
    """A process killed with SIGKILL leaves its spill folder; the next one removes it (this
    host's, of a process id that no longer runs), never a live process's or another host's."""
    import socket
    import subprocess
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid no longer runs
    host = socket.gethostname()
    names = {"dead": f"onnxmerge-spill-{host}-{dead.pid}-abc123", "live": f"onnxmerge-spill-{host}-{os.getpid()}-def456",
             "other host": f"onnxmerge-spill-elsewhere-{dead.pid}-ghi789"}
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "spill.data").write_bytes(b"x")
    weights.sweep_spills(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["live"], names["other host"]])


def test_a_full_disk_while_spilling_is_one_line(tmp_path, monkeypatch):
    spill = weights.Spill(str(tmp_path))
    kept = spill.store(np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(kept, np.arange(6).reshape(2, 3))  # what it writes reads back
    apart = spill.apart(np.arange(12.0).reshape(4, 3))  # a file of its own, read back without mapping it
    np.testing.assert_array_equal(weights.read_rows(apart, slice(1, 3)), np.arange(3.0, 9.0).reshape(2, 3))
    weights.discard(apart)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spill.data"]

    class Full:
        def tell(self):
            return 0

        def write(self, data):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(spill, "_file", Full())
    with pytest.raises(OnnxMergeError, match="No space left on device.*TMPDIR"):
        spill.store(np.zeros(4, np.float32))
