"""Models too big for one protobuf message (issue 18): every place that would serialize a
whole model, or hand it to onnx.checker or shape inference in memory, goes through a file
saved with external data instead. Exercised on the small digits models by lowering
``io.PROTOBUF_LIMIT`` to 512 KB: the results must equal those of the in-memory path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxmerge import api, io, weights
from onnxmerge.calib import sessions
from onnxmerge.graph import shapes
from tests.helpers import similarity_formula

DIGITS = Path(__file__).resolve().parent.parent / "samples" / "digits"
A, B, CALIB = (str(DIGITS / name) for name in ("resnet_a.onnx", "resnet_b.onnx", "calib.npz"))
SMALL_LIMIT = 1 << 19  # below each digits model (690 KB), and their merge


def _lower_limit(monkeypatch, limit: int = SMALL_LIMIT) -> list[int]:
    """Lower the protobuf limit; the sizes of the models that then go through a temporary file."""
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", limit)
    through_files: list[int] = []
    real = io.model_file

    def counting(model):
        through_files.append(io.serialized_size(model))
        return real(model)

    for module in (io, sessions, shapes):
        monkeypatch.setattr(module, "model_file", counting)
    return through_files


def _tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: np.asarray(weights.read(init)) for init in model.graph.initializer}


def _same_model(ours: onnx.ModelProto, theirs: onnx.ModelProto) -> None:
    """Equal graphs (nodes, inputs, outputs) and equal initializer values."""
    assert list(ours.graph.node) == list(theirs.graph.node)
    assert list(ours.graph.output) == list(theirs.graph.output)
    ours_t, theirs_t = _tensors(ours), _tensors(theirs)
    assert ours_t.keys() == theirs_t.keys()
    for name in ours_t:
        np.testing.assert_array_equal(ours_t[name], theirs_t[name], err_msg=name)


def test_serialized_size_bounds_bytesize():
    model = io.load_model(A)
    size = model.ByteSize()
    assert size <= io.serialized_size(model) <= size + 64 * (len(model.graph.node) + len(model.graph.initializer)
                                                             + len(model.graph.value_info) + 64)
    assert not io.too_big(model)


def test_too_big_follows_the_module_limit(monkeypatch):
    model = io.load_model(A)
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", SMALL_LIMIT // 4)
    assert io.too_big(model)


def _fine_tune(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """``model`` with every float weight moved by 1% noise: a fine-tune for the same-base methods."""
    rng = np.random.default_rng(seed)
    tuned = onnx.ModelProto()
    tuned.CopyFrom(model)
    for init in tuned.graph.initializer:
        value = numpy_helper.to_array(init)
        if value.dtype == np.float32 and value.size > 1:
            noise = rng.standard_normal(value.shape).astype(np.float32) * 0.01 * np.abs(value).mean()
            init.CopyFrom(numpy_helper.from_array(value + noise, init.name))
    return tuned


@pytest.mark.parametrize("route", ["too-big", "mapped"])
@pytest.mark.parametrize("settings", [{"method": "zip"}, {"method": "zip", "bn": "fold"}, {"method": "linear"},
                                      {"method": "regmean"}], ids=["zip", "zip-repair", "linear", "regmean"])
def test_merge_on_the_large_model_routes_equals_the_in_memory_merge(monkeypatch, tmp_path, settings, route):
    """Models past protobuf's limit (in memory: everything goes through temporary files) and
    models whose weights stay in their external-data files (mapped: read as memory maps,
    results spilled) merge to the model the in-memory path gives."""
    zip_ = settings["method"] == "zip"
    calib = CALIB if settings["method"] != "linear" else None
    models = [io.load_model(A), io.load_model(B)] if zip_ else [_fine_tune(io.load_model(A), k) for k in (1, 2)]
    inputs, small = [], []
    for k, model in enumerate(models):  # as large models come: weights in external data
        inputs.append(tmp_path / f"model{k}.onnx")
        io.save_model(model, inputs[-1], external_data=True)
        small.append(tmp_path / f"small{k}.onnx")
        io.save_model(model, small[-1])
    expected = api.merge(small, calib, **settings)  # the in-memory path, at the real limit
    assert not io.too_big(expected.model)
    if route == "too-big":
        loaded = [io.load_model(path) for path in small]
        through_files = _lower_limit(monkeypatch)
        result = api.merge(loaded, calib, **settings)
        assert through_files, "nothing went through the large-model path"
    else:
        monkeypatch.setattr(weights, "MAPPED_MIN_BYTES", 4096)
        assert all(weights.has_mapped(io.load_model(path)) for path in inputs)
        result = api.merge(inputs, calib, **settings)
        held = [i.name for i in result.model.graph.initializer if len(i.raw_data) >= 4096]
        assert weights.has_mapped(result.model) and not held, f"merged weights held in memory: {held}"
    _same_model(result.model, expected.model)
    # saved with external data, which loads (and checks by path) to the same model
    path = tmp_path / "merged.onnx"
    result.save(path)
    assert (tmp_path / "merged.onnx.data").exists()
    _same_model(io.load_model(path), expected.model)
    x = np.load(CALIB)
    x = x[x.files[0]][:16]
    name = expected.model.graph.input[0].name
    ours = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {name: x})
    theirs = ort.InferenceSession(expected.model.SerializeToString(),
                                  providers=["CPUExecutionProvider"]).run(None, {name: x})
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)


def test_save_past_the_limit_writes_external_data(monkeypatch, tmp_path):
    """The save from the weightless shell, one tensor at a time, leaves the input as it was."""
    model = io.load_model(A)
    _lower_limit(monkeypatch)
    before = model.SerializeToString()
    io.save_model(model, tmp_path / "auto.onnx")  # past the lowered limit: external data
    io.save_model(model, tmp_path / "forced.onnx", external_data=True)
    assert model.SerializeToString() == before  # the input is not modified
    assert (tmp_path / "auto.onnx.data").read_bytes() == (tmp_path / "forced.onnx.data").read_bytes()
    reloaded = io.load_model(tmp_path / "auto.onnx")
    _same_model(reloaded, model)


def test_check_model_and_sha256_in_memory_past_the_limit(monkeypatch):
    model = io.load_model(A)
    small_digest = io.model_sha256_in_memory(model)
    through_files = _lower_limit(monkeypatch)
    io.check_model(model)  # through a temporary file
    assert through_files
    digest = io.model_sha256_in_memory(model)
    assert len(digest) == 64 and digest == io.model_sha256_in_memory(model) != small_digest


def test_shape_inference_past_the_limit_equals_in_memory(monkeypatch):
    model = io.load_model(A)
    expected = shapes.infer_shapes(_copy(model))
    # the weightless skeleton (no large initializers) just over the limit, its saved shell under it
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 64)
    through_files = _lower_limit(monkeypatch, io.serialized_size(shapes._skeleton(model)) - 1)
    ours = shapes.infer_shapes(_copy(model))
    assert through_files
    assert list(ours.graph.value_info) == list(expected.graph.value_info)
    assert list(ours.graph.output) == list(expected.graph.output)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _random_stats(seed: int):
    from onnxmerge.calib.stats import SpaceStats
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((64, 6)).astype(np.float32)
    b = np.concatenate([a[:, :3] * 2 + 1, np.zeros((64, 2), np.float32), rng.standard_normal((64, 1))], 1)
    stats = SpaceStats.empty((6, 6))
    stats.update([a, b.astype(np.float32)], precise=False)
    return stats


def test_statistics_added_in_place_are_the_same_numbers():
    """The memory-saving in-place forms give the numbers of the plain formulas."""
    from onnxmerge.calib.stats import combine_stats
    shards = [({"s": _random_stats(seed)}, {}) for seed in (1, 2, 3)]
    plain = combine_stats(shards)["s"]
    shards[2][0]["s"].outer.flags.writeable = False  # a read-only shard (as Ray returns) is only read
    in_place = combine_stats(shards, consume=True)["s"]
    assert in_place.count == plain.count
    np.testing.assert_array_equal(in_place.outer, plain.outer)
    np.testing.assert_array_equal(in_place.sum, plain.sum)
    np.testing.assert_array_equal(in_place.similarity(), similarity_formula(in_place))


@pytest.mark.parametrize("pair", ["digits", "transformer"])
def test_statistics_in_passes_give_the_same_merge(monkeypatch, zoo_files, pair):
    """Statistics past the budget are computed a group of spaces at a time, each group in its
    own pass over the data and matched before the next, and a space past it alone a block (a
    pair of models) a pass: the same merged model, byte for byte. Residual streams (a space
    with companion tensors) and attention heads (grids, whose block assignment later units
    reuse) included."""
    from onnxmerge.stages import statistics as stage
    if pair == "digits":
        models, calib = [A, B], CALIB
    else:
        path, x = zoo_files.get("transformer", "legacy_folded")
        models, calib = [path, api.permute(path, seed=1)], x
    expected = api.merge(models, calib)
    passes, blocks = [], []
    real, block = stage.GroupedStatistics._load, stage.collect_block
    monkeypatch.setattr(stage.GroupedStatistics, "_load", lambda self, index: (passes.append(index), real(self, index)))
    monkeypatch.setattr(stage, "collect_block", lambda *args, **kwargs: (blocks.append(args[4]), block(*args, **kwargs))[1])
    monkeypatch.setattr(stage, "STATISTICS_BUDGET", 1)  # one space a pass, a space alone a pair of models a pass
    result = api.merge(models, calib)
    assert len(passes) > 2 and passes == sorted(set(passes)), passes  # each pass once, in order
    assert blocks[:4] == [(0, 0), (0, 1), (1, 0), (1, 1)], blocks
    assert result.model.SerializeToString() == expected.model.SerializeToString()
