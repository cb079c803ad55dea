"""Fuzzing every command with mutated sample models and data (issue 14).

A seeded generator mutates the shipped digits models (truncated or flipped bytes, dropped
nodes, renamed tensors, changed dims, dtypes, attributes, opsets, non-finite weights) and
the calibration / test data (wrong dtype or shape, NaN, truncated files, wrong names) and
runs one command on them in-process. Whatever the input, a command exits 0 or 1 (never a
traceback), an error is one line, no file appears but the command's named outputs (none on
an error), nothing is left in the working or temporary folder, and the inputs are unchanged.
A written model loads again. ``FAST_CASES`` run by default (about 30 s on one core);
``-m slow`` runs ``SLOW_CASES`` more.
"""

from __future__ import annotations

import hashlib
import os
import io
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxmerge.cli import main
from onnxmerge.io import load_model

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "digits"
FAST_CASES = 240
SLOW_CASES = int(os.environ.get("ONNXMERGE_FUZZ_CASES", "500"))  # the slow run: at least 500
# merge / align pairs (of one design; the deep and wide ones differ in depth or width)
PAIRS = [("resnet_a", "resnet_b"), ("vgg_a", "vgg_b"), ("resnet_a_deep", "resnet_b"),
         ("resnet_a", "resnet_b_wide"), ("vgg_a_deep", "vgg_b")]
COMMANDS = ("inspect", "permute", "widen", "deepen", "merge", "calibrate", "align", "eval", "run")
SAME_BASE_METHODS = ("task-arithmetic", "ties", "dare", "slerp", "linear", "regmean")
MODEL_MUTATIONS = ("truncate", "flip", "drop_node", "rename_tensor", "initializer_dims", "input_dims",
                   "initializer_dtype", "input_dtype", "attribute", "drop_attribute", "nonfinite", "opset",
                   "duplicate_name", "drop_output", "shuffle_nodes", "drop_initializer",
                   # valid models that stress the analysis rather than the loader
                   "zero_weights", "copy_channels", "scale_weights", "swap_activation", "extra_output",
                   "rename_everywhere", "fixed_batch", "insert_identity")
DATA_MUTATIONS = ("dtype", "shape", "nan", "truncate", "rename", "empty", "garbage", "labels", "constant", "scale")
RECIPE_MUTATIONS = ("truncate", "flip", "output_is_input", "bad_value", "sha256", "garbage")
_BYTES: dict[str, bytes] = {}


def _sample(name: str) -> bytes:
    if name not in _BYTES:
        _BYTES[name] = (SAMPLES / name).read_bytes()
    return _BYTES[name]


@dataclass
class Case:
    """One command line over files to write first; ``outputs`` are the files it may write."""

    seed: int
    args: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    outputs: set[str] = field(default_factory=set)
    what: list[str] = field(default_factory=list)


# --- model mutations ------------------------------------------------------------------------

