"""Frechet distance, KID and the streaming accumulators against closed forms and direct sums."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cellfluxrl.evaluation.metrics import (FeatureSet, Reservoir, RunningStats, best_of_n, best_of_n_weights, compare,
                                           compare_many, conditional_distances, frechet_distance, kid, mean_sem,
                                           mmd2_unbiased, polynomial_kernel)


def _random_cov(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_running_stats_equals_numpy_in_uneven_batches_and_merge():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(517, 7)) @ rng.normal(size=(7, 7))
    stats = RunningStats(7)
    for chunk in np.array_split(x, [1, 2, 50, 300]):  # includes a 1-row batch
        stats.update(chunk)
    np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    a, b = RunningStats(7), RunningStats(7)
    a.update(x[:100])
    b.update(x[100:])
    a.merge(b)
    assert a.n == 517
    np.testing.assert_allclose(a.cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_frechet_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 16))
    mu, cov = x.mean(0), np.cov(x, rowvar=False)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9)


def test_frechet_mean_shift_with_equal_covariance_is_squared_norm():
    rng = np.random.default_rng(2)
    cov = _random_cov(rng, 12)
    mu = rng.normal(size=12)
    for scale in (0.5, 1.0, 3.0):
        delta = scale * rng.normal(size=12)
        assert frechet_distance(mu, cov, mu + delta, cov) == pytest.approx(float(delta @ delta), rel=1e-9, abs=1e-9)


def test_frechet_one_dimensional_closed_form():
    # 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2.
    for m1, s1, m2, s2 in ((0.0, 1.0, 2.0, 3.0), (-1.5, 0.2, 0.5, 0.7), (4.0, 2.0, 4.0, 2.0)):
        d = frechet_distance(np.array([m1]), np.array([[s1 ** 2]]), np.array([m2]), np.array([[s2 ** 2]]))
        assert d == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, rel=1e-12, abs=1e-12)


def test_frechet_commuting_covariances_closed_form_and_singular_input():
    # Diagonal covariances: sum (sqrt(a_i) - sqrt(b_i))^2 plus the mean term; zeros are allowed.
    a = np.array([1.0, 4.0, 0.0, 9.0])
    b = np.array([4.0, 1.0, 2.0, 0.0])
    mu1, mu2 = np.array([0.0, 1.0, 0.0, 0.0]), np.array([1.0, 1.0, 0.0, 2.0])
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_agrees_with_scipy_sqrtm_on_general_covariances():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(3)
    c1, c2 = _random_cov(rng, 10), _random_cov(rng, 10)
    m1, m2 = rng.normal(size=10), rng.normal(size=10)
    covmean = scipy_linalg.sqrtm(c1 @ c2).real
    expected = float((m1 - m2) @ (m1 - m2) + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean))
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-8)


def _mmd2_direct(x, y):
    m = len(x)

    def k(a, b):
        return (a @ b / x.shape[1] + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return (xx + yy) / (m * (m - 1)) - 2 * xy / m ** 2


def test_mmd2_equals_direct_double_sum():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(9, 5)), rng.normal(0.3, 1.0, size=(9, 5))
    assert mmd2_unbiased(x, y) == pytest.approx(_mmd2_direct(x, y), rel=1e-12)
    assert polynomial_kernel(x, y)[2, 3] == pytest.approx((x[2] @ y[3] / 5 + 1) ** 3, rel=1e-12)


def test_kid_full_subset_is_the_unbiased_mmd():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(12, 4)), rng.normal(1.0, 1.0, size=(12, 4))
    mean, std = kid(x, y, subset_size=12, n_subsets=3, generator=np.random.default_rng(0))
    assert mean == pytest.approx(_mmd2_direct(x, y), rel=1e-10)  # a full subset is a permutation
    assert std == pytest.approx(0.0, abs=1e-12)
    # A set against itself is not 0 for the unbiased estimator: the cross term keeps the diagonal.
    k = polynomial_kernel(x, x)
    self_value = 2 * (k.sum() - np.trace(k)) / (12 * 11) - 2 * k.sum() / 144
    assert kid(x, x, subset_size=12, n_subsets=2)[0] == pytest.approx(self_value, rel=1e-10)


def test_kid_near_zero_for_same_distribution_and_grows_with_shift():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(600, 8)), rng.normal(size=(600, 8))
    same, _ = kid(a, b, subset_size=200, n_subsets=20, seed=1)
    shifts = [kid(a, b + s, subset_size=200, n_subsets=20, seed=1)[0] for s in (0.25, 0.5, 1.0)]
    assert abs(same) < 0.01
    assert 0.01 < shifts[0] < shifts[1] < shifts[2]


def test_reservoir_is_bounded_and_uniform():
    capacity, n = 50, 1000
    counts = np.zeros(n)
    for seed in range(200):
        r = Reservoir(capacity, 1, np.random.default_rng(seed))
        for chunk in np.array_split(np.arange(n, dtype=float)[:, None], 7):
            r.update(chunk)
        assert r.sample.shape == (capacity, 1) and r.n_seen == n
        counts[r.sample[:, 0].astype(int)] += 1
    # Each row is kept with probability 0.05: expected count 10 in 200 runs; first/last halves agree.
    assert counts.sum() == 200 * capacity
    assert abs(counts[:500].mean() - counts[500:].mean()) < 1.0
    small = Reservoir(10, 2, np.random.default_rng(0))
    small.update(np.ones((3, 2)))
    assert small.sample.shape == (3, 2)


def test_compare_and_conditional_average_use_fresh_state_per_condition():
    rng = np.random.default_rng(7)
    sets = {}
    for name, shift in (("a", 0.0), ("b", 2.0)):
        gen, real = FeatureSet.create(3, 500, 0), FeatureSet.create(3, 500, 1)
        gen.update(rng.normal(shift, 1.0, size=(300, 3)))
        real.update(rng.normal(0.0, 1.0, size=(300, 3)))
        sets[name] = (gen, real)
    overall = (FeatureSet.create(3, 500, 0), FeatureSet.create(3, 500, 1))
    for gen, real in sets.values():
        overall[0].update(gen.reservoir.sample)
        overall[1].update(real.reservoir.sample)
    result = conditional_distances(overall, sets, subset_size=100, n_subsets=10)
    fa, fb = result.per_condition["a"].fd, result.per_condition["b"].fd
    assert fa < 0.2 and 10.0 < fb < 14.0  # a shift of 2 in each of 3 dims: ||delta||^2 = 12
    assert result.fd_c == pytest.approx((fa + fb) / 2)
    kb = result.per_condition["b"].kid_mean
    ka = result.per_condition["a"].kid_mean
    assert result.kid_c == pytest.approx((ka + kb) / 2)
    # The per-condition KID of "a" is its own, not accumulated with "b" (CellFlux's bug).
    alone = compare(*sets["a"], subset_size=100, n_subsets=10)
    assert alone.kid_mean == pytest.approx(ka)
    both = compare_many(sets["a"][1], {"a": sets["a"][0], "b": sets["b"][0]}, subset_size=100, n_subsets=10)
    assert both["a"].fd == pytest.approx(fa, rel=1e-10) and both["b"].kid_mean == pytest.approx(
        compare(sets["b"][0], sets["a"][1], subset_size=100, n_subsets=10).kid_mean, rel=1e-12)
    tiny = compare(FeatureSet.create(3, 5, 0), FeatureSet.create(3, 5, 0))
    assert tiny.fd is None and tiny.kid_mean is None


def test_mean_sem_and_best_of_n_nested():
    m, s = mean_sem(np.array([1.0, 2.0, 3.0, 4.0]))
    assert m == 2.5 and s == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    scores = np.array([[0.1, 0.5, 0.3, 0.9], [2.0, 1.0, 1.0, 3.0]])
    assert best_of_n(scores, 1).tolist() == [0, 0]
    assert best_of_n(scores, 2).tolist() == [1, 0]
    assert best_of_n(scores, 4).tolist() == [3, 3]
    with pytest.raises(ValueError):
        best_of_n(scores, 5)


def test_best_of_n_weights_hand_computed_and_against_every_subset():
    # [1, 3, 2], N = 2: subsets {0,1} -> 1, {0,2} -> 2, {1,2} -> 1.
    np.testing.assert_allclose(best_of_n_weights(np.array([[1.0, 3.0, 2.0]]), 2), [[0, 2 / 3, 1 / 3]])
    np.testing.assert_allclose(best_of_n_weights(np.array([[1.0, 3.0, 2.0]]), 1), [[1 / 3] * 3])
    # Ties go to the earliest candidate, as in best_of_n: [2, 2, 0], N = 2 -> {0,1}: 0, {0,2}: 0, {1,2}: 1.
    np.testing.assert_allclose(best_of_n_weights(np.array([[2.0, 2.0, 0.0]]), 2), [[2 / 3, 1 / 3, 0]])
    scores = np.random.default_rng(3).integers(0, 4, (40, 5)).astype(float)
    for n in range(1, 6):
        counts = np.zeros_like(scores)
        subsets = list(itertools.combinations(range(5), n))
        for subset in subsets:
            pick = np.array(subset)[best_of_n(scores[:, list(subset)], n)]
            counts[np.arange(40), pick] += 1
        np.testing.assert_allclose(best_of_n_weights(scores, n), counts / len(subsets), atol=1e-12)
    with pytest.raises(ValueError):
        best_of_n_weights(scores, 6)
