"""CellFluxRL post-training: DiffusionNFT on the source-to-target flow (paper Sec. 4.3, Algorithm 1).

One iteration (= one optimizer step):

1. Rollouts. ``groups_per_step`` pairs ``(x_0, c)`` are drawn from the training split (spread over
   the ranks); each is repeated ``group_size`` times and transported by the *old* policy with the
   Heun sampler. Diversity inside a group comes only from the ``sigma`` noise injected into the
   control. The exact noisy source of every rollout is kept with its sample ``x_1_hat``.
2. Rewards. Each chunk of rollouts is scored on a background thread while the next chunk is
   sampled (the reward kernels release the GIL), so only the last chunk's scoring is exposed; the
   step time is split into rollout / reward wait / train and the hidden reward time is logged.
3. Training. Group-centred advantages scaled by the global reward std, clipped, mapped to ``r``
   (:mod:`cellfluxrl.nft`); the NFT loss of every (rollout, t) on the forward process
   ``x_t = (1 - t) x_0 + t x_1_hat`` plus ``kl_weight ||v_theta - v_ref||^2`` to the frozen base;
   one AdamW step (grad clip 1.0) over the whole iteration.
4. Policies. Evaluation EMA (checkpoints, ``sample``, ``evaluate``) updated every step; old
   policy ``theta_old <- eta_i theta_old + (1 - eta_i) theta`` with ``eta_i = min(0.001 i, 0.5)``.

Which ``x_0`` the forward process starts from (``train_source``): the issue asks to keep the exact
noisy source of each rollout, and it is kept (``Rollouts.x_0``, mode ``"rollout"``), but fitting
the policy on its own deterministic coupling is reflow: for a nearly straight flow
``v_old(x_t) ~ x_1_hat - x_0`` on that chord, so the flow-matching gradient, and with it the NFT
gradient ``clip(A) * grad FM`` (reference section 1.7a), nearly vanishes whatever the rewards
(``tests/test_posttrain.py`` measured no gain). The default ``"fresh"`` redraws the source from
the base model's own coupling, ``x_0 = x_ctrl + sigma * eps'`` with the group's clean control and
fresh noise, the analogue of DiffusionNFT's fresh ``eps`` (reference section 8.7). By default
(``forward_noise="group"``) a group's members share ``eps'`` and ``t`` for each of their training
times: the group-centred advantages then cancel the source noise out of the gradient instead of
adding it (:func:`forward_draws`; docs/posttrain.md).
Dropout is off in all the networks, so ``v_theta = v_old`` holds exactly when their weights agree.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cellfluxrl import nft
from cellfluxrl.checkpoint import truncate_stats
from cellfluxrl.config import config_from_dict, config_to_dict, dump_json
from cellfluxrl.distributed import all_gather_tensor
from cellfluxrl.errors import CellfluxError
from cellfluxrl.generate import guided_velocity
from cellfluxrl.path import add_source_noise, interpolate, target_velocity

log = logging.getLogger(__name__)

STATS_FILE = "stats.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
GRID_DIR = "samples"


@dataclass(frozen=True)
class PosttrainConfig:
    """Post-training settings; defaults follow the paper, then DiffusionNFT (see docs/posttrain.md)."""

    weights: str | None = None  # reward weights NAME=W,... merged into the paper's sum (None: paper's 7 rewards)
    steps: int = 1200  # RL iterations (each takes grad_steps optimizer steps; paper: 1200 x 1)
    group_size: int = 8  # m rollouts per fixed (x_0, c) group
    groups_per_step: int = 16  # groups per iteration over all ranks (16 x 8 = 128 rollouts per step)
    rollout_steps: int = 10  # Heun steps of the rollout sampler (DiffusionNFT: 10; Heun NFE = 2 steps)
    rollout_grid: str = "edm"  # rollout time grid (CellFlux sampler: edm)
    rollout_batch: int = 64  # rollouts per sampler call and per reward job (rounded down to whole groups)
    sigma: float = 1.0  # std of the noise injected into the control (CellFlux: 1.0)
    cfg_scale: float | None = None  # CFG of rollouts AND of the trained (guided) velocity; None: the base run's sampling CFG
    train_source: str = "fresh"  # x_0 of the forward process: clean control + fresh sigma noise, or "rollout" (exact source)
    t_sampling: str = "grid"  # training t: the rollout grid's times (paper App. B) or U[0,1)
    forward_noise: str = "group"  # "group": a group's rollouts share their fresh source noise and t (common random numbers); "independent"
    train_timesteps: int | None = None  # t values per rollout per step (None: int(0.99 rollout_steps), as DiffusionNFT)
    train_batch: int = 32  # (rollout, t) items per forward/backward micro-batch
    grad_steps: int = 1  # optimizer steps per iteration: the shuffled items split into this many chunks (DiffusionNFT OCR: 2)
    nft_beta: float = 1.0  # DiffusionNFT guidance strength beta (implicit policies, Eqs. 8-9); 1.0 = their default
    kl_weight: float = 1.0  # weight of ||v_theta - v_ref||^2 to the frozen base (the paper's "KL weight beta = 1")
    adv_clip: float = 5.0  # advantage clip C; r = 0.5 + clip(A) / (2 C) (DiffusionNFT: 5)
    reward_norm: str = "none"  # "none": advantages of the raw weighted sum (paper Table 1); "per_reward": each reward standardised first
    adaptive: bool = False  # DiffusionNFT's self-normalised (adaptive-weighting) loss instead of plain velocity MSE
    lr: float = 2e-5  # AdamW learning rate (paper App. B)
    weight_decay: float = 1e-4  # AdamW weight decay (DiffusionNFT)
    grad_clip: float = 1.0  # max global gradient norm
    old_rate: float = 0.001  # old-policy decay growth per step: eta_i = min(old_rate i, old_max)
    old_max: float = 0.5  # old-policy decay cap (DiffusionNFT decay_type 1)
    eval_ema_max: float = 0.9  # evaluation EMA decay min((1 + s) / (10 + s), eval_ema_max) (DiffusionNFT)
    max_minutes: float = 0.0  # stop after the step that passes this wall time, with a checkpoint (0 = no limit)
    save_every: int = 10  # checkpoint period (steps); also saved at the end
    grid_every: int = 50  # sample-grid period (steps); 0 = never
    grid_pairs: int = 8  # held-out test pairs shown in each grid (control | base | RL | real target)
    seed: int = 0  # seeds the pairs, the source noise and the t draws (a function of (seed, step, rank))
    bf16: bool = True  # bf16 autocast for every forward pass on GPU (ignored on CPU)

    def __post_init__(self):
        positive = ("steps", "group_size", "groups_per_step", "rollout_steps", "rollout_batch", "train_batch",
                    "grad_steps", "nft_beta", "adv_clip", "save_every", "lr")
        for name in positive:
            if not getattr(self, name) > 0:
                raise CellfluxError(f"posttrain: {name} must be > 0, got {getattr(self, name)!r}")
        if self.cfg_scale is not None and not 0.0 <= self.cfg_scale < float("inf"):
            raise CellfluxError(f"posttrain: cfg_scale must be a finite number >= 0, got {self.cfg_scale!r}")
        for name in ("sigma", "kl_weight", "max_minutes", "weight_decay", "grad_clip", "old_rate", "grid_every",
                     "grid_pairs"):
            if not getattr(self, name) >= 0:
                raise CellfluxError(f"posttrain: {name} must be >= 0, got {getattr(self, name)!r}")
        if self.group_size < 2:
            raise CellfluxError(f"posttrain: group_size must be >= 2 (advantages are group-centred), got {self.group_size}")
        for name in ("old_max", "eval_ema_max"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise CellfluxError(f"posttrain: {name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.reward_norm not in ("none", "per_reward"):
            raise CellfluxError(f"posttrain: reward_norm must be none or per_reward, got {self.reward_norm!r}")
        if self.train_source not in ("fresh", "rollout"):
            raise CellfluxError(f"posttrain: train_source must be fresh or rollout, got {self.train_source!r}")
        if self.forward_noise not in ("group", "independent"):
            raise CellfluxError(f"posttrain: forward_noise must be group or independent, got {self.forward_noise!r}")
        if self.rollout_grid not in ("edm", "uniform") or self.t_sampling not in ("grid", "uniform"):
            raise CellfluxError(f"posttrain: bad rollout_grid {self.rollout_grid!r} or t_sampling {self.t_sampling!r}")
        if self.train_timesteps is not None and not 1 <= self.train_timesteps:
            raise CellfluxError(f"posttrain: train_timesteps must be >= 1, got {self.train_timesteps}")
        if self.t_sampling == "grid" and (self.train_timesteps or 0) > self.rollout_steps:
            raise CellfluxError(f"posttrain: train_timesteps {self.train_timesteps} > rollout_steps "
                                f"{self.rollout_steps} (the grid has only that many times)")

    @property
    def guidance(self) -> float:
        """The CFG scale ``w`` of rollouts and training (an unresolved ``None`` counts as 0)."""
        return float(self.cfg_scale or 0.0)

    @property
    def n_train_timesteps(self) -> int:
        """t values per rollout per step (resolves ``None`` to DiffusionNFT's 99% of the grid)."""
        if self.train_timesteps is not None:
            return self.train_timesteps
        return max(1, int(0.99 * self.rollout_steps))


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


@dataclass
class Policies:
    """The four weight sets: trained ``theta`` (maybe DDP-wrapped as ``train``), ``old`` (sampler),
    ``ref`` (frozen base), ``ema`` (evaluation)."""

    theta: torch.nn.Module
    train: torch.nn.Module
    old: torch.nn.Module
    ref: torch.nn.Module
    ema: torch.nn.Module


def _autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA, nothing elsewhere."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _weights(module: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers in ``state_dict`` order (the tensors an EMA must track)."""
    return list(module.state_dict(keep_vars=True).values())


def _rng(cfg: PosttrainConfig, step: int, rank: int, stream: int) -> np.random.Generator:
    """A generator that depends only on ``(seed, step, rank, stream)``: resumes reproduce a run."""
    return np.random.default_rng([cfg.seed, step, rank, stream])


def _torch_gen(rng: np.random.Generator, device: torch.device) -> torch.Generator:
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
    from cellfluxrl.generate import generate

    rng = _rng(cfg, step, rank, 0)
    items = [pairs[int(i)] for i in rng.integers(len(pairs), size=n_groups)]
    gen = _torch_gen(rng, device)
    m, per_chunk = cfg.group_size, max(1, cfg.rollout_batch // cfg.group_size)
    xs_0, xs_ctrl, xs_1, conds, moas, futures = [], [], [], [], [], []
    for start in range(0, n_groups, per_chunk):
        chunk = items[start:start + per_chunk]
        x_clean = torch.stack([it["x_0"] for it in chunk]).repeat_interleave(m, dim=0).to(device)
        idx = torch.tensor([it["cond"] for it in chunk], device=device).repeat_interleave(m)
        moa = [it["moa"] for it in chunk for _ in range(m)]
        with torch.no_grad(), _autocast(device, cfg.bf16):
            x_1, x_0 = generate(old, x_clean, embeddings[idx], generator=gen, sigma=cfg.sigma,
                                num_steps=cfg.rollout_steps, grid=cfg.rollout_grid, solver="heun",
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
    trains on its sampler's timesteps (paper App. B). ``"uniform"``: ``t ~ U[0, 1)``.
    """
    from cellfluxrl.sampler import time_grid

    T = cfg.n_train_timesteps
    if cfg.t_sampling == "uniform":
        return rng.random((n, T))
    grid = np.asarray(time_grid(cfg.rollout_steps, kind=cfg.rollout_grid), dtype=np.float64)[:-1]
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


def nft_backward(policies: Policies, ro: Rollouts, r: torch.Tensor, cfg: PosttrainConfig,
                 rng: np.random.Generator, device: torch.device, chunk: tuple[int, int] = (0, 1)) -> dict[str, float]:
    """Accumulate the gradient of the iteration's loss (Algorithm 1 lines 9-13) into ``theta``.

    ``chunk = (k, K)`` takes only the ``k``-th of ``K`` contiguous chunks of the shuffled items (one
    optimizer step each, ``cfg.grad_steps = K``); ``rng`` must then be the same fresh generator for
    every ``k`` so that the chunks partition one draw of items, times and source noise.

    Every velocity (``v_theta``, ``v_old``, ``v_ref``) is the guided one the rollouts were sampled
    with, ``(1 + w) v(x, t, c) - w v(x, t, None)`` at ``w = cfg.cfg_scale`` (one batched pass of
    the conditional and unconditional branches; ``w = 0`` is the plain conditional velocity), so
    the policy that is trained is exactly the policy that is sampled, and guidance stays meaningful
    after RL (docs/posttrain.md).

    The loss is the mean over every (rollout, t) item of ``nft_loss + kl_weight * kl_loss``; items
    are shuffled and split into micro-batches of ``train_batch``, each back-propagated with weight
    ``len(batch) / n_items`` (DDP all-reduces only on the last one).

    Returns:
        Means over the items: ``loss``, ``policy_loss``, ``kl`` (``||v_theta - v_ref||^2``),
        ``kl_old`` (``||v_old - v_ref||^2``) and ``fm_old`` (``||v_old - v||^2``).
    """
    n, w = ro.x_1.shape[0], cfg.guidance
    sample, draw, t_flat, n_draws = forward_draws(cfg, n, rng)
    gen = _torch_gen(rng, device)
    if cfg.train_source == "fresh":  # one noisy source per draw; a group's members share their control
        owner = np.zeros(n_draws, dtype=np.int64)
        owner[draw] = sample
        x_src = add_source_noise(ro.x_ctrl[torch.as_tensor(owner, device=device)], cfg.sigma, gen)
    sums = dict.fromkeys(("loss", "policy_loss", "kl", "kl_old", "fm_old"), 0.0)
    bounds = np.linspace(0, sample.size, chunk[1] + 1).round().astype(np.int64)
    lo, hi = int(bounds[chunk[0]]), int(bounds[chunk[0] + 1])
    batches = range(lo, hi, cfg.train_batch)
    for k, start in enumerate(batches):
        items = slice(start, min(start + cfg.train_batch, hi))
        idx = torch.as_tensor(sample[items], device=device)
        t = torch.as_tensor(t_flat[items], dtype=torch.float32, device=device)
        x_1, cond = ro.x_1[idx], ro.cond[idx]
        x_0 = ro.x_0[idx] if cfg.train_source == "rollout" else x_src[torch.as_tensor(draw[items], device=device)]
        x_t, v = interpolate(x_0, x_1, t), target_velocity(x_0, x_1)
        sync = k == len(batches) - 1 or not hasattr(policies.train, "no_sync")
        with nullcontext() if sync else policies.train.no_sync():
            with torch.no_grad():
                v_old = guided_velocity(policies.old, cond, w, autocast=cfg.bf16)(x_t, t)
                v_ref = guided_velocity(policies.ref, cond, w, autocast=cfg.bf16)(x_t, t)
            v_theta = guided_velocity(policies.train, cond, w, autocast=cfg.bf16)(x_t, t)
            policy = nft.nft_loss(v_theta, v_old, v, r[idx].float(), cfg.nft_beta, adv_clip=cfg.adv_clip,
                                  adaptive=cfg.adaptive, t=t)
            kl = nft.kl_loss(v_theta, v_ref)
            loss = policy + cfg.kl_weight * kl
            (loss.sum() / (hi - lo)).backward()
        with torch.no_grad():
            sums["loss"] += float(loss.sum())
            sums["policy_loss"] += float(policy.sum())
            sums["kl"] += float(kl.sum())
            sums["kl_old"] += float(nft.kl_loss(v_old, v_ref).sum())
            sums["fm_old"] += float(((v_old - v) ** 2).mean(dim=(1, 2, 3)).sum())
    return {key: value / (hi - lo) for key, value in sums.items()}


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


def build_policies(base_net: torch.nn.Module, device: torch.device, world: int) -> Policies:
    """``theta``, ``old``, ``ema`` start as copies of the base weights; ``ref`` is the base, frozen.

    Every network is in eval mode (dropout off) so that equal weights give equal velocities.
    """
    ref = base_net.to(device).eval().requires_grad_(False)
    theta = copy.deepcopy(ref).requires_grad_(True)
    old, ema = copy.deepcopy(ref), copy.deepcopy(ref)
    train = theta
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        train = torch.nn.parallel.DistributedDataParallel(theta, device_ids=ids)
    return Policies(theta=theta, train=train, old=old, ref=ref, ema=ema)


def run_iteration(policies: Policies, optimizer: torch.optim.Optimizer, pairs, embeddings: torch.Tensor,
                  worker: RewardWorker, cfg: PosttrainConfig, step: int, rank: int,
                  world: int, device: torch.device) -> dict:
    """One RL iteration (Algorithm 1 lines 3-16); returns its ``stats.jsonl`` record.

    Raises:
        CellfluxError: the loss or the gradient norm is NaN/inf (nothing is updated).
    """
    m, n_groups = cfg.group_size, cfg.groups_per_step // world
    start = time.perf_counter()
    # Roll out from the old policy; rewards are scored in the background meanwhile.
    ro = collect_rollouts(policies.old, pairs, embeddings, cfg, step, rank, n_groups, device, worker.submit)
    t_rollout = time.perf_counter()
    total, comps, names, busy = wait_rewards(ro.futures)
    t_reward = time.perf_counter()

    # Advantages: group mean here, std over every rollout of every rank.
    local = torch.as_tensor(np.concatenate([total[:, None], comps], axis=1), device=device)
    everything = all_gather_tensor(local).double().cpu()
    if cfg.reward_norm == "per_reward":  # every rank computes all advantages, then keeps its own rows
        w = torch.tensor([float(worker.suite.weights.get(name, 0.0)) for name in names], dtype=torch.float64)
        A = nft.per_reward_advantages(everything[:, 1:], w, m, cfg.adv_clip).reshape(-1)
        A = A[rank * len(total):(rank + 1) * len(total)].reshape(-1, m)
    else:
        A = nft.group_advantages(torch.as_tensor(total).reshape(-1, m), cfg.adv_clip,
                                 std=everything[:, 0].std(correction=0))
    r = nft.optimality(A, cfg.adv_clip).reshape(-1).to(device=device, dtype=torch.float32)

    # Accumulate the NFT + KL gradient of each chunk of items, clip, step (v_old stays the sampler's).
    losses, grad_norms = {}, []
    for k in range(cfg.grad_steps):
        optimizer.zero_grad(set_to_none=True)
        part = nft_backward(policies, ro, r, cfg, _rng(cfg, step, rank, 1), device, chunk=(k, cfg.grad_steps))
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(policies.theta.parameters(), max_norm)))
        if not (math.isfinite(part["loss"]) and math.isfinite(grad_norms[-1])):
            raise CellfluxError(f"posttrain: non-finite loss {part['loss']} / grad norm {grad_norms[-1]} at step "
                                f"{step + 1}; the last checkpoint is kept (try a lower --lr)")
        optimizer.step()
        losses = {key: losses.get(key, 0.0) + value / cfg.grad_steps for key, value in part.items()}
    grad_norm = float(np.mean(grad_norms))

    # Update the evaluation EMA and the old (sampling) policy.
    nft.ema_update(_weights(policies.ema), _weights(policies.theta), nft.eval_ema_decay(step, cfg.eval_ema_max))
    eta = nft.old_policy_decay(step + 1, cfg.old_rate, cfg.old_max)
    nft.ema_update(_weights(policies.old), _weights(policies.theta), eta)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    end = time.perf_counter()

    seconds = end - start
    wait = t_reward - t_rollout
    return {"step": step + 1, **reward_stats(everything[:, 0], everything[:, 1:], names, A, r, m), **losses,
            "grad_norm": grad_norm, "eta": eta, "lr": optimizer.param_groups[0]["lr"],
            "images": int(everything.shape[0]), "images_per_s": everything.shape[0] / seconds,
            "it_per_s": 1.0 / seconds, "t_step": seconds, "t_rollout": t_rollout - start, "t_reward_wait": wait,
            "t_train": end - t_reward, "t_reward_busy": busy, "reward_hidden": max(busy - wait, 0.0) / busy if busy else 1.0,
            "reward_wait_share": wait / seconds}


def _resume_state(out_run: Path, base_run: Path) -> dict | None:
    """The checkpoint to resume from (``None`` for a fresh run), after checking ``out_run``."""
    from cellfluxrl.checkpoint import load_checkpoint

    ckpt = out_run / CHECKPOINT_FILE
    if ckpt.is_file():
        state = load_checkpoint(ckpt)
        if state["kind"] != "posttrain":
            raise CellfluxError(f"{out_run} holds a {state['kind']} run; choose a new OUT_RUN for posttrain")
        if Path(state.get("reference_run", "")).resolve() != base_run.resolve():
            raise CellfluxError(f"{out_run} was post-trained from {state.get('reference_run')}, not {base_run}")
        return state
    config = out_run / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("kind") != "posttrain":
        raise CellfluxError(f"{out_run} holds another kind of run; choose a new OUT_RUN for posttrain")
    if out_run.is_file():
        raise CellfluxError(f"output {out_run} is a file; choose a new folder")
    return None


def rollout_sampling(cfg: PosttrainConfig):
    """The :class:`~cellfluxrl.checkpoint.Sampling` a posttrain run records: its rollout sampler and
    guidance (``cfg.cfg_scale`` resolved), the setting its policy was trained for."""
    from cellfluxrl.checkpoint import Sampling

    return Sampling(steps=cfg.rollout_steps, cfg_scale=cfg.guidance, solver="heun",
                    grid=cfg.rollout_grid, sigma=cfg.sigma)


def _resumed_config(state: dict, cfg: PosttrainConfig) -> PosttrainConfig:
    """The stored settings win on resume, except ``steps`` (a run can be extended)."""
    stored = config_from_dict(PosttrainConfig, state["posttrain"])
    changed = [f.name for f in fields(cfg) if f.name != "steps" and getattr(cfg, f.name) is not None
               and getattr(cfg, f.name) != getattr(stored, f.name)]
    if changed:
        log.warning("resuming: keeping the stored %s (ignoring the new values)", ", ".join(changed))
    return replace(stored, steps=cfg.steps)


def _checkpoint(policies: Policies, optimizer, step: int, run_config: dict, cfg: PosttrainConfig,
                base_run: Path, weights: dict[str, float]) -> dict:
    """The ``checkpoint.pt`` content (plain state dicts and Python types)."""
    return {"kind": "posttrain", "step": step, "config": run_config, "model": policies.theta.state_dict(),
            "ema": policies.ema.state_dict(), "old_policy": policies.old.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": {"seed": cfg.seed, "note": "all draws derive from (seed, step, rank)"},
            "posttrain": config_to_dict(cfg), "reference_run": str(base_run.resolve()),
            "reward_weights": dict(weights)}


class SampleGrid:
    """Fixed held-out test pairs drawn every ``grid_every`` steps: control | base | RL | real target.

    The base column and the source noise are fixed at start, so successive grids differ only by the
    weights (a visible guard against reward hacking).
    """

    def __init__(self, dataset, ref: torch.nn.Module, cfg: PosttrainConfig, device: torch.device):
        from cellfluxrl.generate import test_pairs
        from cellfluxrl.images import to_model

        target, control = test_pairs(dataset, cfg.grid_pairs, cfg.seed)
        self.cfg, self.device = cfg, device
        self.control = to_model(dataset.images[control], dequantize=False).to(device)
        self.target = to_model(dataset.images[target], dequantize=False)
        self.cond = torch.as_tensor(dataset.embeddings[dataset.condition[target]], device=device)
        self.labels = [str(c) for c in dataset.table["compound"][target]]
        self.base = self.sample(ref)

    def sample(self, net: torch.nn.Module) -> torch.Tensor:
        """Samples of ``net`` on the fixed pairs, fixed source noise, CPU float32 ``(n, C, H, W)``."""
        from cellfluxrl.generate import generate

        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 7919)
        x_1, _ = generate(net, self.control, self.cond, generator=gen, sigma=self.cfg.sigma,
                          num_steps=self.cfg.rollout_steps, grid=self.cfg.rollout_grid, cfg_scale=self.cfg.guidance)
        return x_1.float().cpu()

    def write(self, path: Path, net: torch.nn.Module, step: int) -> Path:
        """Write the PNG grid for ``net`` (the evaluation EMA) at ``step``; returns its path."""
        from cellfluxrl.grids import save_grid
        from cellfluxrl.images import to_uint8

        columns = [to_uint8(x) for x in (self.control, self.base, self.sample(net), self.target)]
        rows = [[column[i] for column in columns] for i in range(len(self.labels))]
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_grid(path, rows, self.labels, ["control", "base", f"RL step {step}", "real target"],
                         title=f"posttrain step {step} (evaluation EMA)")


def _agree(flag: bool, device: torch.device) -> bool:
    """True when any rank says so (every rank must stop at the same step)."""
    from cellfluxrl.distributed import all_reduce_sum

    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def posttrain(base_run: str | os.PathLike, out_run: str | os.PathLike, cfg: PosttrainConfig, *,
              device: str | torch.device | None = "auto", suite=None,
              on_step: Callable[[dict], None] | None = None) -> Path:
    """Post-train a base run with DiffusionNFT on the rewards; resume ``out_run`` if it has a checkpoint.

    Args:
        base_run: a pretrain (or posttrain) run folder; its EMA weights are the start and the frozen
            reference of the KL term.
        out_run: the new run folder (``config.json``, ``checkpoint.pt`` with ``kind="posttrain"``,
            ``stats.jsonl``, ``samples/step_XXXXXX.png``). Re-running on it resumes.
        cfg: the settings; on resume the stored ones are kept except ``steps``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``; under torchrun each rank takes its local GPU.
        suite: a reward scorer (default: ``RewardSuite.from_dataset`` with ``cfg.weights``).
        on_step: called on every rank with each step's stats (the command draws its progress bar).

    Returns:
        ``out_run``.

    Raises:
        CellfluxError: a bad base run or OUT_RUN, a reward/data problem, or a NaN loss.
    """
    from cellfluxrl.checkpoint import load_run, load_state_strict, save_checkpoint
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.data.pairing import PairedDataset
    from cellfluxrl.distributed import barrier, init_distributed
    from cellfluxrl.rewards.weights import parse_weights

    base_run, out_run = Path(base_run), Path(out_run)
    info = init_distributed(device)
    dev, rank, world = info.device, info.rank, info.world_size
    if cfg.groups_per_step % world:
        raise CellfluxError(f"posttrain: groups_per_step {cfg.groups_per_step} is not divisible by {world} ranks")
    state = _resume_state(out_run, base_run)
    if state is not None:
        cfg = _resumed_config(state, cfg)

    # Load the base run, its dataset and the rewards.
    base = load_run(base_run, device=dev, weights="ema")
    if cfg.cfg_scale is None:  # train and roll out the guidance the base is meant to be sampled with
        cfg = replace(cfg, cfg_scale=base.sampling.cfg_scale)
        if base.recorded is None:
            log.warning("%s predates recorded sampling settings: rolling out and training with CellFlux's CFG %g "
                        "(give --cfg-scale to choose)", base_run, cfg.cfg_scale)
    dataset = load_dataset(base.dataset_dir)
    pairs = PairedDataset(dataset, "train", flip_p=0.0, include_ood=False, seed=cfg.seed)
    weights = parse_weights(cfg.weights)
    if suite is None:
        from cellfluxrl.rewards import RewardSuite

        suite = RewardSuite.from_dataset(str(base.dataset_dir), weights, device=str(dev))
    policies = build_policies(base.net, dev, world)
    optimizer = torch.optim.AdamW(policies.theta.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=cfg.weight_decay)
    start = 0
    if state is not None:
        path = out_run / CHECKPOINT_FILE
        for net, key in ((policies.theta, "model"), (policies.ema, "ema"), (policies.old, "old_policy")):
            load_state_strict(net, state[key], path, key)
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        log.info("resuming %s at step %d", out_run, start)
    run_config = {**base.config, "kind": "posttrain", "base_run": str(base_run.resolve()),
                  "posttrain": config_to_dict(cfg), "reward_weights": dict(weights),
                  "sampling": rollout_sampling(cfg).to_dict()}
    if info.is_main:
        out_run.mkdir(parents=True, exist_ok=True)
        dump_json(run_config, out_run / "config.json")
        truncate_stats(out_run / STATS_FILE, start)
    grid = SampleGrid(dataset, policies.ref, cfg, dev) if info.is_main and cfg.grid_every else None
    embeddings = torch.as_tensor(np.array(dataset.embeddings), device=dev)
    worker = RewardWorker(suite)
    began = time.perf_counter()
    try:
        for step in range(start, cfg.steps):
            stats = run_iteration(policies, optimizer, pairs, embeddings, worker, cfg, step, rank, world, dev)
            done = step + 1
            out_of_time = cfg.max_minutes > 0 and _agree(time.perf_counter() - began > 60 * cfg.max_minutes, dev)
            if info.is_main:
                with open(out_run / STATS_FILE, "a") as f:
                    f.write(json.dumps(stats) + "\n")
                if done % cfg.save_every == 0 or done == cfg.steps or out_of_time:
                    save_checkpoint(out_run / CHECKPOINT_FILE,
                                    _checkpoint(policies, optimizer, done, run_config, cfg, base_run, weights))
                if grid is not None and (done % cfg.grid_every == 0 or done == cfg.steps or out_of_time):
                    grid.write(out_run / GRID_DIR / f"step_{done:06d}.png", policies.ema, done)
            if on_step is not None:
                on_step(stats)
            if out_of_time:
                log.info("stopping after step %d: the %.1f-minute limit is reached", done, cfg.max_minutes)
                break
        barrier()
    finally:
        worker.close()
    return out_run
