"""The texture statistic (evaluation.texture): the share of spectral power above half the Nyquist frequency."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cellfluxrl.evaluation.texture import high_band_mask, high_frequency_share


def test_white_noise_spreads_its_power_over_the_whole_square():
    """White noise is flat in frequency: its share is the area outside the disc of radius 0.25 in
    the unit square, 1 - pi/16 = 0.804 (64 images of 96 px: the mean's s.e. is well below 0.005)."""
    x = torch.randn(64, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    share = high_frequency_share(x)
    assert share.shape == (64,) and share.dtype == np.float64
    assert abs(share.mean() - (1 - np.pi / 16)) < 0.01
    assert high_band_mask(96, 96).mean() == pytest.approx(1 - np.pi / 16, abs=0.01)


def test_smooth_images_are_near_zero_and_speckle_raises_the_share_monotonically():
    """A smooth blob keeps < 1 % of its power above 0.25 cycles/px; adding pixel noise of growing
    amplitude raises the statistic step by step."""
    yy, xx = np.mgrid[:96, :96]
    blob = np.exp(-((yy - 48.0) ** 2 + (xx - 40.0) ** 2) / (2 * 12.0 ** 2))
    smooth = torch.as_tensor(np.broadcast_to(blob, (1, 3, 96, 96)).copy() * 2 - 1)
    assert high_frequency_share(smooth)[0] < 0.01
    noise = torch.randn(smooth.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    values = [high_frequency_share(smooth + a * noise)[0] for a in (0.0, 0.01, 0.03, 0.1, 0.3)]
    assert all(b > a for a, b in zip(values, values[1:]))


def test_scale_free_and_constant_crops_count_zero():
    """An affine change of intensity leaves the share unchanged; a constant channel counts 0."""
    x = torch.rand(4, 3, 48, 48, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert np.allclose(high_frequency_share(x), high_frequency_share(3.0 * x - 0.7), atol=1e-12)
    flat = torch.zeros(2, 3, 48, 48)
    assert np.array_equal(high_frequency_share(flat), np.zeros(2))
    mixed = x[:1].clone()
    mixed[:, 1] = 0.5  # one constant channel of three: the mean over channels counts it as 0
    per_channel = [high_frequency_share(x[:1, c:c + 1])[0] for c in (0, 2)]
    assert high_frequency_share(mixed)[0] == pytest.approx(sum(per_channel) / 3, abs=1e-12)
    with pytest.raises(ValueError, match="B, C, H, W"):
        high_frequency_share(torch.zeros(3, 48, 48))


def test_real_cells_are_smooth_compared_with_their_speckled_copy():
    """A crop of the shipped real field (CC-0) sits far below white noise (about 1 % against 80 %),
    and the same crop with pixel noise of s.d. 8 grey levels (speckle) reads twice as high."""
    from cellfluxrl.images import to_model

    tiffs = sorted(Path(__file__).resolve().parents[2].glob("shared/data/real/ExampleHuman/*d0.tif"))
    if not tiffs:
        pytest.skip("no real field in ../shared/data/real")
    import tifffile

    field = np.asarray(tifffile.imread(tiffs[0]), dtype=np.float64)
    field = field if field.ndim == 2 else field.reshape(-1, *field.shape[-2:])[0]
    crop = field[:96, :96]
    crop = (crop - crop.min()) / max(np.ptp(crop), 1e-9) * 255
    image = np.repeat(crop.astype(np.uint8)[..., None], 3, axis=2)
    x = to_model(image, dequantize=False)
    speckled = (x + torch.randn(x.shape, generator=torch.Generator().manual_seed(3)) * 8 / 127.5).clamp(-1, 1)
    real, noisy = high_frequency_share(x)[0], high_frequency_share(speckled)[0]
    assert real < 0.05 and noisy > 1.5 * real  # measured: 0.0098 and 0.021
