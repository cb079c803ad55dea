"""The command as a process: exit codes, signals, a bug's last line, packages that are missing,
and the modes of the files it writes."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from onnxmerge import cli, io
from tests.helpers import with_domain_op

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "samples" / "digits"
A, B, CALIB = DIGITS / "resnet_a.onnx", DIGITS / "resnet_b.onnx", DIGITS / "calib.npz"


def python(code: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter from the repository root (the checkout's onnxmerge)."""
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, **kwargs)


# ------------------------------------------------------------------ signals


@pytest.fixture
def sigint_raises():
    """In this process: SIGINT raises KeyboardInterrupt, as Python sets it up when started from
    a terminal, even where the test runner was started with it ignored (a background job)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _default_sigint() -> None:
    """In the child: SIGINT as a terminal sends it, even where the test runner was started with
    it ignored (a background job), which the child would inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_until_running(process: subprocess.Popen) -> None:
    """Wait until the command runs its pipeline: onnxruntime, which only a command's work
    imports, is mapped into the process."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if "onnxruntime" in Path(f"/proc/{process.pid}/maps").read_text():
                return
        except OSError:
            pass
        time.sleep(0.01)
    raise AssertionError(f"the merge did not start (exit {process.poll()})")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see that the merge runs")
@pytest.mark.parametrize("signum, code, line", [(signal.SIGINT, 130, "onnxmerge: interrupted"),
                                                (signal.SIGTERM, 143, "onnxmerge: terminated")],
                         ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_a_merge_exits_in_one_line_and_leaves_nothing(tmp_path, signum, code, line):
    out, report = tmp_path / "merged.onnx", tmp_path / "report.json"
    command = [sys.executable, "-m", "onnxmerge", "merge", str(A), str(B), "--calib", str(CALIB), "-o", str(out),
               "--report", str(report), "--zip-layers", "auto"]  # merges at every cut: seconds of work
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=_default_sigint)
    try:
        _wait_until_running(process)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == code, stderr
    assert stderr == line + "\n" and stdout == ""
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
@pytest.mark.usefixtures("sigint_raises")
def test_a_signal_while_the_model_is_written_removes_the_temporary(tmp_path, monkeypatch, capsys, signum, code):
    """The signal arrives when the model's temporary file is written and flushed, just before
    it would be moved into place."""
    out = tmp_path / "out" / "permuted.onnx"
    out.parent.mkdir()
    written = []

    def fsync_then_signal(fd: int) -> None:
        written.extend(p.name for p in out.parent.iterdir())
        os.kill(os.getpid(), signum)

    monkeypatch.setattr(io.os, "fsync", fsync_then_signal)
    assert cli.main(["permute", str(A), "-o", str(out)]) == code
    assert len(written) == 1 and written[0].startswith(".permuted.onnx.") and written[0].endswith(".tmp")
    assert list(out.parent.iterdir()) == []
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.out == ""


@pytest.mark.parametrize("signum, raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, cli.Terminated)],
                         ids=["SIGINT", "SIGTERM"])
@pytest.mark.usefixtures("sigint_raises")
def test_a_signal_while_a_report_is_written_removes_the_temporary(tmp_path, signum, raised):
    def write(temporary: str) -> None:
        Path(temporary).write_text("{\"partial")
        os.kill(os.getpid(), signum)

    with pytest.raises(raised), cli._signals_raise([]):
        io.write_atomically(tmp_path / "report.json", write, "report")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signum, code, line", [(signal.SIGINT, 130, "onnxmerge: interrupted"),
                                                (signal.SIGTERM, 143, "onnxmerge: terminated")],
                         ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("fate", ["import error", "swallowed"])
@pytest.mark.usefixtures("sigint_raises")
def test_a_signal_whose_exception_is_lost_on_its_way_is_still_the_signal(monkeypatch, capsys, signum, code, line,
                                                                         fate):
    """The C extensions of onnxruntime and numpy report an interrupt during their import as an
    ImportError (which would read 'onnxruntime is not installed'), and a best-effort step
    (the symbolic shape inference) swallows what it raises: the command still ends as
    interrupted or terminated."""
    from onnxmerge import api
    inspect = api.inspect

    def interrupted(*args, **kwargs):
        try:
            os.kill(os.getpid(), signum)
        except BaseException:
            if fate == "import error":
                raise ImportError("initialization failed") from None
        return inspect(*args, **kwargs)

    monkeypatch.setattr(api, "inspect", interrupted)
    assert cli.main(["inspect", str(A)]) == code
    assert capsys.readouterr().err == line + "\n"


def test_the_signal_handlers_are_the_callers_again_after_a_command():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert cli.main(["inspect", str(A)]) == 0
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


# ------------------------------------------------------------------ the last resort


@pytest.mark.parametrize("verbose", [False, True])
def test_an_unexpected_exception_is_one_line_naming_the_command_exit_70(monkeypatch, capsys, verbose):
    from onnxmerge import api

    def broken(*args, **kwargs):
        raise ValueError("shapes (3,4) and (5,)\nnot aligned")

    monkeypatch.setattr(api, "inspect", broken)
    assert cli.main(["inspect", str(A), *(["-v"] if verbose else [])]) == 70
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert last.startswith("onnxmerge: internal error in inspect: ValueError: shapes (3,4) and (5,) not aligned; "
                           "this is a bug: please report it with this model")
    if verbose:
        assert "Traceback (most recent call last)" in err and "in broken" in err
    else:
        assert err.count("\n") == 1 and "-v shows the traceback" in last


def test_a_closed_stdout_pipe_stops_quietly():
    """`onnxmerge inspect ... | head -1` when head is gone before the output comes: no traceback,
    no 'internal error', exit 141 as for a tool that SIGPIPE ends."""
    process = subprocess.Popen([sys.executable, "-m", "onnxmerge", "inspect", "--json", str(A)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the only reader: the command's first write finds the pipe closed
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 141 and stderr == b""


# ------------------------------------------------------------------ packages that are missing


BLOCKED = ("import sys\n"
           "for name in sys.argv[1].split(','):\n"
           "    sys.modules[name] = None  # `import name` now fails as if it were not installed\n"
           "import onnxmerge.api  # the package and its API import without them\n"
           "from onnxmerge.cli import main\n"
           "sys.exit(main(sys.argv[2:]))\n")


@pytest.mark.parametrize("command", [
    ["inspect", str(A)],
    ["permute", str(A), "-o", "OUT"],
    ["merge", str(A), str(B), "--calib", str(CALIB), "-o", "OUT"],
    ["eval", str(A), "--data", str(DIGITS / "test.npz")],
], ids=["inspect", "permute", "merge", "eval"])
def test_without_onnxruntime_a_command_names_the_extra_in_one_line(tmp_path, command):
    out = tmp_path / "out.onnx"
    result = python(BLOCKED, "onnxruntime", *[str(out) if a == "OUT" else a for a in command])
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("onnxmerge: error: onnxruntime is not installed")
    assert "pip install 'onnxmerge[cpu]'" in result.stderr and "'onnxmerge[gpu]'" in result.stderr
    assert not out.exists()


def test_without_onnxruntime_help_and_version_work():
    for argv in (["--version"], ["merge", "--help"]):
        result = python(BLOCKED, "onnxruntime", *argv)
        assert result.returncode == 0 and result.stderr == "" and "onnxmerge" in result.stdout


def test_without_sympy_symbolic_shape_inference_is_one_warning(tmp_path):
    """onnxruntime's symbolic shape inference needs sympy; without it the shapes ONNX cannot
    infer stay unknown (the unknown op is a barrier either way) and one warning says why."""
    path = tmp_path / "m.onnx"
    onnx.save(with_domain_op("com.microsoft", "Inverse"), path)
    result = python(BLOCKED, "sympy", "permute", str(path), "-o", str(tmp_path / "p.onnx"))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("\n") == 1 and "symbolic shape inference is not available" in result.stderr
    assert (tmp_path / "p.onnx").exists()


def test_the_samples_merge_without_sympy(tmp_path):
    result = python(BLOCKED, "sympy", "merge", str(A), str(B), "--calib", str(CALIB), "-o", str(tmp_path / "m.onnx"))
    assert result.returncode == 0 and result.stderr == ""


# ------------------------------------------------------------------ modes of the files written


def test_every_output_file_gets_the_mode_the_umask_gives(tmp_path):
    """Models, reports, statistics and plots alike: 0666 less the umask (here 027: 0640)."""
    pytest.importorskip("matplotlib")
    vgg_a, vgg_b, vgg_a_deep = (str(DIGITS / f"{name}.onnx") for name in ("vgg_a", "vgg_b", "vgg_a_deep"))
    commands = [
        ["merge", vgg_a, vgg_b, "--calib", str(CALIB), "-o", "m.onnx", "--report", "r.json"],
        ["calibrate", vgg_a, vgg_b, "--calib", str(CALIB), "-o", "s.npz"],
        ["permute", vgg_a, "-o", "p.onnx"],
        ["align", vgg_a_deep, vgg_b, "--calib", str(CALIB), "--plot", "a.png"],
    ]
    code = ("import os, sys\nos.umask(0o027)\nfrom onnxmerge.cli import main\n"
            f"sys.exit(max(main(argv) for argv in {commands!r}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["m.onnx", "m.onnx.recipe.yaml", "r.json", "s.npz", "p.onnx", "a.png"], 0o640)
