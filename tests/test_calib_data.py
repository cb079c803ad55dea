"""Calibration inputs: every malformed file is refused with a one-line message naming it."""

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

from onnxmerge.calib.data import InputSpec, input_specs, load_calibration
from onnxmerge.errors import CalibrationError


def _model(inputs: dict[str, tuple[int, list]]) -> onnx.ModelProto:
    """A model with the given inputs (name -> (element type, shape)) and one Identity output each,
    plus a weight initializer that is also listed as a graph input (old exporters do this)."""
    values = [helper.make_tensor_value_info(name, kind, shape) for name, (kind, shape) in inputs.items()]
    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [0.0])
    values.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [1]))
    nodes = [helper.make_node("Identity", [name], [f"{name}_out"]) for name in inputs]
    outputs = [helper.make_tensor_value_info(f"{name}_out", kind, shape) for name, (kind, shape) in inputs.items()]
    graph = helper.make_graph(nodes, "g", values, outputs, [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _image_model(name: str = "x", batch=None) -> onnx.ModelProto:
    return _model({name: (TensorProto.FLOAT, [batch if batch else "N", 3, 4])})


def _specs(*models: onnx.ModelProto) -> list[list[InputSpec]]:
    return [input_specs(m) for m in models]


def _data(count: int = 10, dtype=np.float32) -> np.ndarray:
    return np.arange(count * 12, dtype=np.float64).reshape(count, 3, 4).astype(dtype)


def test_input_specs_reads_inputs_not_initializers():
    model = _model({"x": (TensorProto.FLOAT, ["batch", 3, 4]), "ids": (TensorProto.INT64, [1, 7])})
    assert input_specs(model) == [InputSpec("x", np.dtype(np.float32), (None, 3, 4)),
                                  InputSpec("ids", np.dtype(np.int64), (1, 7))]


def test_named_arrays_feed_named_inputs(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, x=_data(), ids=np.arange(10 * 7).reshape(10, 7), y=np.arange(10))
    model = _model({"x": (TensorProto.FLOAT, ["N", 3, 4]), "ids": (TensorProto.INT64, ["N", 7])})
    calib = load_calibration(path, _specs(model))
    feeds = list(calib.batches(0, 4))
    assert calib.num_samples == 10
    assert [f["x"].shape[0] for f in feeds] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([f["ids"] for f in feeds]), np.arange(70).reshape(10, 7))


@pytest.mark.parametrize("suffix", ["npy", "npz"])
def test_single_array_feeds_differently_named_inputs(tmp_path, suffix):
    path = tmp_path / f"calib.{suffix}"
    (np.save if suffix == "npy" else lambda p, a: np.savez(p, images=a))(path, _data())
    first, second = _image_model("input.1"), _image_model("pixel_values")
    calib = load_calibration(path, _specs(first, second))
    for index, model in enumerate((first, second)):
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        outputs = [session.run(None, feed)[0] for feed in calib.batches(index, 3)]
        np.testing.assert_array_equal(np.concatenate(outputs), _data())


def test_fixed_batch_one_gets_batches_of_one(tmp_path):
    path = tmp_path / "calib.npy"
    np.save(path, _data(5))
    fixed, dynamic = _image_model("x", batch=1), _image_model("y")
    calib = load_calibration(path, _specs(fixed, dynamic))
    session = onnxruntime.InferenceSession(fixed.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = list(calib.batches(0, 64))
    assert len(feeds) == 5 and all(f["x"].shape == (1, 3, 4) for f in feeds)
    assert [session.run(None, f)[0].shape for f in feeds] == [(1, 3, 4)] * 5
    # the dynamic model runs in lockstep with the same samples
    for mine, theirs in zip(calib.batches(0, 64), calib.batches(1, 64)):
        np.testing.assert_array_equal(mine["x"], theirs["y"])


def test_fixed_batch_drops_the_remainder_with_a_warning(tmp_path, caplog):
    path = tmp_path / "calib.npy"
    np.save(path, _data(7))
    with caplog.at_level(logging.WARNING):
        calib = load_calibration(path, _specs(_image_model("x", batch=3)))
    assert "last 1 are dropped" in caplog.text
    assert [f["x"].shape[0] for f in calib.batches(0, 8)] == [3, 3]


def test_max_samples_truncates(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, x=_data(10))
    calib = load_calibration(path, _specs(_image_model()), max_samples=4)
    assert calib.num_samples == 4
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in calib.batches(0, 3)]), _data(4))


