"""Heads that differ after the last weight layer (a Softmax, LogSoftmax or Sigmoid in one model
and logits in the other) are each model's own: separate heads copy them per model, shared heads
refuse them, and ``eval`` compares probabilities and logits on one scale."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from scipy.special import expit, log_softmax, softmax

from onnxmerge import api
from onnxmerge.cli import main
from onnxmerge.scoring import score
from onnxmerge.io import load_model, save_model
from tests import zoo
from tests.helpers import run_all, outputs_close

TAILS = {"Softmax": lambda z: softmax(z, axis=1), "LogSoftmax": lambda z: log_softmax(z, axis=1), "Sigmoid": expit}


def with_tail(path: str, op: str, target: Path) -> str:
    """The model with ``op`` applied to its output, which it now returns as ``scores``."""
    model = load_model(path)
    logits = model.graph.output[0]
    attrs = {"axis": 1} if op != "Sigmoid" else {}
    model.graph.node.append(helper.make_node(op, [logits.name], ["scores"], **attrs))
    scores = onnx.ValueInfoProto()
    scores.CopyFrom(logits)
    scores.name = "scores"
    model.graph.output[0].CopyFrom(scores)
    save_model(model, target)
    return str(target)


@pytest.mark.parametrize("op", sorted(TAILS))
def test_merge_with_permuted_self_and_tail_gives_each_model_back(zoo_files, tmp_path, op):
    path, x = zoo_files.get("mlp", "legacy_folded")
    tailed = with_tail(path, op, tmp_path / "tailed.onnx")
    save_model(api.permute(load_model(tailed), seed=2), tmp_path / "permuted.onnx")
    np.save(tmp_path / "calib.npy", x)
    result = api.merge([path, str(tmp_path / "permuted.onnx")], calibration=str(tmp_path / "calib.npy"),
                       options=api.MergeOptions(method="zip", repair="none"))
    assert [o.name for o in result.model.graph.output] == ["output_m0", "scores_m1"]
    (logits,) = run_all(load_model(path), x)
    outputs_close([logits, TAILS[op](logits.astype(np.float64)).astype(np.float32)], run_all(result.model, x))


def test_shared_heads_refuse_different_tails(zoo_files, tmp_path, capsys):
    path, x = zoo_files.get("mlp", "legacy_folded")
    tailed = with_tail(path, "Softmax", tmp_path / "tailed.onnx")
    target = tmp_path / "merged.onnx"
    assert main(["merge", path, tailed, "-o", str(target), "--heads", "shared"]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("onnxmerge: error: ")
    assert "Softmax(axis=1)" in error and "--heads separate" in error
    assert not target.exists()
    assert main(["merge", tailed, with_tail(path, "Softmax", tmp_path / "other.onnx"), "-o", str(target),
                 "--heads", "shared"]) == 0


def test_joint_accuracy_compares_probabilities_and_logits_as_log_probabilities():
    """Head 0 is sure (probability 0.99) of class 0, head 1's logits barely prefer class 5:
    raw, 2.0 beats 0.99; as log-probabilities, log 0.99 beats log_softmax's -0.64."""
    probabilities = np.array([[0.99, 0.01]])
    logits = np.array([[2.0, 1.9]])
    assert score([probabilities, logits], np.array([0]), [[0, 1], [5, 6]])["joint"] == 1.0
    assert score([logits, logits + 1.0], np.array([5]), [[0, 1], [5, 6]])["joint"] == 1.0  # one scale: as they are


def sklearn_and_torch(tmp_path: Path) -> tuple[str, str]:
    """A scikit-learn MLPClassifier (hidden 128, probabilities, label output) on digits 0-4 and a
    PyTorch MLP (hidden 256, logits) on 5-9."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x, y = zoo._digits()
    low = y < 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier((128,), max_iter=60, random_state=0).fit(x[low], y[low])
    sklearn = tmp_path / "sklearn.onnx"
    sklearn.write_bytes(convert_sklearn(clf, initial_types=[("input", FloatTensorType([None, 64]))],
                                        options={id(clf): {"zipmap": False}}).SerializeToString())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 5))
        optimizer = torch.optim.Adam(net.parameters(), 1e-2)
        inputs, labels = torch.tensor(x[~low]), torch.tensor(y[~low] - 5)
        for _ in range(60):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(inputs), labels).backward()
            optimizer.step()
    logits = tmp_path / "torch.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.zeros(2, 64),), str(logits), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "N"}})
    return str(sklearn), str(logits)


def test_sklearn_probabilities_and_torch_logits_merge_and_score(tmp_path, capsys):
    sklearn, logits = sklearn_and_torch(tmp_path)
    x, y = zoo._digits()
    order = np.random.default_rng(0).permutation(len(y))
    np.save(tmp_path / "calib.npy", x[order[:400]])
    np.savez(tmp_path / "test.npz", x=x[order[400:]], y=y[order[400:]])
    merged = tmp_path / "merged.onnx"
    assert main(["merge", sklearn, logits, "--calib", str(tmp_path / "calib.npy"), "-o", str(merged)]) == 0
    assert [o.name for o in load_model(merged).graph.output] == ["label_m0", "probabilities_m0", "logits_m1"]
    test = str(tmp_path / "test.npz")
    (row,) = api.evaluate([str(merged)], test, tasks="0-4,5-9")
    (ensemble,) = api.evaluate([sklearn, logits], test, tasks="0-4,5-9", ensemble=True)
    assert min(row["tasks"].values()) > 0.9
    # each model alone scores about 50 % joint; the merge about as well as both together
    assert row["joint"] > 0.65 and row["joint"] > ensemble["joint"] - 0.05, (row, ensemble)
