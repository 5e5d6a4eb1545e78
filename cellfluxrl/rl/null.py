"""The shuffled-reward null: the control every RL change is measured against (docs/posttrain.md).

The null is the **within-group permutation**: in every iteration, the reward rows of each group of
``m`` rollouts (one ``(x_0, c)`` pair; every reward of a rollout moves together) are permuted
among that group's rollouts, uniformly over all ``m!`` orders. The DiffusionNFT advantage is
group-centred (:func:`cellfluxrl.rl.nft.group_advantages`, :func:`~cellfluxrl.rl.nft.per_reward_advantages`)
and its scale is a std over the whole iteration, which a permutation does not change, so each group
keeps exactly its advantages as a multiset: the null run's updates have the same size, the same
group baselines and the same advantage distribution as the real run's, and differ only in which
rollout got which reward. A gain over it is therefore the reward's signal on the rollout, nothing
else. The permutation is uniform (the identity included), not a derangement: then the reward a
rollout is given has expectation equal to its group's mean, so it carries no information about the
rollout; a derangement would give it ``(sum - r_i) / (m - 1)``, an anti-reward.

(The other permutation, across every rollout of an iteration, mixes groups: it changes each group's
reward set and mean, hence its advantages; experiments/RESULTS.md names it "the across-group null"
where past tables used it.)

The permutation of group ``g`` in iteration ``i`` is drawn from ``numpy.random.SeedSequence`` of
``(NULL_STREAM, seed, i, g)``: a pure function of those numbers, never of a generator's state, so a
resumed run (or another rank, or a script that replays one iteration) gets the same permutations.
"""

from __future__ import annotations

import numpy as np

NULL_STREAM = 0x4E554C4C  # b"NULL": keeps these draws apart from the run's other (seed, step, ...) streams


def within_group_permutation(n_rollouts: int, group_size: int, seed: int, iteration: int) -> np.ndarray:
    """The null's row order for one iteration: ``rows[perm]`` gives every rollout its null reward row.

    Args:
        n_rollouts: ``N = G m`` rollouts of the iteration, in group order (all ranks).
        group_size: ``m`` rollouts per group.
        seed: the run's seed (``PosttrainConfig.seed``), ``>= 0``.
        iteration: the 0-based iteration (optimizer step) index, ``>= 0``.

    Returns:
        int64 ``(N,)`` indices; ``perm[g m : (g + 1) m]`` is a uniform permutation of
        ``g m .. (g + 1) m - 1`` drawn from ``SeedSequence((NULL_STREAM, seed, iteration, g))``.

    Raises:
        ValueError: ``N`` is not a multiple of ``m``, or a count, the seed or the iteration is negative.
    """
    if group_size < 1 or n_rollouts < 0 or n_rollouts % group_size:
        raise ValueError(f"{n_rollouts} rollouts do not split into groups of {group_size}")
    if seed < 0 or iteration < 0:
        raise ValueError(f"seed {seed} and iteration {iteration} must be >= 0")
    groups = [np.random.default_rng(np.random.SeedSequence((NULL_STREAM, int(seed), int(iteration), g)))
              .permutation(group_size) + g * group_size for g in range(n_rollouts // group_size)]
    return np.concatenate(groups).astype(np.int64) if groups else np.zeros(0, dtype=np.int64)