def test_batches_feed_the_given_samples_in_order(tmp_path):
    path = tmp_path / "calib.npy"
    np.save(path, _data(10))
    calib = load_calibration(path, _specs(_image_model()))
    picked = np.array([7, 2, 9, 0, 5])
    fed = np.concatenate([f["x"] for f in calib.batches(0, 2, picked)])
    np.testing.assert_array_equal(fed, _data(10)[picked])


def test_shuffled_draws_distinct_samples_reproducibly(tmp_path):
    path = tmp_path / "calib.npy"
    np.save(path, _data(10))
    calib = load_calibration(path, _specs(_image_model()))
    every = calib.shuffled(None, seed=3)
    assert sorted(every) == list(range(10)) and list(every) != list(range(10))
    some = calib.shuffled(4, seed=3)
    assert len(set(some)) == 4 and list(some) == list(calib.shuffled(4, seed=3))
    assert len(calib.shuffled(50, seed=3)) == 10


def test_shuffled_keeps_whole_fixed_batches(tmp_path):
    path = tmp_path / "calib.npy"
    np.save(path, _data(10))
    calib = load_calibration(path, _specs(_image_model("x", batch=3)))
    assert len(calib.shuffled(4, seed=0)) == 6
    assert [f["x"].shape[0] for f in calib.batches(0, 8, calib.shuffled(4, seed=0))] == [3, 3]


def test_shuffled_refuses_no_samples(tmp_path):
    path = tmp_path / "calib.npy"
    np.save(path, _data(10))
    with pytest.raises(CalibrationError, match="at least 1"):
        load_calibration(path, _specs(_image_model())).shuffled(0, seed=0)


def test_float64_data_is_cast_to_float32(tmp_path):
    path = tmp_path / "calib.npy"
    np.save(path, _data(4, np.float64))
    feed = next(load_calibration(path, _specs(_image_model())).batches(0, 4))
    assert feed["x"].dtype == np.float32 and feed["x"].flags.c_contiguous
    np.testing.assert_array_equal(feed["x"], _data(4))


def test_int32_data_is_cast_to_int64(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, ids=np.arange(12, dtype=np.int32).reshape(2, 6))
    model = _model({"ids": (TensorProto.INT64, ["N", 6])})
    assert next(load_calibration(path, _specs(model)).batches(0, 2))["ids"].dtype == np.int64


def _nan_data():
    data = _data()
    data[2, 1, 1] = np.nan
    data[5, 0, 0] = np.nan
    return data


def _inf_data():
    data = _data()
    data[3, 2, 2] = -np.inf
    return data


BAD_INPUTS = {
    "missing-name": ({"a": _data(), "b": _data()}, "no array for input 'x' of model 0 .*arrays found: 'a', 'b'"),
    "wrong-rank": ({"x": _data().reshape(10, 12)}, r"\(rank 2\) but the model expects rank 3"),
    "wrong-dim": ({"x": _data().reshape(10, 4, 3)}, r"axis 1: 4 vs 3"),
    "int-for-float": ({"x": _data(dtype=np.int64)}, "dtype int64 but the model expects float32"),
    "nan": ({"x": _nan_data()}, "2 NaN and 0 Inf"),
    "inf": ({"x": _inf_data()}, "0 NaN and 1 Inf"),
    "empty": ({"x": _data(0)}, "no samples"),
    "overflow": ({"x": _data(dtype=np.float64) * 1e300}, "too large for float32"),
}


