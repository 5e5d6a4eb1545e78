"""Image degradations for training and stress-testing the MoA classifier.

Generated images differ from real crops by low-level artefacts (slight blur, resampling, noise,
intensity shifts) that a classifier trained only on clean crops reads as evidence about the MoA.
Training on randomly degraded crops (:func:`random_degradation`) makes the classifier read
morphology instead; :data:`ROBUSTNESS_CONDITIONS` are the fixed degradations of its robustness table.

Conventions, for every function here:

* images are float32 ``(B, C, H, W)`` tensors with values in ``[-1, 1]`` (uint8 grey level ``g``
  maps to ``2 g / 255 - 1``); outputs have the same shape, dtype and device, clamped to ``[-1, 1]``;
* lengths (blur sigma) are in pixels of the input image;
* randomness comes only from an explicit CPU ``torch.Generator`` (the global RNG is never used);
* inputs are never modified in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F

Image = torch.Tensor
Scalar = float | torch.Tensor


def _per_sample(value: Scalar, batch: int, device: torch.device) -> torch.Tensor:
    """A scalar or ``(B,)`` value -> float32 ``(B,)`` tensor on ``device``."""
    t = torch.as_tensor(value, dtype=torch.float32).to(device)
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"expected a scalar or a ({batch},) tensor, got shape {tuple(t.shape)}")
    return t


def gaussian_kernels(sigma_px: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels, float32 ``(B, 2 radius + 1)``, one per sigma.

    ``sigma_px`` is a float ``(B,)`` tensor of standard deviations in pixels (``>= 0``); a sigma of
    0 gives the discrete delta (identity kernel). Each row sums to 1.
    """
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=sigma_px.device)
    s = sigma_px.to(torch.float32).clamp_min(1e-6)[:, None]
    k = torch.exp(-0.5 * (t[None, :] / s) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def _blur_along(x: Image, k: torch.Tensor, dim: int) -> Image:
    """Correlate every image of ``x`` with its own 1-D kernel ``k`` (``(B, K)``) along ``dim``
    (-1 or -2), reflect padding. A sum of shifted views: far faster on a CPU than a grouped conv."""
    r = (k.shape[1] - 1) // 2
    n = x.shape[dim]
    p = F.pad(x, (r, r, 0, 0) if dim == -1 else (0, 0, r, r), mode="reflect")
    w = k[:, :, None, None, None]  # (B, K, 1, 1, 1)
    y = p.narrow(dim, 0, n) * w[:, 0]
    for i in range(1, 2 * r + 1):
        y = torch.addcmul(y, p.narrow(dim, i, n), w[:, i])
    return y


def gaussian_blur(x: Image, sigma_px: Scalar) -> Image:
    """Separable Gaussian blur with reflect padding.

    Args:
        x: float32 ``(B, C, H, W)`` in ``[-1, 1]``.
        sigma_px: standard deviation in pixels, a float or a float ``(B,)`` tensor (one per image);
            0 leaves an image unchanged. Each image's kernel radius is ``ceil(3 sigma)``, at most
            ``min(H, W) - 1`` (the reflect-padding limit); images are blurred in groups of equal radius.

    Returns:
        float32 ``(B, C, H, W)``: each pixel a weighted mean of its neighbours (weights summing to 1),
        so within the input's range, and a constant image stays constant.
    """
    b, c, h, w = x.shape
    sigma = _per_sample(sigma_px, b, x.device)
    if b and float(sigma.min()) < 0:
        raise ValueError("sigma_px must be >= 0")
    radii = torch.ceil(3.0 * sigma).clamp(max=min(h, w) - 1).to(torch.int64)
    y = x.clone()
    for r in sorted(set(radii.tolist()) - {0}):
        sel = (radii == r).nonzero().flatten()
        k = gaussian_kernels(sigma[sel], r)
        y[sel] = _blur_along(_blur_along(x[sel], k, -1), k, -2)
    return y


def down_up(x: Image, factor: float) -> Image:
    """Down-sample by ``factor`` (area averaging), then bilinearly up-sample back to ``(H, W)``.

    The low-resolution image has side ``max(1, round(H / factor))``; up-sampling is bilinear with
    ``align_corners=False``, so a linear intensity ramp is restored exactly away from the border
    and a constant image is unchanged. ``factor <= 1`` returns a copy of ``x``.

    Args:
        x: float32 ``(B, C, H, W)`` in ``[-1, 1]``.
        factor: down-sampling factor (e.g. 1.5, 2, 3).

    Returns:
        float32 ``(B, C, H, W)``.
    """
    h, w = x.shape[-2:]
    if factor <= 1 or x.shape[0] == 0:
        return x.clone()
    small = (max(1, round(h / factor)), max(1, round(w / factor)))
    y = F.interpolate(x, size=small, mode="area")
    y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
    return y.clamp(-1.0, 1.0).contiguous(memory_format=torch.contiguous_format)


def add_noise(x: Image, std: Scalar, generator: torch.Generator) -> Image:
    """Add i.i.d. Gaussian pixel noise, then clamp to ``[-1, 1]``.

    Args:
        x: float32 ``(B, C, H, W)`` in ``[-1, 1]``.
        std: noise standard deviation on the ``[-1, 1]`` scale (0.05 is about 6.4 grey levels of
            255), a float or a float ``(B,)`` tensor.
        generator: CPU generator of the noise (drawn on the CPU, then moved to ``x.device``).
    """
    b = x.shape[0]
    s = _per_sample(std, b, x.device)
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
    return torch.addcmul(x, noise, s[:, None, None, None]).clamp_(-1.0, 1.0)


def gain_contrast(x: Image, gain: Scalar, contrast: Scalar) -> Image:
    """Per-image, per-channel intensity gain and contrast on the ``[0, 1]`` intensity scale.

    With ``u = (x + 1) / 2`` and ``m`` the mean of ``u`` over each image's channel,
    ``u' = clamp(gain * (m + contrast * (u - m)), 0, 1)`` and the output is ``2 u' - 1``: ``gain``
    scales the brightness (like a plate's channel gain), ``contrast`` the deviations about the mean.

    Args:
        x: float32 ``(B, C, H, W)`` in ``[-1, 1]``.
        gain, contrast: floats, or float tensors of shape ``(B,)`` (one per image) or ``(B, C)``
            (one per image and channel); gain 1 and contrast 1 leave ``x`` exactly unchanged.
    """
    def shape(v: Scalar) -> torch.Tensor:
        t = torch.as_tensor(v, dtype=torch.float32).to(x.device)
        if t.ndim == 1:
            t = t[:, None]
        return t.reshape(t.shape + (1, 1)) if t.ndim == 2 else t

    g, c = shape(gain), shape(contrast)
    m = (x.mean(dim=(2, 3), keepdim=True) + 1.0) * 0.5
    # 2 u' - 1 = a x + b with a = g c and b = g c + 2 g m (1 - c) - 1: one pass over the pixels.
    a = g * c
    return torch.addcmul(a + 2.0 * g * m * (1.0 - c) - 1.0, a, x).clamp_(-1.0, 1.0)


@dataclass(frozen=True)
class DegradationConfig:
    """Probabilities and ranges of :func:`random_degradation` (each drawn per image).

    Attributes:
        p_gain: probability of a gain/contrast jitter; gain and contrast are drawn per channel,
            uniform in ``1 +- gain_jitter`` and ``1 +- contrast_jitter``. Off by default: channel
            brightness is itself MoA evidence (DNA x0.9 for Aurora kinase inhibitors against x1.1
            for DNA damage), and a +-15 % jitter cost 0.025 clean accuracy at 48 px
            (experiments/RESULTS.md, "MoA classifier on clean crops").
        p_blur: probability of a Gaussian blur with sigma uniform in ``[0, max_blur_px]`` pixels.
        p_down_up: probability of a down/up-sampling round trip, factor drawn uniformly from
            ``down_up_factors``.
        p_noise: probability of Gaussian pixel noise, std uniform in ``[0, max_noise_std]`` (on the
            ``[-1, 1]`` scale).
    """

    p_gain: float = 0.0
    gain_jitter: float = 0.15
    contrast_jitter: float = 0.15
    p_blur: float = 0.5
    max_blur_px: float = 1.2
    p_down_up: float = 0.3
    down_up_factors: tuple[float, ...] = (1.5, 2.0, 3.0)
    p_noise: float = 0.3
    max_noise_std: float = 0.08


DEFAULT_DEGRADATION = DegradationConfig()


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def random_degradation(x: Image, generator: torch.Generator,
                       config: DegradationConfig = DEFAULT_DEGRADATION) -> Image:
    """A random composition of degradations, drawn independently per image.

    In this order, each with its probability from ``config``: gain/contrast jitter, Gaussian blur,
    down/up-sampling, pixel noise. All random numbers come from ``generator`` (a CPU generator),
    so the output is a pure function of ``x``, the generator's state and ``config``.

    Args:
        x: float32 ``(B, C, H, W)`` in ``[-1, 1]``.
        generator: CPU ``torch.Generator``; advanced by the call.
        config: probabilities and ranges.

    Returns:
        float32 ``(B, C, H, W)`` in ``[-1, 1]`` on ``x``'s device (a new tensor).
    """
    b, c = x.shape[:2]
    draws = torch.rand(4, b, generator=generator)  # which degradations apply, per image
    gain = _uniform(b * c, 1 - config.gain_jitter, 1 + config.gain_jitter, generator).reshape(b, c)
    contrast = _uniform(b * c, 1 - config.contrast_jitter, 1 + config.contrast_jitter, generator).reshape(b, c)
    sigma = _uniform(b, 0.0, config.max_blur_px, generator)
    factor_idx = torch.randint(0, max(1, len(config.down_up_factors)), (b,), generator=generator)
    std = _uniform(b, 0.0, config.max_noise_std, generator)

    use = draws < torch.tensor([config.p_gain, config.p_blur, config.p_down_up, config.p_noise])[:, None]
    # Gain 1 and contrast 1 are exactly the identity, and the blur skips sigma-0 images.
    y = gain_contrast(x.contiguous(), torch.where(use[0][:, None], gain, 1.0),
                      torch.where(use[0][:, None], contrast, 1.0))
    y = gaussian_blur(y, torch.where(use[1], sigma, 0.0))  # a new tensor: modified in place below
    for i, factor in enumerate(config.down_up_factors):
        _apply_in_place(y, use[2] & (factor_idx == i), lambda z, s, f=factor: down_up(z, f))
    _apply_in_place(y, use[3], lambda z, s: add_noise(z, std[s], generator))
    return y


def _apply_in_place(x: Image, mask: torch.Tensor, fn: Callable[[Image, torch.Tensor], Image]) -> None:
    """Replace the images of ``x`` selected by the bool ``(B,)`` CPU ``mask`` by
    ``fn(x[selected], selected indices)``, in place (cheaper than degrading every image)."""
    sel = mask.nonzero().flatten()
    if sel.numel():
        sel_d = sel.to(x.device)
        x.index_copy_(0, sel_d, fn(x.index_select(0, sel_d), sel))


NOISE_STD = 0.05
"""Noise std of the ``noise`` robustness condition, on the ``[-1, 1]`` scale (6.4 grey levels)."""


def _noise_condition(x: Image, generator: torch.Generator) -> Image:
    return add_noise(x, NOISE_STD, generator)


ROBUSTNESS_CONDITIONS: dict[str, Callable[[Image, torch.Generator], Image]] = {
    "clean": lambda x, g: x,
    "blur 0.5 px": lambda x, g: gaussian_blur(x, 0.5),
    "blur 0.75 px": lambda x, g: gaussian_blur(x, 0.75),
    "blur 1.0 px": lambda x, g: gaussian_blur(x, 1.0),
    f"noise {NOISE_STD}": _noise_condition,
    "down/up 2x": lambda x, g: down_up(x, 2.0),
}
"""The fixed degradations of the classifier robustness table: name -> ``f(x, generator)``.

``x`` float32 ``(B, C, H, W)`` in ``[-1, 1]``; only the noise condition uses the generator.
"""
