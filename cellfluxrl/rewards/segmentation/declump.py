"""Nuclei from a foreground mask (numba kernels of the classical segmenter): the exact Euclidean
distance transform, and declumping by flooding it from its maxima (h-maxima / dynamics criterion)."""

from __future__ import annotations

import numba as nb
import numpy as np

from cellfluxrl.rewards.segmentation.cell_seeds import _root as _find  # union-find root, shared with the cell seeds


@nb.njit(cache=True, nogil=True)
def _edt_1d(f, n, d, v, zn, zd):
    """Felzenszwalb-Huttenlocher 1-D squared distance transform in integers:
    ``d[q] = min_p (q - p)^2 + f[p]`` over the finite ``f[:n]`` (``f < 0`` means infinite; all
    infinite gives -1). Envelope breakpoints are kept as fractions ``zn / zd`` (no division)."""
    k = -1
    for q in range(n):
        if f[q] < 0:
            continue
        sn = 0
        sd = 1
        while k >= 0:
            vk = v[k]
            sn = (f[q] + q * q) - (f[vk] + vk * vk)
            sd = 2 * (q - vk)
            # pop v[k] if the new parabola takes over at or before v[k]'s left breakpoint
            if k > 0 and sn * zd[k] <= zn[k] * sd:
                k -= 1
            else:
                break
        if k < 0:
            k = 0
            v[0] = q
        else:
            k += 1
            v[k] = q
            zn[k] = sn
            zd[k] = sd
    if k < 0:
        for q in range(n):
            d[q] = -1
        return
    j = 0
    for q in range(n):
        while j < k and zn[j + 1] < q * zd[j + 1]:
            j += 1
        d[q] = (q - v[j]) * (q - v[j]) + f[v[j]]


@nb.njit(cache=True, nogil=True)
def edt_squared(mask, out):
    """Exact squared Euclidean distance (int64) of every foreground pixel to the nearest background
    pixel (the frame is not background, as in ``scipy.ndimage.distance_transform_edt``; an image
    with no background gets H^2 + W^2)."""
    H, W = mask.shape
    n = max(H, W)
    g = np.empty((H, W), np.int64)
    f = np.empty(n, np.int64)
    d = np.empty(n, np.int64)
    v = np.empty(n, np.int64)
    zn = np.empty(n + 1, np.int64)
    zd = np.empty(n + 1, np.int64)
    row_fg = np.zeros(H, np.uint8)
    for x in range(W):
        any_fg = False
        for y in range(H):
            if mask[y, x] != 0:
                f[y] = -1
                any_fg = True
                row_fg[y] = 1
            else:
                f[y] = 0
        if not any_fg:
            for y in range(H):
                g[y, x] = 0
            continue
        _edt_1d(f, H, d, v, zn, zd)
        for y in range(H):
            g[y, x] = d[y]
    for y in range(H):
        if row_fg[y] == 0:
            for x in range(W):
                out[y, x] = 0
            continue
        for x in range(W):
            f[x] = g[y, x]
        _edt_1d(f, W, d, v, zn, zd)
        for x in range(W):
            out[y, x] = d[x] if d[x] >= 0 else H * H + W * W


@nb.njit(cache=True, nogil=True)
def declump_nuclei(mask, d2, h, labels):
    """Split the foreground into nuclei: flood the distance map from its maxima downwards
    (8-connected), merging two basins when the lower peak exceeds their saddle by less than ``h``.
    Writes basin ids (not contiguous, >= 1) into ``labels``; background 0."""
    H, W = mask.shape
    npx = H * W
    max_d2 = 0
    n_fg = 0
    for y in range(H):
        for x in range(W):
            labels[y, x] = 0
            if mask[y, x] != 0:
                n_fg += 1
                max_d2 = max(max_d2, d2[y, x])
    if n_fg == 0:
        return
    # counting sort of the foreground pixels by decreasing squared distance
    counts = np.zeros(max_d2 + 2, np.int64)
    for y in range(H):
        for x in range(W):
            if mask[y, x] != 0:
                counts[max_d2 - d2[y, x] + 1] += 1
    for k in range(1, max_d2 + 2):
        counts[k] += counts[k - 1]
    order = np.empty(n_fg, np.int64)
    for y in range(H):
        for x in range(W):
            if mask[y, x] != 0:
                k = max_d2 - d2[y, x]
                order[counts[k]] = y * W + x
                counts[k] += 1
    parent = np.empty(npx + 1, np.int64)
    peak = np.empty(npx + 1, np.float64)
    n_basins = 0
    for i in range(n_fg):
        p = order[i]
        y, x = p // W, p % W
        level = np.sqrt(np.float64(d2[y, x]))
        cur = 0
        for dy in range(-1, 2):
            yy = y + dy
            if yy < 0 or yy >= H:
                continue
            for dx in range(-1, 2):
                xx = x + dx
                if (dy == 0 and dx == 0) or xx < 0 or xx >= W or labels[yy, xx] == 0:
                    continue
                r = _find(parent, labels[yy, xx])
                if cur == 0:
                    cur = r
                elif r != cur:
                    low, high = (r, cur) if peak[r] < peak[cur] else (cur, r)
                    if peak[low] - level < h:
                        parent[low] = high
                        cur = high
        if cur == 0:
            n_basins += 1
            parent[n_basins] = n_basins
            peak[n_basins] = level
            cur = n_basins
        labels[y, x] = cur
    for y in range(H):
        for x in range(W):
            if labels[y, x] != 0:
                labels[y, x] = _find(parent, labels[y, x])

