"""The Python API (onnxmerge.merge and friends) on the shipped digits models: models as paths or
ModelProto, data as files, arrays, dicts or iterables of batches, and its error messages."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxmerge

DIGITS = Path(__file__).resolve().parent.parent / "samples" / "digits"
A, B = str(DIGITS / "resnet_a.onnx"), str(DIGITS / "resnet_b.onnx")
SAMPLES = 64  # enough for a real merge, few enough to keep each one about a second


@pytest.fixture(scope="module")
def calib() -> np.ndarray:
    return np.load(DIGITS / "calib.npz")["input"][:SAMPLES]


def _graph(model: onnx.ModelProto) -> bytes:
    """The model without its metadata (which names the inputs)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.metadata_props[:]
    return copy.SerializeToString()


@pytest.fixture(scope="module")
def from_files(tmp_path_factory, calib) -> onnxmerge.MergeResult:
    path = tmp_path_factory.mktemp("calib") / "calib.npy"
    np.save(path, calib)
    return onnxmerge.merge([A, B], str(path))


def test_public_names_resolve_and_internals_stay_out():
    for name in onnxmerge.__all__:
        assert getattr(onnxmerge, name) is not None, name
    assert {"merge", "run", "evaluate", "MergeOptions"} <= set(dir(onnxmerge))
    assert callable(onnxmerge.evaluate)  # not the scoring module
    with pytest.raises(AttributeError):
        onnxmerge.canonicalize  # noqa: B018


@pytest.mark.parametrize("form", ["array", "dict", "batches", "tuples", "generator"])
def test_data_in_memory_merges_like_the_file(from_files, calib, form):
    data = {"array": calib, "dict": {"input": calib}, "batches": [calib[:40], calib[40:]],
            "tuples": [(calib[:30], np.zeros(30)), (calib[30:], np.zeros(SAMPLES - 30))],
            "generator": (calib[i:i + 16] for i in range(0, SAMPLES, 16))}[form]
    result = onnxmerge.merge([A, B], data)
    assert _graph(result.model) == _graph(from_files.model)
    assert result.report["repair"] == from_files.report["repair"]
    assert not result.recipe.runnable


def test_models_in_memory_merge_like_the_files_and_are_not_modified(from_files, calib, tmp_path):
    models = [onnx.load(A), onnx.load(B)]
    before = [m.SerializeToString() for m in models]
    np.save(tmp_path / "calib.npy", calib)
    result = onnxmerge.merge(models, str(tmp_path / "calib.npy"))
    assert _graph(result.model) == _graph(from_files.model)
    assert [m.SerializeToString() for m in models] == before
    assert result.report["models"] == ["model 0", "model 1"]


def test_shard_files_give_the_statistics_and_the_model_of_their_concatenation(from_files, calib, tmp_path):
    shards = [tmp_path / f"part{i}.npy" for i in range(3)]
    for path, part in zip(shards, np.split(calib, [10, 37])):  # cuts inside batches
        np.save(path, part)
    stats, meta = onnxmerge.calibrate([A, B], shards)
    single, single_meta = onnxmerge.calibrate([A, B], calib)
    assert meta == single_meta and set(stats) == set(single)
    for key, expected in single.items():  # the same batches: the same sums, bit for bit
        assert stats[key].count == expected.count
        assert np.array_equal(stats[key].sum, expected.sum) and np.array_equal(stats[key].outer, expected.outer)
    for mine, theirs in zip(stats.moments, single.moments):
        assert all(np.array_equal(mine[t].m2, theirs[t].m2) for t in theirs)
    result = onnxmerge.merge([A, B], shards)
    assert _graph(result.model) == _graph(from_files.model)
    assert [entry.name for entry in result.recipe.calibration] == ["part0.npy", "part1.npy", "part2.npy"]


def test_torch_dataloader_feeds_calibration(from_files, calib):
    torch = pytest.importorskip("torch")
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(calib), torch.zeros(SAMPLES))
    loader = torch.utils.data.DataLoader(dataset, batch_size=20)
    assert _graph(onnxmerge.merge([A, B], loader).model) == _graph(from_files.model)


