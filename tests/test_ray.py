"""--ray: calibration statistics computed in shards on Ray workers equal those of one process
(within 1e-9 relative), and a merge from them is the same model, byte for byte (docs/scale.md).

The tests that run Ray share one local instance with two workers (``num_cpus=2``), started once
for the module; onnxmerge uses an instance the caller started and leaves it running. They are
skipped only where Ray is not installed (the ``dev`` extra installs it)."""

from __future__ import annotations

import importlib.util
import logging
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

import onnxmerge
from onnxmerge import cli
from onnxmerge.calib.data import input_specs, load_calibration
from onnxmerge.calib.distributed import _import_failure, check_weight_files, shard_ranges
from onnxmerge.calib.stats import Statistics, load_stats
from onnxmerge.errors import CalibrationError

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "samples" / "digits"
PAIR = [str(DIGITS / "resnet_a.onnx"), str(DIGITS / "resnet_b.onnx")]
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed: pip install 'onnxmerge[ray]' (the dev extra has it)")


@pytest.fixture(scope="module")
def samples() -> np.ndarray:
    return np.load(DIGITS / "calib.npz")["input"][:128]


@pytest.fixture(scope="module")
def cluster():
    """One local Ray instance with two workers for the module."""
    import ray

    handler = signal.getsignal(signal.SIGTERM)
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
    signal.signal(signal.SIGTERM, handler)  # Ray sets its own; the other tests expect pytest's
    yield ray
    ray.shutdown()


def _assert_same_statistics(single: Statistics, distributed: Statistics) -> None:
    assert set(single) == set(distributed)
    for key, expected in single.items():
        got = distributed[key]
        assert got.count == expected.count and got.widths == expected.widths, key
        for field in ("sum", "outer"):
            want, have = getattr(expected, field), getattr(got, field)
            scale = np.abs(want).max()
            assert np.abs(have - want).max() <= 1e-9 * scale, (key, field)
    # REPAIR's source moments, measured by the same tasks and pooled in shard order
    assert [list(model) for model in single.moments] == [list(model) for model in distributed.moments]
    for mine, theirs in zip(single.moments, distributed.moments):
        for tensor, expected in mine.items():
            assert theirs[tensor].count == expected.count, tensor
            np.testing.assert_allclose(theirs[tensor].mean, expected.mean, rtol=1e-9, atol=1e-12, err_msg=tensor)
            np.testing.assert_allclose(theirs[tensor].m2, expected.m2, rtol=1e-9, err_msg=tensor)


@needs_ray
@pytest.mark.parametrize("batch_size, shards", [(16, None), (24, 3), (64, 5)])
def test_statistics_on_two_workers_equal_those_of_one_process(cluster, samples, batch_size, shards):
    """Default shards (one per CPU: 2 of 64 samples), 3 shards of unequal length with a last
    partial batch, and more shards asked for than there are batches (2)."""
    single, single_meta = onnxmerge.calibrate(PAIR, samples, batch_size=batch_size)
    stats, meta = onnxmerge.calibrate(PAIR, samples, batch_size=batch_size, ray="local", ray_shards=shards)
    _assert_same_statistics(single, stats)
    assert meta == single_meta  # fingerprint, provider, samples


@needs_ray
def test_workers_reading_shard_files_themselves_give_the_statistics_of_one_process(cluster, samples, tmp_path):
    """Three files (the last compressed), each task reading its samples from them (shared
    storage), in shards that cross the files' boundaries."""
    paths = [tmp_path / f"part{i}.npz" for i in range(3)]
    for path, part, save in zip(paths, np.split(samples, [40, 90]), (np.savez, np.savez, np.savez_compressed)):
        save(path, input=part)
    single, single_meta = onnxmerge.calibrate(PAIR, samples, batch_size=16)
    stats, meta = onnxmerge.calibrate(PAIR, paths, batch_size=16, ray="local", ray_shards=3)
    _assert_same_statistics(single, stats)
    assert meta == single_meta


