"""The `onnxmerge` command: inspect and permute end to end, and bad input handling."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from onnxmerge.cli import main
from onnxmerge.io import load_model
from tests.helpers import as_format_1, model, outputs_close, run_all


def onnxmerge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxmerge.cli", *args], capture_output=True, text=True)


def test_inspect_json_reports_spaces(zoo_files):
    path, _ = zoo_files.get("resnet_basic", "legacy_bn")
    result = onnxmerge("inspect", path, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["format"] == "onnxmerge.inspect/1"
    assert report["barriers"] == []
    assert report["summary"]["free"] == sum(s["free"] for s in report["spaces"]) > 0
    # the classifier output space is the only fixed one, and it is fixed for being the output
    fixed = [s for s in report["spaces"] if not s["free"]]
    assert len(fixed) == 1 and fixed[0]["width"] == 10
    assert "graph output" in fixed[0]["fixed_reasons"][0]


def test_inspect_text_and_strict(tmp_path, capsys):
    from onnx import helper
    path = tmp_path / "lrn.onnx"
    m = model([helper.make_node("LRN", ["y"], ["z"], size=3)], [])
    path.write_bytes(m.SerializeToString())
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "barrier: node" in out and "spaces:" in out
    assert main(["inspect", str(path), "--strict"]) == 1
    assert "is a barrier" in capsys.readouterr().err


def test_permute_command_preserves_outputs(zoo_files, tmp_path):
    path, x = zoo_files.get("squeeze_excite", "legacy_folded")
    out = tmp_path / "permuted.onnx"
    result = onnxmerge("permute", path, "-o", str(out), "--seed", "5")
    assert result.returncode == 0, result.stderr
    outputs_close(run_all(load_model(path), x), run_all(load_model(out), x))


@pytest.mark.parametrize("content", [b"", b"not an onnx file at all", bytes(range(256)) * 10])
def test_bad_model_gives_one_line_error_and_no_output(tmp_path, content):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    out = tmp_path / "out.onnx"
    for args in (["inspect", str(bad)], ["permute", str(bad), "-o", str(out)]):
        result = onnxmerge(*args)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("onnxmerge: error:") and "bad.onnx" in lines[0]
        assert "Traceback" not in result.stderr
    assert not out.exists()
    assert bad.read_bytes() == content


def test_missing_file_and_usage_errors(tmp_path):
    result = onnxmerge("inspect", str(tmp_path / "nope.onnx"))
    assert result.returncode == 1 and "nope.onnx" in result.stderr
    assert onnxmerge("permute", str(tmp_path / "nope.onnx")).returncode == 2  # -o missing


def test_help_for_every_command():
    for command in ("inspect", "permute", "merge", "calibrate", "eval"):
        result = onnxmerge(command, "--help")
        assert result.returncode == 0 and "usage: onnxmerge" in result.stdout


@pytest.mark.parametrize("command", [
    ["merge", "A", "B", "--calib", "CALIB", "-o", "OUT/m.onnx", "--report", "MISSING/r.json"],
    ["merge", "A", "B", "--calib", "CALIB", "-o", "MISSING/m.onnx"],
    ["calibrate", "A", "B", "--calib", "CALIB", "-o", "MISSING/s.npz"],
    ["align", "A", "B", "--calib", "CALIB", "--plot", "MISSING/p.png"],
    ["permute", "A", "-o", "MISSING/p.onnx"],
    ["deepen", "A", "-o", "MISSING/d.onnx", "--blocks", "1"],
], ids=["report", "merge", "calibrate", "plot", "permute", "deepen"])
def test_unwritable_outputs_fail_first_in_one_line(zoo_files, tmp_path, capsys, command):
    """An output in a missing folder is refused before any work, so nothing is half written."""
    import numpy as np
    path, x = zoo_files.get("resnet_basic", "legacy_bn")
    np.save(tmp_path / "calib.npy", x)
    names = {"A": path, "B": path, "CALIB": str(tmp_path / "calib.npy")}
    args = [names.get(a, a.replace("MISSING", str(tmp_path / "missing")).replace("OUT", str(tmp_path)))
            for a in command]
    assert main(args) == 1
    error = capsys.readouterr().err
    assert error.startswith("onnxmerge: error: ") and error.count("\n") == 1 and "does not exist" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npy"]


@pytest.mark.parametrize("command", ["merge", "calibrate", "align"])
def test_calib_before_the_models_is_refused_naming_the_mix_up(capsys, command):
    """--calib takes one or more files: the models after it would be read as data."""
    with pytest.raises(SystemExit) as exited:
        main([command, "--calib", "calib.npz", "a.onnx", "b.onnx"])
    assert exited.value.code == 2
    assert "--calib: 'a.onnx' is a model, not data; put the data files after the models" in capsys.readouterr().err


def test_repair_samples_below_one_is_refused_before_any_output(zoo_files, tmp_path, capsys):
    import numpy as np
    path, x = zoo_files.get("resnet_basic", "legacy_bn")
    np.save(tmp_path / "calib.npy", x)
    out = tmp_path / "m.onnx"
    assert main(["merge", path, path, "--calib", str(tmp_path / "calib.npy"), "-o", str(out),
                 "--repair-samples", "0"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("onnxmerge: error: --repair-samples 0") and error.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("command", ["merge", "calibrate"])
def test_fewer_than_16_calibration_samples_are_refused_unless_allowed(zoo_files, tmp_path, capsys, command):
    import numpy as np
    path, x = zoo_files.get("mlp", "legacy_folded")
    np.save(tmp_path / "calib.npy", x[:15])
    out = tmp_path / ("m.onnx" if command == "merge" else "s.npz")
    args = [command, path, path, "--calib", str(tmp_path / "calib.npy"), "-o", str(out)]
    assert main(args) == 1
    error = capsys.readouterr().err
    assert error.startswith("onnxmerge: error: ") and error.count("\n") == 1
    assert "15 calibration samples" in error and "--allow-few-samples" in error
    assert not out.exists()
    assert main(args + ["--allow-few-samples"]) == 0 and out.exists()


@pytest.mark.parametrize("extra,warned", [([], True), (["--repair", "none"], False), (["--calib", "CALIB"], False)])
def test_a_merge_that_cannot_repair_warns_in_one_line(zoo_files, tmp_path, caplog, extra, warned):
    import numpy as np
    path, x = zoo_files.get("resnet_basic", "legacy_folded")
    np.save(tmp_path / "calib.npy", x)
    extra = [str(tmp_path / "calib.npy") if a == "CALIB" else a for a in extra]
    with caplog.at_level("WARNING"):
        assert main(["merge", path, path, "-o", str(tmp_path / "m.onnx"), *extra]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "not repaired" in r.getMessage()]
    assert len(warnings) == int(warned)
    if warned:
        assert "accuracy may collapse" in warnings[0] and "--calib" in warnings[0] and "\n" not in warnings[0]


@pytest.mark.parametrize("old", [False, True], ids=["format-2", "format-1"])
def test_statistics_shards_without_data_warn_that_nothing_is_repaired(zoo_files, tmp_path, caplog, old):
    """The warning says what would repair: --calib samples for the merged model's passes (a
    file with source moments), or data for the sources too (a format-1 file)."""
    import numpy as np
    path, x = zoo_files.get("mlp", "legacy_folded")
    np.save(tmp_path / "calib.npy", x)
    assert main(["calibrate", path, path, "--calib", str(tmp_path / "calib.npy"), "-o", str(tmp_path / "s.npz")]) == 0
    if old:
        as_format_1(tmp_path / "s.npz")
    with caplog.at_level("WARNING"):
        assert main(["merge", path, path, "--stats", str(tmp_path / "s.npz"), "-o", str(tmp_path / "m.onnx")]) == 0
    warning, = [r.getMessage() for r in caplog.records if "not repaired" in r.getMessage()]
    from_stats = "the statistics files hold REPAIR's source moments, so it runs from them given a few hundred samples"
    assert (from_stats in warning) != old and "--calib DATA" in warning


def _barrier_model(path) -> None:
    """conv1 -> CumSum over the channels (no rule: a barrier) -> conv2: nothing can merge."""
    from onnx import helper, save
    axis = helper.make_tensor("axis", 7, [], [1])
    save(model([helper.make_node("CumSum", ["y", "axis"], ["z"], name="cumsum")], [axis]), path)


def test_a_merge_that_merges_almost_nothing_warns_and_strict_refuses(tmp_path, caplog, capsys):
    import numpy as np
    _barrier_model(tmp_path / "a.onnx")
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((32, 8, 4, 4)).astype(np.float32))
    args = ["merge", str(tmp_path / "a.onnx"), str(tmp_path / "a.onnx"), "--calib", str(tmp_path / "calib.npy")]
    with caplog.at_level("WARNING"):
        assert main(args + ["-o", str(tmp_path / "m.onnx"), "--report", str(tmp_path / "r.json")]) == 0
    warnings = [r.getMessage() for r in caplog.records if "weight layers are merged" in r.getMessage()]
    assert len(warnings) == 1 and "'cumsum' (CumSum" in warnings[0]
    assert json.loads((tmp_path / "r.json").read_text())["weight_layers"] == {"merged": 0, "total": 2}
    capsys.readouterr()
    assert main(args + ["-o", str(tmp_path / "strict.onnx"), "--strict"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("onnxmerge: error: only 0 of 2 weight layers") and error.count("\n") == 1
    assert not (tmp_path / "strict.onnx").exists()


def test_a_merge_of_a_mergeable_model_does_not_warn_about_coverage(zoo_files, tmp_path, caplog):
    import numpy as np
    path, x = zoo_files.get("resnet_basic", "legacy_folded")
    np.save(tmp_path / "calib.npy", x)
    with caplog.at_level("WARNING"):
        assert main(["merge", path, path, "--calib", str(tmp_path / "calib.npy"), "-o", str(tmp_path / "m.onnx"),
                     "--strict"]) == 0
    assert not any("weight layers are merged" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("command", [
    ["merge", "A", "B", "--calib", "CALIB", "-o", "A"], ["merge", "A", "B", "--calib", "CALIB", "-o", "./LINK"],
    ["merge", "A", "B", "--calib", "CALIB", "-o", "OUT", "--report", "B"],
    ["merge", "A", "B", "--calib", "CALIB", "-o", "OUT", "--report", "OUT"],
    ["calibrate", "A", "B", "--calib", "CALIB", "-o", "CALIB"], ["permute", "A", "-o", "A"], ["widen", "A", "-o", "LINK",
                                                                                              "--factor", "2"]])
def test_an_output_that_is_an_input_or_another_output_is_refused(zoo_files, tmp_path, capsys, monkeypatch, command):
    import os
    import shutil
    import numpy as np
    path, x = zoo_files.get("mlp", "legacy_folded")
    for name in ("a.onnx", "b.onnx"):
        shutil.copy(path, tmp_path / name)
    os.link(tmp_path / "a.onnx", tmp_path / "link.onnx")  # a hard link is the same file
    np.save(tmp_path / "calib.npy", x)
    monkeypatch.chdir(tmp_path)
    names = {"A": "a.onnx", "B": "b.onnx", "CALIB": "calib.npy", "OUT": "out.onnx", "./LINK": "./link.onnx",
             "LINK": "link.onnx"}
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert main([names.get(a, a) for a in command]) == 1
    error = capsys.readouterr().err
    assert error.startswith("onnxmerge: error: ") and error.count("\n") == 1 and "would overwrite" in error
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_merge_of_models_with_unnamed_nodes_cut_after_a_barrier(tmp_path):
    """onnx.helper models often leave nodes unnamed; per-model copies must still get unique names."""
    import numpy as np
    from onnxmerge import api
    from onnxmerge.io import save_model
    import onnx
    _barrier_model(tmp_path / "a.onnx")
    proto = onnx.load(tmp_path / "a.onnx")
    for node in proto.graph.node:
        node.name = ""
    save_model(proto, tmp_path / "a.onnx")
    x = np.random.default_rng(0).standard_normal((32, 8, 4, 4)).astype(np.float32)
    np.save(tmp_path / "calib.npy", x)
    merged = api.merge([str(tmp_path / "a.onnx")] * 2, calibration=str(tmp_path / "calib.npy"),
                       options=api.MergeOptions(repair="none"))
    expected = run_all(proto, x)
    outputs_close(expected + expected, run_all(merged.model, x))


def test_the_cli_choices_are_the_registries():
    """The CLI offers the names of choices.py without importing the pipeline; the registries
    that implement them must list the same names."""
    from onnxmerge import choices
    from onnxmerge.match import METHODS
    from onnxmerge.match.align import ALIGNERS
    assert {m.name: m.summary for m in METHODS} == choices.METHODS
    assert choices.ALIGNMENTS == ("auto", *ALIGNERS, "none")


def test_help_and_version_do_not_import_the_pipeline():
    """--help and --version answer without onnx, onnxruntime, scipy, torch or ray (start-up time)."""
    code = ("import sys\nfrom onnxmerge.cli import main\n"
            "for argv in (['--help'], ['--version'], ['merge', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "heavy = sorted(m for m in ('onnx', 'onnxruntime', 'scipy', 'torch', 'numpy', 'ray', 'onnxmerge.api')"
            " if m in sys.modules)\n"
            "print('imported:', heavy, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().endswith("imported: []")


def test_test_modules_import_helpers_not_each_other():
    """Shared test code lives in tests/helpers.py (or conftest fixtures): a test module that
    imports another would run or collect it twice and couple their random draws."""
    from pathlib import Path

    importing = [(path.name, line) for path in Path(__file__).parent.glob("test_*.py")
                 for line in path.read_text().splitlines() if line.strip().startswith(("from tests.test_",
                                                                                      "import tests.test_"))]
    assert importing == []