@pytest.mark.parametrize("arrays, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise(tmp_path, arrays, message):
    path = tmp_path / "calib.npz"
    np.savez(path, **arrays)
    _assert_refused(path, _specs(_image_model()), message)


def test_float_for_int_input_raises(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, ids=np.zeros((2, 6), np.float32))
    model = _model({"ids": (TensorProto.INT64, ["N", 6])})
    _assert_refused(path, _specs(model), "dtype float32 but the model expects int64")


def test_int_values_out_of_range_raise(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, ids=np.full((2, 6), 2**40, np.int64))
    _assert_refused(path, _specs(_model({"ids": (TensorProto.INT32, ["N", 6])})), "do not fit int32")


def test_differing_sample_counts_raise(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, x=_data(10), ids=np.zeros((9, 7), np.int64))
    model = _model({"x": (TensorProto.FLOAT, ["N", 3, 4]), "ids": (TensorProto.INT64, ["N", 7])})
    _assert_refused(path, _specs(model), "different numbers of samples .*'x': 10, 'ids': 9")


@pytest.mark.parametrize("content", [b"x,y\n1,2\n", b"", b"PK\x03\x04broken zip"], ids=["csv", "empty", "bad-zip"])
def test_not_numpy_files_raise(tmp_path, content):
    path = tmp_path / "calib.npz"
    path.write_bytes(content)
    _assert_refused(path, _specs(_image_model()), "cannot read|not a .npy or .npz")


def test_missing_file_raises(tmp_path):
    _assert_refused(tmp_path / "calib.npz", _specs(_image_model()), "cannot read")


def test_npy_for_two_input_model_raises(tmp_path):
    path = tmp_path / "calib.npy"
    np.save(path, _data())
    model = _model({"x": (TensorProto.FLOAT, ["N", 3, 4]), "ids": (TensorProto.INT64, ["N", 7])})
    _assert_refused(path, _specs(model), "has 2 inputs")


def test_different_fixed_batches_raise(tmp_path):
    path = tmp_path / "calib.npy"
    np.save(path, _data())
    _assert_refused(path, _specs(_image_model("x", batch=1), _image_model("x", batch=2)), "different batch sizes")


def test_fewer_samples_than_fixed_batch_raise(tmp_path):
    path = tmp_path / "calib.npy"
    np.save(path, _data(2))
    _assert_refused(path, _specs(_image_model("x", batch=4)), "at least 4 samples")


def _assert_refused(path, specs, message):
    with pytest.raises(CalibrationError, match=message) as caught:
        load_calibration(path, specs)
    text = str(caught.value)
    assert text.startswith(f"{path}: ") and "\n" not in text and "; " in text


# --- several files: one data set, their samples in file order ---------------------------------

def _shard_files(tmp_path, arrays: dict[str, np.ndarray], cuts=(4, 7), compressed=(False, False, True)) -> list:
    """The arrays cut along axis 0 at ``cuts`` into .npz files (the last compressed by default)."""
    paths = []
    for index, (start, stop) in enumerate(zip((0, *cuts), (*cuts, None))):
        paths.append(tmp_path / f"part{index}.npz")
        (np.savez_compressed if compressed[index] else np.savez)(
            paths[-1], **{name: array[start:stop] for name, array in arrays.items()})
    return paths


def test_several_files_are_one_set_in_file_order(tmp_path):
    ids = np.arange(10 * 7).reshape(10, 7)
    paths = _shard_files(tmp_path, {"x": _data(), "ids": ids, "y": np.arange(10)})
    model = _model({"x": (TensorProto.FLOAT, ["N", 3, 4]), "ids": (TensorProto.INT64, ["N", 7])})
    calib = load_calibration(paths, _specs(model), exclude=("y",))
    assert calib.num_samples == 10 and calib.distinct_samples == 10
    assert calib.path == f"{paths[0]} .. {paths[2]} (3 files)"
    feeds = list(calib.batches(0, 3))  # batches across the files' boundaries
    assert [f["x"].shape[0] for f in feeds] == [3, 3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in feeds]), _data())
    np.testing.assert_array_equal(np.concatenate([f["ids"] for f in feeds]), ids)
    picked = np.array([9, 0, 5, 4, 3])  # samples of every file, in a given order
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in calib.batches(0, 2, picked)]), _data()[picked])
    first = load_calibration(paths, _specs(model), max_samples=6, exclude=("y",))  # the cut falls in file 1
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in first.batches(0, 4)]), _data(6))


