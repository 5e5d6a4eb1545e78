"""Hand-computed checks of the DiffusionNFT pieces (cellfluxrl.rl.nft)."""

from __future__ import annotations

import math

import pytest
import torch

from cellfluxrl.rl.nft import (ADV_EPS, eval_ema_decay, ema_update, group_advantages, implicit_policies, kl_loss,
                               nft_loss, old_policy_decay, optimality)


def _grad(loss_fn, v: torch.Tensor) -> torch.Tensor:
    v = v.detach().clone().requires_grad_(True)
    loss_fn(v).sum().backward()
    return v.grad


def test_group_advantages_hand_computed():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]])
    A = group_advantages(rewards)
    std = math.sqrt(8.0 / 6.0)  # population std of {1,2,3,4,4,4} around 3
    expected = torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64) / (std + ADV_EPS)
    assert A.dtype == torch.float64
    torch.testing.assert_close(A, expected, rtol=0, atol=1e-12)
    r = optimality(A, 5.0)
    torch.testing.assert_close(r[0], 0.5 + expected[0] / 10.0, rtol=0, atol=1e-12)
    assert torch.equal(r[1], torch.full((3,), 0.5, dtype=torch.float64))


def test_group_advantages_uses_the_given_global_std_and_clips():
    rewards = torch.tensor([[0.0, 1.0], [10.0, 30.0]])
    A = group_advantages(rewards, adv_clip=5.0, std=1.0)
    expected = torch.tensor([[-0.5, 0.5], [-5.0, 5.0]], dtype=torch.float64) / (1.0 + ADV_EPS)
    expected[1] = torch.tensor([-5.0, 5.0])  # +-10 / (1 + 1e-4) clipped to +-5
    torch.testing.assert_close(A, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(optimality(A, 5.0)[1], torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_zero_variance_rewards_give_r_one_half_everywhere():
    rewards = torch.full((4, 8), -1.25)
    r = optimality(group_advantages(rewards), 5.0)
    assert torch.equal(r, torch.full((4, 8), 0.5, dtype=torch.float64))


def test_group_advantages_rejects_flat_rewards():
    with pytest.raises(ValueError, match=r"\(G, m\)"):
        group_advantages(torch.zeros(8))


def test_optimality_hand_values():
    A = torch.tensor([-7.0, -5.0, -2.5, 0.0, 1.0, 5.0, 9.0])
    expected = torch.tensor([0.0, 0.0, 0.25, 0.5, 0.6, 1.0, 1.0])
    torch.testing.assert_close(optimality(A, 5.0), expected)


def test_implicit_policies_hand_values():
    v_theta, v_old = torch.tensor([2.0]), torch.tensor([1.0])
    v_plus, v_minus = implicit_policies(v_theta, v_old, 0.25)
    torch.testing.assert_close(v_plus, torch.tensor([0.75 * 1.0 + 0.25 * 2.0]))
    torch.testing.assert_close(v_minus, torch.tensor([1.25 * 1.0 - 0.25 * 2.0]))
    # nft_beta = 1: v+ = v_theta, v- = 2 v_old - v_theta (DiffusionNFT issue #46)
    v_plus, v_minus = implicit_policies(v_theta, v_old, 1.0)
    assert v_plus.item() == 2.0 and v_minus.item() == 0.0


def test_nft_loss_hand_computed_scalars():
    # nft_beta 0.5, v_theta 2, v_old 0, v 1: v+ = 1 (L+ = 0), v- = -1 (L- = 4)
    shape = (1, 1, 1, 2)
    v_theta, v_old, v = torch.full(shape, 2.0), torch.zeros(shape), torch.ones(shape)
    for r, expected in ((1.0, 0.0), (0.0, 5 * 4 / 0.5), (0.25, 5 * 0.75 * 4 / 0.5)):
        loss = nft_loss(v_theta, v_old, v, torch.tensor([r]), 0.5)
        torch.testing.assert_close(loss, torch.tensor([expected]))


def test_r_one_limit_is_flow_matching_on_the_positive_policy():
    gen = torch.Generator().manual_seed(0)
    v_theta, v_old, v = (torch.randn(3, 2, 4, 4, generator=gen) for _ in range(3))
    for beta in (1.0, 0.3):
        loss = nft_loss(v_theta, v_old, v, torch.ones(3), beta)
        v_plus = (1 - beta) * v_old + beta * v_theta
        torch.testing.assert_close(loss, 5.0 / beta * ((v_plus - v) ** 2).mean(dim=(1, 2, 3)))
    # nft_beta = 1: pure flow matching of v_theta on the rollout, scaled by adv_clip
    g = _grad(lambda u: nft_loss(u, v_old, v, torch.ones(3), 1.0), v_theta)
    g_fm = _grad(lambda u: ((u - v) ** 2).mean(dim=(1, 2, 3)), v_theta)
    torch.testing.assert_close(g, 5.0 * g_fm)


def test_r_zero_limit_pushes_v_theta_away_from_the_rollout():
    gen = torch.Generator().manual_seed(1)
    v_theta, v_old, v = (torch.randn(3, 2, 4, 4, generator=gen) for _ in range(3))
    loss = nft_loss(v_theta, v_old, v, torch.zeros(3), 1.0)
    torch.testing.assert_close(loss, 5.0 * ((2 * v_old - v_theta - v) ** 2).mean(dim=(1, 2, 3)))
    # its minimiser is the reflection 2 v_old - v: the gradient vanishes there
    g = _grad(lambda u: nft_loss(u, v_old, v, torch.zeros(3), 1.0), 2 * v_old - v)
    assert g.abs().max() < 1e-6


@pytest.mark.parametrize("nft_beta", [1.0, 0.1, 2.5])
@pytest.mark.parametrize("adaptive", [False, True])
def test_on_policy_gradient_is_clipped_advantage_times_flow_matching(nft_beta, adaptive):
    """Reference section 1.7a: at v_theta = v_old, grad = clip(A) * grad(FM), for any nft_beta."""
    gen = torch.Generator().manual_seed(2)
    v_old, v = torch.randn(4, 3, 5, 5, generator=gen), torch.randn(4, 3, 5, 5, generator=gen)
    t = torch.tensor([0.1, 0.5, 0.9, 0.0])
    A = torch.tensor([2.0, -3.0, 7.0, -0.5])
    A_clip = A.clamp(-5.0, 5.0)
    r = optimality(A_clip, 5.0)
    g = _grad(lambda u: nft_loss(u, v_old, v, r, nft_beta, adaptive=adaptive, t=t), v_old)

    scale = (1 - t).reshape(-1, 1, 1, 1)
    if adaptive:  # self-normalised FM loss with the weight frozen at the on-policy point
        w = (scale * (v_old - v)).abs().mean(dim=(1, 2, 3))
        fm = lambda u: ((scale * (u - v)) ** 2).mean(dim=(1, 2, 3)) / w  # noqa: E731
    else:
        fm = lambda u: ((u - v) ** 2).mean(dim=(1, 2, 3))  # noqa: E731
    g_fm = _grad(fm, v_old)
    torch.testing.assert_close(g, A_clip.reshape(-1, 1, 1, 1) * g_fm, rtol=1e-5, atol=1e-7)
    assert torch.dot(g[0].flatten(), (v_old - v)[0].flatten()) > 0  # A > 0: descent moves toward v


def test_off_policy_minimiser_is_the_reinforcement_guidance():
    """Reference section 1.7b: the per-sample minimiser is v_old + (2r - 1)(v - v_old) / nft_beta."""
    gen = torch.Generator().manual_seed(3)
    v_old, v = torch.randn(3, 1, 4, 4, generator=gen), torch.randn(3, 1, 4, 4, generator=gen)
    r, nft_beta = torch.tensor([0.9, 0.2, 0.5]), 0.7
    v_star = v_old + (2 * r - 1).reshape(-1, 1, 1, 1) * (v - v_old) / nft_beta
    g = _grad(lambda u: nft_loss(u, v_old, v, r, nft_beta), v_star)
    assert g.abs().max() < 1e-5


def test_adaptive_loss_hand_value_and_needs_t():
    # t = 0.5, v_theta = v_old = 0, v = 2: e = 0.5 * (0 - 2) = -1 -> mean(e^2)/mean|e| = 1 for both
    shape = (1, 1, 2, 2)
    loss = nft_loss(torch.zeros(shape), torch.zeros(shape), torch.full(shape, 2.0), torch.tensor([0.3]), 1.0,
                    adaptive=True, t=torch.tensor([0.5]))
    torch.testing.assert_close(loss, torch.tensor([5.0]))
    with pytest.raises(ValueError, match="needs the flow times"):
        nft_loss(torch.zeros(shape), torch.zeros(shape), torch.zeros(shape), torch.tensor([0.3]), 1.0, adaptive=True)
    with pytest.raises(ValueError, match="nft_beta"):
        nft_loss(torch.zeros(shape), torch.zeros(shape), torch.zeros(shape), torch.tensor([0.3]), 0.0)


def test_kl_loss_hand_value_and_gradient_only_through_v_theta():
    v_theta = torch.tensor([[[[1.0, 3.0]]]], requires_grad=True)
    v_ref = torch.zeros(1, 1, 1, 2, requires_grad=True)
    kl = kl_loss(v_theta, v_ref)
    assert kl.item() == 5.0
    kl.sum().backward()
    torch.testing.assert_close(v_theta.grad, torch.tensor([[[[1.0, 3.0]]]]))
    assert v_ref.grad is None


def test_ema_update_in_place():
    target = [torch.tensor([4.0, 0.0]), torch.tensor([7], dtype=torch.int64)]
    source = [torch.tensor([0.0, 8.0]), torch.tensor([9], dtype=torch.int64)]
    ema_update(target, source, 0.25)
    torch.testing.assert_close(target[0], torch.tensor([1.0, 6.0]))
    assert target[1].item() == 9
    ema_update(target, source, 0.0)  # eta = 0: exact copy (on-policy)
    assert torch.equal(target[0], source[0])
    with pytest.raises(ValueError, match="decay"):
        ema_update(target, source, 1.5)
    with pytest.raises(ValueError, match="shape"):
        ema_update([torch.zeros(2)], [torch.zeros(3)], 0.5)


def test_decay_schedules():
    assert [old_policy_decay(i) for i in (0, 1, 250, 500, 10_000)] == [0.0, 0.001, 0.25, 0.5, 0.5]
    assert old_policy_decay(100, rate=0.0) == 0.0
    assert eval_ema_decay(0) == pytest.approx(0.1)
    assert eval_ema_decay(8) == pytest.approx(0.5)
    assert eval_ema_decay(1000) == 0.9


def test_per_reward_advantages_by_hand():
    """Two rewards, two groups of two: z-scores per reward (population std over all rollouts),
    weighted sum, rescaled by its own std."""
    from cellfluxrl.rl.nft import per_reward_advantages

    comps = torch.tensor([[1.0, 10.0], [3.0, 10.0], [0.0, -30.0], [2.0, 50.0]], dtype=torch.float64)
    w = torch.tensor([5.0, 1.0], dtype=torch.float64)
    std = comps.std(dim=0, correction=0)
    z = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [-1.0, -40.0], [1.0, 40.0]], dtype=torch.float64) / (std + 1e-4)
    s = (z * w).sum(dim=1)
    expected = (s / (s.std(correction=0) + 1e-4)).reshape(2, 2)
    torch.testing.assert_close(per_reward_advantages(comps, w, 2), expected)


