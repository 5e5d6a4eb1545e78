"""The seven rewards of CellFluxRL (paper Sec. 4.2), declared as entry points in pyproject.toml.

Each ``make_<name>(context)`` is a factory following the plugin contract of
:mod:`cellfluxrl.rewards.suite`; each reward maps a :class:`RewardBatch` to float64 ``(B,)``.

- ``moa`` (Eq. 3): ``p_cls(y_c | x)``, the MoA classifier's probability of the target MoA, in [0, 1].
  The classifier has no DMSO class, so a control image scores 0.
- ``moa_capped`` (an option, not in the paper's sum): ``min(p_cls(y_c | x), q_c)``, the same
  probability capped at ``q_c``, the mean the classifier gives real images of MoA ``c`` it never
  saw (:mod:`cellfluxrl.rewards.moa_cap`), so a phenotype stronger than real earns nothing more.
- ``nuc_in_cyto``: the fraction of nucleus pixels that lie inside a cell, in [0, 1] (the text's
  definition: "the degree to which all detected nuclei are fully enclosed by cytoplasm"). The printed
  Eq. 4 divides by the *cytoplasm* area, which is not a containment score (it rewards small cells and
  is far below 1 for perfect images), so we use the nucleus area. No nucleus -> 0.
- ``roundness`` (Eq. 5) and ``nuc_size``, ``cyto_size``, ``nuc_count``, ``cyto_count`` (Eq. 6):
  ``r = -z^2`` with ``z = clip((s - mu_y) / sigma_y, -Z_MAX, Z_MAX)``, where ``mu_y``, ``sigma_y`` are
  the mean and std of the statistic over real train images of the target MoA ``y`` (DMSO for
  controls). ``sigma_y`` is floored at ``SIGMA_FLOOR * |mu_y|`` (and 1e-6) so a near-constant
  reference cannot divide by ~0. Clipping bounds every reward to ``[-Z_MAX^2, 0] = [-25, 0]``: one
  degenerate sample (a blank or shattered image with z ~ 100) would otherwise dominate the weighted
  sum and the batch std that scales RL advantages. An image with no nucleus scores the worst value
  -25 on roundness, nuc_size and nuc_count (no cell: on cyto_size and cyto_count), whatever the
  reference mean, so a blank image is never a good answer.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from cellfluxrl.rewards.suite import RewardBatch, RewardContext

Z_MAX = 5.0  # |z| is clipped here, so a z-score reward lies in [-25, 0]
SIGMA_FLOOR = 0.05  # sigma_y >= SIGMA_FLOOR * |mu_y|
SIGMA_MIN = 1e-6

Reward = Callable[[RewardBatch], np.ndarray]


def zscore_reward(s: np.ndarray, mu: np.ndarray, sigma: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Eqs. 5-6 with clipping: ``-clip((s - mu) / sigma_floored, -Z_MAX, Z_MAX)^2``.

    Args:
        s: float64 ``(B,)`` statistic of each image.
        mu, sigma: float64 ``(B,)`` reference mean and std of each image's MoA.
        valid: bool ``(B,)``; images where it is False get the worst value ``-Z_MAX^2``.

    Returns:
        float64 ``(B,)`` in ``[-Z_MAX^2, 0]``.
    """
    sigma = np.maximum(np.maximum(sigma, SIGMA_FLOOR * np.abs(mu)), SIGMA_MIN)
    z = np.clip((np.asarray(s, np.float64) - mu) / sigma, -Z_MAX, Z_MAX)
    r = -(z * z)
    if valid is not None:
        r = np.where(valid, r, -Z_MAX * Z_MAX)
    return r.astype(np.float64)


def _make_zscore(context: RewardContext, stat: str, needs: str) -> Reward:
    """A z-score reward on ``batch.stats[stat]``; ``needs`` = count that must be > 0 (else worst)."""
    mu_table, sigma_table = context.reference(stat)

    def reward(batch: RewardBatch) -> np.ndarray:
        row = batch.moa_index + 1
        return zscore_reward(batch.stats[stat], mu_table[row], sigma_table[row], valid=batch.stats[needs] > 0)

    reward.__name__ = stat
    return reward


def make_roundness(context: RewardContext) -> Reward:
    """Eq. 5: nuclear roundness (mean 4 pi A / P^2) against the MoA's reference, in [-25, 0]."""
    return _make_zscore(context, "roundness", "nuc_count")


def make_nuc_size(context: RewardContext) -> Reward:
    """Eq. 6: area of the largest nucleus (px) against the MoA's reference, in [-25, 0]."""
    return _make_zscore(context, "nuc_size", "nuc_count")


def make_cyto_size(context: RewardContext) -> Reward:
    """Eq. 6: area of the largest cell (px) against the MoA's reference, in [-25, 0]."""
    return _make_zscore(context, "cyto_size", "cyto_count")


def make_nuc_count(context: RewardContext) -> Reward:
    """Eq. 6: number of nuclei against the MoA's reference, in [-25, 0]."""
    return _make_zscore(context, "nuc_count", "nuc_count")


def make_cyto_count(context: RewardContext) -> Reward:
    """Eq. 6: number of cells against the MoA's reference, in [-25, 0]."""
    return _make_zscore(context, "cyto_count", "cyto_count")


def make_nuc_in_cyto(context: RewardContext) -> Reward:
    """Nucleus-in-cytoplasm: fraction of nucleus pixels inside cells, in [0, 1] (0 without nuclei)."""

    def nuc_in_cyto(batch: RewardBatch) -> np.ndarray:
        return np.clip(np.asarray(batch.stats["nuc_in_cyto"], np.float64), 0.0, 1.0)

    return nuc_in_cyto


def _target_probability(batch: RewardBatch, classifier) -> np.ndarray:
    """The classifier's probability of each image's target MoA, float64 ``(B,)`` (a control's row is
    class 0's; callers zero it). The probabilities are computed once per batch and shared."""
    proba = batch.shared("moa_proba", lambda: classifier.predict_proba(batch.images))
    return proba[np.arange(len(batch)), np.maximum(batch.moa_index, 0)]


def make_moa(context: RewardContext) -> Reward:
    """Eq. 3: probability of the target MoA under the dataset's MoA classifier, in [0, 1]; DMSO -> 0."""
    classifier = context.moa_classifier()

    def moa(batch: RewardBatch) -> np.ndarray:
        return np.where(batch.moa_index >= 0, _target_probability(batch, classifier), 0.0).astype(np.float64)

    return moa


def make_moa_capped(context: RewardContext) -> Reward:
    """``moa`` capped at the real images' own class probability (:mod:`cellfluxrl.rewards.moa_cap`), in [0, 1]."""
    from cellfluxrl.rewards.moa_cap import capped_probability, real_class_probability

    classifier = context.moa_classifier()
    caps = real_class_probability(context.evaluators, classifier)

    def moa_capped(batch: RewardBatch) -> np.ndarray:
        return capped_probability(_target_probability(batch, classifier), batch.moa_index, caps)

    return moa_capped
