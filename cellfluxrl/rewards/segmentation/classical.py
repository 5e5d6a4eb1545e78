"""The classical segmentation backend (numba, offline, the default): nuclei and cells of a batch.

The contract (input, labels) is in :mod:`cellfluxrl.rewards.segmentation.base`. Per image and in
parallel over the batch (``prange``), in the spirit of CellProfiler's IdentifyPrimaryObjects /
IdentifySecondaryObjects:

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
   whole nuclei never share one (:mod:`~cellfluxrl.rewards.segmentation.cell_seeds`); seeded
   watershed from those seeds (the nucleus pixels inside the foreground) over the inverted
   cytoplasm intensity, by a 256-level bucket queue, 4-connected, inside the foreground. The nuclei
   are *not* forced into the foreground (``nuclei_in_cells=False``), otherwise every nucleus would
   be contained in its cell by construction and the nuc_in_cyto reward would be constant. Cells
   below ``min_cell_area`` and cytoplasm without a nucleus are dropped.

The kernels are in :mod:`~cellfluxrl.rewards.segmentation.threshold` (smoothing, Otsu),
:mod:`~cellfluxrl.rewards.segmentation.declump` (distance transform, declumping),
:mod:`~cellfluxrl.rewards.segmentation.labels` (components, holes, watershed) and
:mod:`~cellfluxrl.rewards.segmentation.cell_seeds` (which nuclei share a cell).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numba as nb
import numpy as np

from cellfluxrl.errors import CellfluxError
from cellfluxrl.rewards.segmentation.base import check_images
from cellfluxrl.rewards.segmentation.cell_seeds import any_close_pair, group_nuclei
from cellfluxrl.rewards.segmentation.declump import declump_nuclei, edt_squared
from cellfluxrl.rewards.segmentation.labels import N_LEVELS, fill_holes, relabel, seeded_watershed
from cellfluxrl.rewards.segmentation.threshold import binomial_blur, otsu

_LOG_OFFSET = 0.02  # model units (~2.5 grey levels): offset of the log cytoplasm threshold


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
    binomial_blur(img[2], smooth, tmp)
    t, lo, hi, contrast = otsu(smooth, clip, 0.0)
    if contrast < min_contrast:
        return
    t = lo + nuc_scale * (t - lo)
    for y in range(H):
        for x in range(W):
            mask[y, x] = 1 if smooth[y, x] > t else 0
    fill_holes(mask, 0, ids, parent, area, touches)
    d2 = np.empty((H, W), np.int64)
    edt_squared(mask, d2)
    declump_nuclei(mask, d2, h, ids)
    k_nuc = relabel(ids, min_nuc_area, nuclei_out)
    if k_nuc == 0:
        return
    # Cells.
    for y in range(H):
        for x in range(W):
            tmp[y, x] = img[0, y, x] + img[1, y, x]
    cyto = np.empty((H, W), np.float32)
    binomial_blur(tmp, cyto, smooth)
    # Otsu of log(I - min + offset) when log_cyto: robust to bright cells in confluent crops
    t, lo, hi, contrast = otsu(cyto, clip, _LOG_OFFSET if log_cyto else 0.0)
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
    fill_holes(mask, cell_hole, ids, parent, area, touches)
    quant = np.empty((H, W), np.uint8)
    span = max(hi - lo, 1e-6)
    for y in range(H):
        for x in range(W):
            q = int((hi - cyto[y, x]) / span * (N_LEVELS - 1) + 0.5)
            quant[y, x] = min(max(q, 0), N_LEVELS - 1)
    # Cell seeds: a nucleus smaller than `fragment_area` (micronucleus, fragment) shares the seed
    # of the nearest nucleus within `merge` px; whole nuclei never share one (cell_seeds.py). The
    # grouping is skipped when no two nucleus bounding boxes are that close.
    group = np.arange(k_nuc + 1)
    if any_close_pair(nuclei_out, k_nuc, 2 * (merge // 2)):
        group = group_nuclei(nuclei_out, k_nuc, 2 * (merge // 2), fragment_area)
    for y in range(H):
        for x in range(W):
            ids[y, x] = group[nuclei_out[y, x]] if mask[y, x] != 0 else 0
    seeded_watershed(quant, mask, ids)
    relabel(ids, min_cell_area, cells_out)


@nb.njit(cache=True, nogil=True, parallel=True)
def _segment_batch(images, clip, log_cyto, min_contrast, nuc_scale, h, min_nuc_area, cyto_scale, cell_hole, nuclei_in_cells,
                   merge, fragment_area, min_cell_area, nuclei, cells):
    for b in nb.prange(images.shape[0]):
        _segment_one(images[b], clip, log_cyto, min_contrast, nuc_scale, h, min_nuc_area, cyto_scale, cell_hole,
                     nuclei_in_cells, merge, fragment_area, min_cell_area, nuclei[b], cells[b])

