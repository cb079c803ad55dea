"""Zip matching speed: the direct O(n^3) greedy kept in the tests (``tests.test_match.zip_reference``)
against ``onnxmerge.match.zip.zip_clusters`` on the same correlation matrix, which must give
identical clusters (asserted wherever both ran). Target: >= 20x at 2 x 1024 features.

The matrix is the exact correlation of a factor model, two models of d features each: model B's
loadings are a permuted, perturbed copy of model A's (as for two trainings of one network), 2 %
dead features (rows and columns of zeros). Default zip parameters (alpha 0.5, beta 1, r = d).

The reference at 2 x 2048 is run only when a cubic extrapolation from 2 x 1024 says it takes
less than --reference-limit seconds; otherwise the table prints that estimate, marked "est.".
Run from the repository root: python -m benchmarks.bench_zip [--sizes 256 1024 2048]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from onnxmerge.match.zip import ZipParams, zip_clusters
from tests.test_match import zip_reference


def factor_correlation(d: int, seed: int = 0, factors: int = 32) -> np.ndarray:
    """Correlation of the 2 d features of a factor model (see the module docstring)."""
    rng = np.random.default_rng(seed)
    loadings_a = rng.normal(size=(d, factors))
    loadings_b = loadings_a[rng.permutation(d)] + 0.5 * rng.normal(size=(d, factors))
    loadings = np.vstack([loadings_a, loadings_b])
    covariance = loadings @ loadings.T + np.eye(2 * d)
    scale = 1.0 / np.sqrt(np.diag(covariance))
    corr = covariance * scale[:, None] * scale[None, :]
    dead = rng.choice(2 * d, size=max(1, 2 * d // 50), replace=False)
    corr[dead, :], corr[:, dead] = 0.0, 0.0
    return corr


def timed(function, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 2048], help="features per model")
    parser.add_argument("--reference-limit", type=float, default=120.0,
                        help="run the reference only when its cubic estimate is below this many seconds")
    args = parser.parse_args()
    params = ZipParams()
    print(f"{'n':>9} {'reference s':>13} {'fast s':>8} {'ratio':>7}  clusters")
    fitted = None  # reference seconds / n^3, from the largest size run so far
    for d in args.sizes:
        n = 2 * d
        corr = factor_correlation(d)
        fast_s, fast = timed(zip_clusters, corr, [d, d], params)
        estimate = fitted * n ** 3 if fitted is not None else None
        if estimate is None or estimate < args.reference_limit:
            reference_s, reference = timed(zip_reference, corr, [d, d], params.alpha, params.beta, params.width)
            assert np.array_equal(fast.clusters, reference.clusters), f"2x{d}: clusters differ"
            assert fast.within_model_merges == reference.within_model_merges, f"2x{d}: within-model merges differ"
            fitted = reference_s / n ** 3
            shown, check = f"{reference_s:13.2f}", "identical"
        else:
            reference_s = estimate
            shown, check = f"{estimate:8.0f} est.", "reference not run"
        print(f"{f'2x{d}':>9} {shown:>13} {fast_s:8.3f} {reference_s / fast_s:7.0f}  {check}", flush=True)


if __name__ == "__main__":
    main()
