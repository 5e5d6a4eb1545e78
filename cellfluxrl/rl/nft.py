"""DiffusionNFT on the source-to-target flow: the pure pieces of CellFluxRL post-training.

Everything here is a pure function of tensors (no I/O, no config objects, no global state), so each
piece is tested against hand-computed values (``tests/test_nft.py``). The loop that wires them
together is :mod:`cellfluxrl.rl.loop`.

Conventions (owned by :mod:`cellfluxrl.model.path`, restated here for the equations): ``t = 0`` is the
noisy control source ``x_0``, ``t = 1`` the perturbed target; a rollout ``x_1_hat`` is re-noised
with the forward process ``x_t = (1 - t) x_0 + t x_1_hat`` and the velocity target is
``v = x_1_hat - x_0`` (paper Algorithm 1, line 11, with ``alpha_t = 1 - t``, ``beta_t = t``).

Names follow the paper and the DiffusionNFT code, with the two betas kept apart:

* ``nft_beta``: DiffusionNFT's guidance strength (``config.beta``; the paper's gamma in Eqs. 8-9,
  beta in Algorithm 1 line 12). It is an inverse step size: the loss holds
  ``nft_beta * ||v_theta - v_old||^2`` as a proximal term (reference section 1.7b).
* ``kl_weight``: the weight of ``||v_theta - v_ref||^2`` to the frozen base model (DiffusionNFT's
  ``config.train.beta``; the paper's beta in Eq. 7 and beta_KL in Algorithm 1).

Norms ``||.||^2`` are per-sample means over the non-batch dimensions, as in DiffusionNFT, so the
loss scale does not depend on the image size.
"""

from __future__ import annotations

from typing import Iterable

import torch

ADV_EPS = 1e-4  # added to the global reward std before dividing (DiffusionNFT's stat tracker)
ADAPTIVE_MIN_WEIGHT = 1e-5  # floor of the adaptive weight (DiffusionNFT clamps it there)


