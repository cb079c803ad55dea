"""Per-space matching methods (method.md §3): the fast zip against a direct reference, hand-made
cases from the method's definition, permute/average, Matching invariants and the registry."""

from __future__ import annotations

import math
import numpy as np
import pytest

from onnxmerge.errors import OnnxMergeError, RecipeError
from onnxmerge.match import METHODS, get_method
from onnxmerge.match.matching import Matching
from onnxmerge.match.permute import average, permute
from onnxmerge.calib.stats import SpaceStats
from onnxmerge.match.zip import ZipParams, zip_clusters

PER_SPACE = [m for m in METHODS if not m.graph_level]


def zip_reference(corr: np.ndarray, widths, alpha: float = 0.5, beta: float = 1.0,
                  width: int | None = None) -> Matching:
    """Elastic zipping done the direct way (method.md §3), O(n^3) for n features: every step
    masks the dense score matrix and takes its argmax.

    Clusters are named by their smallest feature; the pair (p, q) with p < q of highest score
    wins, ties to the smallest (p, q) (the row-major argmax of the upper triangle), q joins p.
    A pair is within model i when both clusters hold only model i's features; such a join
    spends model i's budget, and with no budget left such pairs are masked out.
    """
    corr = np.asarray(corr, dtype=np.float64)
    n = sum(widths)
    r = max(widths) if width is None else width
    score = (corr + corr.T) / 2
    np.fill_diagonal(score, -np.inf)
    pure = np.repeat(np.arange(len(widths)), widths)  # the model a cluster is made of, -1 when mixed
    budget = [math.floor((n - r) * d / n * beta) for d in widths]
    alive = np.ones(n, dtype=bool)
    label = np.arange(n)
    within, joined = [0] * len(widths), []
    while alive.sum() > r:
        allowed = np.triu(np.outer(alive, alive), k=1)
        for model, left in enumerate(budget):
            if left <= 0:
                mine = alive & (pure == model)
                allowed &= ~np.outer(mine, mine)
        masked = np.where(allowed, score, -np.inf)
        p, q = np.unravel_index(np.argmax(masked), masked.shape)
        assert np.isfinite(masked[p, q]), "no allowed pair left"
        joined.append(score[p, q])
        if pure[p] == pure[q] >= 0:
            budget[pure[p]] -= 1
            within[pure[p]] += 1
        else:
            pure[p] = -1
        with np.errstate(invalid="ignore"):  # alpha 0 times the -inf diagonal; masked anyway
            new = alpha * np.minimum(score[p], score[q])
        score[p, :], score[:, p] = new, new
        score[p, p] = -np.inf
        alive[q] = False
        label[label == q] = p
    mean = float(np.mean(joined)) if joined else float("nan")
    return Matching.from_clusters(label, widths, mean_correlation=mean, within_model_merges=within)


def random_correlation(rng: np.random.Generator, widths, quantum: float | None, dead: int) -> np.ndarray:
    """Symmetric, values in [-1, 1], unit diagonal; ties when quantised; ``dead`` zero rows/columns."""
    n = sum(widths)
    values = rng.uniform(-1.0, 1.0, (n, n))
    if quantum:
        values = np.round(values / quantum) * quantum
    corr = np.triu(values, 1)
    corr = corr + corr.T + np.eye(n)
    if dead and n:
        index = rng.choice(n, size=min(dead, n), replace=False)
        corr[index, :] = 0.0
        corr[:, index] = 0.0
    return corr


def random_case(seed: int):
    rng = np.random.default_rng(seed)
    models = int(rng.choice([2, 3]))
    widths = [int(d) for d in rng.integers(0 if seed % 7 == 0 else 1, 9, size=models)]
    if sum(widths) == 0:
        widths[0] = 3
    corr = random_correlation(rng, widths, quantum=[None, 0.25, 0.5, 0.1][seed % 4], dead=int(rng.integers(0, 4)))
    params = ZipParams(alpha=float(rng.choice([0.5, 0.0, 1.0, 0.3])), beta=float(rng.choice([1.0, 0.0, 0.5, 2.0])),
                       width=int(rng.integers(max(widths), sum(widths) + 1)))
    return corr, widths, params


def assert_same(fast: Matching, reference: Matching) -> None:
    np.testing.assert_array_equal(fast.clusters, reference.clusters)
    assert fast.within_model_merges == reference.within_model_merges
    assert fast.mean_correlation == reference.mean_correlation or (
        math.isnan(fast.mean_correlation) and math.isnan(reference.mean_correlation))