@needs_ray
def test_workers_read_mapped_weights_from_their_files(cluster, samples, tmp_path, monkeypatch):
    """Models saved with external data keep their weights in their files (onnxmerge.weights):
    the tasks read them from the same paths, as from shared storage."""
    from onnxmerge import io, weights
    monkeypatch.setattr(weights, "MAPPED_MIN_BYTES", 4096)
    paths = [tmp_path / f"m{k}.onnx" for k in range(2)]
    for source, path in zip(PAIR, paths):
        io.save_model(io.load_model(source), path, external_data=True)
    assert weights.has_mapped(io.load_model(paths[0]))
    single, _ = onnxmerge.calibrate(paths, samples, batch_size=32)
    stats, _ = onnxmerge.calibrate(paths, samples, batch_size=32, ray="local")
    _assert_same_statistics(single, stats)
    models = [io.load_model(path) for path in paths]
    Path(f"{paths[1]}.data").rename(tmp_path / "elsewhere.data")  # as on a node that does not mount it
    with pytest.raises(CalibrationError, match="a Ray worker cannot read .*m1.onnx.data: the weights"):
        check_weight_files(models)  # what each task checks first


@needs_ray
def test_a_merge_on_ray_is_the_same_model_byte_for_byte(cluster, samples):
    single = onnxmerge.merge(PAIR, samples, batch_size=32)
    distributed = onnxmerge.merge(PAIR, samples, batch_size=32, ray="local")
    assert distributed.model.SerializeToString() == single.model.SerializeToString()
    assert distributed.recipe.to_yaml() == single.recipe.to_yaml()  # where it ran is not recorded
    assert not {"ray", "ray_shards"} & set(yaml.safe_load(distributed.recipe.to_yaml())["options"])
    assert distributed.report["options"]["ray"] == "local"  # the report says how it ran
    assert cluster.is_initialized()  # the caller's instance is left running


@needs_ray
def test_the_cli_merges_and_calibrates_on_ray_into_the_same_files(cluster, tmp_path, capsys):
    calib = tmp_path / "calib.npy"
    np.save(calib, np.load(DIGITS / "calib.npz")["input"][:128])  # memory-mapped: each shard reads its rows
    common = [*PAIR, "--calib", str(calib), "--batch-size", "16"]
    assert cli.main(["merge", *common, "-o", str(tmp_path / "one.onnx")]) == 0
    assert cli.main(["merge", *common, "-o", str(tmp_path / "ray.onnx"), "--ray", "--ray-shards", "3"]) == 0
    assert (tmp_path / "ray.onnx").read_bytes() == (tmp_path / "one.onnx").read_bytes()
    recipe = yaml.safe_load((tmp_path / "ray.onnx.recipe.yaml").read_text())
    assert "ray" not in recipe["options"] and "ray_shards" not in recipe["options"]
    assert cli.main(["calibrate", *common, "-o", str(tmp_path / "one.npz")]) == 0
    assert cli.main(["calibrate", *common, "-o", str(tmp_path / "ray.npz"), "--ray", "local"]) == 0
    _assert_same_statistics(load_stats(tmp_path / "one.npz")[0], load_stats(tmp_path / "ray.npz")[0])
    assert cluster.is_initialized()
    assert "error" not in capsys.readouterr().err


@needs_ray
def test_a_recipe_may_ask_for_ray_and_the_one_it_writes_does_not(cluster, tmp_path, samples):
    np.savez(tmp_path / "calib.npz", input=samples)
    (tmp_path / "mine.yaml").write_text(
        f"models: [{PAIR[0]}, {PAIR[1]}]\ncalibration: calib.npz\noutput: mine.onnx\n"
        "options:\n  ray: local\n  ray_shards: 2\n  batch_size: 32\n")
    assert cli.main(["run", str(tmp_path / "mine.yaml")]) == 0
    written = yaml.safe_load((tmp_path / "mine.onnx.recipe.yaml").read_text())
    assert "ray" not in written["options"] and written["options"]["batch_size"] == 32
    single = onnxmerge.merge(PAIR, str(tmp_path / "calib.npz"), batch_size=32)
    assert onnx.load(tmp_path / "mine.onnx").SerializeToString() == single.model.SerializeToString()


