"""Width heterogeneity: widen preserves outputs; merging a model with its widened copy gives
the model back; models of three widths merge and run."""

from __future__ import annotations

import numpy as np
import pytest

from onnxmerge import api
from onnxmerge.errors import RecipeError
from onnxmerge.io import load_model, save_model
from tests.helpers import run_all, CASES, outputs_close


@pytest.mark.parametrize("name,exporter", CASES)
def test_widen_preserves_outputs(zoo_files, name, exporter):
    path, x = zoo_files.get(name, exporter)
    model = load_model(path)
    wider = api.widen(model, factor=2.0, seed=3)
    widths = {i.name: tuple(i.dims) for i in wider.graph.initializer}
    assert sum(np.prod(d) for d in widths.values()) > sum(np.prod(i.dims) for i in model.graph.initializer)
    outputs_close(run_all(model, x), run_all(wider, x))


WIDEN_MERGE = [("mlp", "legacy_folded"), ("resnet_basic", "legacy_bn"), ("vgg_bn", "dynamo"),
               ("mobilenetv2", "legacy_bn"), ("densenet", "legacy_bn"), ("transformer", "dynamo"),
               ("resnext", "dynamo"), ("mobilenetv2_saturated", "legacy_folded"),
               ("mobilenetv2_saturated", "legacy_bn")]


@pytest.mark.parametrize("target", ["wide", "narrow"])
@pytest.mark.parametrize("name,exporter", WIDEN_MERGE, ids=[f"{m}-{e}" for m, e in WIDEN_MERGE])
def test_merge_with_widened_copy_gives_self(zoo_files, tmp_path, name, exporter, target):
    # alpha 1: with 0.5 a joined pair's link to the feature's second copy (0.5) loses to strong
    # correlations between different features, and the copy joins the wrong cluster
    path, x = zoo_files.get(name, exporter)
    wide = tmp_path / "wide.onnx"
    save_model(api.permute(api.widen(load_model(path), factor=2.0, seed=5), seed=6), wide)
    np.save(tmp_path / "calib.npy", x)
    options = api.MergeOptions(alpha=1.0, repair="none", width=1.0 if target == "wide" else "min")
    result = api.merge([path, str(wide)], calibration=str(tmp_path / "calib.npy"), options=options)
    expected = run_all(load_model(path), x)
    outputs_close(expected + expected, run_all(result.model, x))


def test_three_widths_merge_and_run(zoo_files, tmp_path):
    path, x = zoo_files.get("resnet_basic", "legacy_bn")
    models = [path]
    for factor in (1.5, 2.0):
        wider = tmp_path / f"w{factor}.onnx"
        save_model(api.widen(load_model(path), factor=factor, seed=int(factor * 10)), wider)
        models.append(str(wider))
    np.save(tmp_path / "calib.npy", x)
    result = api.merge(models, calibration=str(tmp_path / "calib.npy"))
    widths = {row["space"]: (row["widths"], row["merged_width"]) for row in result.report["spaces"]}
    assert any(len(set(w)) == 3 for w, _ in widths.values())
    assert all(r == max(w) for w, r in widths.values())
    outputs = run_all(result.model, x)
    assert len(outputs) == 3 and all(np.isfinite(o).all() for o in outputs)


def test_permute_and_average_refuse_unequal_widths(zoo_files, tmp_path):
    path, x = zoo_files.get("mlp", "legacy_folded")
    wide = tmp_path / "wide.onnx"
    save_model(api.widen(load_model(path), factor=2.0), wide)
    np.save(tmp_path / "calib.npy", x)
    for method in ("permute", "average"):
        with pytest.raises(RecipeError, match="use --method zip"):
            api.merge([path, str(wide)], calibration=str(tmp_path / "calib.npy"), options=api.MergeOptions(method=method))


def split_shuffle_net():
    """ShuffleNet v2's unit twice: the channels split in halves, one half passes and the other
    goes through a branch, and the halves are concatenated and shuffled (an Interleave); the
    next unit's split cuts that Interleave, a barrier that fixes the passing half."""
    import torch
    from torch import nn

    from tests import zoo

    class Unit(nn.Module):
        def __init__(self, width: int):
            super().__init__()
            self.branch = nn.Sequential(nn.Conv2d(width // 2, width // 2, 1), nn.BatchNorm2d(width // 2),
                                        nn.ReLU(), nn.Conv2d(width // 2, width // 2, 3, padding=1, groups=width // 2))

        def forward(self, x):
            kept, changed = x.chunk(2, dim=1)
            return zoo.channel_shuffle(torch.cat([kept, self.branch(changed)], dim=1), 2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.units = nn.Sequential(Unit(16), Unit(16))
            self.head = nn.Conv2d(16, 24, 1)
            self.fc = nn.Linear(24, 10)

        def forward(self, x):
            return self.fc(self.head(self.units(self.stem(x))).mean((2, 3)))

    torch.manual_seed(0)
    return zoo._randomize_norms(Net(), 0).eval()


@pytest.mark.parametrize("exporter", ["legacy_folded", "dynamo"])
def test_widen_keeps_the_halves_of_a_channel_split_and_shuffle_even(tmp_path, exporter):
    torch = pytest.importorskip("torch")
    from tests import zoo

    path = str(tmp_path / "split_shuffle.onnx")
    zoo.EXPORTERS[exporter](split_shuffle_net(), torch.randn(2, 3, 16, 16), path)
    model, x = load_model(path), np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    wider = api.widen(model, factor=1.5, seed=3)
    outputs_close(run_all(model, x), run_all(wider, x))
    assert sum(i.ByteSize() for i in wider.graph.initializer) > sum(i.ByteSize() for i in model.graph.initializer)


def _one_channel_gate():
    """conv -> Split([1, 15]): a 1-channel score broadcast over the other 15 (MobileViTv2's
    linear attention: key * softmax(query)) -> conv."""
    from onnx import helper
    from tests.helpers import const, model
    nodes = [helper.make_node("Split", ["y", "sizes"], ["q", "k"], axis=1),
             helper.make_node("Sigmoid", ["q"], ["score"]),
             helper.make_node("Mul", ["k", "score"], ["z"])]
    return model(nodes, [const("sizes", np.array([1, 15], np.int64))], out_shape=(None, 15))


def test_a_one_channel_space_that_broadcasts_stays_one_channel(tmp_path):
    gate = _one_channel_gate()
    x = np.random.default_rng(0).standard_normal((32, 8, 4, 4)).astype(np.float32)
    wider = api.widen(gate, factor=1.5, seed=1)
    outputs_close(run_all(gate, x), run_all(wider, x))
    save_model(gate, tmp_path / "a.onnx")
    save_model(wider, tmp_path / "b.onnx")
    np.save(tmp_path / "calib.npy", x)
    merged = api.merge([str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")], calibration=str(tmp_path / "calib.npy"),
                       options=api.MergeOptions(method="zip", width=1.5, repair="none"))
    assert len(run_all(merged.model, x)) == 2  # valid at 1.5x: the score stays one channel