def _sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions: ``(B, ...)`` -> ``(B,)``."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def group_advantages(rewards: torch.Tensor, adv_clip: float = 5.0,
                     std: float | torch.Tensor | None = None) -> torch.Tensor:
    """Group-centred, globally scaled, clipped advantages (DiffusionNFT's ``global_std`` mode).

    ``A = clip((R - mean_group(R)) / (std + 1e-4), -adv_clip, adv_clip)``, where the mean is over
    the ``m`` rollouts of one ``(x_0, c)`` group and ``std`` is the population standard deviation of
    *all* rewards of the iteration (every group, every rank). This is Algorithm 1 line 6 with
    ``Z_c = adv_clip * (std + 1e-4)`` once mapped by :func:`optimality`.

    Args:
        rewards: ``(G, m)`` total rewards, ``G`` groups of ``m`` rollouts (any float dtype).
        adv_clip: clip bound ``C > 0`` (DiffusionNFT: 5).
        std: the global reward std (gathered across ranks by the caller); ``None`` uses the std of
            ``rewards`` itself (one process).

    Returns:
        float64 ``(G, m)`` advantages in ``[-adv_clip, adv_clip]``. A group whose rewards are all
        equal gets ``A = 0`` (it is kept, not dropped, as in DiffusionNFT).
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be (G, m), got shape {tuple(rewards.shape)}")
    if std is None:
        std = rewards.std(correction=0)
    std = torch.as_tensor(std, dtype=torch.float64)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return torch.clamp(centred / (std + ADV_EPS), -adv_clip, adv_clip)


def per_reward_advantages(components: torch.Tensor, weights: torch.Tensor, group_size: int,
                          adv_clip: float = 5.0) -> torch.Tensor:
    """Advantages of a weighted sum of rewards with every reward standardised first.

    ``z_k = (R_k - mean_group(R_k)) / (std(R_k) + 1e-4)`` for each reward ``k`` (std over every
    rollout of the iteration), ``S = sum_k w_k z_k``, and ``A = clip(S / (std(S) + 1e-4))``. Each
    reward then moves the advantages in proportion to its weight, whatever its scale or tails; with
    the raw sum (:func:`group_advantages` of ``sum_k w_k R_k``) a reward's share is ``w_k^2 Var(R_k)``,
    and one heavy-tailed reward (a clipped squared deviation reaching -25) can drown the others
    (experiments/RESULTS.md, "RL experiments: why RL on the raw reward sum lowered MoA"). This is the paper's App. E idea
    (each reward normalised before weighting), with the std instead of the min-max range, which one
    outlier would set.

    Args:
        components: ``(N, K)`` rewards of every rollout (``N = G m``, group order, all ranks).
        weights: ``(K,)`` weights ``w_k`` (a reward with weight 0 does not count).
        group_size: ``m``.
        adv_clip: clip bound ``C``.

    Returns:
        float64 ``(G, m)`` advantages in ``[-adv_clip, adv_clip]``, group-centred.
    """
    comps = torch.as_tensor(components, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64)
    if comps.ndim != 2 or comps.shape[1] != w.numel() or comps.shape[0] % group_size:
        raise ValueError(f"components {tuple(comps.shape)} do not fit {w.numel()} weights and groups of {group_size}")
    grouped = comps.reshape(-1, group_size, comps.shape[1])
    z = (grouped - grouped.mean(dim=1, keepdim=True)) / (comps.std(dim=0, correction=0) + ADV_EPS)
    combined = (z * w).sum(dim=2)
    return torch.clamp(combined / (combined.std(correction=0) + ADV_EPS), -adv_clip, adv_clip)


def optimality(A: torch.Tensor, adv_clip: float = 5.0) -> torch.Tensor:
    """Optimality probability ``r = clamp(0.5 + A / (2 adv_clip), 0, 1)`` (Algorithm 1 line 6).

    Args:
        A: advantages, any shape (clipped or not).
        adv_clip: the clip bound ``C`` used for ``A``.

    Returns:
        ``r`` in ``[0, 1]``, same shape and dtype: ``A = 0 -> 0.5``, ``A >= C -> 1``, ``A <= -C -> 0``.
    """
    return torch.clamp(0.5 + A / (2.0 * adv_clip), 0.0, 1.0)


def implicit_policies(v_theta: torch.Tensor, v_old: torch.Tensor,
                      nft_beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The implicit positive and negative policies (paper Eqs. 8-9; Algorithm 1 line 12).

    ``v+ = (1 - nft_beta) v_old + nft_beta v_theta`` and ``v- = (1 + nft_beta) v_old - nft_beta v_theta``.
    ``v_old`` is detached: only ``v_theta`` carries gradient.

    Args:
        v_theta: ``(B, C, H, W)`` velocity of the trained policy.
        v_old: ``(B, C, H, W)`` velocity of the data-collection (old) policy.
        nft_beta: guidance strength ``> 0``.

    Returns:
        ``(v_plus, v_minus)``, each ``(B, C, H, W)``.
    """
    v_old = v_old.detach()
    v_plus = (1.0 - nft_beta) * v_old + nft_beta * v_theta
    v_minus = (1.0 + nft_beta) * v_old - nft_beta * v_theta
    return v_plus, v_minus


