"""Layer alignment (method.md §5.3): where each block of a shallower model goes in a deeper one.

Every aligner maps the n shallow blocks of one stage to n of the m >= n deep blocks of the
corresponding stage, strictly increasing, the first pinned to the first. Each stage is aligned
with its own slice of the similarity matrix (the public reference code reuses the first stage's
slice for every stage). Ties go to the earliest deep block, within ``TIE`` (CKA is rounded to 1e-9).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import RecipeError, UnsupportedGraphError

TIE = 1e-7
Aligner = Callable[[np.ndarray], list[int]]


def sma(similarity: np.ndarray) -> list[int]:
    """Segment-wise: maximise the summed similarity of the matched pairs.

    G[k][l]: best sum for shallow 0..k placed within deep 0..l;
    G[k][l] = max(G[k][l-1], G[k-1][l-1] + C[l][k]), G[0][l] = C[0][0] (pinned).
    """
    m, n = similarity.shape
    best = np.full((n, m), -np.inf)
    best[0, :] = similarity[0, 0]
    for k in range(1, n):
        for l in range(k, m):
            best[k, l] = max(best[k, l - 1], best[k - 1, l - 1] + similarity[l, k])
    placed, l = [0] * n, m - 1
    for k in range(n - 1, 0, -1):
        while l - 1 >= k and best[k, l - 1] >= best[k, l] - TIE:  # the same sum with an earlier block
            l -= 1
        placed[k] = l
        l -= 1
    return placed


def lma(similarity: np.ndarray) -> list[int]:
    """Layer-wise: each deep block adds its similarity to the shallow block whose segment holds it
    (shallow block k's segment runs from its deep block to just before block k+1's).

    H[k][l]: best sum over deep 0..l with deep l in segment k;
    H[k][l] = C[l][k] + max(H[k][l-1], H[k-1][l-1]), H[0][l] = C[0][0] + ... + C[l][0].
    """
    m, n = similarity.shape
    best = np.full((n, m), -np.inf)
    best[0, :] = np.cumsum(similarity[:, 0])
    for k in range(1, n):
        for l in range(k, m):
            best[k, l] = similarity[l, k] + max(best[k, l - 1], best[k - 1, l - 1])
    placed, k = [0] * n, n - 1
    for l in range(m - 1, 0, -1):
        if k == 0:
            break
        # segment k starts at l unless continuing it further back scores as well (earlier start)
        if l - 1 < k or best[k - 1, l - 1] > best[k, l - 1] + TIE:
            placed[k] = l
            k -= 1
    return placed


def uniform(similarity: np.ndarray) -> list[int]:
    """Evenly spread: shallow block k goes to deep block floor(k m / n)."""
    m, n = similarity.shape
    return [k * m // n for k in range(n)]


def head_tail(similarity: np.ndarray) -> list[int]:
    """The first n-1 shallow blocks on the first n-1 deep blocks, the last on the last: the
    unaligned (identity) blocks sit just before the stage's final block."""
    m, n = similarity.shape
    return list(range(n - 1)) + [m - 1] if n > 1 else [0]


ALIGNERS: dict[str, Aligner] = {"sma": sma, "lma": lma, "uniform": uniform, "head-tail": head_tail}


def get_aligner(name: str) -> Aligner:
    if name not in ALIGNERS:
        raise RecipeError(f"unknown alignment {name!r}; use one of {', '.join(ALIGNERS)}")
    return ALIGNERS[name]


def objective(similarity: np.ndarray, placed: list[int], kind: str = "sma") -> float:
    """The summed similarity of a placement: matched pairs (sma) or whole segments (lma)."""
    if kind != "lma":
        return float(sum(similarity[l, k] for k, l in enumerate(placed)))
    bounds = list(placed) + [similarity.shape[0]]
    return float(sum(similarity[l, k] for k in range(len(placed)) for l in range(bounds[k], bounds[k + 1])))


def align_stages(similarity: np.ndarray, deep_stages: list[tuple[int, int]],
                 shallow_stages: list[tuple[int, int]], method: str) -> tuple[list[int], list[float]]:
    """Align stage by stage, each with its own slice of ``similarity`` (deep blocks x shallow blocks).

    Args:
        deep_stages, shallow_stages: each stage as a [start, stop) range of block indices.

    Returns:
        For every shallow block its deep block (global indices), and each stage's objective
        (sma's for every method but lma).
    """
    aligner = get_aligner(method)
    if len(deep_stages) != len(shallow_stages):
        raise UnsupportedGraphError(f"{len(shallow_stages)} stages cannot align with {len(deep_stages)}; "
                                    "stages must correspond one to one")
    placed, objectives = [], []
    for index, ((d0, d1), (s0, s1)) in enumerate(zip(deep_stages, shallow_stages)):
        if s1 - s0 > d1 - d0:
            raise UnsupportedGraphError(f"stage {index} has {s1 - s0} blocks in the shallower model and "
                                        f"{d1 - d0} in the deeper; lifting only adds blocks")
        block = similarity[d0:d1, s0:s1]
        local = aligner(block)
        placed.extend(d0 + l for l in local)
        objectives.append(objective(block, local, "lma" if method == "lma" else "sma"))
    return placed, objectives
