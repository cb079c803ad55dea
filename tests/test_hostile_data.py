"""Hostile and broken inputs (issue 14): numeric options out of range, array files that lie
about their size, degenerate calibration data and statistics, undefined CKA, bad test data for
eval and unwritable statistics. Each is refused in one line (what, where, what to do) with an
``OnnxMergeError`` (exit 1), or as a usage error (exit 2) where argparse reads the option."""

from __future__ import annotations

import errno
import io
import json
import logging
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxmerge import api, limits
from onnxmerge.stages import prepare
from onnxmerge.calib.data import check_variation, input_specs, load_calibration
from onnxmerge.calib.files import Mapped
from onnxmerge.calib.stats import CKAStats, SpaceStats, load_stats, save_stats
from onnxmerge.cli import main
from onnxmerge.errors import CalibrationError, OnnxMergeError, RecipeError
from onnxmerge.scoring import load_test_data, parse_tasks
from onnxmerge.io import load_model
from onnxmerge.report import render_alignment

DIGITS = Path(__file__).resolve().parents[1] / "samples" / "digits"
VGG_A, VGG_B, VGG_A_DEEP = (str(DIGITS / f"{n}.onnx") for n in ("vgg_a", "vgg_b", "vgg_a_deep"))
RESNET_A, RESNET_B, RESNET_B_WIDE = (str(DIGITS / f"{n}.onnx") for n in ("resnet_a", "resnet_b", "resnet_b_wide"))
CALIB, TEST = str(DIGITS / "calib.npz"), str(DIGITS / "test.npz")


def _one_line_error(capsys, *phrases: str) -> str:
    error = capsys.readouterr().err
    assert error.startswith("onnxmerge: error: ") and error.count("\n") == 1, error
    assert "Traceback" not in error
    for phrase in phrases:
        assert phrase in error, error
    return error


def _usage_error(capsys, argv: list[str], *phrases: str) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and "error: argument" in error
    for phrase in phrases:
        assert phrase in error, error


# --- 1. numeric options ------------------------------------------------------------------------

USAGE = {
    "factor-inf": (["widen", "A", "-o", "W", "--factor", "inf"], "--factor"),
    "factor-nan": (["widen", "A", "-o", "W", "--factor", "nan"], "--factor"),
    "factor-1e4": (["widen", "A", "-o", "W", "--factor", "1e4"], "--factor"),
    "width-nan": (["merge", "A", "B", "-o", "W", "--width", "nan"], "--width"),
    "width-inf": (["merge", "A", "B", "-o", "W", "--width", "inf"], "--width"),
    "seed-merge": (["merge", "A", "B", "-o", "W", "--seed", "-1"], "--seed"),
    "seed-permute": (["permute", "A", "-o", "W", "--seed", "-1"], "--seed"),
    "blocks-0": (["deepen", "A", "-o", "W", "--blocks", "0"], "--blocks"),
    "batch-size-0": (["merge", "A", "B", "-o", "W", "--batch-size", "0"], "--batch-size"),
    "batch-size-neg": (["calibrate", "A", "B", "--calib", "C", "-o", "W", "--batch-size", "-1"], "--batch-size"),
    "max-samples-0": (["align", "A", "B", "--max-samples", "0"], "--max-samples"),
    "max-loss-high": (["merge", "A", "B", "-o", "W", "--max-loss", "1.5"], "--max-loss"),
    "max-loss-low": (["merge", "A", "B", "-o", "W", "--max-loss", "-0.1"], "--max-loss"),
    "alpha-nan": (["merge", "A", "B", "-o", "W", "--alpha", "nan"], "--alpha"),
    "beta-nan": (["merge", "A", "B", "-o", "W", "--beta", "nan"], "--beta"),
}


@pytest.mark.parametrize("argv, option", USAGE.values(), ids=USAGE.keys())
def test_numeric_options_out_of_range_are_usage_errors(capsys, argv, option):
    _usage_error(capsys, argv, f"argument {option}")


API_OPTIONS = {
    "alpha-nan-weight": dict(method="weight", alpha=float("nan")),
    "beta-inf": dict(beta=float("inf")),
    "width-nan": dict(width=float("nan")),
    "width-inf": dict(width=float("inf")),
    "seed": dict(seed=-1),
    "batch-size": dict(batch_size=0),
    "max-samples": dict(max_samples=0),
    "max-loss": dict(max_loss=2.0),
    "max-loss-nan": dict(max_loss=float("nan")),
}