@pytest.mark.parametrize("block", range(8))
def test_fast_zip_equals_reference_on_random_cases(block):
    for seed in range(block * 100, block * 100 + 100):
        corr, widths, params = random_case(seed)
        reference = zip_reference(corr, widths, params.alpha, params.beta, params.width)
        assert_same(zip_clusters(corr, widths, params), reference)


@pytest.mark.parametrize("quantum", [None, 0.125], ids=["distinct", "ties"])
@pytest.mark.parametrize("widths", [[48, 48], [40, 24], [20, 30, 16]], ids=["2x48", "40+24", "3 models"])
def test_fast_zip_equals_reference_on_larger_cases(widths, quantum):
    rng = np.random.default_rng(sum(widths))
    latent = rng.normal(size=(300, 12))  # features sharing latent factors: correlation-like structure
    features = np.hstack([latent @ rng.normal(size=(12, d)) + rng.normal(size=(300, d)) for d in widths])
    corr = np.corrcoef(features, rowvar=False)
    if quantum:
        corr = np.round(corr / quantum) * quantum
    corr[5], corr[:, 5] = 0.0, 0.0  # one dead feature
    for params in [ZipParams(), ZipParams(alpha=1.0, beta=0.5), ZipParams(width=sum(widths) - 3, beta=2.0)]:
        reference = zip_reference(corr, widths, params.alpha, params.beta, params.width)
        assert_same(zip_clusters(corr, widths, params), reference)


@pytest.mark.parametrize("method", [zip_clusters, permute])
def test_a_method_leaves_the_callers_correlation_unless_told_to_overwrite_it(method):
    rng = np.random.default_rng(3)
    features = rng.normal(size=(100, 24))
    features[:, 12:] = features[:, :12][:, ::-1] + 0.1 * rng.normal(size=(100, 12))
    corr = np.corrcoef(features, rowvar=False)
    corr[0, 1] += 1e-9  # rounding asymmetry, which both ways symmetrise
    given = corr.copy()
    kept = method(corr, [12, 12])
    assert np.array_equal(corr, given)
    overwritten = method(corr, [12, 12], overwrite_corr=True)
    assert_same(overwritten, kept)
    assert not np.array_equal(corr, given)  # worked in the caller's memory


def test_obvious_cross_matching_of_two_by_two():
    # A0 ~ B1 and A1 ~ B0; within-model and other pairs weak
    corr = np.array([[1.0, 0.1, 0.2, 0.9],
                     [0.1, 1.0, 0.8, 0.2],
                     [0.2, 0.8, 1.0, 0.1],
                     [0.9, 0.2, 0.1, 1.0]])
    matching = zip_clusters(corr, [2, 2])
    np.testing.assert_array_equal(matching.clusters, [0, 1, 1, 0])
    np.testing.assert_array_equal(matching.merge[0].toarray(), np.eye(2) / 2)
    np.testing.assert_array_equal(matching.merge[1].toarray(), [[0.0, 0.5], [0.5, 0.0]])
    np.testing.assert_array_equal(matching.unmerge[1].toarray(), [[0.0, 1.0], [1.0, 0.0]])
    assert matching.mean_correlation == pytest.approx(0.85)
    assert matching.within_model_merges == [0, 0]


def test_within_model_joins_spend_the_budget():
    # A0 ~ A1 and B0 ~ B1 strongly, everything across at 0.2
    corr = np.full((4, 4), 0.2)
    corr[0, 1] = corr[1, 0] = 0.95
    corr[2, 3] = corr[3, 2] = 0.9
    np.fill_diagonal(corr, 1.0)
    # beta 1: budgets floor(2 * 2/4) = 1 each, so both within-model pairs join
    spent = zip_clusters(corr, [2, 2])
    np.testing.assert_array_equal(spent.clusters, [0, 0, 1, 1])
    assert spent.within_model_merges == [1, 1]
    # beta 0.5: budgets floor(0.5) = 0; the across ties (all 0.2) go to the smallest pair
    # (A0, B0); then {A0,B0} - A1 scores 0.5 * min(0.95, 0.2) = 0.1 < A1 - B1 at 0.2
    crossed = zip_clusters(corr, [2, 2], ZipParams(beta=0.5))
    np.testing.assert_array_equal(crossed.clusters, [0, 1, 0, 1])
    assert crossed.within_model_merges == [0, 0]


