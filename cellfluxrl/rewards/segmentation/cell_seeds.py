"""Cell seeds from nuclei: which nuclei share one cell (numba, one image at a time).

Used by the classical segmenter (:mod:`cellfluxrl.rewards.segmentation.classical`). A nucleus seeds its own cell unless
it is a *fragment*: nuclei smaller than ``fragment_area`` px (micronuclei, the pieces of a
fragmented or mitotic nucleus) join the nearest group within ``gap`` px. Two groups that each hold
a whole nucleus (area >= ``fragment_area``) are never joined, so on dense tissue, where whole
nuclei touch, the cells follow the nuclei instead of chaining into one cell per cluster.

Pairs are joined in order of increasing distance (chessboard, between the closest pixels), so a
fragment between two whole nuclei joins the closer one.
"""

from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(cache=True, nogil=True)
def _root(parent, i):
    """Root of ``i`` in a union-find forest, with path halving."""
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@nb.njit(cache=True, nogil=True)
def _boundary_pixels(labels):
    """Flat indices (int64, raster order) of the object pixels with an 8-neighbour outside their
    object (or on the frame). The closest pixels of two disjoint objects are always among them."""
    H, W = labels.shape
    out = np.empty(H * W, np.int64)
    n = 0
    for y in range(H):
        for x in range(W):
            L = labels[y, x]
            if L == 0:
                continue
            edge = y == 0 or x == 0 or y == H - 1 or x == W - 1
            if not edge:
                for dy in range(-1, 2):
                    for dx in range(-1, 2):
                        if labels[y + dy, x + dx] != L:
                            edge = True
            if edge:
                out[n] = y * W + x
                n += 1
    return out[:n]


@nb.njit(cache=True, nogil=True)
def group_nuclei(labels, k, gap, fragment_area):
    """Group the nuclei of one image into cell seeds.

    Args:
        labels: int32 ``(H, W)`` nucleus labels, 0 = background, 1..k contiguous.
        k: number of nuclei.
        gap: nuclei whose closest pixels are at most ``gap`` px apart (chessboard gap, i.e.
            ``gap`` background pixels between them) may share a seed; ``gap <= 0`` gives one seed
            per nucleus.
        fragment_area: nuclei smaller than this (px) are fragments; every group holds at most one
            nucleus of at least this area. 0: no nucleus is a fragment (one seed per nucleus).

    Returns:
        int64 ``(k + 1,)``: the group of each nucleus (entry 0 is 0); a group is named by one of its
        nuclei, so ``group[group[i]] == group[i]``.
    """
    H, W = labels.shape
    parent = np.arange(k + 1)
    if k < 2 or gap <= 0 or fragment_area <= 0:
        return parent
    area = np.zeros(k + 1, np.int64)
    for v in labels.ravel():
        area[v] += 1
    whole = np.zeros(k + 1, np.bool_)
    for i in range(1, k + 1):
        whole[i] = area[i] >= fragment_area
    edge = _boundary_pixels(labels)
    flat = labels.ravel()
    for d in range(1, gap + 2):  # pixel distance d = gap + 1, in increasing order
        for p in edge:
            a = flat[p]
            y, x = p // W, p % W
            for dy in range(-d, d + 1):
                yy = y + dy
                if yy < 0 or yy >= H:
                    continue
                step = 1 if (dy == -d or dy == d) else 2 * d  # the ring of chessboard radius d
                for dx in range(-d, d + 1, step):
                    xx = x + dx
                    if xx < 0 or xx >= W:
                        continue
                    b = labels[yy, xx]
                    if b == 0 or b == a:
                        continue
                    ra, rb = _root(parent, a), _root(parent, b)
                    if ra == rb or (whole[ra] and whole[rb]):
                        continue
                    low, high = (ra, rb) if ra < rb else (rb, ra)
                    parent[high] = low
                    whole[low] = whole[ra] or whole[rb]
    for i in range(1, k + 1):
        parent[i] = _root(parent, i)
    return parent


@nb.njit(cache=True, nogil=True)
def any_close_pair(labels, k, gap):
    """Whether two of the objects 1..k have bounding boxes within ``gap`` px (chessboard) of each
    other (a cheap, conservative test for "some pair of objects is that close")."""
    if k < 2 or gap <= 0:
        return False
    H, W = labels.shape
    y0 = np.full(k + 1, H, np.int64)
    y1 = np.full(k + 1, -1, np.int64)
    x0 = np.full(k + 1, W, np.int64)
    x1 = np.full(k + 1, -1, np.int64)
    for y in range(H):
        for x in range(W):
            L = labels[y, x]
            if L != 0:
                y0[L] = min(y0[L], y)
                y1[L] = max(y1[L], y)
                x0[L] = min(x0[L], x)
                x1[L] = max(x1[L], x)
    for a in range(1, k + 1):
        for b in range(a + 1, k + 1):
            gap_y = max(y0[b] - y1[a], y0[a] - y1[b]) - 1
            gap_x = max(x0[b] - x1[a], x0[a] - x1[b]) - 1
            if max(gap_y, gap_x) <= gap:
                return True
    return False