@pytest.mark.parametrize("fields", API_OPTIONS.values(), ids=API_OPTIONS.keys())
def test_the_api_refuses_options_out_of_range_before_any_work(fields):
    option = "--" + next(iter(k for k in fields if k != "method")).replace("_", "-")
    for call in (lambda o: api.merge([VGG_A, VGG_B], options=o),
                 lambda o: api.calibrate([VGG_A, VGG_B], CALIB, options=o),
                 lambda o: api.align([VGG_A_DEEP, VGG_B], None, options=o)):
        with pytest.raises(RecipeError, match=option) as caught:
            call(api.MergeOptions(**fields))
        assert "\n" not in str(caught.value)


def test_rewrites_refuse_bad_factors_seeds_and_blocks():
    model = load_model(VGG_A)
    for factor in (float("inf"), float("nan"), 1e4, 0.5):
        with pytest.raises(RecipeError, match="--factor"):
            api.widen(model, factor=factor)
    with pytest.raises(RecipeError, match="--seed"):
        api.permute(model, seed=-1)
    with pytest.raises(RecipeError, match="--seed"):
        api.widen(model, factor=2, seed=-1)


def test_a_widening_larger_than_the_memory_is_refused_before_allocating(monkeypatch):
    model = load_model(VGG_A)
    monkeypatch.setattr(limits, "available_memory", lambda: 64 << 30)  # the same on any machine
    with pytest.raises(RecipeError, match=r"--factor 1000 would need about [\d.]+ TiB of memory and 64.0 GiB"):
        api.widen(model, factor=1000)  # 1.2 TiB: refused from the shapes, nothing allocated
    monkeypatch.setattr(limits, "available_memory", lambda: 1 << 20)
    with pytest.raises(RecipeError, match=r"would need about [\d.]+ [MK]iB of memory and 1.0 MiB is available; use a smaller"):
        api.widen(model, factor=2)


def test_deepen_inserts_at_most_a_few_blocks_per_block(tmp_path, capsys):
    out = tmp_path / "deep.onnx"
    assert main(["deepen", RESNET_A, "-o", str(out), "--blocks", "1000000"]) == 1
    _one_line_error(capsys, "--blocks 1000000", "insert at most", "run deepen again")
    assert not out.exists()
    with pytest.raises(RecipeError, match="at most 40"):  # 5 blocks in the stages it can deepen
        api.deepen(load_model(RESNET_A), blocks=41)


def test_calibrate_requires_calib_and_says_so_in_its_help(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    usage = capsys.readouterr().out
    assert " --calib DATA [DATA ...]" in usage and "[--calib DATA" not in usage
    with pytest.raises(SystemExit) as exited:
        main(["calibrate", VGG_A, VGG_B, "-o", str(tmp_path / "s.npz")])
    assert exited.value.code == 2 and "--calib" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    assert "[--calib DATA [DATA ...]]" in capsys.readouterr().out  # merge keeps it optional


# --- 2. array files ----------------------------------------------------------------------------

def _npy_header(shape, descr="<f4") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _zip_bomb(path, gib: int = 2) -> None:
    """A real .npz zip bomb of about ``gib`` MB: one deflated member that expands to ``gib`` GiB
    of zeros (a block of 1 MiB of zeros, flushed so it can be repeated, written ``gib`` * 1024 times)."""
    size = gib << 30
    header = _npy_header((size // 4,))
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    start = packer.compress(header) + packer.flush(zlib.Z_FULL_FLUSH)
    block = packer.compress(bytes(1 << 20)) + packer.flush(zlib.Z_FULL_FLUSH)
    body = start + block * (size >> 20) + packer.flush()
    name, total = b"input.npy", len(header) + size
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0, 0, len(body), total, len(name), 0) + name
    central = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, 0, len(body), total, len(name),
                          0, 0, 0, 0, 0, 0) + name
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central), len(local) + len(body), 0)
    Path(path).write_bytes(local + body + central + end)


