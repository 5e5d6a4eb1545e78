"""Segmentation of nuclei and cells: a fast classical backend (numba) and a Cellpose backend.

One segmentation pass per batch is shared by every morphology reward. Both backends take the
model's float32 ``(B, 3, H, W)`` images in ``[-1, 1]`` with channels (actin, tubulin, DNA) and
return int32 ``(B, H, W)`` nucleus and cell labels (0 = background, 1..K contiguous, in raster
order of each object's first pixel). The cell of a nucleus is the whole cell including it.

``classical`` (default, offline), per image and in parallel over the batch (``prange``), in the
spirit of CellProfiler's IdentifyPrimaryObjects / IdentifySecondaryObjects:

1. Nuclei: smooth the DNA channel (5-tap binomial, sigma ~ 1 px); Otsu threshold of this image
   (thresholds are per image because intensity ranges differ per plate); images whose foreground
   is not brighter than the background by ``min_contrast`` have no nuclei; fill holes; exact
   Euclidean distance transform; split touching nuclei by flooding the distance map from its
   maxima in decreasing order and merging two basins when the lower one's peak rises less than
   ``declump_h`` px above their saddle (h-maxima / dynamics criterion, 8-connected); drop objects
   below ``min_nucleus_area``.
2. Cells: smooth actin + tubulin; foreground = above ``min + cyto_threshold_scale * (otsu -
   min)`` with the Otsu threshold taken on log intensity (robust when a crop is mostly cytoplasm
   with a few very bright cells) and a contrast floor, holes filled (background pockets that do
   not touch the frame, or smaller than ``cell_max_hole_area`` px: the nucleus is usually a dim
   pocket of the cytoplasm stains); a nucleus smaller than ``cell_fragment_area`` px (a fragment
   or micronucleus) shares the seed of the nearest nucleus within ``cell_seed_merge`` px, but two
   whole nuclei never share one (:mod:`cellfluxrl.cell_seeds`); seeded watershed from those seeds
   (the nucleus pixels inside the foreground) over the inverted cytoplasm intensity, by a 256-level
   bucket queue, 4-connected, inside the foreground. The nuclei are *not* forced into the foreground
   (``nuclei_in_cells=False``), otherwise every nucleus would be contained in its cell by
   construction and the nuc_in_cyto reward would be constant. Cells below ``min_cell_area`` and
   cytoplasm without a nucleus are dropped.

``cellpose`` lives in :mod:`cellfluxrl.segment_cellpose` (imported only when asked for).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numba as nb
import numpy as np

from cellfluxrl.cell_seeds import _root as _find  # union-find root, shared with the cell seeds
from cellfluxrl.cell_seeds import group_nuclei
from cellfluxrl.errors import CellfluxError

log = logging.getLogger(__name__)

BACKENDS = ("classical", "cellpose")
_N_LEVELS = 256  # watershed intensity quantisation
_LOG_OFFSET = 0.02  # model units (~2.5 grey levels): offset of the log cytoplasm threshold


class Segmenter(Protocol):
    """What every backend provides."""

    def segment(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``(B, 3, H, W)`` in [-1, 1] (actin, tubulin, DNA) -> int32 (nuclei, cells) ``(B, H, W)``."""
        ...

    @property
    def settings(self) -> dict[str, Any]:
        """JSON-serialisable backend name and every parameter that changes the output."""
        ...


def make_segmenter(name: str = "classical", **options: Any) -> Segmenter:
    """Build a segmentation backend by name.

    Args:
        name: ``"classical"`` (default, offline, fast) or ``"cellpose"``.
        **options: the backend's parameters (see :class:`ClassicalSegmenter` and
            :class:`cellfluxrl.segment_cellpose.CellposeSegmenter`).

    Returns:
        A :class:`Segmenter`.

    Raises:
        CellfluxError: unknown backend or option, Cellpose not installed, model file missing.
    """
    if name == "classical":
        try:
            return ClassicalSegmenter(**options)
        except TypeError as exc:
            raise CellfluxError(f"classical segmenter: {exc}") from None
    if name == "cellpose":
        from cellfluxrl.segment_cellpose import CellposeSegmenter

        try:
            return CellposeSegmenter(**options)
        except TypeError as exc:
            raise CellfluxError(f"cellpose segmenter: {exc}") from None
    raise CellfluxError(f"unknown segmentation backend {name!r}; choose one of {', '.join(BACKENDS)}")


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