def _flip(data: bytes, rng: np.random.Generator) -> bytes:
    buffer = bytearray(data)
    for position in rng.integers(len(buffer), size=int(rng.integers(1, 9))):
        buffer[position] ^= int(rng.integers(1, 256))
    return bytes(buffer)


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _mutate_model(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    kind = _pick(rng, MODEL_MUTATIONS)
    if kind == "truncate":
        return data[:int(rng.integers(len(data)))], kind
    if kind == "flip":
        return _flip(data, rng), kind
    model = onnx.ModelProto()
    model.ParseFromString(data)
    graph = model.graph
    nodes = graph.node
    node = nodes[int(rng.integers(len(nodes)))]
    if kind == "drop_node":
        graph.node.remove(node)
    elif kind == "rename_tensor":
        other = _pick(rng, [t for n in nodes for t in n.output] + ["nowhere", ""])
        names = node.input if node.input and rng.random() < 0.5 else node.output
        names[int(rng.integers(len(names)))] = other
    elif kind == "initializer_dims":
        init = _pick(rng, list(graph.initializer))
        if init.dims:
            init.dims[int(rng.integers(len(init.dims)))] = int(rng.integers(0, 70))
        else:
            init.dims.append(2)
    elif kind == "input_dims":
        dims = graph.input[0].type.tensor_type.shape.dim
        dim = dims[int(rng.integers(len(dims)))]
        if rng.random() < 0.2:
            dim.dim_param = "D"
        else:
            dim.dim_value = int(rng.integers(0, 40))
        if rng.random() < 0.2:
            dims.add().dim_value = 3
    elif kind == "initializer_dtype":
        init = _pick(rng, list(graph.initializer))
        init.data_type = _pick(rng, [TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.INT8,
                                     TensorProto.BFLOAT16, TensorProto.BOOL, TensorProto.STRING, 0, 99])
    elif kind == "input_dtype":
        graph.input[0].type.tensor_type.elem_type = _pick(rng, [TensorProto.FLOAT16, TensorProto.DOUBLE,
                                                                TensorProto.INT64, TensorProto.BFLOAT16, 0])
    elif kind in ("attribute", "drop_attribute"):
        with_attributes = [n for n in nodes if n.attribute] or [node]
        node = _pick(rng, with_attributes)
        if not node.attribute or (kind == "attribute" and rng.random() < 0.15):
            node.attribute.append(helper.make_attribute("bogus", 3))
        elif kind == "drop_attribute":
            del node.attribute[int(rng.integers(len(node.attribute)))]
        else:
            attribute = node.attribute[int(rng.integers(len(node.attribute)))]
            if attribute.type == onnx.AttributeProto.INT:
                attribute.i = int(rng.integers(-3, 70))
            elif attribute.type == onnx.AttributeProto.INTS and attribute.ints:
                attribute.ints[int(rng.integers(len(attribute.ints)))] = int(rng.integers(-3, 9))
            elif attribute.type == onnx.AttributeProto.FLOAT:
                attribute.f = float(_pick(rng, [np.nan, np.inf, -1.0, 0.0, 1e30]))
            else:
                attribute.type = onnx.AttributeProto.FLOAT
    elif kind == "nonfinite":
        init = _pick(rng, [i for i in graph.initializer if i.data_type == TensorProto.FLOAT])
        values = numpy_helper.to_array(init).copy()
        values.reshape(-1)[int(rng.integers(values.size))] = _pick(rng, [np.nan, np.inf, -np.inf])
        init.CopyFrom(numpy_helper.from_array(values, init.name))
    elif kind == "opset":
        model.opset_import[0].version = int(_pick(rng, [1, 6, 7, 9, 11, 13, 21, 22, 26, 999]))
    elif kind == "duplicate_name":
        node.name = nodes[int(rng.integers(len(nodes)))].name or "x"
        nodes[0].name = node.name
    elif kind == "drop_output":
        del graph.output[:]
    elif kind == "shuffle_nodes":
        order = [nodes[int(i)] for i in rng.permutation(len(nodes))]
        copies = [onnx.NodeProto() for _ in order]
        for copy, original in zip(copies, order):
            copy.CopyFrom(original)
        del graph.node[:]
        graph.node.extend(copies)
    elif kind == "drop_initializer":
        graph.initializer.remove(_pick(rng, list(graph.initializer)))
    elif kind in ("zero_weights", "copy_channels", "scale_weights"):
        init = _pick(rng, [i for i in graph.initializer if i.data_type == TensorProto.FLOAT and i.dims])
        values = numpy_helper.to_array(init).copy()
        if kind == "zero_weights":  # dead channels, or a whole dead layer
            values[:max(1, len(values) // int(rng.integers(1, 4)))] = 0
        elif kind == "copy_channels":  # exact duplicates: zero-variance differences, singular correlations
            values[1:] = values[0]
        else:
            values *= float(_pick(rng, [1e-30, 1e-8, 1e8, 1e30, -1.0]))
        init.CopyFrom(numpy_helper.from_array(values.astype(np.float32), init.name))
    elif kind == "swap_activation":
        relus = [n for n in nodes if n.op_type == "Relu"] or [node]
        _pick(rng, relus).op_type = _pick(rng, ["Sigmoid", "Tanh", "Abs", "Softplus", "Sin", "Erf", "Neg", "Exp"])
    elif kind == "extra_output":
        tensor = _pick(rng, [t for n in nodes for t in n.output])
        graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
    elif kind == "rename_everywhere":
        old = _pick(rng, [t for n in nodes for t in n.output] + [graph.input[0].name])
        new = _pick(rng, ["renamed", "x/../..", "名前", "a:b", " "])
        for n in nodes:
            for names in (n.input, n.output):
                for k, name in enumerate(names):
                    if name == old:
                        names[k] = new
        for info in list(graph.input) + list(graph.output) + list(graph.value_info):
            if info.name == old:
                info.name = new
    elif kind == "fixed_batch":
        graph.input[0].type.tensor_type.shape.dim[0].dim_value = int(_pick(rng, [1, 7, 64]))
    elif kind == "insert_identity":
        tensor = node.output[0]
        for n in nodes:
            for k, name in enumerate(n.input):
                if name == tensor:
                    n.input[k] = tensor + "_id"
        for info in graph.output:
            if info.name == tensor:
                info.name = tensor + "_id"
        graph.node.append(helper.make_node(_pick(rng, ["Identity", "Dropout"]), [tensor], [tensor + "_id"]))
    return model.SerializeToString(), kind


# --- data mutations -------------------------------------------------------------------------

def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _mutate_data(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    kind = _pick(rng, DATA_MUTATIONS)
    if kind == "truncate":
        return data[:int(rng.integers(len(data)))], kind
    if kind == "garbage":
        return _flip(data, rng) if rng.random() < 0.5 else rng.bytes(int(rng.integers(0, 300))), kind
    arrays = dict(np.load(io.BytesIO(data)))
    x = arrays["input"]
    if kind == "dtype":
        arrays["input"] = x.astype(_pick(rng, [np.float64, np.float16, np.int32, np.bool_, np.complex64, np.uint8]))
    elif kind == "shape":
        arrays["input"] = _pick(rng, [x[:, 0], x[..., None], x.reshape(len(x), -1), x[:, :, :4],
                                      np.concatenate([x, x], axis=1), x[:1], x.transpose(0, 2, 3, 1), x[0]])
    elif kind == "nan":
        x = x.copy()
        x.reshape(-1)[rng.integers(x.size, size=int(rng.integers(1, 50)))] = _pick(rng, [np.nan, np.inf, -np.inf])
        arrays["input"] = x
    elif kind == "rename":
        arrays = {"x" if key == "input" else key: value for key, value in arrays.items()}
        if rng.random() < 0.5:
            arrays["extra"] = x[:3]
    elif kind == "empty":
        arrays["input"] = x[:0]
    elif kind == "constant":  # no feature varies: zero variance everywhere
        arrays["input"] = np.full_like(x, float(_pick(rng, [0.0, 1.0, -3.0])))
    elif kind == "scale":
        arrays["input"] = x * np.float32(_pick(rng, [1e-30, 1e-6, 1e6, 1e30]))
    elif kind == "labels":
        count = len(x)
        arrays["y"] = _pick(rng, [np.full(count, 99), -np.ones(count, np.int64), np.zeros(count + 3, np.int64),
                                  rng.random(count), np.zeros((count, 2), np.int64)])
    return _npz(**arrays), kind


# --- cases ----------------------------------------------------------------------------------

def make_case(seed: int) -> Case:
    """The command and files of case ``seed``: one input mutated (rarely none)."""
    rng = np.random.default_rng(seed)
    case = Case(seed)
    command = COMMANDS[seed % len(COMMANDS)]
    pair = _pick(rng, PAIRS)
    single = command in ("inspect", "permute", "widen", "deepen", "eval")
    sources = {f"m{i}.onnx": f"{name}.onnx" for i, name in enumerate(pair[:1] if single else pair)}
    model_args = list(sources)
    data_name = "test.npz" if command == "eval" else "calib.npz"
    uses_data = command in ("eval", "calibrate", "align") or (command in ("merge", "run") and rng.random() < 0.7)
    same_base = command == "merge" and rng.random() < 0.25
    if uses_data:
        sources["data.npz"] = data_name
    if same_base:  # fine-tunes of a base: here the first model is its own base
        sources["base.onnx"] = f"{pair[0]}.onnx"
    files = {name: _sample(source) for name, source in sources.items()}
    if command == "run":
        files["recipe.yaml"] = _recipe(model_args, uses_data, rng)
    target = _pick(rng, list(files)) if rng.random() < 0.95 else None
    if target is not None:
        mutate = {"data.npz": _mutate_data, "recipe.yaml": _mutate_recipe}.get(target, _mutate_model)
        files[target], kind = mutate(files[target], rng)
        case.what.append(f"{target} ({sources.get(target, 'recipe')}): {kind}")
    few = ["--max-samples", "32"]
    if command == "inspect":
        args = ["inspect", *model_args] + (["--json"] if rng.random() < 0.5 else [])
    elif command == "permute":
        args = ["permute", *model_args, "-o", "out.onnx", "--seed", str(seed)]
    elif command == "widen":
        args = ["widen", *model_args, "-o", "out.onnx", "--factor", str(_pick(rng, [1.0, 1.3, 2.0]))]
    elif command == "deepen":
        args = ["deepen", *model_args, "-o", "out.onnx", "--blocks", str(int(rng.integers(1, 3)))]
    elif command == "eval":
        args = ["eval", *model_args, "--data", "data.npz", "--tasks", "0-4"]
    elif command == "calibrate":
        args = ["calibrate", *model_args, "--calib", "data.npz", "-o", "stats.npz", *few]
    elif command == "align":
        args = ["align", *model_args, "--calib", "data.npz", *few] + (["--json"] if rng.random() < 0.5 else [])
    elif command == "run":
        args = ["run", "recipe.yaml"]
    else:
        args = ["merge", *model_args, "-o", "out.onnx"]
        if uses_data:
            args += ["--calib", "data.npz", *few]
        if same_base:
            args += ["--base", "base.onnx", "--method", _pick(rng, SAME_BASE_METHODS)]
        elif not uses_data:
            args += ["--method", _pick(rng, ["weight", "average"])]
        if rng.random() < 0.3:
            args += ["--report", "report.json"]
        if rng.random() < 0.15:  # statistics shards that are no statistics file
            files["stats.npz"] = _pick(rng, [_sample("calib.npz"), rng.bytes(64), b""])
            args += ["--stats", "stats.npz"]
    if rng.random() < 0.3 and command not in ("eval", "run"):
        args += ["--bn", "fold"]
    case.args, case.files = args, files
    case.outputs = {a for flag, a in zip(args, args[1:]) if flag in ("-o", "--report")}
    if command == "merge":
        case.outputs.add("out.onnx.recipe.yaml")
    elif command == "run":
        case.outputs = _recipe_outputs(files["recipe.yaml"])
    return case


def _recipe_outputs(recipe: bytes) -> set[str]:
    """The files a (mutated) recipe names as its outputs, which ``run`` may write."""
    import yaml
    try:
        document = yaml.safe_load(recipe)
    except (yaml.YAMLError, UnicodeDecodeError, ValueError):
        return set()
    if not isinstance(document, dict):
        return set()
    named = [document.get("output"), document.get("report")]
    outputs = {str(name) for name in named if isinstance(name, (str, int, float)) and str(name)}
    if isinstance(document.get("output"), (str, int, float)):
        outputs.add(f"{document['output']}.recipe.yaml")
    return outputs


def _recipe(models: list[str], data: bool, rng: np.random.Generator) -> bytes:
    """A recipe (docs/recipe.md) over the case's files, paths relative to its folder."""
    lines = ["models:", *(f"- {name}" for name in models)]
    if data:
        lines += ["calibration: data.npz", "options:", "  max_samples: 32"]
    else:
        lines += [f"method: {_pick(rng, ['weight', 'average'])}"]
    lines += ["output: out.onnx"] + (["report: report.json"] if rng.random() < 0.3 else [])
    return ("\n".join(lines) + "\n").encode()


def _mutate_recipe(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    kind = _pick(rng, RECIPE_MUTATIONS)
    text = data.decode()
    if kind == "truncate":
        return data[:int(rng.integers(len(data)))], kind
    if kind == "flip":
        return _flip(data, rng), kind
    if kind == "output_is_input":
        return text.replace("output: out.onnx", f"output: {_pick(rng, ['m0.onnx', 'recipe.yaml', 'data.npz'])}") \
            .encode(), kind
    if kind == "bad_value":
        key = _pick(rng, ["method: zip", "heads: everything", "align: [1, 2]", "parameters: {alpha: fast}",
                          "options: {batch_size: -3}", "stats: [m0.onnx]", "models: {a: 1}", "unknown: 1",
                          "calibration: {path: 3}", "seed: 1e999"])
        return (text + key + "\n").encode(), kind
    if kind == "sha256":
        return text.replace("- m0.onnx", "- path: m0.onnx\n  sha256: '" + "0" * 64 + "'").encode(), kind
    return b"models: [" + rng.bytes(20) + b"\n", kind


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def run_case(case: Case, root: Path, capfd, monkeypatch) -> list[str]:
    """Run one case in fresh folders; the list of broken promises (empty when all hold)."""
    work, cwd, scratch = root / "work", root / "cwd", root / "tmp"
    for folder in (work, cwd, scratch):
        folder.mkdir()
    for name, data in case.files.items():
        (work / name).write_bytes(data)
    before = _digest(work)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # scratch files of ours or our libraries
    capfd.readouterr()
    problems = []
    try:
        with warnings.catch_warnings():  # a warning would be more lines on stderr: a finding
            warnings.simplefilter("error", RuntimeWarning)
            code = main([str(work / a) if _is_file_arg(a) else a for a in case.args])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    except Exception:  # a traceback: the bug the fuzz looks for
        code = None
        problems.append("raised " + traceback.format_exc().strip().splitlines()[-1])
    monkeypatch.undo()
    captured = capfd.readouterr()
    err = captured.err.strip().splitlines()
    if code not in (0, 1, None):
        problems.append(f"exit code {code}")
    if code == 1 and (len(err) != 1 or not err[0].startswith("onnxmerge: error: ")):
        problems.append(f"error is not one line: {captured.err.strip()[:600]!r}")
    after = _digest(work)
    changed = [n for n in before if after.get(n) != before[n]]
    new = set(after) - set(before)
    if changed:
        problems.append(f"inputs changed: {changed}")
    if code != 0 and new:
        problems.append(f"files written on error: {sorted(new)}")
    if new - case.outputs:
        problems.append(f"unnamed files written: {sorted(new - case.outputs)}")
    for folder in (cwd, scratch):
        if any(folder.iterdir()):
            problems.append(f"left in {folder.name}: {sorted(p.name for p in folder.iterdir())}")
    if code == 0 and "out.onnx" in case.outputs and case.args[0] != "run":
        try:
            load_model(work / "out.onnx")
        except Exception as error:  # noqa: BLE001 - any failure to reload is a finding
            problems.append(f"written model does not load: {str(error)[:300]}")
    return problems


def _is_file_arg(arg: str) -> bool:
    return arg.endswith((".onnx", ".npz", ".json", ".yaml"))


def _check(seed: int, tmp_path: Path, capfd, monkeypatch) -> None:
    case = make_case(seed)
    start = time.perf_counter()
    problems = run_case(case, tmp_path, capfd, monkeypatch)
    elapsed = time.perf_counter() - start
    assert not problems, f"case {seed} ({' '.join(case.args)}; {case.what or 'unmutated'}; {elapsed:.1f}s): {problems}"


@pytest.mark.parametrize("seed", range(FAST_CASES))
def test_fuzz(seed, tmp_path, capfd, monkeypatch):
    _check(seed, tmp_path, capfd, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(FAST_CASES, FAST_CASES + SLOW_CASES))
def test_fuzz_slow(seed, tmp_path, capfd, monkeypatch):
    _check(seed, tmp_path, capfd, monkeypatch)


def test_cases_are_deterministic_and_cover_every_command_and_mutation():
    cases = [make_case(seed) for seed in range(FAST_CASES + SLOW_CASES)]
    assert [c.args for c in cases[:20]] == [make_case(seed).args for seed in range(20)]
    assert {c.args[0] for c in cases[:FAST_CASES]} == set(COMMANDS)
    kinds = {what.rsplit(": ", 1)[1] for c in cases for what in c.what}
    assert set(MODEL_MUTATIONS) | set(DATA_MUTATIONS) | set(RECIPE_MUTATIONS) <= kinds
