"""Layer alignment: SMA and LMA against hand-computed cases and brute force, the earliest-block
tie rule, per-stage slices, baselines and errors (method.md §5.3)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnxmerge.errors import CalibrationError, OnnxMergeError, RecipeError, UnsupportedGraphError
from onnxmerge.match.align import ALIGNERS, align_stages, get_aligner, head_tail, identity, lma, objective, sma, uniform

DYNAMIC = {"sma": sma, "lma": lma}


def _maps(m: int, n: int) -> list[tuple[int, ...]]:
    """Every strictly increasing map of n shallow blocks into m deep blocks with 0 -> 0."""
    return [(0, *rest) for rest in itertools.combinations(range(1, m), n - 1)]


def _valid(placed, m: int, n: int) -> bool:
    return len(placed) == n and placed[0] == 0 and placed[-1] < m and all(a < b for a, b in zip(placed, placed[1:]))


def test_sma_and_lma_disagree_on_four_by_two():
    # deep blocks (rows) x shallow blocks (columns); shallow 0 is pinned to deep 0
    c = np.array([[1.0, 0.0],
                  [0.0, 0.5],
                  [0.0, 0.5],
                  [0.0, 0.6]])
    # SMA counts matched pairs only: shallow 1 goes where it is most similar, deep 3 (1 + .6)
    assert sma(c).placed == (0, 3)
    assert sma(c).objective == pytest.approx(1.6)
    # LMA credits every deep block to its segment: [0 | 1,2,3] = 1 + .5 + .5 + .6 = 2.6 beats
    # [0,1 | 2,3] = 1 + 0 + .5 + .6 = 2.1 and [0,1,2 | 3] = 1 + 0 + 0 + .6 = 1.6
    assert lma(c).placed == (0, 1)
    assert lma(c).objective == pytest.approx(2.6)
    assert lma(c).segments == ((0, 1), (1, 4))
    assert sma(c).segments == ((0, 3), (3, 4))


def test_sma_and_lma_disagree_on_five_by_three():
    c = np.array([[1.0, 0.0, 0.0],
                  [0.0, 0.9, 0.0],
                  [0.0, 0.1, 0.5],
                  [0.0, 0.1, 0.5],
                  [0.0, 0.2, 0.6]])
    # SMA, 1 + C[a,1] + C[b,2] over 1 <= a < b <= 4: a = 1 (.9) and b = 4 (.6) are each the
    # column's best and compatible, 2.5
    assert sma(c).placed == (0, 1, 4)
    assert sma(c).objective == pytest.approx(2.5)
    # LMA, segments [0,a) [a,b) [b,5):
    #   a=1 b=2: 1 + .9 + (.5+.5+.6) = 3.5    a=1 b=3: 1 + (.9+.1) + (.5+.6) = 3.1
    #   a=1 b=4: 1 + (.9+.1+.1) + .6 = 2.7    a=2 b=3: 1 + 0 + .1 + 1.1 = 2.2
    #   a=2 b=4: 1 + 0 + .2 + .6 = 1.8        a=3 b=4: 1 + 0 + 0 + .1 + .6 = 1.7
    assert lma(c).placed == (0, 1, 2)
    assert lma(c).objective == pytest.approx(3.5)
    assert lma(c).segments == ((0, 1), (1, 2), (2, 5))


def test_lma_credits_skipped_blocks_to_their_own_segment():
    # deep 1 is very like shallow 0 and unlike shallow 1. LMA keeps it in segment 0: [0,1 | 2]
    # = 1 + 1 + .5 = 2.5 against [0 | 1,2] = 1 + 0 + .5 = 1.5
    c = np.array([[1.0, 0.0],
                  [1.0, 0.0],
                  [0.0, 0.5]])
    assert lma(c).placed == (0, 2)
    assert objective(c, (0, 2), "lma") == pytest.approx(2.5)
    assert objective(c, (0, 1), "lma") == pytest.approx(1.5)


def test_ties_go_to_the_earliest_deep_block():
    # every map of a constant matrix ties: each shallow block on its earliest possible deep block
    for aligner in DYNAMIC.values():
        assert aligner(np.ones((5, 2))).placed == (0, 1)
        assert aligner(np.ones((6, 3))).placed == (0, 1, 2)
    # SMA: shallow 1 scores .5 on deep 1, 2 and 3: the earliest, deep 1
    c = np.array([[1.0, 0.0], [0.0, 0.5], [0.0, 0.5], [0.0, 0.5]])
    assert sma(c).placed == (0, 1)
    # LMA: shallow 1 is as similar as shallow 0 to deep 1 and 2, so its segment may start at 1,
    # 2 or 3 for the same 1 + .5 + .5 + .5; it starts at the earliest, 1
    c = np.array([[1.0, 0.0], [0.5, 0.5], [0.5, 0.5], [0.0, 0.5]])
    assert lma(c).placed == (0, 1)


def test_rounding_noise_is_a_tie():
    # deep 3 beats deep 1 only by summation noise (far below CKA's 1e-9 grain): still a tie
    c = np.array([[1.0, 0.0], [0.0, 0.3], [0.0, 0.0], [0.0, 0.1 + 0.2]])
    assert c[3, 1] > c[1, 1]
    assert sma(c).placed == (0, 1)
    # a difference on the grain itself is not a tie
    c[3, 1] = 0.3 + 1e-9
    assert sma(c).placed == (0, 3)


@pytest.mark.parametrize("seed", range(300))
def test_dynamic_programs_reach_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, 8))
    n = int(rng.integers(1, min(m, 4) + 1))
    # odd seeds: continuous values (unique optimum); even seeds: small integers (many exact ties)
    c = rng.random((m, n)) if seed % 2 else rng.integers(0, 3, (m, n)).astype(float)
    for kind, aligner in DYNAMIC.items():
        result = aligner(c)
        assert _valid(result.placed, m, n)
        values = {placed: objective(c, placed, kind) for placed in _maps(m, n)}
        best = max(values.values())
        assert result.objective == pytest.approx(best, abs=1e-12)
        assert objective(c, result.placed, kind) == pytest.approx(best, abs=1e-12)
        # the earliest rule: every shallow block on its earliest deep block over all optima
        optima = [placed for placed, value in values.items() if value >= best - 1e-12]
        assert result.placed == tuple(min(column) for column in zip(*optima))


def test_each_stage_uses_its_own_slice():
    # stages: deep 0-2 / shallow 0-1, deep 3-6 / shallow 2-4, deep 7-8 / shallow 5-6
    c = np.zeros((9, 7))
    c[0, 0], c[2, 1] = 1, 1  # stage 0: shallow 1 -> deep 2
    c[3, 2], c[4, 3], c[6, 4] = 1, 1, 1  # stage 1: shallow 3 -> deep 4, shallow 4 -> deep 6
    c[7, 5], c[8, 6] = 1, 1  # stage 2: equal depths, identity
    c[1, 3] = c[5, 1] = 9  # across stages: never read
    deep, shallow = [(0, 3), (3, 7), (7, 9)], [(0, 2), (2, 5), (5, 7)]
    placed, objectives = align_stages(c, deep, shallow, "sma")
    assert placed == [0, 2, 3, 4, 6, 7, 8]
    assert objectives == [2.0, 3.0, 2.0]
    # the reference code's bug, stage 0's corner of the matrix for stage 1 (deep 0-3 x shallow
    # 0-2), places stage 1 elsewhere
    wrong = sma(c[0:4, 0:3]).placed
    assert tuple(3 + l for l in wrong) != tuple(placed[2:5])
    for method in ALIGNERS:
        result = align_stages(c, deep, shallow, method)
        assert result.placed[5:] == [7, 8]  # equal stage depths: identity whatever the method
        assert len(result.objectives) == 3


@pytest.mark.parametrize("m, n, expected", [(6, 3, (0, 2, 4)), (7, 3, (0, 2, 4)), (8, 3, (0, 2, 5)),
                                            (5, 4, (0, 1, 2, 3)), (4, 1, (0,)), (9, 2, (0, 4))])
def test_uniform_is_floor_of_k_m_over_n(m, n, expected):
    assert uniform(np.zeros((m, n))).placed == expected


@pytest.mark.parametrize("m, n, expected", [(6, 3, (0, 1, 5)), (4, 2, (0, 3)), (4, 1, (0,)),
                                            (7, 4, (0, 1, 2, 6))])
def test_head_tail_keeps_the_first_and_last_blocks(m, n, expected):
    result = head_tail(np.zeros((m, n)))
    assert result.placed == expected
    # the last block's segment is the last deep block alone, unless it is also the pinned first
    assert result.segments[-1] == ((m - 1, m) if n > 1 else (0, m))


@pytest.mark.parametrize("name", ALIGNERS)
def test_every_aligner_gives_a_pinned_increasing_map(name):
    rng = np.random.default_rng(7)
    for m, n in [(1, 1), (3, 1), (5, 2), (7, 4), (12, 5)]:
        result = get_aligner(name)(rng.random((m, n)))
        assert result.method == name and result.deep_blocks == m
        assert _valid(result.placed, m, n)
        assert [start for start, _ in result.segments] == list(result.placed)
        assert result.segments[-1][1] == m


@pytest.mark.parametrize("name", ALIGNERS)
def test_equal_depths_give_the_identity(name):
    # the similarity prefers an off-diagonal map, but the identity is the only one possible
    c = np.fliplr(np.eye(4)) + 0.1
    assert get_aligner(name)(c).placed == (0, 1, 2, 3)
    assert identity(c).placed == (0, 1, 2, 3)


def test_objective_of_any_map():
    c = np.arange(12, dtype=float).reshape(4, 3)  # c[l, k] = 3 l + k
    assert objective(c, [0, 1, 3], "sma") == 0 + 4 + 11
    assert objective(c, [0, 1, 3], "lma") == 0 + (4 + 7) + 11
    with pytest.raises(RecipeError, match="strictly increasing"):
        objective(c, [0, 2, 2])
    with pytest.raises(RecipeError, match="strictly increasing"):
        objective(c, [1, 2, 3])
    with pytest.raises(RecipeError, match="objective 'best'"):
        objective(c, [0, 1, 2], "best")


def test_unknown_method_lists_the_valid_names():
    with pytest.raises(RecipeError, match="unknown alignment 'best'; available: sma, lma, uniform, head-tail"):
        get_aligner("best")
    with pytest.raises(OnnxMergeError, match="unknown alignment"):
        align_stages(np.zeros((2, 2)), [(0, 2)], [(0, 2)], "best")


def test_stage_errors_name_the_counts_and_the_stage():
    with pytest.raises(UnsupportedGraphError, match="has 2 stages and the deeper 1"):
        align_stages(np.zeros((4, 4)), [(0, 4)], [(0, 2), (2, 4)], "sma")
    with pytest.raises(UnsupportedGraphError, match="stage 1 has 3 blocks in the shallower model and 2"):
        align_stages(np.zeros((5, 5)), [(0, 3), (3, 5)], [(0, 2), (2, 5)], "sma")
    with pytest.raises(UnsupportedGraphError, match="stage 0: .* outside"):
        align_stages(np.zeros((3, 3)), [(0, 4)], [(0, 2)], "sma")


def test_matrix_errors():
    with pytest.raises(UnsupportedGraphError, match=r"shape \(2, 3\)"):
        sma(np.zeros((2, 3)))
    with pytest.raises(UnsupportedGraphError, match=r"shape \(3, 0\)"):
        lma(np.zeros((3, 0)))
    with pytest.raises(CalibrationError, match="NaN"):
        sma(np.array([[1.0], [np.nan]]))
    with pytest.raises(UnsupportedGraphError, match="2 blocks in one model and 3"):
        identity(np.zeros((3, 2)))
