"""Flow-matching loss (CellFlux; paper Eq. 1). Returns per-sample losses; the caller reduces."""

from __future__ import annotations

import torch

from cellfluxrl.model.path import target_velocity


def fm_loss(v_pred: torch.Tensor, x_0: torch.Tensor, x_1: torch.Tensor) -> torch.Tensor:
    """Per-sample flow-matching loss ``mean_pixels ||v_pred - (x_1 - x_0)||^2``.

    Args:
        v_pred: predicted velocity ``v_theta(x_t, t, c)``, float ``(B, C, H, W)``.
        x_0: the source actually used (noisy or clean control), same shape.
        x_1: the target, same shape.

    Returns:
        float32 ``(B,)``: the mean squared error over channels and pixels of each sample.
    """
    err = v_pred.float() - target_velocity(x_0, x_1).float()
    return err.square().flatten(1).mean(dim=1)