# --------------------------------------------------------------------------------------------
# Classical backend.


@dataclass(frozen=True)
class ClassicalSegmenter:
    """Threshold + distance-watershed nuclei, seeded-watershed cells (numba, parallel over images).

    Attributes:
        threshold_clip: thresholds are computed on the intensity range between the
            ``1 - threshold_clip`` and ``threshold_clip`` quantiles of the image (robust to a few
            saturated pixels).
        min_contrast: minimum (mean foreground - mean background) of the smoothed DNA channel, in
            model units ([-1, 1] scale; 0.1 = 12.75 grey levels); below it the image has no nuclei.
            The same floor on the smoothed actin + tubulin decides whether there is any cytoplasm.
        nucleus_threshold_scale: threshold = ``min + scale * (otsu - min)`` of the smoothed DNA.
        declump_h: saddle depth (px of distance) needed to keep two touching nuclei apart.
        min_nucleus_area: nuclei smaller than this (px) are dropped.
        cyto_threshold_scale: cytoplasm threshold = ``min + scale * (otsu - min)`` of the smoothed
            actin + tubulin.
        cyto_log_threshold: take the cytoplasm Otsu threshold on log intensity (robust when a
            crop is mostly cytoplasm with a few very bright cells), mapped back to intensity.
        cell_max_hole_area: background pockets up to this size (px) are filled even when they touch
            the frame (pockets that do not touch it are always filled).
        nuclei_in_cells: add the nuclei to the cell foreground (makes nuc_in_cyto 1 by
            construction; off by default).
        cell_seed_merge: a fragment nucleus joins the seed of the nearest nucleus whose gap is at
            most this (px, chessboard distance, even values count); 0 or 1 gives one cell per
            nucleus.
        cell_fragment_area: nuclei smaller than this (px) are fragments (micronuclei, pieces of a
            fragmented nucleus) that share a neighbour's cell; two nuclei of at least this area
            never share a cell (dense tissue). 0 gives one cell per nucleus.
        min_cell_area: cells smaller than this (px) are dropped.
    """

    threshold_clip: float = 1.0
    min_contrast: float = 0.1
    nucleus_threshold_scale: float = 0.75
    declump_h: float = 1.0
    min_nucleus_area: int = 6
    cyto_threshold_scale: float = 1.0
    cyto_log_threshold: bool = True
    cell_max_hole_area: int = 400
    nuclei_in_cells: bool = False
    cell_seed_merge: int = 4
    cell_fragment_area: int = 60
    min_cell_area: int = 8

    def __post_init__(self):
        if self.declump_h < 0 or self.min_nucleus_area < 1 or self.min_cell_area < 1 or self.cell_max_hole_area < 0 \
                or self.cell_fragment_area < 0:
            raise CellfluxError(f"classical segmenter: invalid parameters {asdict(self)}")

    @property
    def settings(self) -> dict[str, Any]:
        return {"backend": "classical", "version": 2, **asdict(self)}

    def segment(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Segment a batch.

        Args:
            images: float32 ``(B, 3, H, W)`` in ``[-1, 1]``, channels (actin, tubulin, DNA)
                (a torch tensor is accepted too).

        Returns:
            ``(nuclei, cells)``: int32 ``(B, H, W)`` contiguous labels, 0 = background.
        """
        images = check_images(images)
        B, _, H, W = images.shape
        nuclei = np.zeros((B, H, W), np.int32)
        cells = np.zeros((B, H, W), np.int32)
        if B and H and W:
            _segment_batch(images, float(self.threshold_clip), bool(self.cyto_log_threshold), float(self.min_contrast), float(self.nucleus_threshold_scale),
                           float(self.declump_h), int(self.min_nucleus_area), float(self.cyto_threshold_scale),
                           int(self.cell_max_hole_area), bool(self.nuclei_in_cells), int(self.cell_seed_merge),
                           int(self.cell_fragment_area), int(self.min_cell_area),
                           nuclei, cells)
        return nuclei, cells


@nb.njit(cache=True, nogil=True)
def _smooth(img, out, tmp):
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
def _otsu(img, clip, log_offset):
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
def _fill_holes(mask, max_open_area, comp, parent, area, touches):
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
def _edt_squared(mask, out):
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
def _declump(mask, d2, h, labels):
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


@nb.njit(cache=True, nogil=True)
def _relabel(labels, min_area, out):
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
def _seeded_watershed(quant, mask, labels):
    """Grow the seeds in ``labels`` (> 0) over ``mask`` by flooding ``quant`` (uint8 levels, low
    first), 4-connected, with a bucket queue (FIFO per level); pixels are labelled when queued.
    All three arrays must be C-contiguous (H, W)."""
    H, W = quant.shape
    quant_flat, mask_flat, labels_flat = quant.ravel(), mask.ravel(), labels.ravel()
    head = np.full(_N_LEVELS, -1, np.int64)
    tail = np.full(_N_LEVELS, -1, np.int64)
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
    while cur < _N_LEVELS:
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


@nb.njit(cache=True, nogil=True)
def _any_close_pair(labels, k, gap):
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


@nb.njit(cache=True, nogil=True)
def _segment_one(img, clip, log_cyto, min_contrast, nuc_scale, h, min_nuc_area, cyto_scale, cell_hole, nuclei_in_cells,
                 merge, fragment_area, min_cell_area, nuclei_out, cells_out):
    """Segment one (3, H, W) image into ``nuclei_out`` and ``cells_out`` (int32, zero-filled)."""
    _, H, W = img.shape
    tmp = np.empty((H, W), np.float32)
    smooth = np.empty((H, W), np.float32)
    mask = np.zeros((H, W), np.uint8)
    ids = np.zeros((H, W), np.int64)
    parent = np.empty(H * W + 2, np.int64)
    area = np.empty(H * W + 2, np.int64)
    touches = np.empty(H * W + 2, np.uint8)
    # Nuclei.
    _smooth(img[2], smooth, tmp)
    t, lo, hi, contrast = _otsu(smooth, clip, 0.0)
    if contrast < min_contrast:
        return
    t = lo + nuc_scale * (t - lo)
    for y in range(H):
        for x in range(W):
            mask[y, x] = 1 if smooth[y, x] > t else 0
    _fill_holes(mask, 0, ids, parent, area, touches)
    d2 = np.empty((H, W), np.int64)
    _edt_squared(mask, d2)
    _declump(mask, d2, h, ids)
    k_nuc = _relabel(ids, min_nuc_area, nuclei_out)
    if k_nuc == 0:
        return
    # Cells.
    for y in range(H):
        for x in range(W):
            tmp[y, x] = img[0, y, x] + img[1, y, x]
    cyto = np.empty((H, W), np.float32)
    _smooth(tmp, cyto, smooth)
    # Otsu of log(I - min + offset) when log_cyto: robust to bright cells in confluent crops
    t, lo, hi, contrast = _otsu(cyto, clip, _LOG_OFFSET if log_cyto else 0.0)
    t = lo + cyto_scale * (t - lo)
    n_fg = 0
    sum_fg = 0.0
    sum_all = 0.0
    for y in range(H):
        for x in range(W):
            v = cyto[y, x]
            sum_all += v
            if v > t:
                n_fg += 1
                sum_fg += v
    if n_fg == 0 or n_fg == H * W or sum_fg / n_fg - (sum_all - sum_fg) / (H * W - n_fg) < min_contrast:
        if not nuclei_in_cells:
            return  # no cytoplasm signal: no cells
        t = np.inf
    for y in range(H):
        for x in range(W):
            mask[y, x] = 1 if (cyto[y, x] > t or (nuclei_in_cells and nuclei_out[y, x] != 0)) else 0
    _fill_holes(mask, cell_hole, ids, parent, area, touches)
    quant = np.empty((H, W), np.uint8)
    span = max(hi - lo, 1e-6)
    for y in range(H):
        for x in range(W):
            q = int((hi - cyto[y, x]) / span * (_N_LEVELS - 1) + 0.5)
            quant[y, x] = min(max(q, 0), _N_LEVELS - 1)
    # Cell seeds: a nucleus smaller than `fragment_area` (micronucleus, fragment) shares the seed
    # of the nearest nucleus within `merge` px; whole nuclei never share one (cell_seeds.py). The
    # grouping is skipped when no two nucleus bounding boxes are that close.
    group = np.arange(k_nuc + 1)
    if _any_close_pair(nuclei_out, k_nuc, 2 * (merge // 2)):
        group = group_nuclei(nuclei_out, k_nuc, 2 * (merge // 2), fragment_area)
    for y in range(H):
        for x in range(W):
            ids[y, x] = group[nuclei_out[y, x]] if mask[y, x] != 0 else 0
    _seeded_watershed(quant, mask, ids)
    _relabel(ids, min_cell_area, cells_out)


@nb.njit(cache=True, nogil=True, parallel=True)
def _segment_batch(images, clip, log_cyto, min_contrast, nuc_scale, h, min_nuc_area, cyto_scale, cell_hole, nuclei_in_cells,
                   merge, fragment_area, min_cell_area, nuclei, cells):
    for b in nb.prange(images.shape[0]):
        _segment_one(images[b], clip, log_cyto, min_contrast, nuc_scale, h, min_nuc_area, cyto_scale, cell_hole,
                     nuclei_in_cells, merge, fragment_area, min_cell_area, nuclei[b], cells[b])


# --------------------------------------------------------------------------------------------
# Accuracy against ground truth.


def _match_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU matrix float64 ``(n_gt, n_pred)`` of one pair of contiguous label images."""
    n_p, n_g = int(pred.max()), int(gt.max())
    if n_p == 0 or n_g == 0:
        return np.zeros((n_g, n_p))
    overlap = np.bincount(gt.ravel().astype(np.int64) * (n_p + 1) + pred.ravel(), minlength=(n_g + 1) * (n_p + 1))
    overlap = overlap.reshape(n_g + 1, n_p + 1).astype(np.float64)
    area_g = overlap.sum(axis=1)[1:, None]
    area_p = overlap.sum(axis=0)[None, 1:]
    inter = overlap[1:, 1:]
    return inter / np.maximum(area_g + area_p - inter, 1.0)


def segmentation_accuracy(pred: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5) -> dict[str, float]:
    """Object-level accuracy of predicted labels against ground truth.

    Matching is one-to-one by optimal assignment on IoU (Hungarian; at IoU > 0.5 it equals the
    greedy matching). ``ap50`` follows Cellpose / Stringer et al.: per image
    ``TP / (TP + FP + FN)`` at the IoU threshold, **averaged over images** (an image with no object
    in either counts as 1).

    Args:
        pred: integer ``(B, H, W)`` predicted labels (relabelled contiguously if needed).
        gt: integer ``(B, H, W)`` ground-truth labels.
        iou_threshold: a match needs IoU >= this.

    Returns:
        ``count_error`` (mean |#pred - #gt| per image), ``matched_iou`` (mean IoU of the matched
        pairs, pooled over images; 0 if none), ``ap50`` (mean per-image TP/(TP+FP+FN)),
        ``precision`` and ``recall`` (pooled), ``n_gt`` and ``n_pred`` (totals).
    """
    from scipy.optimize import linear_sum_assignment
    from skimage.segmentation import relabel_sequential

    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise CellfluxError(f"segmentation_accuracy: pred {pred.shape} and gt {gt.shape} must both be (B, H, W)")
    count_err, ious, aps = [], [], []
    tp_all = fp_all = fn_all = 0
    for p, g in zip(pred, gt):
        p = relabel_sequential(p.astype(np.int64))[0]
        g = relabel_sequential(g.astype(np.int64))[0]
        iou = _match_iou(p, g)
        n_g, n_p = iou.shape
        tp = 0
        if n_g and n_p:
            rows, cols = linear_sum_assignment(-iou)
            good = iou[rows, cols] >= iou_threshold
            tp = int(good.sum())
            ious.extend(iou[rows, cols][good].tolist())
        fp, fn = n_p - tp, n_g - tp
        aps.append(tp / (tp + fp + fn) if tp + fp + fn else 1.0)
        count_err.append(abs(n_p - n_g))
        tp_all, fp_all, fn_all = tp_all + tp, fp_all + fp, fn_all + fn
    return {
        "count_error": float(np.mean(count_err)) if count_err else 0.0,
        "matched_iou": float(np.mean(ious)) if ious else 0.0,
        "ap50": float(np.mean(aps)) if aps else 1.0,
        "precision": tp_all / max(tp_all + fp_all, 1),
        "recall": tp_all / max(tp_all + fn_all, 1),
        "n_gt": tp_all + fn_all,
        "n_pred": tp_all + fp_all,
    }
