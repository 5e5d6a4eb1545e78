"""The segmentation contract every backend follows: the ``Segmenter`` protocol and :func:`check_images`.

Both backends take the model's float32 ``(B, 3, H, W)`` images in ``[-1, 1]`` with channels (actin,
tubulin, DNA) and return int32 ``(B, H, W)`` nucleus and cell labels (0 = background, 1..K
contiguous, in raster order of each object's first pixel). The cell of a nucleus is the whole cell
including it. One segmentation pass per batch is shared by every morphology reward.

Backends: ``classical`` (:mod:`cellfluxrl.rewards.segmentation.classical`, numba, offline, the
default) and ``cellpose`` (:mod:`cellfluxrl.rewards.segmentation.cellpose_backend`). They import
this module; it imports none of them. The factory that picks one by name is
:mod:`cellfluxrl.rewards.segmentation.factory`, above both.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from cellfluxrl.errors import CellfluxError

class Segmenter(Protocol):
    """What every backend provides."""

    def segment(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``(B, 3, H, W)`` in [-1, 1] (actin, tubulin, DNA) -> int32 (nuclei, cells) ``(B, H, W)``."""
        ...

    @property
    def settings(self) -> dict[str, Any]:
        """JSON-serialisable backend name and every parameter that changes the output."""
        ...


def check_images(images: np.ndarray) -> np.ndarray:
    """Validate a model-space batch and return it as contiguous float32 ``(B, 3, H, W)``, with
    non-finite values replaced (NaN by -1, +-inf by +-1) so they cannot reach the kernels."""
    if hasattr(images, "detach"):  # a torch tensor
        images = images.detach().to("cpu").numpy()
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != 3 or not np.issubdtype(images.dtype, np.floating):
        raise CellfluxError(f"segment: expected float (B, 3, H, W) images in [-1, 1], got {images.dtype} {images.shape}")
    images = np.ascontiguousarray(images, dtype=np.float32)
    if not np.isfinite(images).all():  # a diverged generator: NaN -> background, +-inf -> +-1
        images = np.nan_to_num(images, nan=-1.0, posinf=1.0, neginf=-1.0)
    return images

