"""One RL iteration (Algorithm 1 lines 5-16): the four policies, the NFT + KL gradient over the
iteration's (rollout, t) items, the optimizer step and the old-policy and EMA updates."""

from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from cellfluxrl.distributed import all_gather_tensor
from cellfluxrl.errors import CellfluxError
from cellfluxrl.model.generate import guided_velocity
from cellfluxrl.model.path import add_source_noise, interpolate, target_velocity
from cellfluxrl.rl import nft
from cellfluxrl.rl.config import PosttrainConfig
from cellfluxrl.rl.null import within_group_permutation
from cellfluxrl.rl.reward_worker import RewardWorker, reward_stats, wait_rewards
from cellfluxrl.rl.rollouts import Rollouts, collect_rollouts, forward_draws, iteration_rng, torch_generator


@dataclass
class Policies:
    """The four weight sets: trained ``theta`` (maybe DDP-wrapped as ``train``), ``old`` (sampler),
    ``ref`` (frozen base), ``ema`` (evaluation)."""

    theta: torch.nn.Module
    train: torch.nn.Module
    old: torch.nn.Module
    ref: torch.nn.Module
    ema: torch.nn.Module


def _weights(module: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers in ``state_dict`` order (the tensors an EMA must track)."""
    return list(module.state_dict(keep_vars=True).values())


def build_policies(base_net: torch.nn.Module, device: torch.device, world: int, trainable: str = "all") -> Policies:
    """``theta``, ``old``, ``ema`` start as copies of the base weights; ``ref`` is the base, frozen.

    Only ``theta``'s :func:`trainable_parameters` require gradients (set before any DDP wrap).
    Every network is in eval mode (dropout off) so that equal weights give equal velocities.
    """
    ref = base_net.to(device).eval().requires_grad_(False)
    theta = copy.deepcopy(ref)
    trainable_parameters(theta, trainable)
    old, ema = copy.deepcopy(ref), copy.deepcopy(ref)
    train = theta
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        train = torch.nn.parallel.DistributedDataParallel(theta, device_ids=ids)
    return Policies(theta=theta, train=train, old=old, ref=ref, ema=ema)


def advantages(cfg: PosttrainConfig, everything: torch.Tensor, weights: list[float], rank: int = 0,
               n_local: int | None = None) -> torch.Tensor:
    """This rank's advantages ``(G, m)`` from the iteration's rewards of every rank (Algorithm 1 line 6).

    Args:
        cfg: ``reward_norm`` (``"none"``: the raw weighted sum, :func:`nft.group_advantages`;
            ``"per_reward"``: each reward standardised first, :func:`nft.per_reward_advantages`),
            ``group_size`` and ``adv_clip``.
        everything: float64 ``(N, 1 + K)`` gathered over ranks in rank order: column 0 the weighted
            total, then the ``K`` rewards of every rollout, in group order.
        weights: the ``K`` reward weights, in the columns' order.
        rank: this process's rank; its rows are ``[rank n_local, (rank + 1) n_local)``.
        n_local: rollouts on this rank (``None``: all ``N``, one process).

    Returns:
        float64 ``(n_local / m, m)`` clipped advantages.
    """
    m = cfg.group_size
    n_local = everything.shape[0] if n_local is None else n_local
    rows = slice(rank * n_local, (rank + 1) * n_local)
    if cfg.reward_norm == "per_reward":  # every rank computes all advantages, then keeps its own rows
        w = torch.tensor(weights, dtype=torch.float64)
        return nft.per_reward_advantages(everything[:, 1:], w, m, cfg.adv_clip).reshape(-1)[rows].reshape(-1, m)
    return nft.group_advantages(everything[rows, 0].reshape(-1, m), cfg.adv_clip,
                                std=everything[:, 0].std(correction=0))


def trainable_parameters(net: torch.nn.Module, which: str) -> list[torch.nn.Parameter]:
    """The parameters RL updates: ``"all"``, or ``"conditioning"``, the condition projection
    (``cond_proj``) and every residual block's embedding projection (``*.emb_proj``), which carry
    the compound (and the time) into each block as a per-channel shift, about a quarter of the
    ``micro`` UNet's weights. The others keep ``requires_grad = False``.

    Raises:
        CellfluxError: ``which`` selects no parameter of ``net``.
    """
    names = {name for name, _ in net.named_parameters()}
    if which == "conditioning":
        keep = {name for name in names if name.startswith("cond_proj.") or ".emb_proj." in name}
    else:
        keep = names
    if not keep:
        raise CellfluxError(f"posttrain: trainable {which!r} selects no parameter of this network")
    params = []
    for name, param in net.named_parameters():
        param.requires_grad_(name in keep)
        if name in keep:
            params.append(param)
    return params


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

    The loss is the mean over every (rollout, t) item of ``nft_loss + kl_weight * kl_loss``, the KL
    to ``v_ref`` (the frozen base, paper Eq. 7) or, with ``cfg.kl_target = "old"``, to ``v_old`` (the
    sampling policy, Algorithm 1 line 13: a proximal term that does not anchor to the base); items
    are shuffled and split into micro-batches of ``train_batch``, each back-propagated with weight
    ``len(batch) / n_items`` (DDP all-reduces only on the last one).

    Returns:
        Means over the items: ``loss``, ``policy_loss``, ``kl`` (``||v_theta - v_target||^2``, the KL term),
        ``kl_old`` (``||v_old - v_ref||^2``) and ``fm_old`` (``||v_old - v||^2``).
    """
    n, w = ro.x_1.shape[0], cfg.guidance
    sample, draw, t_flat, n_draws = forward_draws(cfg, n, rng)
    gen = torch_generator(rng, device)
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
            kl = nft.kl_loss(v_theta, v_ref if cfg.kl_target == "ref" else v_old)
            loss = policy + cfg.kl_weight * kl
            (loss.sum() / (hi - lo)).backward()
        with torch.no_grad():
            sums["loss"] += float(loss.sum())
            sums["policy_loss"] += float(policy.sum())
            sums["kl"] += float(kl.sum())
            sums["kl_old"] += float(nft.kl_loss(v_old, v_ref).sum())
            sums["fm_old"] += float(((v_old - v) ** 2).mean(dim=(1, 2, 3)).sum())
    return {key: value / (hi - lo) for key, value in sums.items()}


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
    weights = [float(worker.suite.weights.get(name, 0.0)) for name in names]
    if cfg.reward_null:  # the shuffled-reward null: same rewards, pairing with the rollouts broken
        everything = everything[torch.as_tensor(within_group_permutation(everything.shape[0], m, cfg.seed, step))]
    A = advantages(cfg, everything, weights, rank, len(total))
    r = nft.optimality(A, cfg.adv_clip).reshape(-1).to(device=device, dtype=torch.float32)

    # Accumulate the NFT + KL gradient of each chunk of items, clip, step (v_old stays the sampler's).
    losses, grad_norms = {}, []
    for k in range(cfg.grad_steps):
        optimizer.zero_grad(set_to_none=True)
        part = nft_backward(policies, ro, r, cfg, iteration_rng(cfg, step, rank, 1), device, chunk=(k, cfg.grad_steps))
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
