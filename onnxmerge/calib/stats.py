"""Streaming sufficient statistics of the features at one space (method.md §2).
(Long because the file format, its validation and CKA share the statistics' representation.)

For each space the features of all models are concatenated (model 0's d_0 channels, then model
1's, ...), giving n = sum d_i features per sample. ``SpaceStats`` keeps, in float64, the sample
count, the feature sums and the sum of x x^T; memory is O(n^2) whatever the number of samples,
and statistics of shards add up exactly.

Precision: the covariance is E[xx^T] - mu mu^T, whose rounding error is about
eps * E[x^2] per entry; relative to the variance that is eps * (1 + mean^2 / variance): float64
(eps 1e-16) keeps it negligible, float32 (1e-7) would not for nearly constant channels (a mean
of 6 and a standard deviation of 0.01 leave the variance 3e-6 of E[x^2], and copies of such a
channel would correlate at 0.9). So each batch's products are taken of the rows minus a shift
near the mean (the batch's first row), whose error is relative to the variance, and only the
float64 accumulation adds the shift back (``add_moments``). ``update(..., precise=False)``
multiplies in float32 (faster; see ``update``): entries then carry a relative error of roughly
1e-7 * sqrt(batch rows) of the centred second moment.

``ChannelMoments`` are the per-channel mean and variance of one tensor that REPAIR reads of the
source models; a statistics file (``save_stats``) holds them beside the spaces' statistics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .. import weights
from ..errors import CalibrationError
from ..io import write_atomically
from .arrays import ArrayFile

DEAD_RTOL = 1e-10
"""A channel is dead (constant) when its variance is at most ``DEAD_RTOL`` times its second
moment E[x^2]: below that the variance is rounding noise of E[x^2] - mean^2 (float64 noise is
~1e-16 relative; a constant channel's centred products are exactly 0, whatever their precision)."""

AFFINE_BAND = 1e-3
"""Live features correlated at least 1 - ``AFFINE_BAND`` are affine functions of each other up
to rounding (two constant features are too); ``SpaceStats.similarity`` ranks such pairs by how
nearly equal they are, inside the band [1 - AFFINE_BAND, 1]. Wide enough for the rounding
between two copies of a feature (centred moments), too narrow for features that merely agree."""

EQUAL_RTOL = AFFINE_BAND ** 2
"""Two features whose mean squared difference is at most ``EQUAL_RTOL`` of their mean power
(equal on every sample to about ``AFFINE_BAND`` relative) are copies up to float32 rounding
whatever their correlation: a nearly constant feature (a pooled squeeze-excite or head tensor of
16 samples) varies at the level of the rounding that tells it from its copy, so their
correlation is noise and one of them may even fall under ``DEAD_RTOL`` while the other does not.
``SpaceStats.similarity`` ranks such pairs by agreement like affine ones."""

CKA_RTOL = 1e-12
"""A tensor's CKA is undefined when its HSIC(K, K) is at most ``CKA_RTOL`` of the trace term
it is computed from (``CKAStats``): what float64 cancellation leaves of a tensor that does not
vary (up to about 1e-13 for batches of 500), below a varying tensor's (one whose mean is 100
times its standard deviation still gives 1e-11; above that, the uncentred Gram products lose
the variation to rounding anyway)."""

_FORMAT = "onnxmerge-stats-2"
_FORMATS = ("onnxmerge-stats-1", _FORMAT)  # format 1: no source moments
_META_KEY, _SPACES_KEY, _FORMAT_KEY, _MOMENTS_KEY = "__meta__", "__spaces__", "__format__", "__moments__"
_FIELDS = ("count", "sum", "outer", "widths")
_MOMENT_FIELDS = ("count", "mean", "m2")
_FIX = "give a file written by onnxmerge calibrate"


def to_samples(x: np.ndarray, axis: int, fold: tuple[int, int] = (1, 1), span: int = 1) -> np.ndarray:
    """Rows of features: ``axis`` becomes the last axis and every other axis is flattened.

    [N, C, H, W] with axis 1 gives (N*H*W, C); [N, T, C] with axis 2 gives (N*T, C);
    [N, C] with axis 1 stays (N, C). With ``fold`` (a, b) the axis is read as [a, C, b] and
    its a and b positions become rows too. With ``span`` the axes from ``axis`` on are first
    merged into one: [N, T, H, Dh] with axis 2 and span 2 gives (N*T, H*Dh).
    """
    x = x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + span:])
    width = x.shape[axis] // (fold[0] * fold[1])
    if fold != (1, 1):
        x = x.reshape(x.shape[:axis] + (fold[0], width, fold[1]) + x.shape[axis + 1:])
        axis += 1
    return np.moveaxis(x, axis, -1).reshape(-1, width)


