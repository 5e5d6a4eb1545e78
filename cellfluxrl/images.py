"""The one owner of the image conventions.

On disk: uint8 ``(N, H, W, C)``, channel order (actin, tubulin, DNA) for BBBC021 (= RGB as CellFlux
shows them). In memory: float32 ``(B, C, H, W)`` in ``[-1, 1]``.

Forward (as CellFlux's loader): uniform dequantisation ``(x + U[0, 1)) / 255`` then ``2 x - 1``.
Backward (as CellFlux's evaluation): ``floor(clamp(x / 2 + 1/2, 0, 1) * 255)``; values of exactly
1.0 map to 255. The floor allows :data:`LEVEL_TOLERANCE` of a grey level, so the round trip
``to_uint8(to_model(k, dequantize=False)) == k`` is exact for every level (in float32, ``k / 255 * 2 - 1``
comes back as ``k - 2e-5`` for 63 of the 256 levels, which a bare floor drops one level).
"""

from __future__ import annotations

import numpy as np
import torch

CHANNELS_BBBC021 = ("actin", "tubulin", "dna")
DNA_CHANNEL = 2  # index of the DNA (DAPI) channel in CHANNELS_BBBC021
LEVEL_TOLERANCE = 1e-4  # grey levels: float32 rounding of k / 255 * 2 - 1 is below 2e-5 levels


def to_model(images_uint8: np.ndarray | torch.Tensor, generator: torch.Generator | None = None,
             dequantize: bool = True) -> torch.Tensor:
    """uint8 ``(B, H, W, C)`` (or ``(H, W, C)``) -> float32 ``(B, C, H, W)`` in ``[-1, 1]``.

    Args:
        images_uint8: uint8 images, channels last.
        generator: source of the dequantisation noise (``None``: torch's default generator).
        dequantize: add ``U[0, 1)`` before dividing by 255 (training); ``False`` maps pixel ``k`` to
            ``k / 255 * 2 - 1`` exactly (deterministic, used by rewards and evaluation).
    """
    array = images_uint8 if isinstance(images_uint8, torch.Tensor) else np.asarray(images_uint8)
    if isinstance(array, np.ndarray) and not array.flags.writeable:
        array = array.copy()  # read-only memmap rows: torch cannot wrap them without a copy
    x = torch.as_tensor(array)
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype}")
    if x.ndim == 3:
        x = x[None]
    x = x.permute(0, 3, 1, 2).to(torch.float32)
    if dequantize:
        x = x + torch.rand(x.shape, generator=generator, dtype=torch.float32)
    return (x / 255.0) * 2.0 - 1.0


def to_uint8(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """float ``(B, C, H, W)`` in ``[-1, 1]`` -> uint8 numpy ``(B, H, W, C)`` (clamped, floored)."""
    x = torch.as_tensor(x).detach().to("cpu", torch.float32)
    u = torch.clamp(x * 0.5 + 0.5, 0.0, 1.0)
    u = torch.clamp(torch.floor(u * 255.0 + LEVEL_TOLERANCE), 0, 255).to(torch.uint8)
    return u.permute(0, 2, 3, 1).contiguous().numpy()


def to_unit(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """float ``(B, C, H, W)`` in ``[-1, 1]`` -> float32 numpy ``(B, C, H, W)`` in ``[0, 1]`` (clamped)."""
    x = torch.as_tensor(x).detach().to("cpu", torch.float32)
    return torch.clamp(x * 0.5 + 0.5, 0.0, 1.0).numpy()