def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, v_target: torch.Tensor, r: torch.Tensor,
             nft_beta: float, *, adv_clip: float = 5.0, adaptive: bool = False,
             t: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample DiffusionNFT policy loss (paper Eq. 7 without its KL term).

    ``L = adv_clip * [r L+ + (1 - r) L-] / nft_beta`` with ``L± = ||v± - v||^2`` (plain), or, with
    ``adaptive=True``, DiffusionNFT's self-normalised form in target space: the target prediction
    of a velocity ``u`` is ``x_t + (1 - t) u``, so its error is ``e± = (1 - t)(v± - v)`` and
    ``L± = mean(e±^2) / stopgrad(max(mean|e±|, 1e-5))`` (reference section 1.3, mirrored to t=1 =
    target). The ``adv_clip / nft_beta`` factor makes the on-policy gradient (``v_theta = v_old``)
    exactly ``clip(A)`` times the (normalised) flow-matching gradient, for any ``nft_beta``
    (reference section 1.7a): positive advantages pull toward the rollout, negative ones push away.

    Args:
        v_theta: ``(B, C, H, W)`` trained-policy velocity at ``(x_t, t, c)``, with gradient.
        v_old: ``(B, C, H, W)`` old-policy velocity at the same point (detached here).
        v_target: ``(B, C, H, W)`` forward-process velocity ``x_1_hat - x_0``.
        r: ``(B,)`` optimality probabilities in ``[0, 1]``.
        nft_beta: guidance strength ``> 0`` (DiffusionNFT default 1.0).
        adv_clip: the advantage clip bound used to build ``r``.
        adaptive: use the self-normalised (adaptive-weighting) form; needs ``t``.
        t: ``(B,)`` flow times in ``[0, 1]`` (only for ``adaptive``).

    Returns:
        float32 (or the inputs' dtype) ``(B,)`` per-sample losses; average them in the loop.
    """
    if nft_beta <= 0:
        raise ValueError(f"nft_beta must be > 0, got {nft_beta}")
    v_plus, v_minus = implicit_policies(v_theta, v_old, nft_beta)
    v_target = v_target.detach()
    if adaptive:
        if t is None:
            raise ValueError("adaptive=True needs the flow times t")
        scale = (1.0 - t.detach()).reshape(-1, *([1] * (v_theta.ndim - 1))).to(v_theta.dtype)
        losses = []
        for v_pm in (v_plus, v_minus):
            err = scale * (v_pm - v_target)
            weight = _sample_mean(err.detach().abs().double()).clamp_min(ADAPTIVE_MIN_WEIGHT)
            losses.append(_sample_mean(err ** 2) / weight.to(err.dtype))
        loss_plus, loss_minus = losses
    else:
        loss_plus = _sample_mean((v_plus - v_target) ** 2)
        loss_minus = _sample_mean((v_minus - v_target) ** 2)
    r = r.detach().to(loss_plus.dtype)
    return adv_clip * (r * loss_plus + (1.0 - r) * loss_minus) / nft_beta


def kl_loss(v_theta: torch.Tensor, v_ref: torch.Tensor) -> torch.Tensor:
    """Velocity-space "KL" to the frozen base model: ``||v_theta - v_ref||^2`` per sample.

    For two flows sharing a source this is, up to a time-dependent constant, the KL divergence
    between their path measures; DiffusionNFT uses the same mean squared velocity gap.

    Args:
        v_theta: ``(B, C, H, W)`` trained-policy velocity, with gradient.
        v_ref: ``(B, C, H, W)`` frozen reference (base) velocity at the same point (detached here).

    Returns:
        ``(B,)`` per-sample mean squared gap.
    """
    return _sample_mean((v_theta - v_ref.detach()) ** 2)


@torch.no_grad()
def ema_update(target_params: Iterable[torch.Tensor], source_params: Iterable[torch.Tensor],
               decay: float) -> None:
    """In place: ``target <- decay * target + (1 - decay) * source`` for each tensor pair.

    With ``decay = eta`` this is the old-policy update of Algorithm 1 line 16,
    ``theta_old <- eta theta_old + (1 - eta) theta``: ``eta = 0`` copies ``theta`` (fully on-policy),
    larger ``eta`` makes the sampler lag. Non-floating tensors (counters) are copied.

    Args:
        target_params: tensors updated in place (e.g. the old policy's parameters and buffers).
        source_params: tensors of the same shapes (the trained policy's).
        decay: weight on the target, in ``[0, 1]``.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    targets, sources = list(target_params), list(source_params)
    if len(targets) != len(sources):
        raise ValueError(f"{len(targets)} target tensors but {len(sources)} source tensors")
    for target, source in zip(targets, sources):
        if target.shape != source.shape:
            raise ValueError(f"EMA shape mismatch {tuple(target.shape)} vs {tuple(source.shape)}")
        if target.is_floating_point():
            target.lerp_(source.to(target.dtype), 1.0 - decay)
        else:
            target.copy_(source)


def old_policy_decay(step: int, rate: float = 0.001, max_eta: float = 0.5) -> float:
    """``eta_i = min(rate * i, max_eta)``: the old-policy EMA decay after optimizer step ``i``.

    DiffusionNFT's default schedule (``decay_type 1``): ``eta`` is the weight on the *old*
    parameters in ``theta_old <- eta theta_old + (1 - eta) theta`` (reference section 2.1), so the
    sampler is fully on-policy at the start and lags more as training goes, reaching 0.5 at step 500.

    Args:
        step: optimizer steps completed so far (``>= 0``; 1 after the first step).
        rate: growth per step (0 gives a strictly on-policy sampler).
        max_eta: the cap, in ``[0, 1]``.

    Returns:
        ``eta`` in ``[0, max_eta]``.
    """
    return float(min(max(rate * step, 0.0), max_eta))


def eval_ema_decay(step: int, max_decay: float = 0.9) -> float:
    """Decay of the separate evaluation/checkpoint EMA: ``min((1 + s) / (10 + s), max_decay)``.

    DiffusionNFT's ``EMAModuleWrapper`` schedule, updated every optimizer step ``s`` (0-based);
    distinct from the old policy, which only samples.

    Args:
        step: 0-based index of the optimizer step just taken.
        max_decay: the cap (DiffusionNFT: 0.9).

    Returns:
        the decay in ``[0.1, max_decay]``.
    """
    return float(min((1.0 + step) / (10.0 + step), max_decay))
