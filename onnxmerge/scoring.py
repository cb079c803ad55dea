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
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import onnx

from .calib.capture import open_session
from .errors import CalibrationError, RecipeError


_NUMPY = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


def parse_tasks(text: str) -> list[list[int]]:
    """``0-4,5-9`` -> [[0..4], [5..9]]; ``0,2,4`` style lists use ``+``: ``0+2+4,1+3``."""
    tasks = []
    for part in text.split(","):
        classes: list[int] = []
        for piece in part.split("+"):
            try:
                if "-" in piece:
                    low, high = (int(v) for v in piece.split("-"))
                    classes.extend(range(low, high + 1))
                else:
                    classes.append(int(piece))
            except ValueError as error:
                raise RecipeError(f"--tasks {text!r}: cannot read {piece!r}; write classes like 0-4,5-9") from error
        tasks.append(classes)
    return tasks


def load_test_data(path: str | os.PathLike | Mapping, labels_key: str = "y") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Inputs (every array but the labels) and integer labels from a .npz file, or from a dict
    of arrays in memory."""
    if isinstance(path, Mapping):
        arrays, path = {str(key): np.asarray(value) for key, value in path.items()}, "test data"
    else:
        try:
            with np.load(path) as data:
                arrays = {key: data[key] for key in data.files}
        except (OSError, ValueError) as error:
            raise CalibrationError(f"{path}: cannot read test data ({error}); give an .npz file") from error
    if labels_key not in arrays:
        raise CalibrationError(f"{path}: no labels array {labels_key!r} (found {sorted(arrays)}); use --labels NAME")
    labels = arrays.pop(labels_key)
    if not arrays:
        raise CalibrationError(f"{path}: no input arrays besides the labels {labels_key!r}")
    return arrays, labels.astype(np.int64).reshape(-1)


def run_heads(model: onnx.ModelProto, inputs: dict[str, np.ndarray], provider: str = "auto",
              batch_size: int = 256) -> list[np.ndarray]:
    """The floating-point outputs of a model (its heads) over the inputs, batch by batch;
    label outputs (skl2onnx's) and maps are not scores. A single array feeds a single-input
    model whatever its input is called."""
    session, _ = open_session(model, provider)
    heads = [o.name for o in session.get_outputs() if o.type in _NUMPY]
    if not heads:
        raise CalibrationError("the model has no floating-point output to score; "
                               f"its outputs are {[f'{o.name}: {o.type}' for o in session.get_outputs()]}")
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
    fixed = {i.shape[0] for i in session.get_inputs() if i.shape and isinstance(i.shape[0], int)}
    if fixed:  # a model exported with a fixed batch runs in batches of that size
        batch_size = fixed.pop()
        if count % batch_size:
            raise CalibrationError(f"the model fixes its batch size at {batch_size} and the test data has {count} "
                                   "samples, not a multiple; export it with a dynamic batch axis")
    outputs: list[list[np.ndarray]] = []
    for start in range(0, count, batch_size):
        feed = {name: inputs[name][start:start + batch_size] for name in names}
        outputs.append(session.run(heads, feed))
    return [np.concatenate([batch[k] for batch in outputs]) for k in range(len(outputs[0]))]


def score(heads: list[np.ndarray], labels: np.ndarray, tasks: list[list[int]] | None) -> dict:
    """Joint, per-task and average accuracy of heads on labelled samples."""
    heads = [h.reshape(len(labels), -1) for h in heads]
    if tasks is None:
        if len(heads) != 1:
            raise RecipeError(f"the model has {len(heads)} heads; say which classes each predicts with --tasks")
        tasks = [list(range(heads[0].shape[1]))]
    if len(tasks) != len(heads) or any(len(t) != h.shape[1] for t, h in zip(tasks, heads)):
        raise RecipeError(f"--tasks gives {[len(t) for t in tasks]} classes per head but the heads have "
                          f"{[h.shape[1] for h in heads]}")
    classes = np.concatenate([np.asarray(t) for t in tasks])
    joint = classes[np.concatenate(_one_scale(heads), axis=1).argmax(1)]
    result = {"samples": int(len(labels)), "joint": float((joint == labels).mean()), "tasks": {}}
    for task, head in zip(tasks, heads):
        mask = np.isin(labels, task)
        if mask.any():
            predicted = np.asarray(task)[head[mask].argmax(1)]
            result["tasks"][_name(task)] = float((predicted == labels[mask]).mean())
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