def _member_file(path, content: bytes, name: str = "input.npy", compression=zipfile.ZIP_STORED, extra=None) -> None:
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr(name, content)
        for key, array in (extra or {}).items():
            buffer = io.BytesIO()
            np.save(buffer, array)
            archive.writestr(f"{key}.npy", buffer.getvalue())


def _pickle_member() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return buffer.getvalue()


HOSTILE_FILES = {
    "npy-2^46": (lambda p: p.write_bytes(_npy_header((2**46,)) + bytes(64)), ".npy", "declares 70368744177664 elements"),
    "npz-2^46": (lambda p: _member_file(p, _npy_header((2**46,)) + bytes(64)), ".npz", "declares 70368744177664"),
    "npz-2^46-deflated": (lambda p: _member_file(p, _npy_header((2**46,)) + bytes(64), compression=zipfile.ZIP_DEFLATED),
                          ".npz", "declares 70368744177664"),
    "zip-bomb": (_zip_bomb, ".npz", "a zip bomb"),
    "pickle": (lambda p: _member_file(p, _pickle_member()), ".npz", "a pickle, which onnxmerge never loads"),
    "not-an-array": (lambda p: _member_file(p, b"just some text"), ".npz", "is not a numpy array"),
}


@pytest.mark.parametrize("make, suffix, message", HOSTILE_FILES.values(), ids=HOSTILE_FILES.keys())
def test_hostile_array_files_are_refused_from_their_headers(tmp_path, make, suffix, message):
    path = tmp_path / f"calib{suffix}"
    make(path)
    specs = [input_specs(load_model(VGG_A))]
    with pytest.raises(CalibrationError, match=message) as caught:
        load_calibration(path, specs)
    assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)


def test_the_zip_bomb_is_small_and_refused_in_one_line_by_merge(tmp_path, capsys):
    _zip_bomb(tmp_path / "bomb.npz")
    assert (tmp_path / "bomb.npz").stat().st_size < 3 << 20
    assert main(["merge", VGG_A, VGG_B, "--calib", str(tmp_path / "bomb.npz"), "-o", str(tmp_path / "m.onnx")]) == 1
    _one_line_error(capsys, "expands from", "2.0 GiB", "numpy.savez")


def test_a_compressed_member_larger_than_half_the_memory_is_refused(tmp_path, monkeypatch):
    np.savez_compressed(tmp_path / "calib.npz", input=np.random.default_rng(0).standard_normal((64, 1, 8, 8)))
    monkeypatch.setattr("onnxmerge.calib.arrays.available_memory", lambda: 16 << 10)
    with pytest.raises(CalibrationError, match="more than half the 16.0 KiB of memory available; save it uncompressed"):
        load_calibration(tmp_path / "calib.npz", [input_specs(load_model(VGG_A))])


def test_statistics_and_test_files_are_read_as_carefully(tmp_path):
    path = tmp_path / "huge.npz"
    _member_file(path, _npy_header((2**46,)) + bytes(64), name="y.npy",
                 extra={"input": np.zeros((4, 1, 8, 8), np.float32)})
    with pytest.raises(CalibrationError, match="declares 70368744177664"):
        load_stats(path)
    with pytest.raises(CalibrationError, match="declares 70368744177664"):
        load_test_data(str(path), [input_specs(load_model(VGG_A))])


def test_uncompressed_npz_members_are_memory_mapped_and_compressed_ones_read(tmp_path):
    x = np.random.default_rng(0).standard_normal((40, 1, 8, 8)).astype(np.float32)
    specs = [input_specs(load_model(VGG_A))]
    np.savez(tmp_path / "plain.npz", input=x, y=np.arange(40) % 10)
    np.savez_compressed(tmp_path / "packed.npz", input=x, y=np.arange(40) % 10)
    plain, labels = load_test_data(str(tmp_path / "plain.npz"), specs)
    packed, _ = load_test_data(str(tmp_path / "packed.npz"), specs)
    assert isinstance(plain._arrays.get("input"), Mapped)  # mapped while read
    assert isinstance(packed._arrays.get("input"), np.ndarray)
    for calib in (plain, packed):
        np.testing.assert_array_equal(np.concatenate([f["input"] for f in calib.batches(0, 16)]), x)
    np.testing.assert_array_equal(labels, np.arange(40) % 10)


