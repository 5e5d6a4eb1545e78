"""Honest pooled distances (issue 31 item 5): the jackknife-corrected Frechet distance, the n > D rule
and the paired bootstrap of a difference of two columns' distances."""

from __future__ import annotations

import numpy as np
import pytest

from cellfluxrl.evaluation.debiased import jackknife_fd, jackknife_groups, overall_rule
from cellfluxrl.evaluation.metrics import frechet_of_rows, mmd2_unbiased
from cellfluxrl.evaluation.uncertainty import bootstrap_fd_sem, paired_fd_difference

D, N = 128, 64  # the judge's feature dimension and the demo's pairs per split


def _fd_1d(x: np.ndarray, y: np.ndarray) -> float:
    """The Frechet distance of two 1-d samples by hand: (m1 - m2)^2 + (s1 - s2)^2, s with ddof 1."""
    return (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2


def test_jackknife_fd_removes_the_bias_the_plain_fd_has_when_pairs_are_fewer_than_features():
    """Two samples of ONE Gaussian (true distance 0), n = 64 rows each in D = 128, variances 20 x 0.7^k
    (the shape of the demo judge's spectrum: 18.6, 13.1, 8.5, 6.5, ...): the plain FD (the old
    FD-judge_o) averages about 6.7, all bias; the jackknife's mean over 40 draws is 0 within its
    standard error (about 0.3; measured -0.4 to 0.1 over three seeds). Bounds: the plain mean above 4,
    the jackknife's below 1.5 in size (5 of its s.e.)."""
    rng = np.random.default_rng(5)
    sd = np.sqrt(20 * 0.7 ** np.arange(D))
    plain, jk = [], []
    for _ in range(40):
        a, b = rng.normal(size=(N, D)) * sd, rng.normal(size=(N, D)) * sd
        plain.append(frechet_of_rows(a, b))
        jk.append(jackknife_fd(a, b)[0])
    assert np.mean(plain) > 4.0  # dozens of times the demo's true shifts of about 0.1
    assert abs(np.mean(jk)) < 1.5 and np.std(jk) < 1.5 * np.std(plain)
    # KD needs no correction: the unbiased MMD^2 of two samples of one distribution averages 0
    kd = [mmd2_unbiased(rng.normal(size=(N, D)) * sd, rng.normal(size=(N, D)) * sd) for _ in range(30)]
    assert abs(np.mean(kd)) < 3 * np.std(kd) / np.sqrt(len(kd))


def test_jackknife_fd_matches_a_hand_computation():
    """1-d rows, 6 pairs in 3 groups (positions mod 3): FD_jk = 3 FD - 2 mean(FD without each group)."""
    real, gen = np.array([0.0, 1.0, 2.0, 4.0, 3.0, 7.0]), np.array([1.0, 1.0, 3.0, 5.0, 0.0, 2.0])
    assert jackknife_groups(6, 3).tolist() == [0, 1, 2, 0, 1, 2] and jackknife_groups(3, 16).tolist() == [0, 1, 2]
    keep = [np.arange(6) % 3 != g for g in range(3)]
    left_out = np.array([_fd_1d(gen[k], real[k]) for k in keep])
    value, sem = jackknife_fd(real[:, None], gen[:, None], groups=3)
    assert value == pytest.approx(3 * _fd_1d(gen, real) - 2 * left_out.mean(), abs=1e-12)
    assert sem == pytest.approx(np.sqrt(2 / 3 * ((left_out - left_out.mean()) ** 2).sum()), abs=1e-12)
    with pytest.raises(ValueError):
        jackknife_fd(real[:3, None], gen[:3, None])  # fewer than 4 pairs


def test_the_n_over_d_rule_applies_to_pooled_distances():
    shown, note = overall_rule(64, 64, 128)
    assert not shown and note == ("plain pooled Frechet distance omitted: it needs more images than features "
                                  "(n > D = 128), and a sample has 64")
    assert overall_rule(129, 200, 128)[0] and not overall_rule(200, 128, 128)[0]


def test_paired_bootstrap_of_an_fd_difference_matches_a_hand_computation():
    """Three explicit resamples of 4 pairs, the same for the real targets and both columns: the s.e. is
    the std (ddof 1) of the per-draw differences, plain and jackknifed (2 groups)."""
    real, base, other = np.array([0.0, 1.0, 2.0, 4.0]), np.array([1.0, 1.0, 3.0, 5.0]), np.array([0.0, 2.0, 2.0, 6.0])
    draws = np.array([[0, 1, 2, 3], [0, 0, 3, 3], [1, 2, 2, 3]])
    by_draw = [_fd_1d(other[i], real[i]) - _fd_1d(base[i], real[i]) for i in draws]
    diff, sem = paired_fd_difference(real[:, None], base[:, None], other[:, None], indices=draws)
    assert diff == pytest.approx(_fd_1d(other, real) - _fd_1d(base, real), abs=1e-12)
    assert sem == pytest.approx(np.std(by_draw, ddof=1), abs=1e-12)

    def jk(x, y):  # 2 groups: positions 0, 2 and 1, 3
        return 2 * _fd_1d(x, y) - (_fd_1d(x[1::2], y[1::2]) + _fd_1d(x[0::2], y[0::2])) / 2

    by_draw = [jk(other[i], real[i]) - jk(base[i], real[i]) for i in draws[[0, 2]]]
    diff, sem = paired_fd_difference(real[:, None], base[:, None], other[:, None], indices=draws[[0, 2]], groups=2)
    assert diff == pytest.approx(jk(other, real) - jk(base, real), abs=1e-12)
    assert sem == pytest.approx(np.std(by_draw, ddof=1), abs=1e-12)
    with pytest.raises(ValueError):
        paired_fd_difference(real[:, None], base[:3, None], other[:, None])


def test_pairing_cancels_what_two_columns_share():
    """A column that is another plus small noise: the paired s.e. of their FD difference is far below the
    unpaired combination of the two columns' own bootstrap s.e. (the targets and shared content cancel)."""
    rng = np.random.default_rng(3)
    real = rng.normal(size=(N, 4))
    base = real + rng.normal(size=(N, 4)) + 0.5
    other = base + 0.05 * rng.normal(size=(N, 4))
    _, paired = paired_fd_difference(real, base, other, draws=200, seed=1)
    unpaired = np.hypot(bootstrap_fd_sem(real, base, N, 200, 1), bootstrap_fd_sem(real, other, N, 200, 1))
    assert paired < 0.25 * unpaired
    assert paired_fd_difference(real, base, other, draws=50, seed=1) == paired_fd_difference(real, base, other,
                                                                                             draws=50, seed=1)


def test_frechet_of_rows_with_fewer_rows_than_dimensions_equals_the_covariance_formula():
    """The n x n singular-value route (n <= D) gives frechet_distance of the sample means and covariances."""
    from cellfluxrl.evaluation.metrics import frechet_distance

    rng = np.random.default_rng(0)
    for n_a, n_b, dim in ((64, 64, 128), (10, 30, 128), (5, 7, 7)):
        a = rng.normal(size=(n_a, dim)) * np.sqrt(0.7 ** np.arange(dim))
        b = rng.normal(size=(n_b, dim)) + 0.1
        want = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        assert frechet_of_rows(a, b) == pytest.approx(want, rel=1e-7)
