"""Exact and property checks of cellfluxrl.rewards.degradations (float32 (B, C, H, W) images in [-1, 1])."""

from __future__ import annotations

import math

import pytest
import torch

from cellfluxrl.rewards.degradations import (ROBUSTNESS_CONDITIONS, DegradationConfig, add_noise, down_up,
                                             gain_contrast, gaussian_blur, gaussian_kernels, random_degradation)


def _images(seed: int = 0, shape=(4, 3, 32, 32)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _high_freq_energy(x: torch.Tensor) -> float:
    """Mean squared difference of horizontally and vertically adjacent pixels."""
    return float((x[..., 1:] - x[..., :-1]).pow(2).mean() + (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean())


def test_blur_sigma_zero_is_identity():
    x = _images()
    assert torch.equal(gaussian_blur(x, 0.0), x)
    y = gaussian_blur(x, torch.tensor([0.0, 1.0, 0.0, 0.5]))  # per-sample: sigma 0 rows untouched
    assert torch.equal(y[0], x[0]) and torch.equal(y[2], x[2])
    assert not torch.allclose(y[1], x[1]) and not torch.allclose(y[3], x[3])


def test_blur_kernels_normalised_and_radius():
    k = gaussian_kernels(torch.tensor([0.0, 0.5, 1.0]), 3)
    assert k.shape == (3, 7)
    torch.testing.assert_close(k.sum(1), torch.ones(3))
    assert torch.equal(k[0], torch.tensor([0, 0, 0, 1.0, 0, 0, 0]))
    torch.testing.assert_close(k[2], k[2].flip(0))  # symmetric
    # Variance of the sigma-1 kernel (radius 3 truncates about 1 % of the tail's variance).
    t = torch.arange(-3, 4, dtype=torch.float32)
    assert abs(float((k[2] * t**2).sum()) - 1.0) < 0.03


def test_blur_preserves_constant_and_mean():
    const = torch.full((2, 3, 16, 16), 0.3)
    torch.testing.assert_close(gaussian_blur(const, 1.0), const, atol=1e-6, rtol=0)
    x = _images(1)
    y = gaussian_blur(x, 1.0)
    torch.testing.assert_close(y.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=5e-3, rtol=0)


def test_blur_matches_per_sample_scalar_calls():
    x = _images(2)
    sigma = torch.tensor([0.3, 0.75, 1.0, 0.0])
    y = gaussian_blur(x, sigma)
    for i, s in enumerate(sigma.tolist()):
        torch.testing.assert_close(y[i:i + 1], gaussian_blur(x[i:i + 1], s), atol=1e-6, rtol=0)


def test_blur_reduces_high_frequency_energy_monotonically():
    x = _images(3)
    energies = [_high_freq_energy(gaussian_blur(x, s)) for s in (0.0, 0.5, 0.75, 1.0)]
    assert all(a > b for a, b in zip(energies, energies[1:]))
    assert energies[-1] < 0.25 * energies[0]


def test_blur_rejects_negative_sigma():
    with pytest.raises(ValueError):
        gaussian_blur(_images(), torch.tensor([-0.5, 1.0, 1.0, 1.0]))


def test_down_up_constant_ramp_and_identity():
    const = torch.full((1, 3, 16, 16), -0.4)
    torch.testing.assert_close(down_up(const, 2.0), const)
    x = _images()
    assert torch.equal(down_up(x, 1.0), x)
    # A horizontal linear ramp is restored exactly away from the border (area-down then bilinear up).
    ramp = torch.linspace(-0.9, 0.9, 32).expand(2, 3, 32, 32).contiguous()
    y = down_up(ramp, 2.0)
    torch.testing.assert_close(y[..., 1:-1], ramp[..., 1:-1], atol=1e-6, rtol=0)
    # Area down-sampling of a 2x2 block-constant image is exact: the round trip equals upsampling the blocks.
    blocks = _images(4, (2, 3, 8, 8))
    big = blocks.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    expected = torch.nn.functional.interpolate(blocks, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(down_up(big, 2.0), expected)


def test_down_up_removes_the_highest_frequency():
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2.0 - 1.0
    y = down_up(checker.expand(1, 3, 16, 16), 2.0)
    torch.testing.assert_close(y, torch.zeros_like(y))


def test_noise_std_and_determinism():
    x = torch.zeros(8, 3, 32, 32)
    a = add_noise(x, 0.05, torch.Generator().manual_seed(0))
    b = add_noise(x, 0.05, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert abs(float(a.std()) - 0.05) < 0.003
    per = add_noise(x, torch.tensor([0.0] * 4 + [0.1] * 4), torch.Generator().manual_seed(1))
    assert torch.equal(per[:4], x[:4]) and abs(float(per[4:].std()) - 0.1) < 0.005
    assert float(add_noise(torch.ones(2, 3, 8, 8), 0.5, torch.Generator()).max()) <= 1.0


def test_gain_contrast_formula():
    x = _images(5)
    assert torch.equal(gain_contrast(x, 1.0, 1.0), x)
    u = (x + 1) / 2
    m = u.mean(dim=(2, 3), keepdim=True)
    gain = torch.tensor([[0.8, 1.0, 1.2]] * 4)
    contrast = torch.tensor([0.9, 1.1, 1.0, 0.7])
    expected = (gain[..., None, None] * (m + contrast[:, None, None, None] * (u - m))).clamp(0, 1) * 2 - 1
    torch.testing.assert_close(gain_contrast(x, gain, contrast), expected, atol=1e-6, rtol=0)
    # contrast 0 gives each channel its (gained) mean intensity
    flat = gain_contrast(x, 1.0, 0.0)
    torch.testing.assert_close(flat, (m * 2 - 1).expand_as(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(ROBUSTNESS_CONDITIONS))
def test_conditions_keep_shape_dtype_range(name):
    x = _images(6)
    y = ROBUSTNESS_CONDITIONS[name](x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == torch.float32
    assert float(y.min()) >= -1.0 and float(y.max()) <= 1.0
    assert torch.equal(x, _images(6))  # input untouched


def test_random_degradation_deterministic_and_seed_dependent():
    x = _images(7, (16, 3, 32, 32))
    a = random_degradation(x, torch.Generator().manual_seed(0))
    b = random_degradation(x, torch.Generator().manual_seed(0))
    c = random_degradation(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == torch.float32 and torch.equal(x, _images(7, (16, 3, 32, 32)))
    assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0
    changed = (a - x).abs().flatten(1).amax(1) > 0
    assert 0 < int(changed.sum()) < 16  # some images are degraded, some (with these defaults) are not
    # the global RNG is untouched
    state = torch.get_rng_state()
    random_degradation(x, torch.Generator().manual_seed(2))
    assert torch.equal(state, torch.get_rng_state())


def test_random_degradation_probabilities():
    x = _images(8, (400, 1, 8, 8))
    none = DegradationConfig(p_gain=0, p_blur=0, p_down_up=0, p_noise=0)
    assert torch.equal(random_degradation(x, torch.Generator(), none), x)
    only_noise = DegradationConfig(p_gain=0, p_blur=0, p_down_up=0, p_noise=0.5, max_noise_std=0.1)
    changed = ((random_degradation(x, torch.Generator().manual_seed(3), only_noise) - x).abs().flatten(1).amax(1) > 0)
    k = int(changed.sum())
    assert abs(k - 200) < 4 * math.sqrt(400 * 0.25)  # binomial(400, 0.5) within 4 s.e.
    all_blur = DegradationConfig(p_gain=0, p_blur=1, max_blur_px=1.0, p_down_up=0, p_noise=0)
    y = random_degradation(x, torch.Generator().manual_seed(4), all_blur)
    assert _high_freq_energy(y) < _high_freq_energy(x)


def test_default_degradation_keeps_channel_brightness():
    """Brightness is MoA evidence (DNA x0.9 Aurora, x1.1 DNA damage): the default leaves it alone.

    Constant images of distinct channel levels keep each channel's mean to 0.01 (only the pixel
    noise, std <= 0.08 averaged over 1,024 pixels and clamped, moves it); a +-15 % gain jitter
    would move a level of 0.4 by up to 0.21."""
    levels = torch.tensor([0.4, -0.3, 0.6])
    x = levels[None, :, None, None].expand(64, 3, 32, 32).contiguous()
    y = random_degradation(x, torch.Generator().manual_seed(9))
    assert float((y.mean(dim=(2, 3)) - levels).abs().max()) < 0.01