def test_mixed_cluster_may_take_a_feature_of_a_model_without_budget():
    # budgets 0 (beta 0). After {A0, B0} (0.9) the joint cluster scores 0.5 * min(0.8, 0.8) = 0.4
    # to A1, above A1 - B1 (0.3): a mixed cluster and a pure-A one are not "within model A"
    corr = np.array([[1.0, 0.8, 0.9, 0.1],
                     [0.8, 1.0, 0.8, 0.3],
                     [0.9, 0.8, 1.0, 0.1],
                     [0.1, 0.3, 0.1, 1.0]])
    matching = zip_clusters(corr, [2, 2], ZipParams(beta=0.0, width=2))
    np.testing.assert_array_equal(matching.clusters, [0, 0, 0, 1])
    assert matching.mean_correlation == pytest.approx((0.9 + 0.4) / 2)


@pytest.mark.parametrize("beta,expected,within", [(1.0, [0, 0, 1], [0, 0]), (2.0, [0, 1, 1], [0, 1])])
def test_unequal_widths_budget(beta, expected, within):
    # widths 1 and 2, r = 2: one join. Budgets floor(1 * d_i / 3 * beta): (0, 0) at beta 1, (0, 1) at 2
    corr = np.array([[1.0, 0.5, 0.4],
                     [0.5, 1.0, 0.9],
                     [0.4, 0.9, 1.0]])
    matching = zip_clusters(corr, [1, 2], ZipParams(beta=beta))
    assert matching.width == 2
    np.testing.assert_array_equal(matching.clusters, expected)
    assert matching.within_model_merges == within
    assert [m.shape for m in matching.merge] == [(2, 1), (2, 2)]


def test_joint_cluster_score_is_alpha_times_the_minimum():
    # three models of one feature, r = 1: A-B (0.9) first, then {A,B}-C at alpha * min(0.8, 0.1)
    corr = np.array([[1.0, 0.9, 0.8],
                     [0.9, 1.0, 0.1],
                     [0.8, 0.1, 1.0]])
    for alpha in (0.5, 1.0, 0.0):
        matching = zip_clusters(corr, [1, 1, 1], ZipParams(alpha=alpha))
        np.testing.assert_array_equal(matching.clusters, [0, 0, 0])
        assert matching.mean_correlation == pytest.approx((0.9 + alpha * 0.1) / 2)
        np.testing.assert_allclose(sum(m.sum() for m in matching.merge), 1.0)


def test_target_width_range_and_parameters_are_checked():
    corr = np.eye(5)
    for params in [ZipParams(width=0), ZipParams(width=6), ZipParams(alpha=1.5), ZipParams(beta=-1.0),
                   ZipParams(beta=math.inf)]:
        with pytest.raises(RecipeError, match="space s3"):
            zip_clusters(corr, [3, 2], params, space="s3")
    assert zip_clusters(corr, [3, 2], ZipParams(width=5)).width == 5  # sum: nothing joined
    assert zip_clusters(corr, [3, 2], ZipParams(width=2)).width == 2  # below max: compression
    assert math.isnan(zip_clusters(corr, [3, 2], ZipParams(width=5)).mean_correlation)


def test_non_finite_correlation_is_a_calibration_error():
    corr = np.eye(4)
    corr[0, 1] = np.nan
    for method in PER_SPACE:
        if method.needs_calibration:
            with pytest.raises(OnnxMergeError, match="NaN"):
                method.function(corr, [2, 2], method.params(), space="s1")


def permuted_copy_correlation(rng, d: int, copies: int):
    features = rng.normal(size=(500, d)) @ rng.normal(size=(d, d))  # correlated features
    perms = [np.arange(d)] + [rng.permutation(d) for _ in range(copies - 1)]
    return np.corrcoef(np.hstack([features[:, p] for p in perms]), rowvar=False), perms


@pytest.mark.parametrize("name", ["permute", "zip"])
@pytest.mark.parametrize("copies", [2, 3])
def test_permuted_copies_give_the_model_order(name, copies):
    # copy i's feature k is model 0's feature perm_i[k], so it belongs to cluster perm_i[k]
    corr, perms = permuted_copy_correlation(np.random.default_rng(copies), 12, copies)
    # zip with alpha 0.5 rates a joined pair's link to a third copy at half, below the strong
    # within-model correlations of these features, so three copies need alpha 1
    params = ZipParams(alpha=1.0 if copies == 3 else 0.5) if name == "zip" else get_method(name).params()
    matching = get_method(name).function(corr, [12] * copies, params)
    np.testing.assert_array_equal(matching.clusters, np.concatenate(perms))
    np.testing.assert_allclose(matching.merge[0].toarray(), np.eye(12) / copies)
    for perm, merge in zip(perms, matching.merge):
        np.testing.assert_allclose(merge.toarray(), np.eye(12)[perm].T / copies)
    assert matching.mean_correlation == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["permute", "zip"])
