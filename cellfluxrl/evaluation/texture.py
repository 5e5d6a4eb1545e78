"""The texture statistic: how ragged or speckled a crop is, as the share of its power at high frequencies.

Generated cells that look speckled or ragged where real ones are smooth carry more of their
image power near the pixel scale. :func:`high_frequency_share` measures that per image: per channel,
the crop minus its mean is tapered by a 2-d Hann window (so the crop's border, which is not
periodic, does not leak power across the spectrum), its power spectrum ``|FFT|^2`` is taken, and
the statistic is the share of the non-DC power whose radial frequency
``sqrt(f_y^2 + f_x^2)`` exceeds half the Nyquist frequency (0.25 cycles per pixel); the image's
value is the mean over channels. 0 means all structure is coarser than 4 pixels per cycle; white
noise gives about 0.80 (the share of the frequency square outside the disc of radius 0.25). A
channel with no power at all (a constant crop) counts 0.

The report shows it per column, ``real`` included, with its standard errors; the number to read is
a column's gap to ``real`` on the same pairs (docs/evaluate.md).
"""

from __future__ import annotations

import numpy as np
import torch

HALF_NYQUIST = 0.25  # cycles per pixel


def high_band_mask(height: int, width: int, cutoff: float = HALF_NYQUIST) -> np.ndarray:
    """bool ``(H, W)``: FFT bins whose radial frequency exceeds ``cutoff`` (cycles per pixel), in
    ``numpy.fft.fft2`` order."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.fftfreq(width)[None, :]
    return np.sqrt(fy ** 2 + fx ** 2) > cutoff


def hann_2d(height: int, width: int) -> np.ndarray:
    """float64 ``(H, W)``: the separable Hann taper (peak 1, zero at the border)."""
    return np.outer(np.hanning(height), np.hanning(width))


def high_frequency_share(images: torch.Tensor | np.ndarray, cutoff: float = HALF_NYQUIST) -> np.ndarray:
    """Per image, the share of non-DC spectral power above ``cutoff`` cycles per pixel, averaged over channels.

    Args:
        images: float ``(B, C, H, W)`` (any affine intensity scale: the share is scale-free; the
            project's ``[-1, 1]`` model space in practice).
        cutoff: radial frequency in cycles per pixel (default half the Nyquist frequency, 0.25).

    Returns:
        float64 ``(B,)`` in ``[0, 1]``.
    """
    x = torch.as_tensor(images).detach().to("cpu", torch.float64).numpy()
    if x.ndim != 4:
        raise ValueError(f"expected (B, C, H, W) images, got shape {x.shape}")
    _, _, h, w = x.shape
    x = (x - x.mean(axis=(2, 3), keepdims=True)) * hann_2d(h, w)
    power = np.abs(np.fft.fft2(x, axes=(2, 3))) ** 2
    power[..., 0, 0] = 0.0
    total = power.sum(axis=(2, 3))
    high = power[..., high_band_mask(h, w, cutoff)].sum(axis=-1)
    share = np.divide(high, total, out=np.zeros_like(total), where=total > 0)
    return share.mean(axis=1)
