"""Image operations on raw fields of view before cropping: magnification, touching nuclei,
illumination correction, nucleus centroids, crop windows and uint8 scaling.

Used by :func:`cellfluxrl.data.bbbc021.raw.prepare_raw`. A crop is meant to hold the field of view of
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
NUCLEUS_SIGMA_PX = 1.5  # Gaussian smoothing of DAPI before the Otsu threshold
MIN_NUCLEUS_AREA_PX = 20  # thresholded objects smaller than this are debris, not nuclei


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


def illumination_function(mean_image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Smooth a plate's mean image of one channel into a multiplicative illumination function.

    Args:
        mean_image: float ``(H, W)``, the mean of all the plate's fields for one channel.
        sigma_px: Gaussian sigma (px), about 1/20 of the image width.

    Returns:
        float32 ``(H, W)`` with mean 1 and strictly positive values (all ones for a blank channel).
    """
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(np.asarray(mean_image, dtype=np.float64), sigma_px, mode="nearest")
    if smooth.mean() <= 0:
        return np.ones(mean_image.shape, dtype=np.float32)
    smooth = smooth / smooth.mean()
    return np.maximum(smooth, 1e-3).astype(np.float32)


def detect_nuclei(dna: np.ndarray, sigma_px: float = NUCLEUS_SIGMA_PX,
                  min_area_px: int = MIN_NUCLEUS_AREA_PX, declump_h_px: float = DECLUMP_H_PX) -> np.ndarray:
    """Nucleus centroids in a (corrected) DNA image: Gaussian smoothing, Otsu threshold, touching
    nuclei split (:func:`~cellfluxrl.data.bbbc021.fields.split_touching`), labels.

    Args:
        dna: float ``(H, W)`` DNA (DAPI) intensities, any units.
        sigma_px: Gaussian smoothing sigma (px).
        min_area_px: objects smaller than this (px^2) are dropped as debris.
        declump_h_px: saddle depth (px) that keeps two touching nuclei apart; 0 = no splitting.

    Returns:
        float64 ``(K, 2)`` centroids as (row, col) in px, in label order (raster order of first pixel).
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    smooth = ndimage.gaussian_filter(np.asarray(dna, dtype=np.float32), sigma_px)
    if smooth.max() <= smooth.min():
        return np.zeros((0, 2))
    mask = smooth > threshold_otsu(smooth)
    labels, k = split_touching(mask, declump_h_px) if declump_h_px > 0 else ndimage.label(mask)
    rows, cols = np.indices(labels.shape)
    flat = labels.ravel()
    area = np.bincount(flat, minlength=k + 1)[1:]
    centroids = np.stack([np.bincount(flat, weights=rows.ravel(), minlength=k + 1)[1:],
                          np.bincount(flat, weights=cols.ravel(), minlength=k + 1)[1:]], axis=1)
    keep = area >= min_area_px
    return centroids[keep] / area[keep, None]


def crop_windows(centroids: np.ndarray, shape: tuple[int, int], crop_size: int) -> np.ndarray:
    """Top-left corners of the ``crop_size`` windows centred on each centroid that fit in the field.

    The window of a centroid (r, c) starts at ``(round(r) - crop_size // 2, round(c) - crop_size // 2)``.

    Args:
        centroids: float ``(K, 2)`` (row, col) in px.
        shape: ``(H, W)`` of the field.
        crop_size: window side (px).

    Returns:
        int64 ``(K', 2)`` corners of the windows that lie entirely inside the field (K' <= K).
    """
    corners = np.rint(np.asarray(centroids, dtype=np.float64)).astype(np.int64) - crop_size // 2
    inside = ((corners >= 0) & (corners + crop_size <= np.asarray(shape))).all(axis=1)
    return corners[inside].reshape(-1, 2)


def scale_to_uint8(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Map ``lo -> 0`` and ``hi -> 255`` per channel (last axis), rounded and clipped, as uint8."""
    lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
    scaled = (np.asarray(x, np.float32) - lo) * (255.0 / np.maximum(hi - lo, 1e-6))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """float ``(C, H, W)`` -> ``(C, H // factor, W // factor)`` means of ``factor x factor`` blocks."""
    c, h, w = image.shape
    h, w = h // factor, w // factor
    return image[:, :h * factor, :w * factor].reshape(c, h, factor, w, factor).mean(axis=(2, 4))
