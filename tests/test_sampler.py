"""Path, loss, time grids, Euler/Heun solvers on analytic fields, CFG and seeded generation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cellfluxrl.model.generate import generate, guided_velocity
from cellfluxrl.model.losses import fm_loss
from cellfluxrl.model.path import (add_source_noise, interpolate, sample_t_skewed, sample_t_uniform,
                                   skewed_t_density_mean, target_velocity)
from cellfluxrl.model.sampler import euler_sample, heun_sample, time_grid
from cellfluxrl.model.unet import UNetConfig, VelocityUNet

MICRO = UNetConfig(model_channels=32, channel_mult=(1, 1), num_res_blocks=1, attention_resolutions=(), dropout=0.0)




def perturbed_net(seed: int = 0) -> VelocityUNet:
    torch.manual_seed(seed)
    net = VelocityUNet(MICRO, 4).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


class Counting(nn.Module):
    """Wraps a network and counts forward calls (not a VelocityUNet: CFG uses two separate passes)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x, t, cond):
        self.calls += 1
        return self.net(x, t, cond)


# ---------------------------------------------------------------------------------------------- path, loss

def test_path_endpoints_and_velocity():
    x_0, x_1 = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    assert torch.equal(interpolate(x_0, x_1, torch.zeros(3)), x_0)
    assert torch.equal(interpolate(x_0, x_1, torch.ones(3)), x_1)
    t = torch.tensor([0.25, 0.5, 0.75])
    torch.testing.assert_close(interpolate(x_0, x_1, t)[1], 0.5 * (x_0[1] + x_1[1]))
    eps = 1e-3  # d x_t / dt equals the target velocity
    torch.testing.assert_close((interpolate(x_0, x_1, t + eps) - interpolate(x_0, x_1, t)) / eps,
                               target_velocity(x_0, x_1), atol=1e-3, rtol=1e-3)


def test_skewed_and_uniform_times():
    g = torch.Generator().manual_seed(0)
    t = sample_t_skewed(200_000, g)
    assert t.min() >= 1e-4 and t.max() <= 1.0
    assert abs(t.mean().item() - skewed_t_density_mean()) < 0.005
    assert 0.70 < t.mean().item() < 0.74 and 0.75 < t.median().item() < 0.79
    assert torch.equal(sample_t_skewed(5, torch.Generator().manual_seed(1)), sample_t_skewed(5, torch.Generator().manual_seed(1)))
    u = sample_t_uniform(100_000, g)
    assert abs(u.mean().item() - 0.5) < 0.01


def test_source_noise_and_loss():
    x = torch.zeros(64, 3, 8, 8)
    noisy = add_source_noise(x, 0.5, torch.Generator().manual_seed(0))
    assert abs(noisy.std().item() - 0.5) < 0.02
    assert add_source_noise(x, 0.0) is x
    x_0, x_1 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.equal(fm_loss(x_1 - x_0, x_0, x_1), torch.zeros(2))
    v = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(fm_loss(v, x_0, x_1), ((v - (x_1 - x_0)) ** 2).mean(dim=(1, 2, 3)))


# ---------------------------------------------------------------------------------------------- grids, solvers