def test_files_that_repeat_each_other_count_as_repeated_samples(tmp_path):
    for name in ("a", "b"):
        np.save(tmp_path / f"{name}.npy", _data(6))
    calib = load_calibration([tmp_path / "a.npy", tmp_path / "b.npy"], _specs(_image_model()))
    assert calib.num_samples == 12 and calib.distinct_samples == 6


MISMATCHED = {
    "names": ({"x": _data(), "z": _data()}, "part2.npz: arrays 'x', 'z' where .*part0.npz has 'x'; "),
    "dtype": ({"x": _data(dtype=np.float64)},
              r"part2.npz: array 'x' has dtype float64 and samples of shape \(3, 4\) where .*part0.npz has float32"),
    "sample shape": ({"x": _data().reshape(10, 4, 3)},
                     r"part2.npz: array 'x' has dtype float32 and samples of shape \(4, 3\) where .*part0.npz has "
                     r"float32 and \(3, 4\)"),
    "samples per file": ({"x": _data(), "ids": np.zeros((11, 7), np.int64)},
                         "part2.npz: array 'ids' has 4 samples and array 'x' 3; "),
}


@pytest.mark.parametrize("last, message", MISMATCHED.values(), ids=MISMATCHED.keys())
def test_files_that_disagree_are_refused_naming_the_file_and_the_array(tmp_path, last, message):
    good = {"x": _data(), "ids": np.zeros((10, 7), np.int64)} if "ids" in last else {"x": _data()}
    paths = _shard_files(tmp_path, good)
    np.savez(paths[2], **{name: array[7:] for name, array in last.items()})
    model = _model({name: (TensorProto.FLOAT if name == "x" else TensorProto.INT64, ["N", 3, 4] if name == "x" else
                           ["N", 7]) for name in good})
    with pytest.raises(CalibrationError, match=message) as caught:
        load_calibration(paths, _specs(model))
    assert str(caught.value).startswith(f"{paths[2]}: ") and "\n" not in str(caught.value)


def test_bad_values_name_the_file_that_holds_them(tmp_path):
    paths = _shard_files(tmp_path, {"x": _nan_data()}, cuts=(2, 6))  # samples 2 and 5 in file 1
    with pytest.raises(CalibrationError, match="2 NaN") as caught:
        load_calibration(paths, _specs(_image_model()))
    assert str(caught.value).startswith(f"{paths[1]}: array 'x' has 2 NaN")


def test_more_files_than_the_process_may_open_at_once(tmp_path):
    """Files are mapped only while read: a mapping keeps a file descriptor open."""
    resource = pytest.importorskip("resource")
    paths = []
    for index in range(60):
        paths.append(tmp_path / f"part{index:02d}.npy")
        np.save(paths[-1], _data(60)[index:index + 1])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    opened = len(list(Path("/proc/self/fd").iterdir())) if Path("/proc/self/fd").is_dir() else 64
    resource.setrlimit(resource.RLIMIT_NOFILE, (opened + 30, hard))
    try:
        calib = load_calibration(paths, _specs(_image_model()))
        fed = np.concatenate([f["x"] for f in calib.batches(0, 7)])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    np.testing.assert_array_equal(fed, _data(60))
