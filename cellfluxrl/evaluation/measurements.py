"""CellProfiler-named per-object measurements of nucleus, cell and cytoplasm label images.

The maths behind ``cellfluxrl measure`` (tables and files: :mod:`cellfluxrl.evaluation.measurement_tables`).
Definitions follow CellProfiler >= 4 (``MeasureObjectSizeShape``, which calls
``skimage.measure.regionprops``; cp-measure 0.3 reproduces it as a library) and
``IdentifyTertiaryObjects``:

* ``Area``: pixel count of the label (px^2, here px because the pixel is the unit).
* ``Perimeter``: scikit-image's ``perimeter(image, 4)`` of the object's own mask (other labels and
  the image frame count as background): border pixels (a 4-neighbour outside the object) weighed
  by their border neighbours, 1 / sqrt(2) / (1 + sqrt(2)) / 2. Computed by the project's numba
  kernel :func:`cellfluxrl.rewards.morphology.object_perimeters`, equal to it within 1e-12.
  CellProfiler 3.x used centrosome's 3x3 lookup-table perimeter instead: its numbers differ.
* ``FormFactor = 4 pi Area / Perimeter^2`` (``inf`` for a perimeter of 0, as CellProfiler);
  ``Compactness = Perimeter^2 / max(4 pi Area, 1)``.
* Second moments: ``mu20, mu02, mu11`` are the central moments of the pixel centres divided by the
  area (row variance, column variance, covariance, px^2); the eigenvalues ``l1 >= l2`` of
  ``[[mu20, mu11], [mu11, mu02]]``, clipped at 0, give ``Eccentricity = sqrt(1 - l2 / l1)`` (0 when
  ``l1 = 0``), ``MajorAxisLength = 4 sqrt(l1)``, ``MinorAxisLength = 4 sqrt(l2)`` (px) and
  ``Orientation = 0.5 atan2(2 mu11, mu20 - mu02)`` in degrees (+-45 when ``mu20 = mu02``).
* ``Center_X/Y``: centroid (column / row mean, px); bounding box ``Minimum`` inclusive,
  ``Maximum`` exclusive (as regionprops); ``Extent = Area / BoundingBoxArea``;
  ``EquivalentDiameter = sqrt(4 Area / pi)``.
* Cytoplasm (IdentifyTertiaryObjects, "shrink primary" on, its default): the cell's label on every
  pixel that is not inside a nucleus, where the nucleus' outline (pixels with an 8-neighbour of
  another nucleus label, or on the image frame) stays cytoplasm. A cytoplasm keeps its cell's number.

Every kernel makes one or two passes over the label image with per-label accumulators (numba).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba as nb
import numpy as np

from cellfluxrl.errors import CellfluxError
from cellfluxrl.rewards.morphology import object_perimeters

COMPARTMENTS = ("Nuclei", "Cells", "Cytoplasm")
SHAPE_FEATURES = ("Area", "Perimeter", "FormFactor", "Compactness", "Eccentricity", "MajorAxisLength",
                  "MinorAxisLength", "Orientation", "EquivalentDiameter", "Extent", "Center_X", "Center_Y",
                  "BoundingBoxArea", "BoundingBoxMinimum_X", "BoundingBoxMaximum_X", "BoundingBoxMinimum_Y",
                  "BoundingBoxMaximum_Y")
"""The ``AreaShape`` features computed, in column order (CellProfiler's names)."""


@nb.njit(cache=True, nogil=True)
def _moment_sums(labels, n_labels):
    """float64 (n_labels + 1, 10) per label: area, centroid y/x, mu20, mu02, mu11 (per px), bbox.

    Columns: 0 area, 1 mean row, 2 mean column, 3 row variance, 4 column variance, 5 covariance,
    6 min row, 7 max row (inclusive), 8 min column, 9 max column (inclusive). Two passes: sums,
    then sums of centred products (no cancellation from raw second moments).
    """
    H, W = labels.shape
    out = np.zeros((n_labels + 1, 10), np.float64)
    for L in range(n_labels + 1):
        out[L, 6] = H
        out[L, 8] = W
        out[L, 7] = -1.0
        out[L, 9] = -1.0
    for y in range(H):
        for x in range(W):
            L = labels[y, x]
            if L == 0:
                continue
            out[L, 0] += 1.0
            out[L, 1] += y
            out[L, 2] += x
            out[L, 6] = min(out[L, 6], y)
            out[L, 7] = max(out[L, 7], y)
            out[L, 8] = min(out[L, 8], x)
            out[L, 9] = max(out[L, 9], x)
    for L in range(1, n_labels + 1):
        if out[L, 0] > 0:
            out[L, 1] /= out[L, 0]
            out[L, 2] /= out[L, 0]
    for y in range(H):
        for x in range(W):
            L = labels[y, x]
            if L == 0:
                continue
            dy = y - out[L, 1]
            dx = x - out[L, 2]
            out[L, 3] += dy * dy
            out[L, 4] += dx * dx
            out[L, 5] += dy * dx
    for L in range(1, n_labels + 1):
        if out[L, 0] > 0:
            out[L, 3] /= out[L, 0]
            out[L, 4] /= out[L, 0]
            out[L, 5] /= out[L, 0]
    return out


@nb.njit(cache=True, nogil=True)
def _cytoplasm(nuclei, cells, out):
    """Write CellProfiler's tertiary labels (cells minus shrunk nuclei) into ``out`` (H, W) int32."""
    H, W = nuclei.shape
    for y in range(H):
        for x in range(W):
            C = cells[y, x]
            N = nuclei[y, x]
            if C == 0 or N == 0:
                out[y, x] = C
                continue
            outline = y == 0 or x == 0 or y == H - 1 or x == W - 1
            if not outline:
                for dy in range(-1, 2):
                    for dx in range(-1, 2):
                        if nuclei[y + dy, x + dx] != N:
                            outline = True
            out[y, x] = C if outline else 0


def _label_image(name: str, labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise CellfluxError(f"{name}: expected an integer (H, W) label image, got {labels.dtype} {labels.shape}")
    if labels.size and labels.min() < 0:
        raise CellfluxError(f"{name}: labels must be >= 0")
    return np.ascontiguousarray(labels, dtype=np.int32)


def cytoplasm_labels(nuclei: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """CellProfiler's cytoplasm (IdentifyTertiaryObjects, shrink primary on) of one image.

    Args:
        nuclei: integer ``(H, W)`` nucleus labels, 0 = background.
        cells: integer ``(H, W)`` whole-cell labels, same shape.

    Returns:
        int32 ``(H, W)``: the cell label on every pixel of a cell outside the nuclei' interiors (a
        nucleus' outline, i.e. its pixels with an 8-neighbour of another label or on the image
        frame, stays cytoplasm); 0 elsewhere. Cytoplasm ``k`` belongs to cell ``k``.
    """
    nuclei, cells = _label_image("nuclei", nuclei), _label_image("cells", cells)
    if nuclei.shape != cells.shape:
        raise CellfluxError(f"cytoplasm: nuclei {nuclei.shape} and cells {cells.shape} differ in shape")
    out = np.zeros_like(cells)
    if cells.size:
        _cytoplasm(nuclei, cells, out)
    return out


@dataclass(frozen=True)
class ObjectTable:
    """Measurements of the objects of one label image.

    Attributes:
        labels: int64 ``(K,)`` the object numbers present (ascending; CellProfiler's ObjectNumber).
        features: ``AreaShape`` feature name (:data:`SHAPE_FEATURES`) -> float64 ``(K,)``.
    """

    labels: np.ndarray
    features: dict[str, np.ndarray]


def shape_features(labels: np.ndarray) -> ObjectTable:
    """CellProfiler's ``AreaShape`` features of every object of one label image.

    Args:
        labels: integer ``(H, W)`` labels, 0 = background; need not be contiguous (an absent label
            has no row) or connected (a label is one object however many pieces it has).

    Returns:
        An :class:`ObjectTable`; units px (lengths), px^2 (areas, moments), degrees (Orientation).
    """
    labels = _label_image("labels", labels)
    n_labels = int(labels.max()) if labels.size else 0
    if n_labels == 0:
        return ObjectTable(np.zeros(0, np.int64), {f: np.zeros(0, np.float64) for f in SHAPE_FEATURES})
    sums = _moment_sums(labels, n_labels)
    present = np.flatnonzero(sums[1:, 0] > 0) + 1
    s = sums[present]
    area = s[:, 0]
    perimeter = object_perimeters(labels)[present - 1]
    mu20, mu02, mu11 = s[:, 3], s[:, 4], s[:, 5]
    half_trace = (mu20 + mu02) / 2
    disc = np.sqrt(((mu20 - mu02) / 2) ** 2 + mu11 ** 2)
    l1 = np.clip(half_trace + disc, 0.0, None)
    l2 = np.clip(half_trace - disc, 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        eccentricity = np.where(l1 == 0, 0.0, np.sqrt(np.clip(1 - l2 / l1, 0.0, 1.0)))
        form_factor = 4 * math.pi * area / perimeter ** 2
    orientation = np.where(mu20 - mu02 == 0, np.where(mu11 > 0, 45.0, -45.0),
                           np.degrees(0.5 * np.arctan2(2 * mu11, mu20 - mu02)))
    bbox_h, bbox_w = s[:, 7] - s[:, 6] + 1, s[:, 9] - s[:, 8] + 1
    features = {
        "Area": area, "Perimeter": perimeter, "FormFactor": form_factor,
        "Compactness": perimeter ** 2 / np.maximum(4 * math.pi * area, 1.0),
        "Eccentricity": eccentricity, "MajorAxisLength": 4 * np.sqrt(l1), "MinorAxisLength": 4 * np.sqrt(l2),
        "Orientation": orientation, "EquivalentDiameter": np.sqrt(4 * area / math.pi),
        "Extent": area / (bbox_h * bbox_w), "Center_X": s[:, 2], "Center_Y": s[:, 1],
        "BoundingBoxArea": bbox_h * bbox_w, "BoundingBoxMinimum_X": s[:, 8], "BoundingBoxMaximum_X": s[:, 9] + 1,
        "BoundingBoxMinimum_Y": s[:, 6], "BoundingBoxMaximum_Y": s[:, 7] + 1,
    }
    return ObjectTable(present.astype(np.int64), features)


def largest_overlap(child: np.ndarray, parent: np.ndarray, n_child: int, n_parent: int) -> np.ndarray:
    """For every child label, the parent label sharing most of its pixels (0: none).

    Args:
        child, parent: int32 ``(H, W)`` labels of the same image.
        n_child, n_parent: their largest labels.

    Returns:
        int64 ``(n_child + 1,)``; entry ``k`` is the parent of child ``k`` (ties: the smaller label).
    """
    both = (child > 0) & (parent > 0)
    pairs = child[both].astype(np.int64) * (n_parent + 1) + parent[both]
    counts = np.bincount(pairs, minlength=(n_child + 1) * (n_parent + 1)).reshape(n_child + 1, n_parent + 1)
    best = counts.argmax(axis=1)
    return np.where(counts.max(axis=1) > 0, best, 0).astype(np.int64)


@dataclass(frozen=True)
class ImageMeasurements:
    """Measurements of one image: its three compartments and how their objects relate.

    Attributes:
        objects: compartment name (:data:`COMPARTMENTS`) -> its :class:`ObjectTable`.
        relations: column name -> int64 ``(K,)`` aligned with that compartment's objects:
            ``Nuclei_Children_Cells_Count``, ``Cells_Parent_Nuclei``, ``Cytoplasm_Parent_Cells``,
            ``Cytoplasm_Parent_Nuclei`` (0 = none).
    """

    objects: dict[str, ObjectTable]
    relations: dict[str, np.ndarray]

    def count(self, compartment: str) -> int:
        return int(len(self.objects[compartment].labels))


def measure_image(nuclei: np.ndarray, cells: np.ndarray) -> ImageMeasurements:
    """All compartments of one image from its nucleus and cell labels.

    Args:
        nuclei: integer ``(H, W)`` nucleus labels (0 = background).
        cells: integer ``(H, W)`` whole-cell labels (a cell includes its nucleus), same shape.

    Returns:
        An :class:`ImageMeasurements`. A cell's parent nucleus is the nucleus with most pixels in
        it (the project's segmenter may seed one cell from a nucleus and its fragments); a nucleus'
        child count is how many cells name it as parent.
    """
    nuclei, cells = _label_image("nuclei", nuclei), _label_image("cells", cells)
    cytoplasm = cytoplasm_labels(nuclei, cells)
    objects = {"Nuclei": shape_features(nuclei), "Cells": shape_features(cells),
               "Cytoplasm": shape_features(cytoplasm)}
    n_nuc, n_cell = (int(nuclei.max()), int(cells.max())) if nuclei.size else (0, 0)
    cell_parent = largest_overlap(cells, nuclei, n_cell, n_nuc)
    children = np.bincount(cell_parent[objects["Cells"].labels], minlength=n_nuc + 1)
    cyto = objects["Cytoplasm"].labels
    relations = {"Nuclei_Children_Cells_Count": children[objects["Nuclei"].labels].astype(np.int64),
                 "Cells_Parent_Nuclei": cell_parent[objects["Cells"].labels],
                 "Cytoplasm_Parent_Cells": cyto.copy(), "Cytoplasm_Parent_Nuclei": cell_parent[cyto]}
    return ImageMeasurements(objects, relations)
