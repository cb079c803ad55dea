"""Layer alignment (method.md §5.3): where each block of a shallower model goes in a deeper one.

Every aligner takes one stage's similarity matrix C, deep blocks (rows, m) x shallow blocks
(columns, n), m >= n >= 1, and places the n shallow blocks on n of the m deep blocks, strictly
increasing, shallow block 0 pinned to deep block 0 (a stage opens with its downsampling block in
both models). Shallow block k's *segment* is the deep blocks from its own up to just before
shallow block k+1's (the last runs to the end of the stage); lifting fills the rest of a segment
with identity blocks. When m == n the only such map is the identity, so every aligner returns it.

Ties go to the earliest deep blocks, and for both objectives that is unambiguous: each is a sum
of terms per matched pair (SMA) or per deep block (LMA), so the componentwise minimum of two
optimal maps is optimal too (their componentwise maximum takes the other terms), and there is
one optimal map with every shallow block on its earliest deep block over all optimal maps. The
backtrack of the forward dynamic program finds it: from the last shallow block back, each step
takes the earliest deep block that still reaches the optimum (the colexicographically smallest
optimal map, which in a set closed under componentwise minimum is that minimum). Objectives
within ``TIE * max(1, m * max |C|)`` of each other count as equal: far above summation noise (about m ulps of the
largest objective) and below the 1e-9 grain CKA is rounded to (``calib.stats``), so blocks with
identical outputs tie and the earliest-block rule decides, not rounding.

Stages are aligned one by one, each with its own slice of the matrix; the public reference code
reuses the first stage's slice for every stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np

from ..errors import CalibrationError, RecipeError, UnsupportedGraphError

TIE = 1e-12  # relative tolerance of the earliest-block rule (module docstring)


@dataclass(frozen=True)
class Alignment:
    """One stage's alignment.

    Attributes:
        method: the aligner's name.
        placed: per shallow block, its deep block (stage-local); strictly increasing, placed[0] == 0.
        deep_blocks: m, the deep stage's number of blocks.
        objective: the value of ``placed``: LMA's (whole segments) for lma, otherwise SMA's
            (matched pairs only), which the baselines report too so they compare with SMA.
    """

    method: str
    placed: tuple[int, ...]
    deep_blocks: int
    objective: float

    @property
    def segments(self) -> tuple[tuple[int, int], ...]:
        """Per shallow block, the [start, stop) range of deep blocks its segment covers."""
        return tuple(zip(self.placed, (*self.placed[1:], self.deep_blocks)))


Aligner = Callable[[np.ndarray], Alignment]


class StagedAlignment(NamedTuple):
    """All stages' alignment (a named tuple, so ``placed, objectives = align_stages(...)`` reads it).

    Attributes:
        placed: per shallow block (global index), its deep block (global index).
        objectives: per stage, the stage's ``Alignment.objective``.
    """

    placed: list[int]
    objectives: list[float]


def _checked(similarity: np.ndarray) -> np.ndarray:
    """``similarity`` as a float matrix with m >= n >= 1 and finite values.

    Raises:
        UnsupportedGraphError: not a matrix, no shallow blocks, or more shallow than deep blocks.
        CalibrationError: NaN or infinite similarities.
    """
    c = np.asarray(similarity, dtype=np.float64)
    if c.ndim != 2 or not 1 <= c.shape[1] <= c.shape[0]:
        raise UnsupportedGraphError(f"alignment needs a deep x shallow similarity matrix with at least as many deep "
                                    f"blocks as shallow ones (and one or more); got shape {c.shape}")
    if not np.isfinite(c).all():
        raise CalibrationError("the block similarity matrix has NaN or infinite values; check the calibration data")
    return c


def _tolerance(c: np.ndarray) -> float:
    return TIE * max(1.0, c.shape[0] * float(np.abs(c).max()))


def sma(similarity: np.ndarray) -> Alignment:
    """Segment-wise: maximise the summed similarity of the matched (shallow, deep) pairs.

    F[k][l]: best sum for shallow blocks 0..k placed within deep blocks 0..l, -inf for l < k;
    F[0][l] = C[0][0] (pinned); F[k][l] = max(F[k][l-1], F[k-1][l-1] + C[l][k]).
    Each row is non-decreasing in l, so the earliest deep block for shallow k that still reaches
    the optimum is the first l where F[k][l] reaches what blocks 0..k must contribute.
    """
    c = _checked(similarity)
    m, n = c.shape
    table = np.full((n, m), -np.inf)
    table[0, :] = c[0, 0]
    for k in range(1, n):
        for l in range(k, m):
            table[k, l] = max(table[k, l - 1], table[k - 1, l - 1] + c[l, k])
    tolerance, need, stop = _tolerance(c), table[n - 1, m - 1], m
    placed = [0] * n
    for k in range(n - 1, 0, -1):
        # invariant: table[k, stop - 1] >= need - tolerance, so a first such l exists, and at it
        # table[k, l - 1] falls short: the maximum came from placing shallow k on deep l
        l = k + int(np.argmax(table[k, k:stop] >= need - tolerance))
        placed[k], need, stop = l, need - c[l, k], l
    return Alignment("sma", tuple(placed), m, objective(c, placed, "sma"))


def lma(similarity: np.ndarray) -> Alignment:
    """Layer-wise: every deep block adds its similarity to the shallow block whose segment holds it.

    H[k][l]: best sum over deep blocks 0..l with deep l in segment k, -inf for l < k;
    H[0][l] = C[0][0] + ... + C[l][0] (segment 0 starts at the pinned deep 0);
    H[k][l] = C[l][k] + max(H[k][l-1], H[k-1][l-1]): deep l-1 is in the same segment or closes
    the previous one. (The public reference code credits deep blocks skipped by segment k to
    shallow k-1's column, an off-by-one.) The backtrack walks the deep blocks from the last and
    keeps deep l-1 in segment k whenever that still reaches the optimum, so every segment starts
    as early as it can.
    """
    c = _checked(similarity)
    m, n = c.shape
    table = np.full((n, m), -np.inf)
    table[0, :] = np.cumsum(c[:, 0])
    for k in range(1, n):
        for l in range(k, m):
            table[k, l] = c[l, k] + max(table[k, l - 1], table[k - 1, l - 1])
    tolerance, need, k = _tolerance(c), table[n - 1, m - 1], n - 1
    placed = [0] * n
    for l in range(m - 1, 0, -1):
        if k == 0:
            break
        need -= c[l, k]  # what deep blocks 0..l-1 must still contribute; one of the options does
        if table[k, l - 1] < need - tolerance:  # -inf when l == k: segment k must start here
            placed[k], k = l, k - 1
    return Alignment("lma", tuple(placed), m, objective(c, placed, "lma"))


def uniform(similarity: np.ndarray) -> Alignment:
    """Data-free baseline, evenly spread: shallow block k on deep block floor(k m / n).

    Floor keeps shallow 0 on deep 0 and the map strictly increasing (consecutive values differ
    by m / n >= 1); segments get floor or ceil of m / n blocks. Only the shape of C is read.
    """
    c = _checked(similarity)
    m, n = c.shape
    placed = [k * m // n for k in range(n)]
    return Alignment("uniform", tuple(placed), m, objective(c, placed, "sma"))


def head_tail(similarity: np.ndarray) -> Alignment:
    """Data-free baseline: the first n-1 shallow blocks on the first n-1 deep blocks, the last on
    the last, so the stage's input and output blocks both keep their counterparts and every
    identity block sits just before the final block (a single shallow block stays pinned to deep
    block 0). Only the shape of C is read.
    """
    c = _checked(similarity)
    m, n = c.shape
    placed = [*range(n - 1), m - 1] if n > 1 else [0]
    return Alignment("head-tail", tuple(placed), m, objective(c, placed, "sma"))


def identity(similarity: np.ndarray) -> Alignment:
    """No alignment (``--align none``): shallow block k on deep block k; needs m == n.

    Raises:
        UnsupportedGraphError: the stage has different depths in the two models.
    """
    c = _checked(similarity)
    m, n = c.shape
    if m != n:
        raise UnsupportedGraphError(f"a stage has {n} blocks in one model and {m} in the other; "
                                    "align the depths with sma, lma, uniform or head-tail")
    return Alignment("none", tuple(range(n)), m, objective(c, list(range(n)), "sma"))


ALIGNERS: dict[str, Aligner] = {"sma": sma, "lma": lma, "uniform": uniform, "head-tail": head_tail}


def get_aligner(name: str) -> Aligner:
    """The registered aligner ``name``.

    Raises:
        RecipeError: unknown name; the message lists the valid names.
    """
    if name not in ALIGNERS:
        raise RecipeError(f"unknown alignment {name!r}; available: {', '.join(ALIGNERS)}")
    return ALIGNERS[name]


def objective(similarity: np.ndarray, placed: Sequence[int], kind: str = "sma") -> float:
    """The value of any placement: matched pairs (``sma``) or whole segments (``lma``).

    Raises:
        RecipeError: unknown kind, or ``placed`` is not a pinned, strictly increasing map of
            one deep block per column of ``similarity``.
    """
    c = np.asarray(similarity, dtype=np.float64)
    m, n = c.shape
    placed = [int(l) for l in placed]
    if kind not in ("sma", "lma"):
        raise RecipeError(f"unknown alignment objective {kind!r}; available: sma, lma")
    if len(placed) != n or placed[0] != 0 or placed[-1] >= m or any(a >= b for a, b in zip(placed, placed[1:])):
        raise RecipeError(f"{placed} is not a strictly increasing map of {n} shallow blocks into {m} deep "
                          "blocks with the first on the first")
    if kind == "sma":
        return float(sum(c[l, k] for k, l in enumerate(placed)))
    bounds = [*placed, m]
    return float(sum(c[bounds[k]:bounds[k + 1], k].sum() for k in range(n)))


def align_stages(similarity: np.ndarray, deep_stages: Sequence[tuple[int, int]],
                 shallow_stages: Sequence[tuple[int, int]], method: str) -> StagedAlignment:
    """Align stage by stage, each with its own slice of ``similarity``.

    Args:
        similarity: deep blocks (rows) x shallow blocks (columns) over the whole models.
        deep_stages, shallow_stages: each model's stages as [start, stop) block ranges, in
            order; stage i of one corresponds to stage i of the other.
        method: a name in ``ALIGNERS``.

    Returns:
        The global map (per shallow block, its deep block) and each stage's objective.

    Raises:
        RecipeError: unknown method.
        UnsupportedGraphError: the stage counts differ, a stage range does not fit the matrix,
            or a shallow stage has more blocks than its deep stage (lifting only adds blocks).
    """
    aligner = get_aligner(method)
    similarity = np.asarray(similarity, dtype=np.float64)
    if len(deep_stages) != len(shallow_stages):
        raise UnsupportedGraphError(f"the shallower model has {len(shallow_stages)} stages and the deeper "
                                    f"{len(deep_stages)}; depth alignment maps stage to stage one to one")
    placed, objectives = [], []
    for index, (deep, shallow) in enumerate(zip(deep_stages, shallow_stages)):
        (d0, d1), (s0, s1) = deep, shallow
        if not (0 <= d0 < d1 <= similarity.shape[0] and 0 <= s0 < s1 <= similarity.shape[1]):
            raise UnsupportedGraphError(f"stage {index}: deep blocks {d0}..{d1} or shallow blocks {s0}..{s1} "
                                        f"are empty or outside the {similarity.shape} similarity matrix")
        if s1 - s0 > d1 - d0:
            raise UnsupportedGraphError(f"stage {index} has {s1 - s0} blocks in the shallower model and "
                                        f"{d1 - d0} in the deeper; lifting only adds blocks, so give the "
                                        "model that is deeper in every stage as the deep one")
        result = aligner(similarity[d0:d1, s0:s1])
        placed.extend(d0 + l for l in result.placed)
        objectives.append(result.objective)
    return StagedAlignment(placed, objectives)
