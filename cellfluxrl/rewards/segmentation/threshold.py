"""Smoothing and robust Otsu thresholds of one image (numba kernels of the classical segmenter)."""

from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(cache=True, nogil=True)
def binomial_blur(img, out, tmp):
    """5-tap binomial blur [1 4 6 4 1] / 16 (sigma = 1 px) in y then x, edges replicated."""
    H, W = img.shape
    for y in range(H):
        y0, y1, y3, y4 = max(y - 2, 0), max(y - 1, 0), min(y + 1, H - 1), min(y + 2, H - 1)
        for x in range(W):
            tmp[y, x] = (img[y0, x] + img[y4, x] + 4.0 * (img[y1, x] + img[y3, x]) + 6.0 * img[y, x]) * 0.0625
    for y in range(H):
        for x in range(W):
            x0, x1, x3, x4 = max(x - 2, 0), max(x - 1, 0), min(x + 1, W - 1), min(x + 2, W - 1)
            out[y, x] = (tmp[y, x0] + tmp[y, x4] + 4.0 * (tmp[y, x1] + tmp[y, x3]) + 6.0 * tmp[y, x]) * 0.0625


@nb.njit(cache=True, nogil=True)
def _histogram(img, lo, hi, hist):
    """Fill ``hist`` (n bins over [lo, hi], values outside clipped to the end bins)."""
    n = hist.size
    scale = n / (hi - lo)
    hist[:] = 0.0
    for v in img.ravel():
        k = int((v - lo) * scale)
        hist[min(max(k, 0), n - 1)] += 1.0


@nb.njit(cache=True, nogil=True)
def otsu(img, clip, log_offset):
    """Robust Otsu threshold of one image.

    The range is first narrowed to the ``[1 - clip, clip]`` quantiles (from a histogram), so a few
    saturated pixels do not squeeze everything else into the lowest bins; then Otsu on a histogram
    of that range (values outside clipped to the end bins). With ``log_offset > 0`` the bins are
    valued ``log(I - min + log_offset)`` (Otsu on log intensity, 1024 bins), otherwise ``I``
    (256 bins).

    Returns:
        ``(threshold, lo, hi, contrast)``: the threshold (intensity units; foreground is
        ``I > threshold``), the quantile range, and the difference of the two class means in the
        bin-value units (0 for a flat image).
    """
    lo = img[0, 0]
    hi = img[0, 0]
    for v in img.ravel():
        lo = min(lo, v)
        hi = max(hi, v)
    if hi - lo < 1e-6:
        return hi, lo, hi, 0.0
    img_min = lo
    nb_bins = 1024 if log_offset > 0 else 256
    hist = np.empty(nb_bins, np.float64)
    _histogram(img, lo, hi, hist)
    total = float(img.size)
    if clip < 1.0:
        width = (hi - lo) / nb_bins
        cum = 0.0
        k_lo = 0
        k_hi = nb_bins - 1
        for k in range(nb_bins):
            cum += hist[k]
            if cum <= (1.0 - clip) * total:
                k_lo = k + 1
            if cum < clip * total:
                k_hi = k + 1
        new_lo = lo + k_lo * width
        new_hi = min(lo + (k_hi + 1) * width, hi)
        if new_hi - new_lo > 1e-6:
            lo, hi = new_lo, new_hi
            _histogram(img, lo, hi, hist)
    width = (hi - lo) / nb_bins
    value = np.empty(nb_bins, np.float64)
    for k in range(nb_bins):
        centre = lo + (k + 0.5) * width
        value[k] = np.log(centre - img_min + log_offset) if log_offset > 0 else centre
    total_sum = 0.0
    for k in range(nb_bins):
        total_sum += hist[k] * value[k]
    w0 = 0.0
    s0 = 0.0
    best = -1.0
    best_k = 0
    best_m0 = 0.0
    best_m1 = 0.0
    for k in range(nb_bins - 1):
        w0 += hist[k]
        s0 += hist[k] * value[k]
        w1 = total - w0
        if w0 == 0.0 or w1 == 0.0:
            continue
        m0 = s0 / w0
        m1 = (total_sum - s0) / w1
        between = w0 * w1 * (m0 - m1) * (m0 - m1)
        if between > best:
            best, best_k, best_m0, best_m1 = between, k, m0, m1
    threshold = lo + (best_k + 1) * width  # upper edge of the last background bin
    return threshold, lo, hi, best_m1 - best_m0

