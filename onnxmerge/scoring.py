"""Accuracy of single and multi-head models on class-split tasks (method.md §8).

A model's floating-point graph outputs are its heads, in order; head i predicts the classes of
task i (integer label outputs and ZipMap's maps are left out).
Joint accuracy: argmax over all heads' outputs concatenated, mapped to global classes. Heads
are compared on one scale: when they are all logits, all probabilities or all log-probabilities
they are compared as they are; when the scales differ (one model ends in a Softmax, the other
returns logits), each head becomes log-probabilities first (the log of probabilities, the
log-softmax of logits). A head's rows are probabilities when they are non-negative and sum to 1,
log-probabilities when their exponentials do.
Per-task accuracy: on the samples of task i, argmax within head i. Average: mean over tasks.
Tasks may share classes (an ensemble of two models of classes 5-9): every task is scored, and
tasks of the same classes are named by their head, counted from 0 as the outputs ``_m0``,
``_m1`` are (``5-9 (head 1)``).

The test data is checked like calibration data (calib/data.py: no NaN, shapes and dtypes that
fit every model's inputs) and streamed in batches: ``.npy`` members of an uncompressed ``.npz``
are memory-mapped, so memory stays bounded whatever the file's size. Labels are one
non-negative integer class per sample.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from .calib.arrays import ArrayFile
from .calib.sessions import first_line, open_session
from .calib.data import CalibrationSet, InputSpec, input_specs, load_calibration
from .errors import CalibrationError, RecipeError, about


_NUMPY = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


def parse_tasks(text: str) -> list[list[int]]:
    """``0-4,5-9`` -> [[0..4], [5..9]]; ``0,2,4`` style lists use ``+``: ``0+2+4,1+3``.

    Raises:
        RecipeError: a piece that is no class or range of classes, an empty range, or a class
            listed twice in one task.
    """
    tasks = []
    for part in text.split(","):
        classes: list[int] = []
        for piece in part.split("+"):
            try:
                if "-" in piece:
                    low, high = (int(v) for v in piece.split("-"))
                    if not 0 <= low <= high:
                        raise ValueError(piece)
                    classes.extend(range(low, high + 1))
                else:
                    classes.append(int(piece))
                    if classes[-1] < 0:
                        raise ValueError(piece)
            except ValueError as error:
                raise RecipeError(f"--tasks {text!r}: cannot read {piece!r}; write classes (0, 1, ...) and "
                                  "ranges (low-high) like 0-4,5-9") from error
        repeated = sorted({c for c in classes if classes.count(c) > 1})
        if repeated:
            raise RecipeError(f"--tasks {text!r}: task {part!r} lists class {repeated[0]} twice; "
                              "list each class of a head once")
        tasks.append(classes)
    return tasks


_DATA_FIX = "give an .npz with the input arrays and the labels, e.g. numpy.savez(path, input=x, y=labels)"


def load_test_data(path: str | os.PathLike | Sequence[str | os.PathLike] | Mapping,
                   specs_per_model: list[list[InputSpec]], labels_key: str = "y",
                   model_names: list[str] | None = None) -> tuple[CalibrationSet, np.ndarray]:
    """The inputs (every array but the labels), checked against each model's inputs as
    calibration data is and read batch by batch, and the labels: one class per sample. ``path``
    may also be several files, one test set in file order (as calibration files), or the
    arrays in memory, by name (the Python API).

    Raises:
        CalibrationError: not an .npz, no labels or no inputs, inputs that calibration would
            refuse (NaN, wrong rank or dtype, no samples), labels that are no classes (NaN,
            fractions, negative, not one per sample).
    """
    if isinstance(path, Mapping):
        return _arrays_in_memory(dict(path), specs_per_model, labels_key, model_names)
    paths = [os.fspath(path)] if isinstance(path, (str, os.PathLike)) else [os.fspath(p) for p in path]
    labels = [_file_labels(p, labels_key) for p in paths]
    return _inputs(paths, specs_per_model, labels_key, model_names, labels), np.concatenate(labels)


def _file_labels(path: str, labels_key: str) -> np.ndarray:
    """The labels of one test file, which must hold inputs besides them."""
    file = ArrayFile(path, _DATA_FIX)
    try:
        if file.kind == "npy":
            raise CalibrationError(f"{path}: a .npy holds one array, but eval needs the inputs and the labels: "
                                   f"{_DATA_FIX}")
        if labels_key not in file.keys:
            raise CalibrationError(f"{path}: no labels array {labels_key!r} (found {sorted(file.keys)}); "
                                   "use --labels NAME")
        if len(file.keys) == 1:
            raise CalibrationError(f"{path}: no input arrays besides the labels {labels_key!r}; {_DATA_FIX}")
        return _labels(path, labels_key, np.array(file.get(labels_key)))
    finally:
        file.close()


def _arrays_in_memory(arrays: dict, specs_per_model: list[list[InputSpec]], labels_key: str,
                      model_names: list[str] | None) -> tuple[CalibrationSet, np.ndarray]:
    what = "test data"
    if labels_key not in arrays:
        raise CalibrationError(f"{what}: no labels array {labels_key!r} (found {sorted(arrays)}); pass labels=NAME")
    if len(arrays) == 1:
        raise CalibrationError(f"{what}: no input arrays besides the labels {labels_key!r}")
    labels = _labels(what, labels_key, np.asarray(arrays[labels_key]))
    return _inputs(arrays, specs_per_model, labels_key, model_names, [labels]), labels


def _inputs(source, specs_per_model, labels_key: str, model_names, labels: list[np.ndarray]) -> CalibrationSet:
    """The checked inputs; ``labels`` holds each file's labels, which must be one per sample of that file."""
    inputs = load_calibration(source, specs_per_model, model_names=model_names, exclude=(labels_key,), lockstep=False)
    for (path, count), mine in zip(inputs.samples_per_file(), labels):
        if len(mine) != count:
            raise CalibrationError(f"{path}: {len(mine)} labels in {labels_key!r} for {count} input samples; "
                                   "give one label per sample")
    return inputs