# --- 3. degenerate calibration data and statistics ---------------------------------------------

@pytest.mark.parametrize("value", [0.0, 0.5])
def test_constant_calibration_data_is_refused(tmp_path, capsys, value):
    np.savez(tmp_path / "calib.npz", input=np.full((500, 1, 8, 8), value, np.float32))
    out = tmp_path / "m.onnx"
    assert main(["merge", VGG_A, VGG_B, "--calib", str(tmp_path / "calib.npz"), "-o", str(out)]) == 1
    _one_line_error(capsys, "the data is constant", f"all {value}", "give real input samples")
    assert not out.exists()


def test_too_few_distinct_samples_are_refused_unless_allowed(tmp_path):
    x = np.load(CALIB)["input"]
    np.savez(tmp_path / "calib.npz", input=np.tile(x[:3], (100, 1, 1, 1)))
    with pytest.raises(CalibrationError, match="only 3 distinct samples among 300 .*--allow-few-samples"):
        api.calibrate([VGG_A, VGG_B], str(tmp_path / "calib.npz"))
    stats, meta = api.calibrate([VGG_A, VGG_B], str(tmp_path / "calib.npz"), allow_few_samples=True)
    assert meta["samples"] == "300" and stats


def test_a_constant_float_input_beside_varying_ones_warns(tmp_path, caplog):
    values = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in ("x", "scale")]
    graph = helper.make_graph([helper.make_node("Mul", ["x", "scale"], ["y"])], "g", values,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(0).standard_normal((32, 3)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x, scale=np.ones((32, 3), np.float32))
    calib = load_calibration(tmp_path / "calib.npz", [input_specs(model)])
    with caplog.at_level(logging.WARNING):
        check_variation(calib)
    assert "array 'scale' is all 1.0 while the other inputs vary" in caplog.text
    np.savez(tmp_path / "calib.npz", x=np.zeros((32, 3), np.float32), scale=np.ones((32, 3), np.float32))
    with pytest.raises(CalibrationError, match="constant .*array 'x' is all 0.0, array 'scale' is all 1.0"):
        check_variation(load_calibration(tmp_path / "calib.npz", [input_specs(model)]))


def _stats(**change) -> dict:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 3))
    space = SpaceStats.empty((2, 1))
    space.update([x[:, :2], x[:, 2:]])
    for name, value in change.items():
        setattr(space, name, value)
    return {"t:1": space}


BAD_STATS = {
    "nan-sum": (dict(sum=np.array([np.nan, 0.0, 1.0])), "NaN or infinite values in its sum"),
    "inf-outer": (dict(outer=np.full((3, 3), np.inf)), "NaN or infinite values in its outer"),
    "count-0": (dict(count=0), "count 0 and widths .* must be positive"),
    "negative-variance": (dict(outer=np.zeros((3, 3))), "negative variances"),
    "constant": (dict(count=10, sum=np.full(3, 10.0), outer=np.full((3, 3), 10.0)), "no feature varies"),
}


@pytest.mark.parametrize("change, message", BAD_STATS.values(), ids=BAD_STATS.keys())
def test_statistics_files_are_validated_like_calibration_data(tmp_path, change, message):
    path = tmp_path / "stats.npz"
    save_stats(path, _stats(**change), {"fingerprint": "f"})
    with pytest.raises(CalibrationError, match=message) as caught:
        load_stats(path)
    assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)
    save_stats(path, _stats(), {"fingerprint": "f"})
    assert list(load_stats(path)[0]) == ["t:1"]


def test_merge_refuses_a_statistics_file_with_nan_in_one_line(tmp_path, capsys):
    stats_path = tmp_path / "s.npz"
    assert main(["calibrate", VGG_A, VGG_B, "--calib", CALIB, "-o", str(stats_path)]) == 0
    stats, meta = load_stats(stats_path)
    next(iter(stats.values())).outer[0, 0] = np.nan
    save_stats(stats_path, stats, meta)
    capsys.readouterr()
    assert main(["merge", VGG_A, VGG_B, "--stats", str(stats_path), "-o", str(tmp_path / "m.onnx")]) == 1
    _one_line_error(capsys, "s.npz", "NaN or infinite", "recompute it with onnxmerge calibrate")


