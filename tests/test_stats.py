"""Streaming statistics against direct numpy computations on all samples at once."""

from dataclasses import replace

import numpy as np
import pytest

from onnxmerge import weights
from onnxmerge.calib.stats import (AFFINE_BAND, BlockStats, ChannelMoments, SpaceStats, Statistics,
                                   combine_moments, combine_stats, load_moments, load_stats, pooled_similarity, save_stats, to_samples)
from onnxmerge.errors import CalibrationError
from tests.helpers import as_format_1, near_constant_copies, similarity_formula

WIDTHS = (6, 10)


def _features(seed: int, rows: int) -> list[np.ndarray]:
    """Correlated features of two models with offsets, so covariance is not trivial."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((rows, 8))
    first = base[:, :6] * np.arange(1, 7) + 3.0
    second = np.hstack([base @ rng.standard_normal((8, 4)), rng.standard_normal((rows, 6))]) - 1.5
    return [first.astype(np.float32), second.astype(np.float32)]


def _accumulate(batches: list[list[np.ndarray]], widths=WIDTHS) -> SpaceStats:
    stats = SpaceStats.empty(widths)
    for batch in batches:
        stats.update(batch)
    return stats


def _batches(seed: int, count: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [_features(seed * 1000 + k, int(rng.integers(1, 200))) for k in range(count)]


def _assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())


def test_streaming_equals_direct_computation():
    batches = _batches(1, 60)
    stats = _accumulate(batches)
    everything = np.vstack([np.hstack(batch) for batch in batches]).astype(np.float64)
    assert stats.count == everything.shape[0]
    assert stats.widths == WIDTHS
    _assert_close(stats.mean(), everything.mean(axis=0))
    _assert_close(stats.covariance(), np.cov(everything, rowvar=False, bias=True))
    _assert_close(stats.correlation(), np.corrcoef(everything, rowvar=False))


def test_two_shards_combined_equal_one_run():
    batches = _batches(2, 20)
    whole = _accumulate(batches)
    combined = _accumulate(batches[:7]) + _accumulate(batches[7:])
    assert combined.count == whole.count
    _assert_close(combined.sum, whole.sum)
    _assert_close(combined.outer, whole.outer)


@pytest.mark.parametrize("band_bytes", [8 * 16 * 3, 64 << 20])  # bands of 3 rows cross the model boundary
def test_moments_by_blocks_add_as_the_whole_matrix(monkeypatch, band_bytes):
    """A moments graph's upper blocks of X^T X add, band by band, to the same numbers as the
    whole (n, n) matrix, and these equal the direct computation on the uncentred rows."""
    monkeypatch.setattr(weights, "BAND_BYTES", band_bytes)
    first, second = _features(7, 50)
    shift = np.concatenate([first[0], second[0]]).astype(np.float64)
    rows = np.hstack([first, second]).astype(np.float64)
    centred = (rows - shift).astype(np.float32)
    a, b = centred[:, :6], centred[:, 6:]
    whole, blocks = SpaceStats.empty(WIDTHS), SpaceStats.empty(WIDTHS)
    total = centred.sum(axis=0, dtype=np.float64)
    whole.add_moments(50, total, (centred.T @ centred).astype(np.float64), shift)
    blocks.add_moments(50, total, [[a.T @ a, a.T @ b], [None, b.T @ b]], shift)
    np.testing.assert_array_equal(blocks.outer, whole.outer)
    np.testing.assert_array_equal(blocks.sum, whole.sum)
    # float32 products of the centred rows: relative error ~1e-7 * sqrt(rows) of the centred moments
    np.testing.assert_allclose(blocks.outer, rows.T @ rows, rtol=1e-5, atol=1e-5 * np.abs(rows.T @ rows).max())
    np.testing.assert_allclose(blocks.sum, rows.sum(axis=0), rtol=1e-6)


@pytest.mark.parametrize("band_bytes", [8 * 3, 64 << 20])  # a row a band; whole blocks
def test_statistics_a_block_per_pair_of_models_assemble_to_the_whole_bit_for_bit(monkeypatch, band_bytes):
    """A space too large to hold whole is computed a pair of models at a time (BlockStats,
    each pass the block a moments graph computes, transposed below the diagonal): assembled,
    the same numbers as SpaceStats.add_moments on the whole."""
    monkeypatch.setattr(weights, "BAND_BYTES", band_bytes)
    rng = np.random.default_rng(11)
    widths = (5, 7, 3)
    whole = SpaceStats.empty(widths)
    blocks = {(i, j): BlockStats.empty((i, j), widths) for i in range(3) for j in range(3)}
    for _ in range(4):
        features = [(rng.normal(size=(20, d)) * (k + 1) + 3).astype(np.float32) for k, d in enumerate(widths)]
        shifts = [f[0].copy() for f in features]
        centred = [f - s for f, s in zip(features, shifts)]
        totals = [c.sum(axis=0, dtype=np.float64) for c in centred]
        products = [[centred[i].T @ centred[j] if j >= i else None for j in range(3)] for i in range(3)]
        whole.add_moments(20, np.concatenate(totals), products, np.concatenate(shifts))
        for (i, j), block in blocks.items():
            models = [i] if i == j else [i, j]
            block.add_moments(20, [totals[m] for m in models], products[i][j] if j >= i else products[j][i].T,
                              [shifts[m] for m in models])
    spilled = [replace(b, outer=weights.spill().apart(b.outer)) for b in blocks.values()]  # as the stage keeps them
    assembled = SpaceStats.from_blocks(spilled[::-1], widths)
    np.testing.assert_array_equal(assembled.outer, whole.outer)
    np.testing.assert_array_equal(assembled.sum, whole.sum)
    assert assembled.count == whole.count
    with pytest.raises(CalibrationError, match="one per pair"):
        SpaceStats.from_blocks(spilled[1:], widths)
    for block in spilled:
        weights.discard(block.outer)


def test_fast_update_is_close():
    batches = _batches(3, 5)
    precise = _accumulate(batches)
    fast = SpaceStats.empty(WIDTHS)
    for batch in batches:
        fast.update(batch, precise=False)
    np.testing.assert_allclose(fast.correlation(), precise.correlation(), atol=1e-5)


def test_dead_channels_have_zero_correlation():
    rng = np.random.default_rng(4)
    first = rng.standard_normal((500, 4)).astype(np.float32)
    first[:, 1] = 0.0  # dead ReLU
    first[:, 3] = 7.3  # constant
    second = rng.standard_normal((500, 3)).astype(np.float32)
    second[:, 0] = -2.1
    stats = SpaceStats.empty((4, 3))
    for start in range(0, 500, 100):
        stats.update([first[start:start + 100], second[start:start + 100]])
    corr = stats.correlation()
    assert np.isfinite(corr).all()
    dead = [1, 3, 4]
    live = [0, 2, 5, 6]
    assert (corr[dead, :] == 0).all() and (corr[:, dead] == 0).all()
    np.testing.assert_array_equal(np.diag(corr)[live], 1.0)
    assert np.abs(corr).max() <= 1.0
    np.testing.assert_allclose(corr, corr.T)


def test_fast_update_keeps_nearly_constant_channels_apart_from_constant_ones():
    # mean 6, std 1e-3: the variance is 3e-8 of E[x^2], below float32 rounding of raw products
    rng = np.random.default_rng(6)
    near = 6.0 + 1e-3 * rng.standard_normal((4000, 3))
    first = np.hstack([near, np.full((4000, 1), 6.0)]).astype(np.float32)
    stats = SpaceStats.empty((4, 4))
    for start in range(0, 4000, 1000):
        stats.update([first[start:start + 1000], first[start:start + 1000, ::-1]], precise=False)
    np.testing.assert_array_equal(stats.live(), [True, True, True, False, False, True, True, True])
    np.testing.assert_allclose(stats.correlation()[[0, 1, 2], [7, 6, 5]], 1.0, atol=1e-6)


def test_similarity_ranks_affine_pairs_by_how_nearly_equal_they_are():
    rng = np.random.default_rng(7)
    signal = rng.standard_normal((300, 1))
    # 0-1 independent, 2-4 affine in one signal (4 equals 2), 5-7 constant (7 equals 5)
    features = np.hstack([rng.standard_normal((300, 2)), signal, 2 * signal + 1, signal,
                          np.full((300, 1), 3.0), np.full((300, 1), -1.0), np.full((300, 1), 3.0)])
    stats = SpaceStats.empty((8,))
    stats.update([features])
    corr, similarity = stats.correlation(), stats.similarity()
    independent = [0, 1]
    np.testing.assert_array_equal(similarity[independent][:, [0, 1, 2, 5]], corr[independent][:, [0, 1, 2, 5]])
    np.testing.assert_allclose(np.diag(similarity), 1.0)
    for same, other in [((2, 4), (2, 3)), ((5, 7), (5, 6))]:
        assert similarity[same] > 1 - 1e-12 and 1 - 1e-6 > similarity[other] >= 1 - AFFINE_BAND
    assert (similarity[:5, 5:] == 0).all()


def test_similarity_pairs_a_near_constant_feature_with_its_copy_across_the_dead_threshold():
    stats, perm = near_constant_copies()
    live = stats.live()
    where = int(np.flatnonzero(perm == 0)[0])
    assert live[0] and not live[8:].any()  # the copies fall on either side of DEAD_RTOL
    similarity = stats.similarity()
    assert similarity[0, 8 + where] > 1 - 1e-9
    strangers = np.delete(similarity[0, 8:], where)
    assert strangers.max() < similarity[0, 8 + where]


def test_models_vary_pools_the_channels():
    stats, _ = near_constant_copies()
    np.testing.assert_array_equal(stats.models_vary(), [False, False])
    rng = np.random.default_rng(10)
    varied = SpaceStats.empty((3, 3))
    varied.update([rng.standard_normal((16, 3)), np.ones((16, 3))])
    np.testing.assert_array_equal(varied.models_vary(), [True, False])


def test_no_samples_raises():
    with pytest.raises(CalibrationError, match="no samples"):
        SpaceStats.empty(WIDTHS).correlation()


@pytest.mark.parametrize("features, message", [
    ([np.zeros((3, 6))], "2 models"),
    ([np.zeros((3, 6)), np.zeros((3, 9))], "model 1 gave features of shape"),
    ([np.zeros((3, 6)), np.zeros((4, 10))], "different numbers of feature rows"),
    ([np.zeros((3, 6)), np.full((3, 10), np.nan)], "model 1 produced NaN"),
], ids=["model-count", "width", "rows", "nan"])
def test_bad_batches_raise(features, message):
    with pytest.raises(CalibrationError, match=message):
        SpaceStats.empty(WIDTHS).update(features)


def test_to_samples_nchw():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    rows = to_samples(x, 1)
    assert rows.shape == (40, 3)
    np.testing.assert_array_equal(rows[1 * 20 + 2 * 5 + 3], x[1, :, 2, 3])  # row n*H*W + h*W + w


def test_to_samples_ntc_and_nc():
    x = np.arange(2 * 7 * 3, dtype=np.float32).reshape(2, 7, 3)
    rows = to_samples(x, 2)
    assert rows.shape == (14, 3)
    np.testing.assert_array_equal(rows[7 + 4], x[1, 4])
    y = np.arange(15, dtype=np.float32).reshape(5, 3)
    np.testing.assert_array_equal(to_samples(y, 1), y)


def _stats_dict(seed: int) -> dict[str, SpaceStats]:
    return {"/stem/Conv_output_0:1": _accumulate(_batches(seed, 3)),
            "S 2/odd:name": _accumulate(_batches(seed + 1, 2), WIDTHS)}


def test_save_load_round_trip(tmp_path):
    stats = _stats_dict(5)
    meta = {"fingerprint": "abc123", "provider": "cpu"}
    path = tmp_path / "stats.npz"
    save_stats(path, stats, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.npz"]  # no temporary left
    loaded, loaded_meta = load_stats(path)
    assert loaded_meta == meta
    assert list(loaded) == list(stats)
    for name, space in stats.items():
        assert loaded[name].count == space.count and loaded[name].widths == space.widths
        np.testing.assert_array_equal(loaded[name].sum, space.sum)
        np.testing.assert_array_equal(loaded[name].outer, space.outer)


def test_save_keeps_the_given_name(tmp_path):
    path = tmp_path / "shard.stats"
    save_stats(path, _stats_dict(6), {})
    assert path.exists() and load_stats(path)[1] == {}


def test_combine_stats_adds_shards():
    first, second = _stats_dict(7), _stats_dict(8)
    meta = {"fingerprint": "f"}
    combined = combine_stats([(first, meta), (second, {"fingerprint": "f", "provider": "cuda"})])
    for name in first:
        assert combined[name].count == first[name].count + second[name].count
        _assert_close(combined[name].outer, first[name].outer + second[name].outer)


@pytest.mark.parametrize("change, message", [
    (lambda s, m: ({k: v for k, v in list(s.items())[:1]}, m), "different spaces"),
    (lambda s, m: (s, {"fingerprint": "other"}), "differ in fingerprint"),
    (lambda s, m: ({**s, "S 2/odd:name": SpaceStats.empty((6, 9))}, m), "differ in the widths"),
], ids=["spaces", "fingerprint", "widths"])
def test_combine_mismatched_shards_raises(change, message):
    stats, meta = _stats_dict(9), {"fingerprint": "f"}
    with pytest.raises(CalibrationError, match=message):
        combine_stats([(stats, meta), change(stats, meta)], sources=["a.npz", "b.npz"])


@pytest.mark.parametrize("content", [b"not numpy at all", b""], ids=["text", "empty"])
def test_load_stats_rejects_other_files(tmp_path, content):
    path = tmp_path / "bad.npz"
    path.write_bytes(content)
    with pytest.raises(CalibrationError, match="bad.npz"):
        load_stats(path)


def test_load_stats_rejects_plain_npz(tmp_path):
    path = tmp_path / "inputs.npz"
    np.savez(path, x=np.zeros(3))
    with pytest.raises(CalibrationError, match="not an onnxmerge statistics file"):
        load_stats(path)


def _moments(x: np.ndarray, batch: int) -> ChannelMoments:
    """Moments of the rows of ``x`` (samples x channels) pooled batch by batch, as measured."""
    pooled = ChannelMoments()
    for start in range(0, len(x), batch):
        part = x[start:start + batch]
        pooled.add(len(part), part.mean(axis=0), part.var(axis=0))
    return pooled


_COLUMNS = [{"conv/out": slice(0, 4), "odd name:1": slice(4, 6)}, {"conv/out": slice(6, 9)}]
"""Two models' tensors (model 0 has two, model 1 one) as columns of one array of samples."""


