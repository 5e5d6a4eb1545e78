"""One iteration's rollouts (Algorithm 1 lines 3-4) and the forward-process draws trained on them.

Every random draw of an iteration derives from ``(seed, step, rank, stream)``
(:func:`iteration_rng`), so a resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from cellfluxrl.model.generate import autocast_for, generate
from cellfluxrl.rl.config import PosttrainConfig


@dataclass
class Rollouts:
    """One iteration's rollouts on this rank, in group order (``G`` groups of ``m``).

    Attributes:
        x_0: float32 ``(G m, C, H, W)`` the exact noisy sources the ODE started from.
        x_ctrl: float32 ``(G m, C, H, W)`` the clean controls (for fresh source noise).
        x_1: float32 ``(G m, C, H, W)`` the generated targets ``x_1_hat``.
        cond: float32 ``(G m, D)`` condition embeddings.
        moa: ``G m`` MoA names.
        futures: reward futures, one per chunk, each giving ``(RewardResult, busy seconds)``.
    """

    x_0: torch.Tensor
    x_ctrl: torch.Tensor
    x_1: torch.Tensor
    cond: torch.Tensor
    moa: list[str]
    futures: list[Future]


def iteration_rng(cfg: PosttrainConfig, step: int, rank: int, stream: int) -> np.random.Generator:
    """A generator that depends only on ``(seed, step, rank, stream)``: resumes reproduce a run."""
    return np.random.default_rng([cfg.seed, step, rank, stream])


def torch_generator(rng: np.random.Generator, device: torch.device) -> torch.Generator:
    """A torch generator on ``device`` seeded by the next draw of ``rng``."""
    return torch.Generator(device=device).manual_seed(int(rng.integers(2**62)))


def collect_rollouts(old: torch.nn.Module, pairs, embeddings: torch.Tensor, cfg: PosttrainConfig, step: int,
                     rank: int, n_groups: int, device: torch.device,
                     submit: Callable[[torch.Tensor, list[str]], Future]) -> Rollouts:
    """Sample ``n_groups`` groups of ``group_size`` rollouts with the old policy (Algorithm 1 lines 3-4).

    Args:
        old: the data-collection policy (eval mode).
        pairs: a :class:`~cellfluxrl.data.pairing.PairedDataset` of the training split.
        embeddings: float32 ``(n_conditions, D)`` on ``device``.
        cfg: the settings (group size, sampler, sigma, cfg scale).
        step: the iteration index (seeds the pair draw and the source noise).
        rank: this process's rank (its own pairs and noise).
        n_groups: groups on this rank.
        device: where to sample.
        submit: starts scoring ``(images (B, C, H, W) CPU float32 in [-1, 1], moa)`` in the background.

    Returns:
        The rollouts, reward futures attached, one per chunk of ``rollout_batch`` images.
    """
    rng = iteration_rng(cfg, step, rank, 0)
    items = [pairs[int(i)] for i in rng.integers(len(pairs), size=n_groups)]
    gen = torch_generator(rng, device)
    m, per_chunk = cfg.group_size, max(1, cfg.rollout_batch // cfg.group_size)
    xs_0, xs_ctrl, xs_1, conds, moas, futures = [], [], [], [], [], []
    for start in range(0, n_groups, per_chunk):
        chunk = items[start:start + per_chunk]
        x_clean = torch.stack([it["x_0"] for it in chunk]).repeat_interleave(m, dim=0).to(device)
        idx = torch.tensor([it["cond"] for it in chunk], device=device).repeat_interleave(m)
        moa = [it["moa"] for it in chunk for _ in range(m)]
        with torch.no_grad(), autocast_for(device, cfg.bf16):
            x_1, x_0 = generate(old, x_clean, embeddings[idx], generator=gen, sigma=cfg.sigma,
                                num_steps=cfg.rollout_steps, grid=cfg.rollout_grid, solver=cfg.rollout_solver,
                                cfg_scale=cfg.guidance)
        x_1, x_0 = x_1.float(), x_0.float()
        futures.append(submit(x_1.detach().to("cpu"), moa))
        xs_0.append(x_0)
        xs_ctrl.append(x_clean)
        xs_1.append(x_1)
        conds.append(embeddings[idx])
        moas.extend(moa)
    return Rollouts(torch.cat(xs_0), torch.cat(xs_ctrl), torch.cat(xs_1), torch.cat(conds), moas, futures)


def train_times(cfg: PosttrainConfig, n: int, rng: np.random.Generator) -> np.ndarray:
    """Training times per rollout: float64 ``(n, T)`` with ``T = cfg.n_train_timesteps``.

    ``"grid"``: for each rollout, a random subset (no repeats) of the rollout grid's step times
    ``t_0 .. t_{N-1}`` (the points where the Heun predictor evaluated the velocity), as DiffusionNFT
    trains on its sampler's timesteps (paper App. B). ``"uniform"``: ``t ~ U[0, 1)``. Either way only
    times ``t <= cfg.train_t_max`` are drawn (``U[0, t_max)`` for uniform).
    """
    T = cfg.n_train_timesteps
    if cfg.t_sampling == "uniform":
        return rng.random((n, T)) * cfg.train_t_max
    grid = np.asarray(cfg.train_grid, dtype=np.float64)
    return np.stack([grid[rng.permutation(grid.size)[:T]] for _ in range(n)])


def forward_draws(cfg: PosttrainConfig, n: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The shuffled (rollout, t) training items of an iteration and their forward-process draws.

    Every rollout gets ``T = cfg.n_train_timesteps`` items. Item ``(i, j)`` uses source-noise draw
    ``key(i) T + j`` and that draw's time, where ``key(i) = i // group_size`` under
    ``forward_noise="group"`` (the members of a group share their noise and times: common random
    numbers, so the group-centred advantages cancel the noise of the flow-matching target instead of
    adding it) and ``key(i) = i`` under ``"independent"``. Both give every item the same marginal
    law, so the expected loss is unchanged.

    Args:
        cfg: the settings (group size, forward noise mode, t sampling).
        n: rollouts on this rank, in group order (a multiple of the group size).
        rng: the iteration's generator.

    Returns:
        ``(sample, draw, t, n_draws)``: int64 ``(n T,)`` rollout index, int64 ``(n T,)`` draw index in
        ``[0, n_draws)``, float64 ``(n T,)`` time in ``[0, 1)``, and the number of draws.
    """
    key = np.arange(n) // cfg.group_size if cfg.forward_noise == "group" else np.arange(n)
    t_key = train_times(cfg, int(key[-1]) + 1, rng)
    T = t_key.shape[1]
    sample = np.repeat(np.arange(n), T)
    draw = (key[:, None] * T + np.arange(T)).reshape(-1)
    order = rng.permutation(sample.size)
    return sample[order], draw[order], t_key.reshape(-1)[draw[order]], t_key.size