def _band(outer: np.ndarray | list[list[np.ndarray | None]], rows: slice, widths: tuple[int, ...]) -> np.ndarray:
    """Rows ``rows`` of an (n, n) matrix given whole or by blocks (``SpaceStats.add_moments``),
    in float64 (a view of a float64 array)."""
    if isinstance(outer, np.ndarray):
        return np.asarray(outer[rows], np.float64)
    edges = np.concatenate([[0], np.cumsum(widths)])
    band = np.empty((rows.stop - rows.start, edges[-1]), np.float64)
    for i in range(len(widths)):
        lo, hi = max(rows.start, edges[i]), min(rows.stop, edges[i + 1])
        if lo >= hi:
            continue
        for j in range(len(widths)):
            block = outer[i][j] if outer[i][j] is not None else outer[j][i].T
            band[lo - rows.start:hi - rows.start, edges[j]:edges[j + 1]] = block[lo - edges[i]:hi - edges[i]]
    return band


def _shifted_sum(count: int, total: np.ndarray, shift: np.ndarray | None, widths: Sequence[int],
                 models: Sequence[int] | None = None) -> np.ndarray:
    """A batch's sum of the features from the sum of the features minus ``shift``; refuses NaN
    or Inf features, naming the model (``widths``: the features' models, in order, which are
    ``models``; default 0, 1, ...)."""
    shifted = total if shift is None else total + count * shift
    if not np.isfinite(shifted).all():
        bad = np.flatnonzero(~np.isfinite(shifted))
        model = int(np.searchsorted(np.cumsum(widths), bad[0], side="right"))
        model = model if models is None else models[model]
        raise CalibrationError(f"model {model} produced NaN or Inf features ({len(bad)} channels); "
                               "check the model on the calibration data with onnxruntime")
    return shifted


def _add_products(target: np.ndarray, band: np.ndarray, count: int, shifted: tuple | None) -> None:
    """``target`` += the products of uncentred features: ``band`` (float64, overwritten), entries
    of sum (x - s)(x - s)^T, plus the shift's cross terms; ``shifted`` is (the rows' shift, the
    rows' sum of x - s, the columns' shift, the columns' sum), or None: no shift. Refuses
    products that overflowed."""
    if shifted is not None:
        shift_rows, total_rows, shift_cols, total_cols = shifted
        # outer + cross + cross^T + count * shift shift^T, added in this order
        band += np.outer(shift_rows, total_cols)
        band += np.outer(total_rows, shift_cols)
        band += count * np.outer(shift_rows, shift_cols)
    if not np.isfinite(band).all():  # finite features whose products overflowed float32
        raise CalibrationError("the features' products X^T X hold NaN or Inf values (they overflow); check "
                               "the model on the calibration data with onnxruntime")
    target += band