@needs_ray
def test_cuda_on_a_cluster_without_gpus_is_refused(cluster, samples):
    with pytest.raises(onnxmerge.CalibrationError, match="no GPU"):
        onnxmerge.calibrate(PAIR, samples, ray="local", provider="cuda")


@needs_ray
def test_a_command_starts_its_own_ray_and_an_address_where_nothing_listens_is_one_line(tmp_path):
    """In a process of its own: --ray starts a local instance and shuts it down; a wrong address
    fails at once (Ray would retry for minutes)."""
    script = ("import sys\nfrom onnxmerge.cli import main\n"
              f"code = main(['calibrate', *{PAIR!r}, '--calib', {str(DIGITS / 'calib.npz')!r}, '--max-samples', '64',"
              f" '-o', {str(tmp_path / 's.npz')!r}, '--ray'])\n"
              "import ray\nassert not ray.is_initialized(), 'left running'\n"
              f"code2 = main(['calibrate', *{PAIR!r}, '--calib', {str(DIGITS / 'calib.npz')!r},"
              f" '-o', {str(tmp_path / 't.npz')!r}, '--ray', '127.0.0.1:9'])\n"
              "print(code, code2)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "0 1"
    assert (tmp_path / "s.npz").exists() and not (tmp_path / "t.npz").exists()
    errors = [line for line in done.stderr.splitlines() if line.startswith("onnxmerge: error:")]
    assert len(errors) == 1 and "nothing answers at 127.0.0.1:9" in errors[0], done.stderr[-3000:]


# What follows needs no Ray.

def test_without_ray_the_cli_says_which_extra_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as where it is not installed
    code = cli.main(["calibrate", *PAIR, "--calib", str(DIGITS / "calib.npz"), "-o", str(tmp_path / "s.npz"), "--ray"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "pip install 'onnxmerge[ray]'" in err, err
    assert not (tmp_path / "s.npz").exists()


@pytest.mark.parametrize("argv, words", [
    (["merge", "--ray", *PAIR, "-o", "m.onnx"], "put --ray after the models"),
    (["merge", *PAIR, "-o", "m.onnx", "--ray-shards", "2"], "add --ray"),
])
def test_ray_options_that_cannot_work_are_one_line(tmp_path, monkeypatch, capsys, argv, words):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err


def test_shards_are_at_least_one(samples, capsys):
    with pytest.raises(SystemExit) as usage:
        cli.main(["calibrate", *PAIR, "--calib", str(DIGITS / "calib.npz"), "-o", "s.npz", "--ray", "--ray-shards", "0"])
    assert usage.value.code == 2 and "--ray-shards: 0 is out of range" in capsys.readouterr().err
    with pytest.raises(onnxmerge.RecipeError, match="--ray-shards"):
        onnxmerge.calibrate(PAIR, samples, ray="local", ray_shards=0)


def test_shards_are_whole_batches_that_cover_the_samples():
    def ranges(count, batch, shards, fixed=None):
        shape = (fixed, 1, 8, 8)
        model = onnx.helper.make_model(onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, shape)]))
        calib = load_calibration({"": np.zeros((count, 1, 8, 8), np.float32)}, [input_specs(model)])
        return shard_ranges(calib, batch, shards)

    assert ranges(128, 16, 2) == [(0, 64), (64, 128)]
    assert ranges(128, 24, 3) == [(0, 48), (48, 96), (96, 128)]  # 6 batches, the last of 8 samples
    assert ranges(100, 16, 3) == [(0, 48), (48, 80), (80, 100)]  # 7 batches: 3, 2, 2
    assert ranges(128, 64, 5) == [(0, 64), (64, 128)]  # no empty shard
    assert ranges(70, 64, 4, fixed=8) == [(0, 16), (16, 32), (32, 48), (48, 70)]  # batches of 8, the last 6 dropped


