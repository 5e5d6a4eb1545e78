"""Label images (numba kernels of the classical segmenter): connected components, hole filling,
contiguous relabelling and the seeded watershed that grows cells from their nucleus seeds."""

from __future__ import annotations

import numba as nb
import numpy as np

from cellfluxrl.rewards.segmentation.cell_seeds import _root as _find  # union-find root, shared with the cell seeds

N_LEVELS = 256  # watershed intensity quantisation


@nb.njit(cache=True, nogil=True, inline="always")
def _union(parent, a, b):
    """Merge the trees of provisional labels ``a`` and ``b``; returns the smaller root."""
    ra = _find(parent, a)
    rb = _find(parent, b)
    if ra < rb:
        parent[rb] = ra
        return ra
    parent[ra] = rb
    return rb


@nb.njit(cache=True, nogil=True)
def _label_cc(mask, want, eight, comp, parent):
    """Connected components of the pixels where ``mask == want`` (4- or 8-connected), two-pass
    union-find. Writes root ids (>= 1, not contiguous) into ``comp`` (0 elsewhere); ``parent``
    (length >= H*W + 1) is scratch. Returns the largest id used."""
    H, W = mask.shape
    n = 0
    for y in range(H):
        for x in range(W):
            if mask[y, x] != want:
                comp[y, x] = 0
                continue
            c = comp[y, x - 1] if x > 0 else 0
            up = comp[y - 1, x] if y > 0 else 0
            if eight and up == 0 and y > 0:  # diagonal neighbours only matter when up is empty
                ul = comp[y - 1, x - 1] if x > 0 else 0
                ur = comp[y - 1, x + 1] if x < W - 1 else 0
                if c == 0:
                    c = ul
                elif ul != 0 and ul != c:
                    c = _union(parent, c, ul)
                if c == 0:
                    c = ur
                elif ur != 0 and ur != c:
                    c = _union(parent, c, ur)
            if c == 0:
                c = up
            elif up != 0 and up != c:
                c = _union(parent, c, up)
            if c == 0:
                n += 1
                parent[n] = n
                c = n
            comp[y, x] = c
    for y in range(H):
        for x in range(W):
            if comp[y, x] != 0:
                comp[y, x] = _find(parent, comp[y, x])
    return n


@nb.njit(cache=True, nogil=True)
def fill_holes(mask, max_open_area, comp, parent, area, touches):
    """Set to 1 every 4-connected background pocket of ``mask`` (uint8 0/1, in place) that does not
    touch the frame or has at most ``max_open_area`` pixels. ``comp`` (H, W) int64, ``parent``,
    ``area`` int64 and ``touches`` uint8 (length >= H*W + 1) are scratch."""
    H, W = mask.shape
    n = _label_cc(mask, 0, False, comp, parent)
    if n == 0:
        return
    area[: n + 1] = 0
    touches[: n + 1] = 0
    for y in range(H):
        edge = y == 0 or y == H - 1
        for x in range(W):
            r = comp[y, x]
            if r != 0:
                area[r] += 1
                if edge or x == 0 or x == W - 1:
                    touches[r] = 1
    for y in range(H):
        for x in range(W):
            r = comp[y, x]
            if r != 0 and (touches[r] == 0 or area[r] <= max_open_area):
                mask[y, x] = 1


@nb.njit(cache=True, nogil=True)
def relabel(labels, min_area, out):
    """Contiguous labels 1..K in raster order of first pixel, dropping objects below ``min_area``.
    ``labels`` ids must be >= 0. Returns K."""
    H, W = labels.shape
    top = 0
    for v in labels.ravel():
        top = max(top, v)
    area = np.zeros(top + 1, np.int64)
    for y in range(H):
        for x in range(W):
            area[labels[y, x]] += 1
    new = np.zeros(top + 1, np.int32)
    k = 0
    for y in range(H):
        for x in range(W):
            L = labels[y, x]
            if L != 0 and new[L] == 0 and area[L] >= min_area:
                k += 1
                new[L] = k
            out[y, x] = new[L] if L != 0 else 0
    return k


@nb.njit(cache=True, nogil=True)
def seeded_watershed(quant, mask, labels):
    """Grow the seeds in ``labels`` (> 0) over ``mask`` by flooding ``quant`` (uint8 levels, low
    first), 4-connected, with a bucket queue (FIFO per level); pixels are labelled when queued.
    All three arrays must be C-contiguous (H, W)."""
    H, W = quant.shape
    quant_flat, mask_flat, labels_flat = quant.ravel(), mask.ravel(), labels.ravel()
    head = np.full(N_LEVELS, -1, np.int64)
    tail = np.full(N_LEVELS, -1, np.int64)
    nxt = np.empty(H * W, np.int64)
    for p in range(H * W):
        if labels_flat[p] != 0:
            lv = np.int64(quant_flat[p])
            nxt[p] = -1
            if tail[lv] < 0:
                head[lv] = p
            else:
                nxt[tail[lv]] = p
            tail[lv] = p
    cur = 0
    while cur < N_LEVELS:
        p = head[cur]
        if p < 0:
            cur += 1
            continue
        head[cur] = nxt[p]
        if head[cur] < 0:
            tail[cur] = -1
        L = labels_flat[p]
        y = p // W
        x = p - y * W
        for k in range(4):
            if k == 0:
                if y == 0:
                    continue
                q = p - W
            elif k == 1:
                if y == H - 1:
                    continue
                q = p + W
            elif k == 2:
                if x == 0:
                    continue
                q = p - 1
            else:
                if x == W - 1:
                    continue
                q = p + 1
            if mask_flat[q] == 0 or labels_flat[q] != 0:
                continue
            labels_flat[q] = L
            lv = max(cur, np.int64(quant_flat[q]))
            nxt[q] = -1
            t = tail[lv]
            if t < 0:
                head[lv] = q
            else:
                nxt[t] = q
            tail[lv] = q