def _tensors(x: np.ndarray) -> list[dict[str, ChannelMoments]]:
    """The source moments of ``_COLUMNS`` in ``x``, in batches of 7 samples."""
    return [{tensor: _moments(x[:, columns], 7) for tensor, columns in model.items()} for model in _COLUMNS]


def test_moments_of_shards_pool_to_those_of_all_samples():
    x = np.random.default_rng(3).normal(50.0, 0.5, (90, 9))  # a large mean: pooling must not cancel
    whole, shards = _tensors(x), combine_moments([_tensors(x[:31]), _tensors(x[31:])])
    for columns, mine, theirs in zip(_COLUMNS, shards, whole):
        assert list(mine) == list(theirs)
        for tensor, moments in mine.items():
            assert moments.count == theirs[tensor].count == 90
            np.testing.assert_allclose(moments.mean, theirs[tensor].mean, rtol=1e-12)
            np.testing.assert_allclose(moments.var, theirs[tensor].var, rtol=1e-9)
            np.testing.assert_allclose(moments.var, x[:, columns[tensor]].var(axis=0), rtol=1e-9)  # all rows at once


def test_moments_round_trip_and_a_format_1_file_loads_without_them(tmp_path):
    moments = _tensors(np.random.default_rng(4).normal(size=(20, 9)))
    path = tmp_path / "stats.npz"
    save_stats(path, Statistics(_stats_dict(5), moments), {"fingerprint": "f"})
    loaded, meta = load_stats(path)
    assert list(loaded) == list(_stats_dict(5)) and meta == {"fingerprint": "f"}
    for read in (loaded.moments, load_moments(path)[0]):
        assert [list(model) for model in read] == [list(model) for model in moments]
        for mine, theirs in zip(read, moments):
            for tensor, pooled in mine.items():
                assert pooled.count == theirs[tensor].count
                np.testing.assert_array_equal(pooled.mean, theirs[tensor].mean)
                np.testing.assert_array_equal(pooled.m2, theirs[tensor].m2)
    as_format_1(path)
    old, _ = load_stats(path)
    assert old.moments is None and load_moments(path) == (None, {"fingerprint": "f"})
    np.testing.assert_array_equal(old["S 2/odd:name"].outer, loaded["S 2/odd:name"].outer)