def test_per_reward_advantages_ignore_scale_and_zero_weights():
    """Rescaling one reward (or shifting it) leaves the advantages unchanged (up to the std eps), a weight-0 reward has
    no say, and a heavy-tailed reward no longer drowns a weighted one, unlike the raw sum."""
    from cellfluxrl.rl.nft import group_advantages, per_reward_advantages

    g = torch.Generator().manual_seed(0)
    moa = torch.rand(32, generator=g, dtype=torch.float64)
    tail = -torch.distributions.Exponential(0.2).sample((32,)).double().clamp(max=25.0)
    noise = torch.randn(32, generator=g, dtype=torch.float64)
    comps = torch.stack([moa, tail, noise], dim=1)
    w = torch.tensor([5.0, 1.0, 0.0], dtype=torch.float64)
    A = per_reward_advantages(comps, w, 4)
    scaled = comps * torch.tensor([1.0, 7.0, 3.0], dtype=torch.float64) + torch.tensor([2.0, -5.0, 1.0])
    torch.testing.assert_close(per_reward_advantages(scaled, w, 4), A, rtol=1e-3, atol=1e-3)  # up to the 1e-4 eps
    comps_other_noise = comps.clone()
    comps_other_noise[:, 2] = torch.randn(32, generator=g, dtype=torch.float64)
    torch.testing.assert_close(per_reward_advantages(comps_other_noise, w, 4), A)
    centred_moa = (moa.reshape(8, 4) - moa.reshape(8, 4).mean(dim=1, keepdim=True)).reshape(-1)

    def corr(a, b):
        return float(torch.corrcoef(torch.stack([a.reshape(-1), b]))[0, 1])

    raw = group_advantages((comps[:, :2] @ w[:2]).reshape(8, 4))
    assert corr(A, centred_moa) > 0.8 > corr(raw, centred_moa)
