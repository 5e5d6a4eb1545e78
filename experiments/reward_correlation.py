"""Within-group correlations of the rewards on a run's own rollouts (RESULTS.md, "What RL trades").

    python experiments/reward_correlation.py BASE OUT [--iterations 8] [--seed 123]

Rolls out ``BASE`` exactly as the demo's post-training would (``posttrain_config(DemoConfig())`` at
the base's recorded sampler steps and CFG) for ``--iterations`` iterations at a learning rate of
1e-12, so the policy stays the base, and records every rollout's seven rewards. Prints, over the
group-centred rewards (what the advantages compare): each reward's within-group standard
deviation, their correlation matrix, and ``R @ w`` for the paper's weights, the covariance of each
standardised reward with the ``per_reward`` advantage in units of its std: a reward whose entry is
<= 0 would not rise, to first order, under the combined objective. Saves the ``(N, 7)`` rewards to
``OUT/components.npy``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

NAMES = ("moa", "nuc_in_cyto", "roundness", "nuc_size", "cyto_size", "nuc_count", "cyto_count")
PAPER_WEIGHTS = np.array([5.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0])


def within_group(components: np.ndarray, group_size: int) -> np.ndarray:
    """``(N, K) -> (N, K)``: each reward minus its group's mean (groups of ``group_size`` in order)."""
    grouped = components.reshape(-1, group_size, components.shape[1])
    return (grouped - grouped.mean(axis=1, keepdims=True)).reshape(components.shape)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from cellfluxrl.checkpoint import load_run
    from cellfluxrl.commands.demo import DemoConfig, posttrain_config
    from cellfluxrl.rl import nft
    from cellfluxrl.rl.loop import posttrain

    seen = []
    advantages = nft.per_reward_advantages

    def record(components, weights, group_size, adv_clip=5.0):
        # the suite's order is the weights' (DEFAULT_WEIGHTS) order; the paper's weights confirm it
        assert np.allclose(np.asarray(weights, dtype=np.float64), PAPER_WEIGHTS), weights
        seen.append(np.asarray(components, dtype=np.float64).copy())
        return advantages(components, weights, group_size, adv_clip)

    nft.per_reward_advantages = record
    sampling = load_run(args.base).sampling
    cfg = posttrain_config(DemoConfig(), steps=args.iterations, rollout_steps=sampling.steps,
                           rollout_solver=sampling.solver, rollout_grid=sampling.grid, cfg_scale=sampling.cfg_scale, seed=args.seed, lr=1e-12, save_every=10_000,
                           reward_norm="per_reward", weights=None)
    posttrain(args.base, args.out, cfg, device="cpu")
    components = np.concatenate(seen)
    np.save(args.out / "components.npy", components)
    z = within_group(components, cfg.group_size)
    corr = np.corrcoef(z.T)
    print(f"{len(components)} rollouts, groups of {cfg.group_size}")
    print("within-group std: " + ", ".join(f"{n} {s:.3f}" for n, s in zip(NAMES, z.std(axis=0))))
    print("| | " + " | ".join(NAMES) + " |\n|---|" + "---|" * len(NAMES))
    for name, row in zip(NAMES, corr):
        print(f"| {name} | " + " | ".join(f"{v:+.2f}" for v in row) + " |")
    print("R @ w (paper weights): " + ", ".join(f"{n} {v:+.2f}" for n, v in zip(NAMES, corr @ PAPER_WEIGHTS)))


if __name__ == "__main__":
    main()