@pytest.mark.parametrize("field, value, message", [
    ("m2", -np.ones(4), "negative"), ("count", np.array(0, np.int64), "at least 1"), ("mean", np.zeros(3), "shape"),
])
def test_damaged_moments_are_refused(tmp_path, field, value, message):
    path = tmp_path / "stats.npz"
    save_stats(path, Statistics(_stats_dict(5), _tensors(np.ones((4, 9)))), {})
    with np.load(path) as arrays:
        content = {key: arrays[key] for key in arrays.files} | {f"m0/0/{field}": value}
    np.savez(path, **content)
    for load in (load_stats, load_moments):
        with pytest.raises(CalibrationError, match=f"damaged statistics file .*conv/out.*{message}"):
            load(path)


def test_moments_of_other_tensors_do_not_combine():
    x = np.ones((4, 9))
    with pytest.raises(CalibrationError, match="b.npz and a.npz hold the moments of different tensors"):
        combine_moments([_tensors(x), _tensors(x)[:1]], ["a.npz", "b.npz"])


def test_pooled_similarity_is_the_count_weighted_mean_of_the_correlations():
    """Two tensors of one space (300 and 100 rows): the mean of their numpy correlations,
    weighted 3:1; one tensor alone gives its own similarity exactly."""
    first, second = _accumulate([_features(1, 300)]), _accumulate([_features(2, 100)])
    expected = (3 * np.corrcoef(np.hstack(_features(1, 300)), rowvar=False)
                + np.corrcoef(np.hstack(_features(2, 100)), rowvar=False)) / 4
    np.testing.assert_allclose(pooled_similarity([first, second]), expected, atol=1e-6)
    np.testing.assert_array_equal(pooled_similarity([first]), first.similarity())


@pytest.mark.parametrize("band_bytes", [weights.BAND_BYTES, 8 * 7 * 7])  # one tile; 7 x 7 tiles (pairs across)
def test_similarity_by_tiles_is_the_whole_matrix_formula_and_consuming_it_changes_nothing(monkeypatch, band_bytes):
    monkeypatch.setattr(weights, "BAND_BYTES", band_bytes)
    rng = np.random.default_rng(5)
    a = rng.normal(size=(200, 12)).astype(np.float32)
    b = np.concatenate([a[:, ::-1] * 1.0001 + 0.5, rng.normal(size=(200, 8))], axis=1).astype(np.float32)
    a[:, 2] = 3.0  # a dead channel
    stats = SpaceStats.empty((12, 20))
    for rows in range(0, 200, 50):
        stats.update([a[rows:rows + 50], b[rows:rows + 50]], precise=False)
    expected = similarity_formula(stats)
    assert np.array_equal(stats.similarity(), expected)
    assert np.array_equal(stats.covariance(), stats.covariance().T)
    outer = stats.outer
    consumed = stats.similarity(consume=True)
    assert consumed is outer and stats.outer is None  # computed in the statistics' memory
    assert np.array_equal(consumed, expected)
