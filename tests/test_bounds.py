"""Statistical floors for tests that grade a learnt model by counting right answers.

A trained classifier's accuracy on ``n`` images is a binomial count whose success probability
moves with the CPU's float rounding (AVX-512/AMX and AVX2 machines train to different weights).
A bare ``accuracy > 0.8`` fails on one machine and passes on another; these floors instead say
"the count is not what a model of true accuracy ``p_min`` would fall below, except with
probability ``alpha``", with ``p_min`` set below the accuracy measured on the reference CPUs by a
margin for CPU-to-CPU differences.
"""

from __future__ import annotations

from scipy.stats import binom


def binomial_floor(n: int, p_min: float, alpha: float = 1e-3) -> int:
    """The smallest count a model of true accuracy ``p_min`` reaches on ``n`` items, but for ``alpha``.

    Returns the largest ``k`` with ``P(X < k) <= alpha`` for ``X ~ Binomial(n, p_min)``.
    """
    return int(binom.ppf(alpha, int(n), float(p_min)))


def test_binomial_floor_is_the_lower_quantile():
    assert binomial_floor(64, 0.7) == 33  # hand check: P(X <= 32) = 6.3e-4 <= 1e-3 < P(X <= 33) = 1.5e-3
    assert binom.cdf(binomial_floor(64, 0.7) - 1, 64, 0.7) <= 1e-3
    assert binomial_floor(100, 1.0) == 100 and binomial_floor(100, 0.0) == 0
