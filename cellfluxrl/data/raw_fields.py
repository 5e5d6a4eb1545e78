"""Pure helpers for raw fields of view before cropping: magnification and touching nuclei.

Used by :func:`cellfluxrl.data.bbbc021.prepare_raw`. A crop is meant to hold the field of view of
a BBBC021 crop (96 px at BBBC021's pixel size), so fields taken at another magnification are
resized first (:func:`field_scale`, :func:`rescale_field`); and nuclei that touch are split
(:func:`split_touching`) so every nucleus gets its own centred crop.
"""

from __future__ import annotations

import math

import numpy as np

from cellfluxrl.errors import CellfluxError

# Microns per pixel of the BBBC021 images (20x objective); the value usually quoted for the set,
# not stated in the Broad page's text we have. Use `scale=` when the ratio to BBBC021 is known.
BBBC021_PIXEL_SIZE_UM = 0.325
MAX_RESCALE = 8.0  # fields are resized by at most this factor, up or down
DECLUMP_H_PX = 2.0  # saddle depth (px, at BBBC021 scale) that keeps two touching nuclei apart


def field_scale(pixel_size_um: float | None = None, scale: float | None = None) -> float:
    """The factor by which fields are resized so they have BBBC021's pixel size.

    Args:
        pixel_size_um: microns per pixel of the user's images (``--pixel-size``); the factor is
            ``pixel_size_um / BBBC021_PIXEL_SIZE_UM``.
        scale: the factor itself (``--scale``), e.g. 0.5 for images at twice BBBC021's
            magnification. At most one of the two; neither gives 1.0.

    Returns:
        The resize factor, a float in ``[1 / MAX_RESCALE, MAX_RESCALE]``.

    Raises:
        CellfluxError: both given, or a value that is not a positive finite number, or a factor
            outside the range.
    """
    if pixel_size_um is not None and scale is not None:
        raise CellfluxError("give --pixel-size or --scale, not both")
    if pixel_size_um is None and scale is None:
        return 1.0
    name, value = ("--pixel-size", pixel_size_um) if pixel_size_um is not None else ("--scale", scale)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise CellfluxError(f"{name} {value!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise CellfluxError(f"{name} must be a positive finite number, got {value!r}")
    factor = value / BBBC021_PIXEL_SIZE_UM if pixel_size_um is not None else value
    if not 1 / MAX_RESCALE <= factor <= MAX_RESCALE:
        raise CellfluxError(f"{name} {value:g} means resizing the fields by {factor:.3g}, outside "
                            f"[1/{MAX_RESCALE:g}, {MAX_RESCALE:g}]; is the unit right (microns per pixel)?")
    return factor


def rescale_field(image: np.ndarray, factor: float) -> np.ndarray:
    """Resize a field by ``factor`` (bilinear; Gaussian anti-aliasing when shrinking).

    Args:
        image: float ``(C, H, W)`` intensities, any units.
        factor: resize factor (> 0); 1.0 returns ``image`` unchanged.

    Returns:
        float32 ``(C, round(H * factor), round(W * factor))``, same intensity units.
    """
    if factor == 1.0:
        return image
    from skimage.transform import rescale

    out = rescale(np.asarray(image, np.float32), factor, order=1, mode="edge", anti_aliasing=factor < 1,
                  channel_axis=0, preserve_range=True)
    return out.astype(np.float32, copy=False)


def split_touching(mask: np.ndarray, h: float = DECLUMP_H_PX) -> tuple[np.ndarray, int]:
    """Split touching nuclei: watershed of the distance transform from its h-maxima.

    Two nuclei stay apart when the smaller one's distance peak rises at least ``h`` px above the
    saddle between them, as in CellProfiler's "shape" declumping.

    Args:
        mask: bool ``(H, W)`` nucleus foreground.
        h: saddle depth in px (> 0).

    Returns:
        ``(labels, k)``: int32 ``(H, W)`` labels 1..k (0 = background) and the number of objects.
    """
    from scipy import ndimage
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    mask = np.asarray(mask, bool)
    if not mask.any():
        return np.zeros(mask.shape, np.int32), 0
    distance = ndimage.distance_transform_edt(mask)
    markers, _ = ndimage.label(h_maxima(distance, h))
    labels = watershed(-distance, markers, mask=mask).astype(np.int32)
    return labels, int(labels.max())