# --- 4. CKA ------------------------------------------------------------------------------------

def test_cka_of_a_tensor_that_does_not_vary_is_undefined_and_the_rest_in_0_1():
    rng = np.random.default_rng(0)
    stats = CKAStats(3)
    for _ in range(3):
        x = rng.standard_normal((64, 16))
        stats.update([x, x @ rng.standard_normal((16, 16)), np.tile(np.abs(rng.standard_normal(16)) + 5, (64, 1))])
    cka = stats.cka()
    assert np.isnan(cka[2]).all() and np.isnan(cka[:, 2]).all()
    assert ((cka[:2, :2] >= 0) & (cka[:2, :2] <= 1)).all() and cka[0, 0] == 1.0


def test_align_refuses_undefined_cka_and_suggests_a_data_free_alignment(tmp_path, monkeypatch):
    np.savez(tmp_path / "calib.npz", input=np.zeros((64, 1, 8, 8), np.float32))
    monkeypatch.setattr(prepare, "check_variation", lambda *args, **kwargs: None)  # as if the data looked varied
    with pytest.raises(CalibrationError, match="CKA is undefined for .*vgg_a_deep.onnx blocks 0, .*--method uniform") as caught:
        api.align([VGG_A_DEEP, VGG_B], str(tmp_path / "calib.npz"))
    assert "\n" not in str(caught.value) and "--align uniform" in str(caught.value)
    alignment = api.align([VGG_A_DEEP, VGG_B], str(tmp_path / "calib.npz"), align="uniform")
    assert alignment.method == "uniform"


def test_align_on_constant_data_prints_no_cka_values(tmp_path, capsys):
    np.savez(tmp_path / "calib.npz", input=np.zeros((64, 1, 8, 8), np.float32))
    assert main(["align", VGG_A_DEEP, VGG_B, "--calib", str(tmp_path / "calib.npz")]) == 1
    _one_line_error(capsys, "the data is constant")


def test_undefined_cka_is_shown_as_undefined():
    report = {"method": "sma", "deep": "d", "units": {"d": 2, "s": 1}, "stages": {"d": [2], "s": [1]},
              "maps": {"s": [{"stage": 0, "deep_units": [0, 1], "map": [0, None], "objective": 0.5}]},
              "cka": {"s": [[0.5], [None]]}}
    text = render_alignment(report)
    assert "undef" in text and "CKA undefined" in text
    json.dumps(report, allow_nan=False)


# --- 5. eval -----------------------------------------------------------------------------------

def _test_file(tmp_path, **change):
    data = dict(np.load(TEST))
    data.update(change)
    np.savez(tmp_path / "test.npz", **{k: v for k, v in data.items() if v is not None})
    return str(tmp_path / "test.npz")


def _nan_model(path) -> str:
    """Scores sqrt(x) of the first 5 pixels: NaN for negative pixels."""
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]),
         helper.make_node("Slice", ["flat", "start", "stop", "axis"], ["five"]),
         helper.make_node("Sqrt", ["five"], ["scores"])], "nan",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("start", 0), ("stop", 5), ("axis", 1))])
    from onnx import save
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def _x():
    return np.load(TEST)["input"]


def _labels():
    return np.load(TEST)["y"]


EVAL_CASES = {
    "nan-inputs": (lambda: dict(input=np.where(np.arange(64).reshape(1, 1, 8, 8) == 3, np.nan, _x())),
                   ["450 NaN and 0 Inf"]),
    "nan-labels": (lambda: dict(y=np.where(np.arange(450) == 7, np.nan, _labels().astype(np.float64))),
                   ["labels array 'y' has 1 NaN"]),
    "fraction-labels": (lambda: dict(y=_labels() + 0.5), ["holds fractions"]),
    "negative-labels": (lambda: dict(y=_labels() - 1), ["negative classes (e.g. -1)"]),
    "labels-of-no-head": (lambda: dict(y=_labels() + 100), ["none of the labels (classes 100-109)", "--tasks"]),
    "short-labels": (lambda: dict(y=_labels()[:449]), ["449 labels in 'y' for 450 input samples"]),
    "one-hot-labels": (lambda: dict(y=np.eye(10)[_labels()]), ["shape (450, 10)", "not one-hot"]),
    "no-samples": (lambda: dict(input=_x()[:0], y=_labels()[:0]), ["no samples"]),
    "int-inputs": (lambda: dict(input=(_x() * 16).astype(np.int64)), ["dtype int64 but the model expects float32"]),
    "wrong-rank": (lambda: dict(input=_x().reshape(450, 64)), ["rank 2", "expects rank 4"]),
    "no-inputs": (lambda: dict(input=None), ["no input arrays besides the labels"]),
}