def test_permuted_copy_with_constant_and_collinear_features_is_recovered(name):
    # features nearly constant (float32 products of raw values would drown their variance),
    # constant (distinct values) or affine functions of one signal: their correlations are 0 or
    # 1 to many features, and only the similarity names each one's copy
    rng = np.random.default_rng(8)
    signal = rng.normal(size=(400, 1))
    features = np.hstack([rng.normal(size=(400, 6)), 6.0 + 1e-3 * rng.normal(size=(400, 4)) @ rng.normal(size=(4, 6)),
                          signal * rng.uniform(0.5, 2.0, 6) + rng.normal(size=6), np.ones((400, 6)) * rng.normal(size=6)])
    features[:, 3] = features[:, 4] = 0.0  # two equal constants: either pairing is exact
    perm = rng.permutation(24)
    stats = SpaceStats.empty((24, 24))
    stats.update([features.astype(np.float32), features[:, perm].astype(np.float32)], precise=False)
    matching = get_method(name).function(stats.similarity(), [24, 24], get_method(name).params())
    merged = sum(m @ f.T for m, f in zip(matching.merge, [features, features[:, perm]]))
    for unmerge, own in zip(matching.unmerge, [features, features[:, perm]]):
        np.testing.assert_allclose(unmerge @ merged, own.T, atol=1e-6)


def test_near_constant_space_keeps_a_model_whose_copy_falls_under_the_dead_threshold():
    # one nearly constant channel is live in model 0 and dead in its permuted copy: model 1 is
    # no featureless model (method.md §5.5) and must be matched, not spread round-robin
    from onnxmerge.calib.capture import CaptureUnit
    from tests.helpers import near_constant_copies

    stats, perm = near_constant_copies()
    from onnxmerge.stages.matching import match_unit
    matched = match_unit(None, CaptureUnit((0,), "t", 1), stats, zip_clusters, {}, set())
    np.testing.assert_array_equal(matched[0].clusters[8:], matched[0].clusters[perm])


def test_companions_outvote_a_misleading_chosen_tensor_and_a_featureless_one_is_left_out():
    """A space is matched on the similarity pooled over its capture unit and its companions
    (other tensors of a residual stream): three companions showing one pairing outvote the
    chosen tensor showing another, and a companion where model 1 is constant changes nothing."""
    from onnxmerge.calib.capture import CaptureUnit
    from onnxmerge.stages.matching import match_unit
    rng = np.random.default_rng(5)
    right, wrong = rng.permutation(8), rng.permutation(8)

    def tensor(perm, constant=False) -> SpaceStats:
        features = rng.normal(size=(300, 8))
        other = np.ones_like(features) if constant else features[:, perm] + 0.2 * rng.normal(size=(300, 8))
        stats = SpaceStats.empty((8, 8))
        stats.update([features, other])
        return stats

    unit, chosen = CaptureUnit((0,), "t", 1), tensor(wrong)
    companions = [(CaptureUnit((0,), f"c{k}", 1), tensor(right)) for k in range(3)]
    alone = match_unit(None, unit, chosen, permute, {}, set())[0]
    pooled = match_unit(None, unit, chosen, permute, {}, set(), companions)[0]
    np.testing.assert_array_equal(alone.clusters[8:], wrong)
    np.testing.assert_array_equal(pooled.clusters[8:], right)
    featureless = (CaptureUnit((0,), "dead", 1), tensor(right, constant=True))
    again = match_unit(None, unit, chosen, permute, {}, set(), [*companions, featureless])[0]
    assert again.mean_correlation == pooled.mean_correlation


def test_permute_recovers_a_known_permutation_with_noise():
    rng = np.random.default_rng(11)
    features = rng.normal(size=(2000, 16))
    perm = rng.permutation(16)
    other = features[:, perm] + 0.3 * rng.normal(size=(2000, 16))
    corr = np.corrcoef(np.hstack([features, other]), rowvar=False)
    matching = permute(corr, [16, 16])
    np.testing.assert_array_equal(matching.clusters[16:], perm)
    np.testing.assert_array_equal(matching.unmerge[1].toarray(), np.eye(16)[perm])


