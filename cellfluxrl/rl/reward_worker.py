"""Reward scoring beside the rollouts: a background worker (the reward kernels release the GIL),
the collection of an iteration's scores and the reward statistics logged per step."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch


class RewardWorker:
    """Scores rollouts on one background thread and times each job (the scorer releases the GIL).

    Args:
        suite: anything with ``score(images (B, C, H, W) float in [-1, 1], moa list) -> result`` where
            ``result.total`` is float64 ``(B,)`` and ``result.components`` maps name -> float64 ``(B,)``.
    """

    def __init__(self, suite):
        self.suite = suite
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cellfluxrl-reward")

    def _score(self, images: torch.Tensor, moa: list[str]):
        start = time.perf_counter()
        result = self.suite.score(images, moa)
        return result, time.perf_counter() - start

    def submit(self, images: torch.Tensor, moa: list[str]) -> Future:
        """Start scoring; the future gives ``(result, busy seconds)``."""
        return self.pool.submit(self._score, images, moa)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def wait_rewards(futures: list[Future]) -> tuple[np.ndarray, np.ndarray, list[str], float]:
    """Collect the reward futures of one iteration.

    Returns:
        ``(total, components, names, busy_s)``: float64 ``(n,)`` totals, float64 ``(n, K)``
        components, their ``K`` names (the suite's order), and the summed scoring time (seconds).
    """
    totals, comps, names, busy = [], [], None, 0.0
    for future in futures:
        result, seconds = future.result()
        names = list(result.components) if names is None else names
        totals.append(np.asarray(result.total, dtype=np.float64))
        comps.append(np.stack([np.asarray(result.components[k], dtype=np.float64) for k in names], axis=1)
                     if names else np.zeros((len(totals[-1]), 0)))
        busy += seconds
    return np.concatenate(totals), np.concatenate(comps), names or [], busy


def reward_stats(total: torch.Tensor, comps: torch.Tensor, names: list[str], A: torch.Tensor,
                 r: torch.Tensor, group_size: int) -> dict[str, float]:
    """The per-step reward, advantage and guard statistics logged to ``stats.jsonl``.

    Args:
        total: float64 ``(N,)`` totals of every rollout of the iteration (all ranks).
        comps: float64 ``(N, K)`` components in ``names`` order.
        names: the reward names.
        A: this rank's clipped advantages; r: their optimality probabilities.
        group_size: m.
    """
    groups = total.reshape(-1, group_size)
    stats = {"reward": float(total.mean()), "reward_std": float(total.std(correction=0)),
             "reward_best_of_group": float(groups.max(dim=1).values.mean()),
             "zero_std_groups": float((groups.std(dim=1, correction=0) == 0).double().mean()),
             "adv_abs_mean": float(A.abs().mean()), "r_mean": float(r.mean()),
             "r_clipped": float(((r == 0) | (r == 1)).double().mean())}
    for k, name in enumerate(names):
        stats[f"reward/{name}"] = float(comps[:, k].mean())
    return stats