def _numbered(count: int, start: int = 0) -> np.ndarray:
    """Samples for the digits models whose first value is 64 times their index (from ``start``)."""
    return np.arange(start * 64, (start + count) * 64, dtype=np.float64).reshape(count, 1, 8, 8)


def _first_values(shard, batch_size: int = 1) -> list[int]:
    return [int(value) // 64 for batch in shard.batches(0, batch_size) for value in batch["input"][:, 0, 0, 0]]


def test_a_shard_of_files_is_their_paths_and_ranges_and_is_read_where_it_runs(tmp_path):
    paths = [tmp_path / "big.npy", tmp_path / "more.npy"]
    np.save(paths[0], _numbered(4000))
    np.save(paths[1], _numbered(1000, 4000))
    specs = [input_specs(onnx.load(p)) for p in PAIR]
    calib = load_calibration([str(p) for p in paths], specs)
    shard = pickle.loads(pickle.dumps(calib.shard(3950, 4060)))  # as a Ray task receives it
    assert len(pickle.dumps(calib.shard(3950, 4060))) < 2048  # paths and ranges, not 110 x 512 bytes of samples
    assert shard.num_samples == 110 and shard.path == f"{paths[0]} [samples 3950:] .. {paths[1]} [samples :60] (2 files)"
    first = next(shard.batches(1, 64))["input"]
    assert first.dtype == np.float32 and first[0, 0, 0, 0] == 3950 * 64  # cast as the set casts
    assert _first_values(shard, 64) == list(range(3950, 4060))
    subset = calib.subset(np.array([4005, 3, 7, 1])).shard(1, 3)  # a subset's rows, in its order
    assert _first_values(pickle.loads(pickle.dumps(subset))) == [3, 7]


def test_a_shard_of_arrays_in_memory_holds_its_rows_only():
    specs = [input_specs(onnx.load(p)) for p in PAIR]
    shard = load_calibration({"": _numbered(4000)}, specs).shard(1000, 1100)
    assert len(pickle.dumps(shard)) < 100 * 64 * 8 + 4096 and _first_values(shard) == list(range(1000, 1100))


@pytest.mark.parametrize("change, words", [
    (lambda path: path.rename(path.with_suffix(".gone")), "cannot read (No such file or directory)"),
    (lambda path: np.save(path, _numbered(99)), "bytes where the driver read"),
    (lambda path: np.save(path, _numbered(100).reshape(50, 1, 16, 8)), "has dtype float64 and shape (50, 1, 16, 8)"),
])
def test_a_worker_that_does_not_see_the_files_the_driver_read_says_so(tmp_path, change, words):
    path = tmp_path / "calib.npy"
    np.save(path, _numbered(100))
    shard = load_calibration(str(path), [input_specs(onnx.load(p)) for p in PAIR]).shard(0, 50)
    change(path)
    with pytest.raises(CalibrationError) as raised:
        next(pickle.loads(pickle.dumps(shard)).batches(0, 16))
    assert str(raised.value).startswith(f"{path}: ") and words in str(raised.value) and "\n" not in str(raised.value)
    assert str(raised.value).endswith("every Ray worker reads the calibration files at the paths the driver read "
                                      "them (shared storage, docs/scale.md)")


def test_a_worker_that_cannot_import_onnxmerge_is_named():
    failure = RuntimeError("The remote function failed to import on the worker. This may be because ...\n"
                           "Traceback (most recent call last):\n  File ...\n"
                           "ModuleNotFoundError: No module named 'onnxmerge.calib.distributed'\n")
    assert _import_failure(failure) == "ModuleNotFoundError: No module named 'onnxmerge.calib.distributed'"
    assert _import_failure(ImportError("no onnxruntime")) == "no onnxruntime"
    assert _import_failure(ValueError("other")) is None
