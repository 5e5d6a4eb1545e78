"""The image conventions (cellfluxrl.images): uint8 on disk, [-1, 1] in memory, and back."""

from __future__ import annotations

import numpy as np
import torch

from cellfluxrl.images import to_model, to_uint8


def test_every_grey_level_survives_the_round_trip():
    """to_uint8(to_model(k)) == k for all 256 levels (a bare floor loses one level on 63 of them),
    so a real image scored through the generated-image path (quantise) is scored unchanged."""
    from cellfluxrl.evaluation.candidates import quantize

    levels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    x = to_model(levels, dequantize=False)
    assert np.array_equal(to_uint8(x), levels)
    assert torch.equal(quantize(x), x)


def test_continuous_values_floor_as_cellflux_does():
    """Between levels the backward map is CellFlux's floor: 0.4 of a level above k gives k, 1.0 gives
    255, anything beyond [-1, 1] is clamped."""
    k = torch.tensor([0.0, 10.4, 100.6, 254.9, 255.0, 300.0, -20.0]) / 255 * 2 - 1
    out = to_uint8(k.view(1, 1, 1, -1))[0, 0, :, 0]
    assert out.tolist() == [0, 10, 100, 254, 255, 255, 0]