@dataclass(eq=False)
class SpaceStats:
    """Count, sum and sum of outer products of the concatenated features at one space.

    Attributes:
        count: number of samples (feature rows) accumulated.
        sum: (n,) float64 sum of the rows.
        outer: (n, n) float64 sum of x x^T over the rows.
        widths: each model's number of features; n = sum(widths).
    """

    count: int
    sum: np.ndarray
    outer: np.ndarray
    widths: tuple[int, ...]

    @classmethod
    def empty(cls, widths: tuple[int, ...] | list[int]) -> SpaceStats:
        widths = tuple(int(w) for w in widths)
        n = sum(widths)
        return cls(0, np.zeros(n, np.float64), np.zeros((n, n), np.float64), widths)

    @classmethod
    def from_blocks(cls, blocks: Sequence[BlockStats], widths: Sequence[int]) -> SpaceStats:
        """The statistics of a space computed a block at a time (``BlockStats``, one for each
        ordered pair of models, in any order): the same numbers as computed whole. A block may
        be a memory map (spilled): it is read a band of rows at a time.

        Raises:
            CalibrationError: a pair missing or given twice, or blocks of different sample counts.
        """
        widths = tuple(int(w) for w in widths)
        pairs = sorted(b.pair for b in blocks)
        every = [(i, j) for i in range(len(widths)) for j in range(len(widths))]
        if pairs != every or len({b.count for b in blocks}) != 1:
            raise CalibrationError(f"blocks {pairs} of different sample counts or not one per pair of models; "
                                   "compute every pair's block on the same data")
        edges = np.concatenate([[0], np.cumsum(widths)])
        stats = cls(blocks[0].count, np.empty(edges[-1]), np.empty((edges[-1], edges[-1])), widths)
        for block in blocks:
            i, j = block.pair
            for model, total in zip(block.pair, block.sums):
                stats.sum[edges[model]:edges[model + 1]] = total
            for rows in weights.row_bands(block.outer.shape):
                band = weights.read_rows(block.outer, rows)
                stats.outer[edges[i] + rows.start:edges[i] + rows.stop, edges[j]:edges[j + 1]] = band
        return stats

    @property
    def width(self) -> int:
        return sum(self.widths)

    def update(self, features: list[np.ndarray], *, precise: bool = True) -> None:
        """Add one batch: ``features[i]`` is model i's (rows, d_i) array, same rows for every model.

        Args:
            features: float arrays, already shaped by ``to_samples``.
            precise: form the batch's X^T X in float64 (default). False forms it in float32 and
                only accumulates in float64: about 2x faster on large spaces, at a relative error
                of roughly 1e-7 * sqrt(rows) (see the module docstring).

        Raises:
            CalibrationError: shapes do not fit the widths, or a model produced NaN/Inf.
        """
        self._check_batch(features)
        dtype = np.float64 if precise else np.float32
        batch = np.concatenate([np.asarray(f, dtype=dtype) for f in features], axis=1)
        shift = batch[0].copy() if len(batch) else np.zeros(batch.shape[1], dtype)
        batch -= shift  # concatenate copied the features
        # numpy uses a symmetric rank-k product for X^T X
        self.add_moments(batch.shape[0], batch.sum(axis=0, dtype=np.float64), batch.T @ batch, shift)

    def add_moments(self, count: int, total: np.ndarray, outer: np.ndarray | list[list[np.ndarray | None]],
                    shift: np.ndarray | None = None) -> None:
        """Add a batch's moments computed elsewhere: count, sum of x - shift and sum of
        (x - shift)(x - shift)^T (shift 0 when None; see the module docstring for why to shift).

        Args:
            outer: the (n, n) array, or its blocks by model: ``outer[i][j]`` the (d_i, d_j)
                block, None below the diagonal for the transpose of the block above it (what a
                moments graph computes). Taken into float64 a band of rows at a time, so that
                no (n, n) temporary is made; a float64 array is used in place (the callers pass
                a batch's temporary).

        Raises:
            CalibrationError: a model produced NaN/Inf features.
        """
        total, shift = np.asarray(total, np.float64), None if shift is None else np.asarray(shift, np.float64)
        summed = _shifted_sum(count, total, shift, self.widths)
        for rows in weights.row_bands(self.outer.shape):
            shifted = None if shift is None else (shift[rows], total[rows], shift, total)
            _add_products(self.outer[rows], _band(outer, rows, self.widths), count, shifted)
        self.count += int(count)
        self.sum += summed

    def _check_batch(self, features: list[np.ndarray]) -> None:
        if len(features) != len(self.widths):
            raise CalibrationError(f"{len(features)} feature arrays for a space of {len(self.widths)} models")
        rows = {f.shape[0] if f.ndim == 2 else -1 for f in features}
        for index, (array, width) in enumerate(zip(features, self.widths)):
            if array.ndim != 2 or array.shape[1] != width:
                raise CalibrationError(f"model {index} gave features of shape {array.shape} at a space of "
                                       f"width {width}; compare the model with onnxmerge inspect")
        if len(rows) > 1:
            raise CalibrationError(f"the models gave different numbers of feature rows {sorted(rows)} for one batch; "
                                   "feed every model the same samples")

    def __add__(self, other: SpaceStats) -> SpaceStats:
        return combine(self, other)

    def mean(self) -> np.ndarray:
        """(n,) feature means."""
        if self.count == 0:
            raise CalibrationError(f"no samples were accumulated at a space of widths {self.widths}; "
                                   "give at least one calibration batch")
        return self.sum / self.count

    def covariance(self) -> np.ndarray:
        """(n, n) population covariance E[xx^T] - mu mu^T (divides by count), symmetric."""
        return self._derived(self._covariance_tiles())

    def _covariance_tiles(self) -> Callable:
        mu = self.mean()

        def tiles(rows: slice, cols: slice, upper: np.ndarray, lower: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            means = np.outer(mu[rows], mu[cols])
            mean = ((upper - means) + (lower - means)) / 2  # symmetric: the mean of both mirrored entries
            return mean, mean
        return tiles

    def _variance(self) -> np.ndarray:
        """(n,) the covariance's diagonal, computed as ``covariance`` computes it (same numbers)."""
        mu = self.mean()
        return np.diagonal(self.outer) / self.count - mu * mu

    def live(self, *, dead_rtol: float = DEAD_RTOL) -> np.ndarray:
        """(n,) bool: the channel varies, i.e. its variance exceeds ``dead_rtol`` * E[x^2]
        (see ``DEAD_RTOL``); the others are dead (constant)."""
        return self._variance() > dead_rtol * np.diagonal(self.outer) / self.count

    def models_vary(self, *, dead_rtol: float = DEAD_RTOL) -> np.ndarray:
        """(models,) bool: model i's features vary, i.e. their summed variance exceeds
        ``dead_rtol`` times their summed E[x^2]. Pooled rather than any live channel, so one
        nearly constant channel on either side of ``live``'s threshold does not decide alone
        whether a model has features at a space."""
        bounds = np.cumsum([0, *self.widths])
        variance, power = self._variance(), np.diagonal(self.outer) / self.count
        return np.array([variance[a:b].sum() > dead_rtol * power[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])

    def correlation(self, *, dead_rtol: float = DEAD_RTOL) -> np.ndarray:
        """(n, n) Pearson correlation, finite everywhere and clipped into [-1, 1].

        A dead channel (see ``live``) has correlation 0 to everything, itself included; a live
        channel has 1 on the diagonal.
        """
        return self._derived(self._correlation_tiles(dead_rtol))

    def _correlation_tiles(self, dead_rtol: float) -> Callable:
        covariance = self._covariance_tiles()
        live = self.live(dead_rtol=dead_rtol)
        std = np.where(live, np.sqrt(np.where(live, self._variance(), 1.0)), 1.0)

        def tiles(rows: slice, cols: slice, upper: np.ndarray, lower: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            corr, _ = covariance(rows, cols, upper, lower)
            corr /= np.outer(std[rows], std[cols])
            corr[~live[rows], :] = 0.0
            corr[:, ~live[cols]] = 0.0
            np.clip(corr, -1.0, 1.0, out=corr)
            if rows == cols:
                np.fill_diagonal(corr, live[rows].astype(np.float64))
            return corr, corr
        return tiles

    def similarity(self, *, dead_rtol: float = DEAD_RTOL, consume: bool = False) -> np.ndarray:
        """(n, n) what features are matched on: the correlation, except for pairs that are
        affine functions of each other (live ones correlated at least 1 - ``AFFINE_BAND``, or
        two dead ones) or equal up to rounding (agreement at least 1 - ``EQUAL_RTOL``), which
        get 1 - AFFINE_BAND * (1 - agreement), agreement = 2 E[ab] / (E[a^2] + E[b^2]) clipped
        into [0, 1].

        Correlation cannot tell such features apart: it is 1 between any two affine functions
        of one signal and 0 for constants, so a feature's copy in a permuted model would tie
        with strangers. Agreement is 1 only for features equal on every sample (the one pair
        merged without error) and falls with the difference of their means and scales, so the
        copy wins; every other pair keeps its correlation. The diagonal is 1.

        Args:
            consume: compute it in the memory of the statistics' ``outer``, which is gone
                after (``outer`` becomes None): one (n, n) float64 array in memory, not two.
        """
        correlation = self._correlation_tiles(dead_rtol)
        dead = ~self.live(dead_rtol=dead_rtol)
        diagonal = np.diagonal(self.outer) / self.count

        def ranked(rows: slice, cols: slice, corr: np.ndarray, second: np.ndarray) -> np.ndarray:
            power = diagonal[rows, None] + diagonal[None, cols]
            second *= 2.0
            # two channels that are 0 on every sample are equal
            agreement = np.ones_like(second)
            np.divide(second, power, out=agreement, where=power > 0)
            np.clip(agreement, 0.0, 1.0, out=agreement)
            affine = corr >= 1.0 - AFFINE_BAND
            affine |= np.outer(dead[rows], dead[cols])
            affine |= agreement >= 1.0 - EQUAL_RTOL
            np.subtract(1.0, agreement, out=agreement)
            agreement *= AFFINE_BAND
            np.subtract(1.0, agreement, out=agreement)
            return np.where(affine, agreement, corr)

        def tiles(rows: slice, cols: slice, upper: np.ndarray, lower: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            corr, _ = correlation(rows, cols, upper, lower)
            # agreement reads each entry's own second moment: the two mirrored tiles differ
            return ranked(rows, cols, corr, upper), ranked(rows, cols, corr, lower)
        return self._derived(tiles, consume=consume)

    def _derived(self, tiles: Callable, *, consume: bool = False) -> np.ndarray:
        """The (n, n) matrix whose tiles ``tiles(rows, cols, upper, lower)`` computes from the
        second moments E[xx^T] of a pair of mirrored tiles (``upper`` at [rows, cols], ``lower``
        at [cols, rows], transposed), returning both (``lower`` transposed likewise). Written in
        a new array, or with ``consume`` in place of ``outer`` (then None): each pair of tiles
        is read before either is written."""
        source = self.outer
        result = source if consume else np.empty_like(source)
        if consume:
            self.outer = None
        for rows, cols in weights.tile_pairs(len(source)):
            upper, lower = tiles(rows, cols, source[rows, cols] / self.count, source[cols, rows].T / self.count)
            result[cols, rows] = lower.T
            result[rows, cols] = upper
        return result


@dataclass(eq=False)
class BlockStats:
    """The moments between models i and j (``pair``) at one space: the sample count, each
    model's feature sums (``sums``: model i's, then model j's when j != i) and the (d_i, d_j)
    float64 block of X^T X, computed as ``SpaceStats.add_moments`` computes that block of the
    whole (so the same numbers). What a pass over the data computes of a space whose whole
    statistics would not fit the memory budget (``SpaceStats.from_blocks`` assembles them).
    """

    pair: tuple[int, int]
    count: int
    sums: list[np.ndarray]
    outer: np.ndarray

    @classmethod
    def empty(cls, pair: tuple[int, int], widths: Sequence[int]) -> BlockStats:
        i, j = pair
        models = (i,) if i == j else (i, j)
        return cls(pair, 0, [np.zeros(widths[m]) for m in models], np.zeros((widths[i], widths[j])))

    def add_moments(self, count: int, totals: list[np.ndarray], block: np.ndarray, shifts: list[np.ndarray]) -> None:
        """Add a batch's moments (as ``SpaceStats.add_moments``, of this pair's models only):
        per model the sum of x - shift and the shift, and the block of sum (x - s_i)(x - s_j)^T
        (for i > j, the transpose of the (j, i) block a moments graph computes; a float64
        block is used in place, as ``SpaceStats.add_moments`` uses its outer products).

        Raises:
            CalibrationError: a model produced NaN/Inf features, or the products overflowed.
        """
        totals = [np.asarray(t, np.float64) for t in totals]
        shifts = [np.asarray(s, np.float64) for s in shifts]
        sizes = [len(t) for t in totals]
        summed = _shifted_sum(count, np.concatenate(totals), np.concatenate(shifts), sizes,
                              self.pair[:len(sizes)])
        for rows in weights.row_bands(self.outer.shape):
            # entry (a, b) takes model i's shift and sum at a, model j's at b
            shifted = (shifts[0][rows], totals[0][rows], shifts[-1], totals[-1])
            _add_products(self.outer[rows], np.asarray(block[rows], np.float64), count, shifted)
        self.count += int(count)
        offsets = np.cumsum([0, *sizes])
        for k, total in enumerate(self.sums):
            total += summed[offsets[k]:offsets[k + 1]]


def pooled_similarity(stats: Sequence[SpaceStats], *, consume: bool = False) -> np.ndarray:
    """The similarity of features that several tensors show (a residual stream's stem output,
    block outputs and sums): the mean of each tensor's ``similarity``, weighted by its sample
    count. Correlations are averaged rather than read from the summed moments, so that a tensor
    of a larger scale (a conv's output before its BatchNormalization, a sum deep in the stream)
    does not outweigh the others; one tensor's is its own similarity exactly. ``consume``: as
    ``SpaceStats.similarity``'s, for every one of ``stats``."""
    total = sum(s.count for s in stats)
    pooled = stats[0].similarity(consume=consume)
    pooled *= stats[0].count / total  # one tensor's: times 1.0, its similarity exactly
    for more in stats[1:]:  # summed in place, in the order of the plain sum (the same numbers)
        similarity = more.similarity(consume=consume)
        similarity *= more.count / total
        pooled += similarity
        del similarity
    return pooled


def combine(a: SpaceStats, b: SpaceStats) -> SpaceStats:
    """The statistics of both sample sets (exact: counts, sums and outer products add)."""
    if a.widths != b.widths:
        raise CalibrationError(f"cannot add statistics of widths {a.widths} and {b.widths}; "
                               "combine shards computed for the same models")
    return SpaceStats(a.count + b.count, a.sum + b.sum, a.outer + b.outer, a.widths)


@dataclass
class ChannelMoments:
    """Pooled per-channel moments of one tensor over the samples seen so far (float64): what
    REPAIR reads of a source tensor (method.md §7). Batches and shards pool exactly (Chan et
    al.'s parallel variance), so the result depends on the order only by rounding."""

    count: int = 0
    mean: np.ndarray | float = 0.0
    m2: np.ndarray | float = 0.0  # sum of squared deviations from the mean

    def add(self, size: int, mean: np.ndarray, var: np.ndarray) -> None:
        """Pool one batch of ``size`` samples with batch mean and biased variance (shape [C])."""
        mean, var = mean.astype(np.float64).reshape(-1), var.astype(np.float64).reshape(-1)
        self.pool(size, mean, var * size)

    def pool(self, count: int, mean: np.ndarray, m2: np.ndarray) -> None:
        """Pool the moments of ``count`` other samples: their mean and sum of squared deviations."""
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * count / total)
        self.count = total

    @property
    def var(self) -> np.ndarray:
        return np.maximum(np.asarray(self.m2) / max(self.count, 1), 0.0)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)


SourceMoments = list[dict[str, ChannelMoments]]
"""Per model (in command-line order), tensor name -> its pooled per-channel moments."""


class Statistics(dict):
    """What ``calibrate`` computes and a statistics file holds: ``SpaceStats`` by capture unit
    (the dict's items), and in ``moments`` the ``SourceMoments`` of every tensor a REPAIR of
    these models can read (None: a file written without them, format 1)."""

    def __init__(self, spaces: dict[str, SpaceStats], moments: SourceMoments | None = None):
        super().__init__(spaces)
        self.moments = moments


def combine_moments(shards: list[SourceMoments], sources: list[str] | None = None) -> SourceMoments:
    """The moments of all the shards' samples, pooled in shard order (exact up to rounding).

    Raises:
        CalibrationError: no shards, or shards that differ in models, tensors or widths.
    """
    if not shards:
        raise CalibrationError("no moments to combine; give statistics files written by onnxmerge calibrate")
    names = sources or [f"shard {k + 1}" for k in range(len(shards))]
    first = shards[0]
    for name, shard in zip(names[1:], shards[1:]):
        shapes = [{tensor: np.shape(m.mean) for tensor, m in model.items()} for model in shard]
        if shapes != [{tensor: np.shape(m.mean) for tensor, m in model.items()} for model in first]:
            raise CalibrationError(f"{name} and {names[0]} hold the moments of different tensors; "
                                   "compute every shard with the same models and options")
    total: SourceMoments = [{tensor: ChannelMoments() for tensor in model} for model in first]
    for shard in shards:
        for pooled, model in zip(total, shard):
            for tensor, moments in model.items():
                pooled[tensor].pool(moments.count, moments.mean, moments.m2)
    return total


MATCHING_META = ("fingerprint",)
"""Meta fields that shards must agree on to be combined (the models and plan they describe)."""


def save_stats(path: str | Path, stats: dict[str, SpaceStats], meta: dict[str, str]) -> None:
    """Write statistics (with their source moments when ``stats`` is a ``Statistics`` that has
    them) and string metadata to one ``.npz``, atomically.

    Layout (format 2): ``__format__``, ``__meta__`` (JSON object) and ``__spaces__`` (JSON list
    of the space names, in order) as strings; space k's fields under ``k/count``, ``k/sum``,
    ``k/outer``, ``k/widths`` (numbered, because space and tensor names may hold any character).
    With moments, ``__moments__`` (JSON list per model of its tensor names, in order) and tensor
    k of model i under ``m<i>/<k>/count``, ``m<i>/<k>/mean``, ``m<i>/<k>/m2``. Format 1 is the
    same without moments. The file is written beside ``path`` under a temporary name and moved
    into place when complete, so a failed save leaves no partial file.

    Raises:
        OnnxMergeError: the file cannot be written (a folder, no space left...), in one line.
    """
    names = list(stats)
    arrays = {_FORMAT_KEY: np.array(_FORMAT), _META_KEY: np.array(json.dumps({k: str(v) for k, v in meta.items()})),
              _SPACES_KEY: np.array(json.dumps(names))}
    for index, name in enumerate(names):
        space = stats[name]
        arrays.update({f"{index}/count": np.array(space.count, np.int64), f"{index}/sum": space.sum,
                       f"{index}/outer": space.outer, f"{index}/widths": np.array(space.widths, np.int64)})
    moments = getattr(stats, "moments", None)
    if moments is not None:
        arrays[_MOMENTS_KEY] = np.array(json.dumps([list(model) for model in moments]))
        for i, model in enumerate(moments):
            for k, pooled in enumerate(model.values()):
                arrays.update({f"m{i}/{k}/count": np.array(pooled.count, np.int64),
                               f"m{i}/{k}/mean": np.asarray(pooled.mean, np.float64),
                               f"m{i}/{k}/m2": np.asarray(pooled.m2, np.float64)})

    def write(temporary: str) -> None:
        with open(temporary, "wb") as handle:  # a file object, so numpy adds no .npz suffix
            np.savez(handle, **arrays)

    write_atomically(path, write, "statistics")


def load_stats(path: str | Path) -> tuple[Statistics, dict[str, str]]:
    """Statistics (with their source moments, None in a format-1 file) and metadata written by
    ``save_stats``.

    Raises:
        CalibrationError: the file is missing, not a statistics file, or inconsistent: a value
            that is not finite, shapes that do not fit the widths, a count below 1 (see ``_space_from``
            and ``_moments_from``), or no variation at any space (statistics of constant calibration data).
    """
    file = ArrayFile(path, _FIX)
    try:
        arrays = {key: np.array(file.get(key)) for key in file.keys}
    finally:
        file.close()
    _check_format(path, arrays.get(_FORMAT_KEY, ""))
    try:
        meta = _meta_from(arrays[_META_KEY])
        names = json.loads(str(arrays[_SPACES_KEY]))
        stats = {name: _space_from(arrays, index) for index, name in enumerate(names)}
        moments = _moments_from(arrays.__getitem__, arrays.get(_MOMENTS_KEY))
    except (KeyError, ValueError, TypeError) as error:
        raise CalibrationError(f"{path}: damaged statistics file ({error}); "
                               "recompute it with onnxmerge calibrate") from error
    if stats and not any(space.live().any() for space in stats.values()):
        raise CalibrationError(f"{path}: no feature varies at any of the {len(stats)} spaces: the statistics were "
                               "computed from constant calibration data; recompute them with onnxmerge calibrate "
                               "on real samples")
    return Statistics(stats, moments), meta


def load_moments(path: str | Path) -> tuple[SourceMoments | None, dict[str, str]]:
    """The source moments of a statistics file (None when it has none) and its metadata, read
    without its statistics, which may be as large as the models.

    Raises:
        CalibrationError: as ``load_stats``.
    """
    file = ArrayFile(path, _FIX)
    try:
        _check_format(path, file.get(_FORMAT_KEY) if _FORMAT_KEY in file.keys else "")
        names = np.array(file.get(_MOMENTS_KEY)) if _MOMENTS_KEY in file.keys else None
        return _moments_from(lambda key: np.array(file.get(key)), names), _meta_from(file.get(_META_KEY))
    except (KeyError, ValueError, TypeError) as error:
        raise CalibrationError(f"{path}: damaged statistics file ({error}); "
                               "recompute it with onnxmerge calibrate") from error
    finally:
        file.close()


def _check_format(path: str | Path, marker: np.ndarray | str) -> None:
    if str(marker) not in _FORMATS:
        raise CalibrationError(f"{path}: not an onnxmerge statistics file (no {_FORMAT} marker); {_FIX}")


def _meta_from(text: np.ndarray) -> dict[str, str]:
    meta = json.loads(str(text))
    if not isinstance(meta, dict):
        raise ValueError("__meta__ is not a JSON object")
    return meta


def _moments_from(get: Callable[[str], np.ndarray], names: np.ndarray | None) -> SourceMoments | None:
    """The moments listed by ``__moments__`` (``names``; None: there are none), checked: an
    integer count of at least one sample, finite float means and non-negative sums of squared
    deviations of one shape.

    Raises:
        ValueError: what is wrong, naming the model and tensor.
    """
    if names is None:
        return None
    listed = json.loads(str(names))
    if not isinstance(listed, list) or not all(isinstance(model, list) for model in listed):
        raise ValueError("__moments__ is not a list of tensor names per model")
    moments: SourceMoments = []
    for i, tensors in enumerate(listed):
        model = {}
        for k, tensor in enumerate(tensors):
            count, mean, m2 = (get(f"m{i}/{k}/{field}") for field in _MOMENT_FIELDS)
            where = f"the moments of tensor {tensor!r} of model {i}"
            if count.shape != () or count.dtype.kind not in "iu" or int(count) < 1:
                raise ValueError(f"{where}: the count must be one integer of at least 1")
            if mean.ndim != 1 or mean.shape != m2.shape or mean.dtype.kind != "f" or m2.dtype.kind != "f":
                raise ValueError(f"{where}: means of shape {mean.shape} and squared deviations of shape {m2.shape}")
            if not (np.isfinite(mean).all() and np.isfinite(m2).all()) or (m2 < 0).any():
                raise ValueError(f"{where}: NaN, infinite or negative values")
            model[str(tensor)] = ChannelMoments(int(count), mean.astype(np.float64), m2.astype(np.float64))
        moments.append(model)
    return moments


def _space_from(arrays: dict[str, np.ndarray], index: int) -> SpaceStats:
    """Space ``index``'s statistics, checked as calibration data is: integer count of at least
    one sample and positive widths, shapes that fit the widths, finite sums, and second moments
    that are possible (non-negative, at least the squared mean).

    Raises:
        ValueError: what is wrong, naming the space.
    """
    count, total, outer, widths = (arrays[f"{index}/{field}"] for field in _FIELDS)
    where = f"space {index}"
    if count.shape != () or count.dtype.kind not in "iu" or widths.ndim != 1 or widths.dtype.kind not in "iu":
        raise ValueError(f"{where}: the count must be one integer and the widths a list of integers")
    if int(count) < 1 or not len(widths) or (widths < 1).any():
        raise ValueError(f"{where}: count {int(count)} and widths {widths.tolist()} must be positive")
    widths = tuple(int(w) for w in widths)
    n = sum(widths)
    if total.shape != (n,) or outer.shape != (n, n) or total.dtype.kind != "f" or outer.dtype.kind != "f":
        raise ValueError(f"{where}: shapes {total.shape}, {outer.shape} do not fit widths {widths}")
    for name, values in (("sum", total), ("outer", outer)):
        if not np.isfinite(values).all():
            raise ValueError(f"{where}: {int((~np.isfinite(values)).sum())} NaN or infinite values in its {name}")
    scale = max(float(np.abs(outer).max()), 1e-300)
    if np.abs(outer - outer.T).max() > 1e-9 * scale:  # a sum of x x^T is symmetric up to rounding
        raise ValueError(f"{where}: its sum of x x^T is not symmetric")
    power, mean = np.diag(outer) / int(count), total / int(count)
    if (power < mean ** 2 * (1 - 1e-6) - 1e-300).any():  # E[x^2] >= E[x]^2 up to rounding
        raise ValueError(f"{where}: second moments below the squared means (negative variances)")
    return SpaceStats(int(count), total.astype(np.float64), outer.astype(np.float64), widths)


def combine_stats(shards: list[tuple[dict[str, SpaceStats], dict[str, str]]], *,
                  sources: list[str] | None = None, consume: bool = False) -> dict[str, SpaceStats]:
    """Add shards of statistics (as ``load_stats`` returns them) into one.

    Args:
        shards: (statistics, meta) pairs.
        sources: names of the shards for error messages (default ``shard 1``, ...).
        consume: add into the first shard's arrays (the same numbers) instead of new ones, for a
            caller that drops the shards: statistics of wide spaces are as large as the models.

    Raises:
        CalibrationError: no shards, or shards that differ in spaces, widths or a
            ``MATCHING_META`` field.
    """
    if not shards:
        raise CalibrationError("no statistics to combine; give calibration data or statistics files")
    names = sources or [f"shard {k + 1}" for k in range(len(shards))]
    first_stats, first_meta = shards[0]
    for name, (stats, meta) in zip(names[1:], shards[1:]):
        where = f"{name} and {names[0]}"
        if set(stats) != set(first_stats):
            extra = sorted(set(stats) ^ set(first_stats))
            raise CalibrationError(f"{where} hold statistics of different spaces (e.g. {extra[:3]}); "
                                   "compute every shard with the same models and options")
        for field in MATCHING_META:
            if meta.get(field) != first_meta.get(field):
                raise CalibrationError(f"{where} differ in {field} ({meta.get(field)} vs {first_meta.get(field)}); "
                                       "compute every shard with the same models and options")
        for space, space_stats in stats.items():
            if space_stats.widths != first_stats[space].widths:
                raise CalibrationError(f"{where} differ in the widths of space {space!r} "
                                       f"({space_stats.widths} vs {first_stats[space].widths}); "
                                       "compute every shard with the same models")
    return {space: _sum_of([stats[space] for stats, _ in shards], consume) for space in first_stats}


def _sum_of(parts: list[SpaceStats], consume: bool = False) -> SpaceStats:
    if consume and parts[0].sum.flags.writeable and parts[0].outer.flags.writeable:
        # in place (not into arrays shared read-only, as Ray's results are), in the order
        # below: 0 + first (which only turns -0.0 into 0.0) + ...
        total = parts[0]
        total.sum += 0.0
        total.outer += 0.0
        for part in parts[1:]:
            total.count += part.count
            total.sum += part.sum
            total.outer += part.outer
        return total
    total = SpaceStats(0, np.zeros_like(parts[0].sum), np.zeros_like(parts[0].outer), parts[0].widths)
    for part in parts:
        total = combine(total, part)
    return total


class CKAStats:
    """Streaming unbiased minibatch linear CKA between any two of a set of tensors (method.md §5.2).

    Per batch of n samples each tensor's linear Gram matrix K = X X^T (X flattened per sample) is
    formed once; the unbiased HSIC (Song et al. 2012) of every pair of tensors is summed in float64.
    CKA = mean HSIC(K, L) / sqrt(mean HSIC(K, K) mean HSIC(L, L)).

    CKA is undefined (NaN) for a tensor that does not vary over the samples: its HSIC(K, K) is 0
    up to rounding, i.e. at most ``CKA_RTOL`` times the size of the products it is computed
    from (a constant tensor's Gram terms cancel exactly, so what is left is rounding noise,
    whose ratios are meaningless: values like 2.5 or -3.8).
    """

    def __init__(self, count: int):
        self.hsic = np.zeros((count, count))
        self.scale = np.zeros(count)  # per tensor: the summed trace term of its HSIC(K, K)
        self.batches = 0

    def update(self, features: list[np.ndarray]) -> None:
        """One batch: one array (batch first) per tensor. Batches under 4 samples are skipped."""
        n = features[0].shape[0]
        if n < 4:
            return
        grams = np.stack([_zero_diagonal(x.reshape(n, -1).astype(np.float64)) for x in features])
        flat = grams.reshape(len(features), -1)
        rows = grams.sum(axis=2)
        totals = rows.sum(axis=1)
        products = flat @ flat.T
        hsic = (products + np.outer(totals, totals) / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * rows @ rows.T) / (n * (n - 3))
        self.hsic += hsic
        self.scale += np.diag(products) / (n * (n - 3))
        self.batches += 1

    def undefined(self) -> np.ndarray:
        """(count,) bool: the tensor does not vary, so its CKA with anything is undefined."""
        return np.diag(self.hsic) <= CKA_RTOL * self.scale

    def cka(self) -> np.ndarray:
        """The CKA matrix, clipped into [0, 1]; NaN in the rows and columns of tensors that do
        not vary (``undefined``)."""
        if not self.batches:
            raise CalibrationError("CKA needs at least one batch of 4 or more samples; pass more calibration data")
        undefined = self.undefined()
        scale = np.sqrt(np.where(undefined, 1.0, np.diag(self.hsic)))
        result = np.clip(self.hsic / np.outer(scale, scale), 0.0, 1.0)
        result[undefined, :] = np.nan
        result[:, undefined] = np.nan
        # rounded so that blocks with identical outputs tie exactly (the products sum identical
        # rows in different orders) and alignment's earliest-block rule decides, not rounding noise
        return np.round(result, 9)


def _zero_diagonal(x: np.ndarray) -> np.ndarray:
    gram = x @ x.T
    np.fill_diagonal(gram, 0.0)
    return gram
