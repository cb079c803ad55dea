"""Feature extractors (issue 12): a model whose output is its hidden state (an encoder's
``last_hidden_state``, a ResNet's pooled features) merges every layer; each model gets its
output back from the merged stream through its own unmerge matrix."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch

from onnxmerge import api
from onnxmerge.io import load_model, save_model
from onnxmerge.graph.apply import transform_parameters
from onnxmerge.rewrite.heads import feature_outputs
from onnxmerge.graph.transform import Permutation
from tests import zoo
from tests.helpers import permuted_copies, run_all, outputs_close

def layer_counts(report: dict) -> tuple[int, int]:
    merged = report["weight_layers"]
    return merged["merged"], merged["total"]


@pytest.mark.parametrize("name", zoo.FEATURE_EXTRACTORS)
def test_feature_output_with_permuted_self_zips_every_layer(zoo_files, tmp_path, name):
    path, x, calib, (copy,) = permuted_copies(zoo_files, tmp_path, name, "legacy_folded")
    expected = run_all(load_model(path), x)
    plain = api.merge([path, copy], calibration=calib, options=api.MergeOptions(repair="none"))
    zipped, total = layer_counts(plain.report)
    assert zipped == total, plain.report["layers"]
    assert [o.name for o in plain.model.graph.output] == ["output_m0", "output_m1"]
    outputs_close(expected + expected, run_all(plain.model, x))
    # the sources' statistics are the merged ones already: REPAIR changes nothing
    repaired = api.merge([path, copy], calibration=calib, options=api.MergeOptions(repair="repair"))
    assert repaired.report["repair"].startswith("REPAIR")
    outputs_close(expected + expected, run_all(repaired.model, x))


def stream_permuted(path: str, target) -> str:
    """A copy of the model with its feature outputs permuted too (``permute`` keeps outputs):
    its outputs are the model's with their features reordered."""
    canonical, graph = api.analyse(load_model(path))
    rng = np.random.default_rng(3)
    spaces = [s.id for s in graph.free_spaces] + sorted(feature_outputs(graph))
    orders = {s: Permutation(rng.permutation(graph.table.widths[s])) for s in spaces}
    save_model(transform_parameters(canonical, graph, lambda space, role: orders.get(space)), target)
    return str(target)


@pytest.mark.parametrize("heads", ["separate", "shared"])
@pytest.mark.parametrize("name", zoo.FEATURE_EXTRACTORS)
def test_a_permuted_feature_output_is_matched(zoo_files, tmp_path, name, heads):
    """Separate heads: each model gets its own output back (the copy's in its own order);
    shared: one output, the reference model's."""
    path, x = zoo_files.get(name, "legacy_folded")
    copy = stream_permuted(path, tmp_path / "copy.onnx")
    np.save(tmp_path / "calib.npy", x)
    expected, (reordered,) = run_all(load_model(path), x), run_all(load_model(copy), x)
    assert not np.allclose(expected[0], reordered)
    result = api.merge([path, copy], calibration=str(tmp_path / "calib.npy"),
                       options=api.MergeOptions(heads=heads, repair="none"))
    zipped, total = layer_counts(result.report)
    assert zipped == total, result.report["layers"]
    if heads == "shared":
        assert [o.name for o in result.model.graph.output] == ["output"]
        outputs_close(expected, run_all(result.model, x))
    else:
        outputs_close(expected + [reordered], run_all(result.model, x))


def test_shared_feature_output_has_the_merged_width(zoo_files, tmp_path):
    path, x, calib, (copy,) = permuted_copies(zoo_files, tmp_path, "resnet_features", "legacy_folded")
    result = api.merge([path, copy], calibration=calib, options=api.MergeOptions(heads="shared", width=1.5))
    (features,) = run_all(result.model, x)
    assert features.shape == (len(x), 48)


def test_a_classifier_keeps_its_task_head_per_model(zoo_files, tmp_path):
    """Logits are only written, never read by the graph: the classifier stays per model."""
    path, x, calib, (copy,) = permuted_copies(zoo_files, tmp_path, "transformer", "legacy_folded")
    result = api.merge([path, copy], calibration=calib, options=api.MergeOptions(repair="none"))
    zipped, total = layer_counts(result.report)
    assert zipped == total - 1, result.report["layers"]
    heads = [n.name for n in result.model.graph.node if n.op_type == "Gemm" and n.name.endswith(("_m0", "_m1"))]
    assert len(heads) == 2, heads


def encoder(seed: int, path) -> str:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = zoo._randomize_norms(zoo.Transformer(classify=False), seed)
    zoo.EXPORTERS["legacy_folded"](model, torch.randn(2, 8, 16), path)
    return str(path)


def test_encoders_of_different_inits_merge_their_layers(tmp_path):
    paths = [encoder(seed, tmp_path / f"encoder{seed}.onnx") for seed in (1, 2)]
    x = zoo.sample_input("transformer_encoder", batch=128, seed=3)
    np.save(tmp_path / "calib.npy", x)
    result = api.merge(paths, calibration=str(tmp_path / "calib.npy"))
    zipped, total = layer_counts(result.report)
    assert zipped == total, result.report["layers"]
    session = onnxruntime.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"input": x})
    assert [o.shape for o in outputs] == [(128, 8, 64)] * 2
    # each model's output, read from the merged stream through its U_i, follows that model's
    # (about 0.75 here), not the other's (about 0)
    sources = [run_all(load_model(p), x)[0] for p in paths]
    for i, output in enumerate(outputs):
        own, other = (np.corrcoef(output.ravel(), sources[j].ravel())[0, 1] for j in (i, 1 - i))
        assert own > 0.5 and abs(other) < 0.2, (i, own, other)
