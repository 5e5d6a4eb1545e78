"""The one owner of the flow-time convention (CellFlux's conditional OT path).

``t = 0`` is the (noisy) control source ``x_0``, ``t = 1`` the perturbed target ``x_1``::

    x_t = (1 - t) x_0 + t x_1,        u_t = x_1 - x_0   (target velocity, constant along the path)

Every other module (loss, sampler, RL) goes through these functions, so the convention lives in
exactly one place.
"""

from __future__ import annotations

import math

import torch

SKEW_SCALE = 1.2  # CellFlux --skewed_timesteps: s = exp(1.2 z - 1.2), t = 1 / (1 + s)
T_MIN = 1e-4


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a ``(B,)`` time vector to ``(B, 1, 1, ...)`` so it broadcasts against ``like``."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    if t.shape[0] != like.shape[0]:
        raise ValueError(f"t has {t.shape[0]} entries for a batch of {like.shape[0]}")
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def interpolate(x_0: torch.Tensor, x_1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The point ``x_t = (1 - t) x_0 + t x_1`` of the straight path.

    Args:
        x_0: source (noisy control), float ``(B, C, H, W)`` in about ``[-1, 1]`` (+ noise).
        x_1: target (treated image), same shape.
        t: times in ``[0, 1]``, shape ``(B,)`` (or a scalar).

    Returns:
        ``x_t``, same shape and dtype as ``x_0``.
    """
    t = _expand(t, x_0)
    return (1.0 - t) * x_0 + t * x_1


def target_velocity(x_0: torch.Tensor, x_1: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target ``u_t = x_1 - x_0`` (independent of ``t``)."""
    return x_1 - x_0


def sample_t_skewed(n: int, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """CellFlux's skewed times: ``z ~ N(0, 1)``, ``s = exp(1.2 z - 1.2)``, ``t = 1 / (1 + s)``.

    More weight near ``t = 1`` (mean about 0.72, median about 0.77), clipped to ``[1e-4, 1]``.

    Args:
        n: number of times.
        generator: source of ``z`` (its device is used unless ``device`` is given).
        device: where to put the result.

    Returns:
        float32 ``(n,)`` in ``[1e-4, 1]``.
    """
    gen_device = generator.device if generator is not None else "cpu"
    z = torch.randn(n, generator=generator, device=gen_device)
    s = torch.exp(SKEW_SCALE * z - SKEW_SCALE)
    t = torch.clamp(1.0 / (1.0 + s), T_MIN, 1.0)
    return t.to(device) if device is not None else t


def sample_t_uniform(n: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """``t ~ U[0, 1)``, float32 ``(n,)`` (CellFlux without ``--skewed_timesteps``)."""
    gen_device = generator.device if generator is not None else "cpu"
    t = torch.rand(n, generator=generator, device=gen_device)
    return t.to(device) if device is not None else t


def add_source_noise(x_0: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """CellFlux's noise injection into the control: ``x_0 + sigma * N(0, I)``.

    Args:
        x_0: clean control, float ``(B, C, H, W)`` in ``[-1, 1]``.
        sigma: noise standard deviation in the ``[-1, 1]`` image scale (CellFlux: 1.0).
        generator: source of the noise (drawn on the generator's device, then moved to ``x_0``'s).

    Returns:
        ``x_0 + sigma * eps``, same shape/dtype/device as ``x_0``; ``x_0`` itself when ``sigma == 0``.
    """
    if sigma == 0:
        return x_0
    gen_device = generator.device if generator is not None else x_0.device
    eps = torch.randn(x_0.shape, generator=generator, device=gen_device, dtype=torch.float32)
    return x_0 + float(sigma) * eps.to(device=x_0.device, dtype=x_0.dtype)


def skewed_t_density_mean(num: int = 200_001) -> float:
    """Mean of the skewed time distribution by quadrature over ``z`` (for documentation/tests)."""
    z = torch.linspace(-8.0, 8.0, num, dtype=torch.float64)
    w = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    t = torch.clamp(1.0 / (1.0 + torch.exp(SKEW_SCALE * z - SKEW_SCALE)), T_MIN, 1.0)
    return float(torch.trapezoid(w * t, z))
