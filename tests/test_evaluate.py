"""Accuracy on class-split tasks, checked against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from onnxmerge.cli import main
from onnxmerge.errors import RecipeError
from onnxmerge.scoring import parse_tasks, run_heads, score


def test_parse_tasks():
    assert parse_tasks("0-4,5-9") == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert parse_tasks("0+2+4,1+3") == [[0, 2, 4], [1, 3]]
    with pytest.raises(RecipeError, match="0-x"):
        parse_tasks("0-x")


def test_joint_and_per_task_accuracy_by_hand():
    labels = np.array([0, 1, 2, 3])
    head_a = np.array([[5.0, 0.0], [0.0, 1.0], [9.0, 0.0], [0.0, 0.0]])  # classes 0, 1
    head_b = np.array([[0.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 3.0]])  # classes 2, 3
    result = score([head_a, head_b], labels, [[0, 1], [2, 3]])
    # joint argmax: sample 0 -> 0 ok, 1 -> 3 wrong, 2 -> 0 wrong, 3 -> 3 ok
    assert result["joint"] == 0.5
    # task 0-1 (samples 0, 1): 0 ok, 1 ok; task 2-3 (samples 2, 3): 2 ok, 3 ok
    assert result["tasks"] == {"0-1": 1.0, "2-3": 1.0}
    assert result["average"] == 1.0


def test_heads_and_tasks_must_agree():
    with pytest.raises(RecipeError, match="classes per head"):
        score([np.zeros((2, 3))], np.array([0, 1]), [[0, 1]])


def test_eval_command_single_model_and_ensemble(capsys):
    a, b, test = "samples/digits/resnet_a.onnx", "samples/digits/resnet_b.onnx", "samples/digits/test.npz"
    assert main(["eval", a, "--data", test, "--tasks", "0-4"]) == 0
    line = capsys.readouterr().out
    assert "task 0-4" in line and "joint" in line
    assert main(["eval", a, b, "--data", test, "--tasks", "0-4,5-9", "--ensemble", "--json"]) == 0
    import json
    (row,) = json.loads(capsys.readouterr().out)
    assert row["model"].startswith("ensemble") and set(row["tasks"]) == {"0-4", "5-9"}
    assert row["joint"] > 0.9  # two well-trained experts side by side


def test_a_model_with_a_fixed_batch_of_one_is_scored_in_batches_of_one(tmp_path):
    """Exports without a dynamic batch axis are common; eval must not feed them 256 samples."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "fixed",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    (scores,) = run_heads(model, {"x": x}, "cpu")
    np.testing.assert_allclose(scores, x @ numpy_helper.to_array(weight), rtol=1e-5)
    onnx.checker.check_model(model)


def test_eval_on_several_files_scores_them_as_one_test_set(tmp_path, capsys):
    a, b, test = "samples/digits/resnet_a.onnx", "samples/digits/resnet_b.onnx", "samples/digits/test.npz"
    with np.load(test) as data:
        arrays = dict(data)
    parts = [tmp_path / "part0.npz", tmp_path / "part1.npz"]
    for path, rows in zip(parts, (slice(None, 100), slice(100, None))):
        np.savez(path, **{name: array[rows] for name, array in arrays.items()})
    common = [a, b, "--tasks", "0-4,5-9", "--ensemble", "--json"]
    assert main(["eval", *common, "--data", test]) == 0
    whole = capsys.readouterr().out
    assert main(["eval", *common, "--data", *map(str, parts)]) == 0
    assert capsys.readouterr().out == whole
    np.savez(parts[1], **{name: array[101 if name == "y" else 100:] for name, array in arrays.items()})
    np.savez(parts[0], **{name: array[:101 if name == "y" else 100] for name, array in arrays.items()})
    assert main(["eval", *common, "--data", *map(str, parts)]) == 1  # as many labels in all, not in each file
    assert capsys.readouterr().err == f"onnxmerge: error: {parts[0]}: 101 labels in 'y' for 100 input samples; " \
                                      "give one label per sample\n"
