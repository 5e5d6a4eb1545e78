"""Error bars: compound-clustered standard errors, the FD bootstrap, the per-compound distance rule."""

from __future__ import annotations

import numpy as np
import pytest

from cellfluxrl.evaluation.uncertainty import bootstrap_fd_sem, mean_sem_clustered, per_compound_rule


def test_clustered_sem_matches_a_hand_computation():
    # values 1, 2, 3 in cluster a and 10 in cluster b: mean 4, deviations -3, -2, -1, 6
    # cluster sums -6 and 6; V = G / (G - 1) * (36 + 36) / n^2 = 2 * 72 / 16 = 9 -> s.e. 3
    mean, sem, clustered = mean_sem_clustered(np.array([1.0, 2.0, 3.0, 10.0]), np.array(["a", "a", "a", "b"]))
    assert mean == 4.0 and clustered == pytest.approx(3.0, abs=1e-12)
    assert sem == pytest.approx(np.sqrt((9 + 4 + 1 + 36) / 3 / 4), abs=1e-12)  # per-item, ddof = 1


def test_one_item_per_cluster_gives_the_per_item_sem():
    v = np.random.default_rng(0).normal(size=37)
    mean, sem, clustered = mean_sem_clustered(v, np.arange(37))
    assert clustered == pytest.approx(sem, rel=1e-12) and sem == pytest.approx(v.std(ddof=1) / np.sqrt(37))
    assert mean_sem_clustered(np.array([2.0]), np.array([0])) == (2.0, 0.0, 0.0)
    assert np.isnan(mean_sem_clustered(np.array([1.0, 3.0]), np.array([7, 7]))[2])  # one cluster: unknown


def test_clustered_sem_covers_the_spread_of_means_over_compounds():
    """26 compounds with a compound effect (sd 1) and 2-3 pairs each (noise sd 0.5): the spread of the
    mean over 2,000 fresh draws of compounds is what the clustered s.e. estimates; the per-pair one
    is too small. Tolerances: the ratio of a 2,000-draw std is known to about 3 %."""
    rng = np.random.default_rng(1)
    sizes = np.array([2, 3] * 13)
    clusters = np.repeat(np.arange(26), sizes)
    means, sems, clustered = [], [], []
    for _ in range(2000):
        v = np.repeat(rng.normal(0, 1, 26), sizes) + rng.normal(0, 0.5, clusters.size)
        m, s, c = mean_sem_clustered(v, clusters)
        means.append(m)
        sems.append(s)
        clustered.append(c)
    truth = np.std(means, ddof=1)
    assert 0.85 < np.sqrt(np.mean(np.square(clustered))) / truth < 1.15
    assert np.sqrt(np.mean(np.square(sems))) / truth < 0.75  # the per-pair s.e. is optimistic here


def test_fd_bootstrap_sem_is_the_spread_of_the_distance():
    """Paired bootstrap over 300 pairs of 4-d features: the s.e. agrees with the spread of FD over
    independent fresh samples within a factor 1.5 (a bootstrap of a biased statistic is rough)."""
    rng = np.random.default_rng(2)
    shift = np.array([0.5, 0.0, 0.0, 0.0])
    from cellfluxrl.evaluation.metrics import frechet_distance

    def fd(a, b):
        return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))

    spread = np.std([fd(rng.normal(size=(300, 4)), rng.normal(size=(300, 4)) + shift) for _ in range(200)], ddof=1)
    real, gen = rng.normal(size=(300, 4)), rng.normal(size=(300, 4)) + shift
    se = bootstrap_fd_sem(real, gen, n=300, draws=200, seed=0)
    assert spread / 1.5 < se < spread * 1.5
    assert bootstrap_fd_sem(real[:1], gen, n=300) is None
    # reservoirs smaller than the pairs: the s.e. of 100 rows scaled to 300 pairs
    small = bootstrap_fd_sem(real[:100], gen[:100], n=300, draws=200, seed=0)
    assert spread / 2 < small < spread * 2


def test_per_compound_rule():
    shown, note = per_compound_rule(np.array([200, 150, 130]), 128)
    assert shown and "n_c > D" in note
    shown, note = per_compound_rule(np.array([3, 2, 2]), 128)
    assert not shown and note == ("per-compound distances omitted: they need more images per compound than the "
                                  "feature dimension (n_c > D = 128), and the smallest compound has 2")