def _labels(path: str, key: str, labels: np.ndarray) -> np.ndarray:
    """Labels as int64 classes, one per sample, or a one-line error."""
    where = f"{path}: labels array {key!r}"
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise CalibrationError(f"{where} has shape {labels.shape}; give one integer class per sample "
                               "(shape (samples,)), not one-hot rows")
    if labels.dtype.kind == "f":
        bad = ~np.isfinite(labels)
        if bad.any():
            raise CalibrationError(f"{where} has {int(bad.sum())} NaN or infinite values; fix or drop those samples")
        if (labels != np.round(labels)).any():
            raise CalibrationError(f"{where} holds fractions (e.g. {labels[labels != np.round(labels)][0]}); "
                                   "give integer classes")
    elif labels.dtype.kind not in "iub":
        raise CalibrationError(f"{where} has dtype {labels.dtype}; give integer classes")
    if len(labels) and labels.min() < 0:
        raise CalibrationError(f"{where} holds negative classes (e.g. {labels.min()}); classes are 0, 1, 2, ...")
    return labels.astype(np.int64)


def run_heads(model: onnx.ModelProto, inputs: dict[str, np.ndarray] | CalibrationSet, provider: str,
              batch_size: int = 256, *, index: int = 0, name: str = "the model") -> list[np.ndarray]:
    """The floating-point outputs of a model (its heads) over the inputs, batch by batch;
    label outputs (skl2onnx's) and maps are not scores. A single array feeds a single-input
    model whatever its input is called.

    Args:
        inputs: arrays by input name (sample axis first), or checked test data
            (``load_test_data``) whose feeds for model ``index`` are streamed.
        name: how errors name the model.

    Raises:
        CalibrationError: no score output, onnxruntime fails, or an output is NaN.
    """
    session, _ = open_session(model, provider)
    heads = [o.name for o in session.get_outputs() if o.type in _NUMPY]
    if not heads:
        raise CalibrationError(f"{name}: the model has no floating-point output to score; "
                               f"its outputs are {[f'{o.name}: {o.type}' for o in session.get_outputs()]}")
    fixed = {i.shape[0] for i in session.get_inputs() if i.shape and isinstance(i.shape[0], int)}
    if isinstance(inputs, CalibrationSet):
        count = inputs.num_samples
        batch_size = _batch(fixed, count, batch_size)
        return _collect(session, heads, inputs.batches(index, batch_size), count, name)
    names = [i.name for i in session.get_inputs()]
    if len(inputs) == 1 and len(names) == 1:
        inputs = {names[0]: next(iter(inputs.values()))}
    missing = [name for name in names if name not in inputs]
    if missing:
        raise CalibrationError(f"the test data has no array for model input(s) {missing} (found {sorted(inputs)})")
    dtypes = {i.name: _NUMPY.get(i.type) for i in session.get_inputs()}
    inputs = {name: value.astype(dtypes[name]) if dtypes.get(name) and value.dtype.kind == "f" else value
              for name, value in inputs.items()}
    count = len(next(iter(inputs.values())))
    batch_size = _batch(fixed, count, batch_size)
    feeds = ({key: inputs[key][start:start + batch_size] for key in names} for start in range(0, count, batch_size))
    return _collect(session, heads, feeds, count, name)


def _batch(fixed: set, count: int, batch_size: int) -> int:
    """A model exported with a fixed batch runs in batches of that size, which must divide the samples."""
    if not fixed:
        return batch_size
    size = fixed.pop()
    if count % size:
        raise CalibrationError(f"the model fixes its batch size at {size} and the test data has {count} "
                               "samples, not a multiple; export it with a dynamic batch axis")
    return size