@pytest.mark.parametrize("function", [average, permute], ids=["average", "permute"])
def test_equal_width_methods_reject_unequal_widths(function):
    with pytest.raises(RecipeError, match=r"space s4: --method \w+ needs equal widths .*\[3, 2\].*--method zip"):
        function(np.eye(5), [3, 2], space="s4")


def test_average_is_the_identity():
    matching = average(None, [4, 4, 4])
    np.testing.assert_array_equal(matching.clusters, np.tile(np.arange(4), 3))
    for merge in matching.merge:
        np.testing.assert_array_equal(merge.toarray(), np.eye(4) / 3)


def check_invariants(matching: Matching, widths) -> None:
    r = matching.width
    assert len(matching.clusters) == sum(widths) and set(matching.clusters) == set(range(r))
    sizes = np.bincount(matching.clusters, minlength=r)
    total = np.zeros(r)
    for merge, unmerge, d in zip(matching.merge, matching.unmerge, widths):
        merge, unmerge = merge.toarray(), unmerge.toarray()  # stored sparse
        assert merge.shape == (r, d) and unmerge.shape == (d, r)
        assert merge.dtype == unmerge.dtype == np.float64
        np.testing.assert_array_equal(unmerge.sum(axis=1), np.ones(d))  # one-hot rows
        assert set(np.unique(unmerge)) <= {0.0, 1.0}
        np.testing.assert_allclose(merge, unmerge.T / sizes[:, None])  # 1/|cluster| at members
        total += merge.sum(axis=1)
    np.testing.assert_allclose(total, np.ones(r))  # summed over models: the mean of the members
    first = [int(np.flatnonzero(matching.clusters == c)[0]) for c in range(r)]
    assert first == sorted(first)  # numbered by first appearance
    assert len(matching.within_model_merges) == len(widths)
    again = Matching.from_clusters(matching.clusters, widths)
    np.testing.assert_array_equal(again.clusters, matching.clusters)


@pytest.mark.parametrize("method", PER_SPACE, ids=[m.name for m in PER_SPACE])
@pytest.mark.parametrize("widths", [[6, 6], [5, 5, 5], [7, 3], [4, 0]], ids=["6+6", "5+5+5", "7+3", "4+0"])
def test_matching_invariants(method, widths):
    corr = random_correlation(np.random.default_rng(2), widths, quantum=0.25, dead=1)
    if len(set(widths)) > 1 and not method.unequal_widths:
        with pytest.raises(RecipeError):
            method.function(corr, widths, method.params())
        return
    first = method.function(corr, widths, method.params())
    check_invariants(first, widths)
    second = method.function(corr.copy(), list(widths), method.params())
    np.testing.assert_array_equal(first.clusters, second.clusters)  # deterministic


def test_from_clusters_renumbers_by_first_appearance():
    matching = Matching.from_clusters([7, 3, 7, 9, 3], [2, 3])
    np.testing.assert_array_equal(matching.clusters, [0, 1, 0, 2, 1])
    np.testing.assert_array_equal(matching.merge[0].toarray(), [[0.5, 0.0], [0.0, 0.5], [0.0, 0.0]])
    np.testing.assert_array_equal(matching.merge[1].toarray(), [[0.5, 0.0, 0.0], [0.0, 0.0, 0.5], [0.0, 1.0, 0.0]])
    check_invariants(matching, [2, 3])
    identity = Matching.identity([3, 2])
    np.testing.assert_array_equal(identity.clusters, [0, 1, 2, 0, 1])
    with pytest.raises(ValueError):
        Matching.from_clusters([0, 1], [2, 3])


def test_registry():
    assert len({m.name for m in METHODS}) == len(METHODS)
    assert {"average", "permute", "zip"} <= {m.name for m in METHODS}
    for method in METHODS:
        method.params()  # every parameter has a default
        assert method.summary and method.reference
    assert get_method("zip").unequal_widths and get_method("zip").needs_calibration
    assert get_method("zip").make_params(alpha=0.25, seed=3) == ZipParams(alpha=0.25)
    assert not get_method("average").needs_calibration
    with pytest.raises(OnnxMergeError, match="unknown merge method 'zipit'; available: ") as caught:
        get_method("zipit")
    assert all(m.name in str(caught.value) for m in METHODS)
