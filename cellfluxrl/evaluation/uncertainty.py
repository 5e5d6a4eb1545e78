"""Error bars that match the claim: per-pair and compound-clustered standard errors, bootstrap.

The evaluation's pairs are not independent draws of compounds: several pairs share a compound
(about 2.5 per compound in the demo) and controls are drawn with replacement. The per-pair
standard error answers "how sure are we about these pairs"; a claim about *compounds* needs the
standard error clustered by compound (:func:`mean_sem_clustered`), which the report prints beside
it. Distances computed on one image per pair get a bootstrap standard error over pairs
(:func:`bootstrap_sem`, :func:`bootstrap_fd_sem`), and the difference of two columns' Frechet
distances a paired one (:func:`paired_fd_difference`: the same pairs resampled for both columns
and the real targets).
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def mean_sem_clustered(values: np.ndarray, clusters: np.ndarray) -> tuple[float, float, float]:
    """Mean, per-item standard error and cluster-robust standard error of the mean.

    The clustered variance is the CR1 sandwich estimator of a mean::

        V_c = G / (G - 1) * sum_g (sum_{i in g} (v_i - mean))^2 / n^2

    with ``G`` clusters and ``n`` items. With one item per cluster it equals the per-item
    ``var(ddof=1) / n``; items of one cluster that move together widen it.

    Args:
        values: float ``(n,)`` per-item values (e.g. per-pair rewards or paired differences).
        clusters: ``(n,)`` cluster label of each item (e.g. the pair's compound), any hashable dtype.

    Returns:
        ``(mean, sem, sem_clustered)``; both standard errors are 0 for ``n = 1``, the clustered one
        is ``nan`` when all items share one cluster (it cannot be estimated from one cluster).
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    g = np.asarray(clusters).reshape(-1)
    if v.size == 0 or v.size != g.size:
        raise ValueError(f"need n >= 1 values with one cluster each, got {v.size} values and {g.size} clusters")
    mean = float(v.mean())
    if v.size == 1:
        return mean, 0.0, 0.0
    sem = float(v.std(ddof=1) / np.sqrt(v.size))
    _, index = np.unique(g, return_inverse=True)
    n_clusters = int(index.max()) + 1
    if n_clusters < 2:
        return mean, sem, float("nan")
    sums = np.bincount(index, weights=v - mean, minlength=n_clusters)
    variance = n_clusters / (n_clusters - 1) * float((sums ** 2).sum()) / v.size ** 2
    return mean, sem, float(np.sqrt(variance))


def bootstrap_sem(statistic: Callable[[np.ndarray], float], n: int, draws: int = 100, seed: int = 0) -> float:
    """Bootstrap standard error of a statistic of ``n`` items: the std (ddof=1) of
    ``statistic(idx)`` over ``draws`` resamples ``idx`` of ``0..n-1`` with replacement.

    Args:
        statistic: maps an int64 ``(n,)`` index array (a resample of the items) to a float.
        n: number of items.
        draws: bootstrap resamples.
        seed: seed of the resampling.

    Returns:
        The standard error (``nan`` when ``n < 2`` or fewer than two resamples give a finite value).
    """
    if n < 2 or draws < 2:
        return float("nan")
    rng = np.random.default_rng([int(seed), 0xB007])
    values = np.array([statistic(rng.integers(0, n, size=n)) for _ in range(draws)], dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.std(ddof=1)) if values.size >= 2 else float("nan")


def bootstrap_fd_sem(real: np.ndarray, generated: np.ndarray, n: int, draws: int = 100, seed: int = 0) -> float | None:
    """Bootstrap standard error of the Frechet distance between two feature samples.

    Both samples are resampled with replacement and the distance recomputed ``draws`` times. When
    both hold every one of the ``n`` pairs in pair order (the reservoirs of an evaluation with
    ``n <= reservoir size``), the same pair indices are drawn for both (a paired bootstrap over
    pairs); otherwise each is resampled on its own and the standard error of the ``m``-row samples
    is scaled by ``sqrt(m / n)`` to the ``n`` pairs the distance was computed on.

    Args:
        real, generated: float ``(m_a, D)`` and ``(m_b, D)`` feature rows.
        n: the pairs behind the reported distance.
        draws: bootstrap resamples.
        seed: seed of the resampling.

    Returns:
        The standard error, or None when a sample has fewer than 2 rows.
    """
    from cellfluxrl.evaluation.metrics import frechet_of_rows as fd

    real, generated = np.asarray(real, dtype=np.float64), np.asarray(generated, dtype=np.float64)
    if min(real.shape[0], generated.shape[0]) < 2:
        return None
    paired = real.shape[0] == generated.shape[0] == n

    rng = np.random.default_rng([int(seed), 0xFD5E])
    values = []
    for _ in range(int(draws)):
        i = rng.integers(0, real.shape[0], size=real.shape[0])
        j = i if paired else rng.integers(0, generated.shape[0], size=generated.shape[0])
        values.append(fd(real[i], generated[j]))
    se = float(np.std(values, ddof=1))
    if not paired:
        se *= float(np.sqrt(min(real.shape[0], generated.shape[0]) / max(int(n), 1)))
    return se


def paired_fd_difference(real: np.ndarray, base: np.ndarray, other: np.ndarray, draws: int = 100, seed: int = 0,
                         indices: np.ndarray | None = None, groups: int | None = None) -> tuple[float, float | None]:
    """``FD(other, real) - FD(base, real)`` on the same pairs, with its paired bootstrap standard error.

    Row ``i`` of the three samples belongs to pair ``i`` (the real target, the base's image and the
    other column's image of one pair). Each draw resamples pairs with replacement and uses the same
    indices for all three, so the pairs' shared targets, controls and noise cancel in the
    difference; the s.e. is the std (ddof=1) of the difference over the draws.

    Args:
        real, base, other: float ``(n, D)`` feature rows in pair order, the same ``n`` (>= 2; >= 4 with
            ``groups``).
        draws: bootstrap resamples.
        seed: seed of the resampling (ignored with ``indices``).
        indices: int ``(draws, n)`` explicit resamples (tests); default: drawn from the seed.
        groups: None: the plain Frechet distance; else the jackknife bias-corrected one with that many
            groups (:func:`~cellfluxrl.evaluation.debiased.jackknife_fd`, recomputed in every draw).

    Returns:
        ``(difference on all pairs, s.e.)``; the s.e. is None when fewer than two draws are finite.
    """
    from cellfluxrl.evaluation.debiased import jackknife_fd
    from cellfluxrl.evaluation.metrics import frechet_of_rows

    def fd(a: np.ndarray, b: np.ndarray) -> float:
        return frechet_of_rows(a, b) if groups is None else jackknife_fd(b, a, groups)[0]

    real, base, other = (np.asarray(x, dtype=np.float64) for x in (real, base, other))
    n = real.shape[0]
    if not base.shape[0] == other.shape[0] == n or n < 2:
        raise ValueError(f"paired_fd_difference needs three samples of one size n >= 2, got "
                         f"{real.shape[0]}, {base.shape[0]}, {other.shape[0]}")
    if indices is None:
        rng = np.random.default_rng([int(seed), 0xFDD1])
        indices = rng.integers(0, n, size=(int(draws), n))
    values = np.array([fd(other[i], real[i]) - fd(base[i], real[i]) for i in np.asarray(indices)], dtype=np.float64)
    values = values[np.isfinite(values)]
    sem = float(values.std(ddof=1)) if values.size >= 2 else None
    return fd(other, real) - fd(base, real), sem


def per_compound_rule(counts: np.ndarray, dim: int) -> tuple[bool, str]:
    """Whether per-compound distances (``<FD>_c``, ``<KD>_c``) mean something, and the line saying why.

    Rule: every compound has more images than the feature dimension (``n_c > D``), so that each
    compound's feature covariance can be full rank; with fewer, a per-compound Frechet distance is
    dominated by the bias of a rank-deficient covariance and a kernel distance by its variance.

    Args:
        counts: int ``(n_compounds,)`` images per compound (one per pair).
        dim: feature dimension ``D``.
    """
    counts = np.asarray(counts)
    smallest = int(counts.min()) if counts.size else 0
    if counts.size and smallest > dim:
        return True, f"per-compound distances shown: every compound has more than D = {dim} images (n_c > D)"
    return False, (f"per-compound distances omitted: they need more images per compound than the feature dimension "
                   f"(n_c > D = {dim}), and the smallest compound has {smallest}")
