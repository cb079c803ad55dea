"""Layer alignment: SMA and LMA against hand-computed cases and brute force, per-stage slices,
baselines and errors (method.md §5.3)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnxmerge.errors import RecipeError, UnsupportedGraphError
from onnxmerge.match.align import align_stages, get_aligner, head_tail, lma, objective, sma, uniform


def _best(similarity: np.ndarray, kind: str) -> float:
    m, n = similarity.shape
    return max(objective(similarity, [0, *rest], kind) for rest in itertools.combinations(range(1, m), n - 1))


def test_sma_and_lma_differ_by_hand():
    # deep blocks (rows) x shallow blocks (columns); shallow 0 is pinned to deep 0
    c = np.array([[1.0, 0.0],
                  [0.0, 0.5],
                  [0.0, 0.5],
                  [0.0, 0.6]])
    # SMA counts matched pairs only: shallow 1 goes where it is most similar, deep 3 (1 + .6)
    assert sma(c) == [0, 3]
    # LMA credits every deep block to its segment: [0 | 1,2,3] = 1 + .5 + .5 + .6 = 2.6 beats
    # [0,1 | 2,3] = 1 + 0 + .5 + .6 = 2.1 and [0,1,2 | 3] = 1 + 0 + 0 + .6 = 1.6
    assert lma(c) == [0, 1]
    assert objective(c, [0, 1], "lma") == pytest.approx(2.6)
    assert objective(c, [0, 3], "sma") == pytest.approx(1.6)


def test_three_shallow_blocks_by_hand():
    c = np.array([[1.0, 0.0, 0.0],
                  [0.2, 0.8, 0.1],
                  [0.1, 0.7, 0.2],
                  [0.0, 0.6, 0.9],
                  [0.0, 0.1, 0.8]])
    assert sma(c) == [0, 1, 3]  # 1 + .8 + .9
    # LMA: [0 | 1,2 | 3,4] = 1 + .8 + .7 + .9 + .8 = 4.2 is the best segmentation
    assert lma(c) == [0, 1, 3]
    assert objective(c, [0, 1, 3], "lma") == pytest.approx(4.2)


def test_ties_go_to_the_earliest_deep_block():
    c = np.ones((5, 2))
    assert sma(c) == [0, 1]
    c = np.array([[1.0, 0.0], [0.0, 0.5], [0.0, 0.5], [0.0, 0.5]])
    assert sma(c) == [0, 1]


@pytest.mark.parametrize("seed", range(200))
def test_dynamic_programs_reach_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, 8))
    n = int(rng.integers(1, min(m, 4) + 1))
    c = rng.random((m, n)) if seed % 2 else rng.integers(0, 3, (m, n)).astype(float)
    for aligner, kind in ((sma, "sma"), (lma, "lma")):
        placed = aligner(c)
        assert placed[0] == 0 and all(a < b for a, b in zip(placed, placed[1:])) and placed[-1] < m
        assert objective(c, placed, kind) == pytest.approx(_best(c, kind))


def test_each_stage_uses_its_own_slice():
    # stage 0: deep 0-2 vs shallow 0-1; stage 1: deep 3-5 vs shallow 2-3. Within stage 1 shallow
    # block 3 fits deep block 4; stage 0's slice (the reference code's bug) would put it on deep 5.
    c = np.zeros((6, 4))
    c[0, 0], c[2, 1] = 1, 1  # stage 0: shallow 1 -> deep 2
    c[3, 2], c[4, 3] = 1, 1  # stage 1: shallow 3 -> deep 4
    placed, objectives = align_stages(c, [(0, 3), (3, 6)], [(0, 2), (2, 4)], "sma")
    assert placed == [0, 2, 3, 4]
    assert objectives == [2.0, 2.0]
    wrong = sma(c[0:3, 0:2])  # what reusing stage 0's slice would give for stage 1
    assert [3 + l for l in wrong] != placed[2:]


def test_baselines():
    c = np.zeros((6, 3))
    assert uniform(c) == [0, 2, 4]
    assert head_tail(c) == [0, 1, 5]
    assert uniform(np.zeros((4, 1))) == head_tail(np.zeros((4, 1))) == [0]
    for name in ("sma", "lma", "uniform", "head-tail"):
        assert get_aligner(name)(np.random.default_rng(1).random((4, 4))) == [0, 1, 2, 3]


def test_errors():
    with pytest.raises(RecipeError, match="unknown alignment"):
        get_aligner("best")
    with pytest.raises(UnsupportedGraphError, match="stages"):
        align_stages(np.zeros((4, 4)), [(0, 4)], [(0, 2), (2, 4)], "sma")
    with pytest.raises(UnsupportedGraphError, match="stage 1 has 3 blocks"):
        align_stages(np.zeros((5, 5)), [(0, 3), (3, 5)], [(0, 2), (2, 5)], "sma")