@pytest.mark.parametrize("change, phrases", EVAL_CASES.values(), ids=EVAL_CASES.keys())
def test_eval_refuses_bad_test_data_in_one_line(tmp_path, capsys, change, phrases):
    path = _test_file(tmp_path, **change())
    assert main(["eval", VGG_A, "--data", path, "--tasks", "0-4"]) == 1
    _one_line_error(capsys, *phrases)


def test_eval_refuses_a_plain_npy_and_nan_scores(tmp_path, capsys):
    np.save(tmp_path / "test.npy", _x())
    assert main(["eval", VGG_A, "--data", str(tmp_path / "test.npy")]) == 1
    _one_line_error(capsys, "test.npy: a .npy holds one array, but eval needs the inputs and the labels")
    nan = _nan_model(tmp_path / "nan.onnx")
    assert main(["eval", nan, "--data", _test_file(tmp_path, input=_x() - 1.0), "--tasks", "0-4"]) == 1
    _one_line_error(capsys, "nan.onnx: output 'scores' is NaN for", "of the 450 test samples")


def test_eval_scores_every_task_when_tasks_share_classes(capsys):
    assert main(["eval", RESNET_A, RESNET_B, RESNET_B_WIDE, "--data", TEST, "--tasks", "0-4,5-9,5-9", "--ensemble",
                 "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert list(row["tasks"]) == ["0-4", "5-9 (head 1)", "5-9 (head 2)"]
    assert row["average"] == pytest.approx(np.mean(list(row["tasks"].values())))


@pytest.mark.parametrize("text, message", [("0-4+3,5-9", "lists class 3 twice"), ("4-0", "cannot read '4-0'"),
                                           ("0-4,5-9+7", "lists class 7 twice")])
def test_parse_tasks_refuses_repeated_classes_and_empty_ranges(text, message):
    with pytest.raises(RecipeError, match=message):
        parse_tasks(text)


def test_eval_results_are_the_same_streamed_from_any_file_layout(tmp_path):
    data = dict(np.load(TEST))
    np.savez_compressed(tmp_path / "packed.npz", **data)
    rows = [api.evaluate([VGG_A, VGG_B], path, tasks="0-4,5-9", ensemble=True)
            for path in (TEST, str(tmp_path / "packed.npz"))]
    assert rows[0] == rows[1] and rows[0][0]["samples"] == 450


# --- 6. outputs of calibrate -------------------------------------------------------------------

def test_statistics_into_a_folder_or_a_full_disk_fail_in_one_line(tmp_path, capsys, monkeypatch):
    with pytest.raises(OnnxMergeError, match="cannot write the statistics"):
        save_stats(tmp_path, _stats(), {})  # a folder, when the command's early check is bypassed
    out = tmp_path / "s.npz"
    assert main(["calibrate", VGG_A, VGG_B, "--calib", CALIB, "-o", str(tmp_path)]) == 1
    _one_line_error(capsys, "is a folder")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    assert main(["calibrate", VGG_A, VGG_B, "--calib", CALIB, "-o", str(out)]) == 1
    _one_line_error(capsys, "cannot write the statistics", "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_statistics_file_with_an_asymmetric_second_moment_is_refused(tmp_path):
    """A sum of x x^T is symmetric: a file where it is not was damaged or forged."""
    space = SpaceStats.empty((2, 2))
    x = np.random.default_rng(0).standard_normal((32, 4))
    space.update([x[:, :2], x[:, 2:]])
    space.outer[0, 1] += 1e3
    save_stats(tmp_path / "s.npz", {"t:1": space}, {"fingerprint": "x"})
    with pytest.raises(CalibrationError, match="not symmetric"):
        load_stats(tmp_path / "s.npz")