def test_evaluate_save_and_reload(from_files, tmp_path):
    test = dict(np.load(DIGITS / "test.npz"))
    row, = onnxmerge.evaluate([from_files.model], test, tasks="0-4,5-9")
    assert 0.5 < row["joint"] <= 1 and set(row["tasks"]) == {"0-4", "5-9"}
    written = from_files.save(tmp_path / "m.onnx", report=tmp_path / "m.json")
    assert written == [str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx.recipe.yaml"), str(tmp_path / "m.json")]
    again, = onnxmerge.evaluate([str(tmp_path / "m.onnx")], str(DIGITS / "test.npz"), tasks="0-4,5-9")
    assert again["joint"] == row["joint"]


def test_rewrites_take_paths_or_models():
    model = onnx.load(A)
    assert onnxmerge.permute(A, seed=1).SerializeToString() == onnxmerge.permute(model, seed=1).SerializeToString()
    assert onnxmerge.inspect(model)["spaces"] == onnxmerge.inspect(A)["spaces"]
    wide = onnxmerge.widen(model, factor=1.5)
    assert wide.SerializeToString() == onnxmerge.widen(A, factor=1.5).SerializeToString()
    assert next(i.dims[0] for i in wide.graph.initializer if i.name == "net.0.weight") == 48


@pytest.mark.parametrize("call, error, words", [
    (lambda c: onnxmerge.merge([A, 3], c), onnxmerge.InvalidModelError, "model 1: a int is neither a path"),
    (lambda c: onnxmerge.merge(A, c), onnxmerge.InvalidModelError, "give a list of models"),
    (lambda c: onnxmerge.merge([A, B], 3.0), onnxmerge.CalibrationError, "a float is not data"),
    (lambda c: onnxmerge.merge([A, B], [np.zeros(3, object)]), onnxmerge.CalibrationError, "not a numeric array"),
    (lambda c: onnxmerge.merge([A, B], []), onnxmerge.CalibrationError, "yielded no batches"),
    (lambda c: onnxmerge.merge([A, B], [{"input": c}, {"x": c}]), onnxmerge.CalibrationError, "batch 1 has inputs"),
    (lambda c: onnxmerge.merge([A, B], c, alpah=0.3), onnxmerge.RecipeError, "unknown option(s) alpah"),
    (lambda c: onnxmerge.merge([A, B], c[:5]), onnxmerge.CalibrationError, "5 calibration samples are too few"),
])
def test_bad_arguments_give_one_line_errors(calib, call, error, words):
    with pytest.raises(error) as raised:
        call(calib)
    assert words in str(raised.value) and "\n" not in str(raised.value)


def test_calibrate_then_merge_with_stats_matches_like_calibration(calib, tmp_path):
    stats, meta = onnxmerge.calibrate([A, B], calib)
    onnxmerge.save_stats(tmp_path / "s.npz", stats, meta)
    from_stats = onnxmerge.merge([A, B], stats=[str(tmp_path / "s.npz")], repair="none")
    direct = onnxmerge.merge([A, B], calib, repair="none")
    assert from_stats.report["method"] == "zip"
    assert from_stats.report["spaces"] == direct.report["spaces"]


def _documented_keys(table_start: str) -> set[str]:
    """The keys of the table that follows ``table_start`` in docs/report-json.md."""
    text = (DIGITS.parent.parent / "docs" / "report-json.md").read_text()
    table = next(b for b in text[text.index(table_start):].split("\n\n") if b.startswith("|"))
    rows = table.splitlines()[2:]
    return {row.split("`")[1] for row in rows}


def test_report_is_strict_json_with_the_documented_keys(calib, tmp_path):
    result = onnxmerge.merge([A, B], method="weight")  # data-free: correlations are null, not NaN
    result.save(tmp_path / "m.onnx", report=tmp_path / "m.json")

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    report = json.loads((tmp_path / "m.json").read_text(), parse_constant=refuse)
    optional = {"alignment", "zip_layers_auto"}
    assert set(report) == _documented_keys("# The merge report") - optional
    assert set(report["spaces"][0]) == _documented_keys("Each row of `spaces`")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_bars_on_a_terminal_unless_quiet(tmp_path, monkeypatch, quiet):
    from onnxmerge import cli

    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    np.savez(tmp_path / "c.npz", input=np.load(DIGITS / "calib.npz")["input"][:SAMPLES])
    code = cli.main(["merge", A, B, "--calib", str(tmp_path / "c.npz"), "-o", str(tmp_path / "m.onnx"),
                     *(["--quiet"] if quiet else [])])
    assert code == 0
    shown = terminal.getvalue()
    for what in ("canonicalise", "statistics", "matching", "reset pass"):
        assert (what in shown) != quiet, shown


def test_no_progress_bars_when_stderr_is_not_a_terminal(tmp_path, capsys):
    from onnxmerge import cli

    np.savez(tmp_path / "c.npz", input=np.load(DIGITS / "calib.npz")["input"][:SAMPLES])
    assert cli.main(["merge", A, B, "--calib", str(tmp_path / "c.npz"), "-o", str(tmp_path / "m.onnx")]) == 0
    assert capsys.readouterr().err == ""


def test_calibrate_then_merge_stats_aligns_models_of_different_depths_without_data(calib, tmp_path):
    deep = str(DIGITS / "resnet_a_deep.onnx")
    onnxmerge.save_stats(tmp_path / "s.npz", *onnxmerge.calibrate([deep, B], calib))
    from_stats = onnxmerge.merge([deep, B], stats=[str(tmp_path / "s.npz")], repair="none")
    direct = onnxmerge.merge([deep, B], calib, repair="none")
    def maps(result):
        return {name: [stage["map"] for stage in stages] for name, stages in result.report["alignment"]["maps"].items()}

    assert maps(from_stats) == maps(direct)
    assert _graph(from_stats.model) == _graph(direct.model)


def test_merge_stats_refuses_an_alignment_other_than_the_stored_one(calib, tmp_path):
    deep = str(DIGITS / "resnet_a_deep.onnx")
    onnxmerge.save_stats(tmp_path / "s.npz", *onnxmerge.calibrate([deep, B], calib))
    with pytest.raises(onnxmerge.RecipeError, match="aligned by sma, not lma; pass --align sma"):
        onnxmerge.merge([deep, B], stats=[str(tmp_path / "s.npz")], repair="none", align="lma")