def test_edm_grid_matches_cellflux():
    g = time_grid(50, "edm")
    assert g.dtype == torch.float64 and g.shape == (51,)
    assert g[0].item() == pytest.approx(1 / 81, abs=1e-12) and g[-1].item() == 1.0
    assert g[-2].item() == pytest.approx(1 / 1.002, abs=1e-12)
    assert torch.all(torch.diff(g) > 0)
    steps = torch.diff(g)
    assert steps[25] > 5 * steps[0] and steps[25] > 5 * steps[-1]  # dense near both ends
    u = time_grid(4, "uniform")
    assert torch.equal(u, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        time_grid(10, "cosine")


def test_exactness_on_simple_fields():
    x_init = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    grid = time_grid(7, "edm")
    t0, t1 = grid[0].item(), 1.0
    const = lambda x, t: torch.full_like(x, 3.0)  # noqa: E731
    for solver in (euler_sample, heun_sample):
        torch.testing.assert_close(solver(const, x_init, grid), x_init + 3.0 * (t1 - t0), atol=1e-12, rtol=0)
    affine_t = lambda x, t: (2.0 + 6.0 * t)[:, None].expand_as(x)  # noqa: E731  x(t) = x0 + 2 dt + 3 (t^2 - t0^2)
    exact = x_init + 2.0 * (t1 - t0) + 3.0 * (t1 ** 2 - t0 ** 2)
    torch.testing.assert_close(heun_sample(affine_t, x_init, grid), exact, atol=1e-12, rtol=0)
    assert (euler_sample(affine_t, x_init, grid) - exact).abs().max() > 1e-3  # Euler is only first order


def test_heun_is_second_order_euler_first_order():
    x_init = torch.tensor([[1.0]], dtype=torch.float64)
    decay = lambda x, t: -x * (1.0 + t[:, None])  # noqa: E731  x(1) = exp(-1.5)
    exact = math.exp(-1.5)

    def errors(solver):
        return [abs(solver(decay, x_init, time_grid(n, "uniform")).item() - exact) for n in (10, 20, 40)]

    heun, euler = errors(heun_sample), errors(euler_sample)
    for coarse, fine in zip(heun[:-1], heun[1:]):
        assert 3.6 < coarse / fine < 4.4
    for coarse, fine in zip(euler[:-1], euler[1:]):
        assert 1.8 < coarse / fine < 2.2


def test_nfe_and_trajectory():
    calls = []

    def field(x, t):
        calls.append(t.clone())
        return -x

    x_init = torch.ones(2, 3)
    out, traj = heun_sample(field, x_init, time_grid(5, "uniform"), return_trajectory=True)
    assert len(calls) == 10 and traj.shape == (6, 2, 3)
    assert torch.equal(traj[0], x_init) and torch.equal(traj[-1], out)
    assert all(t.shape == (2,) for t in calls)
    calls.clear()
    euler_sample(field, x_init, time_grid(5, "uniform"))
    assert len(calls) == 5


# ---------------------------------------------------------------------------------------------- CFG, generate

def test_cfg_scale_zero_is_one_conditional_evaluation():
    net = Counting(perturbed_net())
    x, t, c = torch.randn(2, 3, 8, 8), torch.rand(2), torch.randn(2, 4)
    v = guided_velocity(net, c, cfg_scale=0.0)(x, t)
    assert net.calls == 1
    assert torch.equal(v, net.net(x, t, c))
    net.calls = 0
    v_w = guided_velocity(net, c, cfg_scale=0.2)(x, t)
    assert net.calls == 2
    torch.testing.assert_close(v_w, 1.2 * net.net(x, t, c) - 0.2 * net.net(x, t, None))


def test_cfg_batched_path_matches_two_passes():
    net = perturbed_net()
    x, t, c = torch.randn(3, 3, 8, 8), torch.rand(3), torch.randn(3, 4)
    v = guided_velocity(net, c, cfg_scale=0.5)(x, t)
    torch.testing.assert_close(v, 1.5 * net(x, t, c) - 0.5 * net(x, t, None), atol=1e-5, rtol=1e-4)


def test_generate_is_seeded_and_returns_its_noisy_source():
    net = perturbed_net()
    x_0, c = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 4)
    run = lambda seed, **kw: generate(net, x_0, c, generator=torch.Generator().manual_seed(seed), num_steps=4, **kw)  # noqa: E731
    a, a_src = run(1)
    b, b_src = run(1)
    c_, _ = run(2)
    assert torch.equal(a, b) and torch.equal(a_src, b_src) and not torch.equal(a, c_)
    torch.testing.assert_close(a_src, x_0 + torch.randn(x_0.shape, generator=torch.Generator().manual_seed(1)))
    # Starting the ODE from the returned source with sigma = 0 reproduces the sample.
    again, src = generate(net, a_src, c, generator=torch.Generator(), sigma=0.0, num_steps=4)
    assert torch.equal(src, a_src) and torch.equal(again, a)
    x, x_src, traj = run(1, return_trajectory=True, solver="euler", grid="uniform")
    assert traj.shape == (5, 2, 3, 8, 8) and torch.equal(traj[0], x_src) and torch.equal(traj[-1], x)