def _collect(session, heads: list[str], feeds, count: int, name: str) -> list[np.ndarray]:
    """The heads' outputs over all feeds, concatenated; NaN scores are refused."""
    outputs: list[list[np.ndarray]] = []
    for feed in feeds:
        try:
            outputs.append(session.run(heads, feed))
        except CalibrationError:  # open_session's sessions say so in one line already
            raise
        except Exception as error:  # onnxruntime's error classes share no base but Exception
            raise CalibrationError(f"{name}: onnxruntime cannot run the model on the test data "
                                   f"({first_line(error)}); check the data's shapes and dtypes against the "
                                   "model's inputs (onnxmerge inspect)") from error
    results = [np.concatenate([batch[k] for batch in outputs]) for k in range(len(heads))]
    for head, values in zip(heads, results):
        if len(values) != count:
            raise CalibrationError(f"{name}: output {head!r} has {len(values)} rows for {count} samples; "
                                   "eval scores outputs with one row of class scores per sample")
        bad = np.isnan(values.reshape(count, -1)).any(axis=1)
        if bad.any():
            raise CalibrationError(f"{name}: output {head!r} is NaN for {int(bad.sum())} of the {count} test samples "
                                   f"(the first is sample {int(np.flatnonzero(bad)[0])}); check the model on those "
                                   "inputs with onnxruntime")
    return results


def score(heads: list[np.ndarray], labels: np.ndarray, tasks: list[list[int]] | None) -> dict:
    """Joint, per-task and average accuracy of heads on labelled samples.

    Raises:
        RecipeError: heads and tasks disagree, or no label is a class any head predicts.
    """
    if any(h.shape[0] != len(labels) for h in heads):
        raise CalibrationError(f"the heads give {[h.shape[0] for h in heads]} rows for {len(labels)} labels; "
                               "give one label per sample")
    heads = [h.reshape(len(labels), -1) for h in heads]
    if tasks is None:
        if len(heads) != 1:
            raise RecipeError(f"the model has {len(heads)} heads; say which classes each predicts with --tasks")
        tasks = [list(range(heads[0].shape[1]))]
    if len(tasks) != len(heads) or any(len(t) != h.shape[1] for t, h in zip(tasks, heads)):
        raise RecipeError(f"--tasks gives {[len(t) for t in tasks]} classes per head but the heads have "
                          f"{[h.shape[1] for h in heads]}")
    classes = np.concatenate([np.asarray(t) for t in tasks])
    if not np.isin(labels, classes).any():
        raise RecipeError(f"none of the labels (classes {labels.min()}-{labels.max()}) is a class the heads predict "
                          f"({', '.join(_name(t) for t in tasks)}); check --tasks and --labels")
    joint = classes[np.concatenate(_one_scale(heads), axis=1).argmax(1)]
    result = {"samples": int(len(labels)), "joint": float((joint == labels).mean()), "tasks": {}}
    names = [_name(task) for task in tasks]
    for index, (task, head) in enumerate(zip(tasks, heads)):
        mask = np.isin(labels, task)
        if mask.any():
            predicted = np.asarray(task)[head[mask].argmax(1)]
            name = names[index] if names.count(names[index]) == 1 else f"{names[index]} (head {index})"
            result["tasks"][name] = float((predicted == labels[mask]).mean())
    result["average"] = float(np.mean(list(result["tasks"].values()))) if result["tasks"] else float("nan")
    return result


def _scale(head: np.ndarray) -> str:
    """``probabilities``, ``log-probabilities`` or ``logits``: what a head's rows are."""
    def sums_to_one(rows: np.ndarray) -> bool:
        return bool((rows >= 0).all() and np.allclose(rows.sum(1), 1.0, atol=1e-3))

    if sums_to_one(head):
        return "probabilities"
    return "log-probabilities" if (head <= 0).all() and sums_to_one(np.exp(head)) else "logits"


def _one_scale(heads: list[np.ndarray]) -> list[np.ndarray]:
    """The heads as they are when they share a scale, else each as log-probabilities."""
    scales = [_scale(h) for h in heads]
    if len(set(scales)) == 1:
        return heads
    from scipy.special import log_softmax  # imported here: scipy.special takes a fifth of a second to load
    tiny = np.finfo(np.float64).tiny
    return [np.log(np.maximum(h.astype(np.float64), tiny)) if scale == "probabilities"
            else log_softmax(h.astype(np.float64), axis=1) if scale == "logits" else h
            for h, scale in zip(heads, scales)]


def _name(task: list[int]) -> str:
    if task == list(range(task[0], task[-1] + 1)):
        return f"{task[0]}-{task[-1]}"
    return "+".join(str(c) for c in task)


def accuracies(sources: list, data, labels: str, tasks: list[list[int]] | None, ensemble: bool,
               provider: str) -> list[dict]:
    """``api.evaluate`` on read models (``sources.Source``): a row per model, or one for their
    ensemble."""
    inputs, truth = load_test_data(data, [input_specs(s.model) for s in sources], labels, [s.name for s in sources])
    heads = []
    for index, source in enumerate(sources):
        with about(source.name):
            heads.append(run_heads(source.model, inputs, provider, index=index, name=source.name))
    if ensemble:
        joined = [h for model_heads in heads for h in model_heads]
        return [dict(model="ensemble(" + ", ".join(s.file_name for s in sources) + ")", **score(joined, truth, tasks))]
    return [dict(model=s.name, **score(model_heads, truth, tasks)) for s, model_heads in zip(sources, heads)]
