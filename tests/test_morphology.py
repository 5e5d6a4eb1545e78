"""Morphology kernels: hand-made shapes with known area and perimeter, skimage equivalence,
measure() on hand-made label batches (containment, empty images), input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.measure import label as sk_label
from skimage.measure import regionprops

from cellfluxrl.errors import CellfluxError
from cellfluxrl.rewards.morphology import MEASURE_KEYS, ROUNDNESS_MIN_AREA, measure, object_perimeters

SQRT2 = math.sqrt(2.0)


def _canvas(*shapes: tuple[int, np.ndarray, int, int], size: int = 32) -> np.ndarray:
    """int32 (size, size) with each (label, binary shape, y, x) pasted at (y, x)."""
    out = np.zeros((size, size), np.int32)
    for lab, shape, y, x in shapes:
        h, w = shape.shape
        out[y:y + h, x:x + w][shape.astype(bool)] = lab
    return out


PLUS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]])


@pytest.mark.parametrize("shape, area, perimeter", [
    (np.ones((1, 1)), 1, 0.0),            # single pixel: no pixel has a weighted code
    (np.ones((1, 2)), 2, 0.0),            # domino: both ends have code 3 (weight 0)
    (np.ones((2, 2)), 4, 4.0),            # each pixel: n4 = 2, n8 = 1 -> code 15 -> 1
    (np.ones((4, 4)), 16, 12.0),          # 12 border pixels, codes 5 (corners) and 25 (edges)
    (np.ones((3, 5)), 15, 12.0),          # 12 border pixels, codes 5, 15 and 25
    (PLUS, 5, 4 * SQRT2),                 # centre is interior; each arm has n4 = 0, n8 = 2 -> code 21
    (np.ones((1, 5)), 5, 3.0),            # a line: 3 inner pixels weigh 1, the ends 0
])
def test_hand_made_shapes(shape, area, perimeter):
    labels = _canvas((1, shape, 5, 7))
    assert object_perimeters(labels)[0] == pytest.approx(perimeter, abs=1e-12)
    assert regionprops(labels)[0].perimeter == pytest.approx(perimeter, abs=1e-12)  # the hand value is skimage's
    m = measure(labels[None], labels[None])
    assert m["nuc_size"][0] == area and m["cyto_size"][0] == area


def test_frame_counts_as_background():
    # a 3x3 square in the corner: its frame-side pixels are border pixels too
    labels = _canvas((1, np.ones((3, 3)), 0, 0), size=8)
    assert object_perimeters(labels)[0] == pytest.approx(regionprops(labels)[0].perimeter, abs=1e-12) == 8.0


def test_touching_labels_and_missing_labels():
    labels = _canvas((1, np.ones((4, 4)), 2, 2), (3, np.ones((4, 4)), 2, 6))  # label 2 absent, 1 and 3 touch
    p = object_perimeters(labels)
    assert p.shape == (3,) and p.dtype == np.float64
    assert p[0] == p[2] == 12.0 and p[1] == 0.0


def _random_label_images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        field = ndi.gaussian_filter(rng.normal(size=(96, 96)), rng.uniform(1.0, 4.0))
        mask = field > rng.uniform(-0.2, 0.4) * field.std()
        lab = sk_label(mask, connectivity=1 + i % 2).astype(np.int32)
        if i % 3 == 0:  # cut objects into touching pieces with different labels
            lab = np.where(lab > 0, lab + (np.arange(96)[None, :] // 17) * (lab.max() + 1), 0)
            lab = sk_label(lab, connectivity=1, background=0).astype(np.int32)
        images.append(lab)
    return images


def test_perimeters_equal_skimage_on_random_masks():
    n_regions = 0
    for lab in _random_label_images(60, seed=1):
        p = object_perimeters(lab)
        for region in regionprops(lab):
            assert abs(region.perimeter - p[region.label - 1]) <= 1e-9
            n_regions += 1
    assert n_regions > 1000


def test_measure_matches_skimage_on_random_masks():
    nuclei = np.stack(_random_label_images(24, seed=2))
    cells = np.stack(_random_label_images(24, seed=3))
    m = measure(nuclei, cells)
    for b in range(len(nuclei)):
        regions = regionprops(nuclei[b])
        areas = np.array([r.area for r in regions])
        kept = [4 * math.pi * r.area / r.perimeter ** 2 for r in regions
                if r.area >= ROUNDNESS_MIN_AREA and r.perimeter > 0]
        assert m["nuc_count"][b] == len(regions)
        assert m["nuc_size"][b] == areas.max()
        assert m["cyto_count"][b] == len(regionprops(cells[b]))
        assert m["cyto_size"][b] == max(r.area for r in regionprops(cells[b]))
        assert m["roundness"][b] == pytest.approx(np.mean(kept), rel=1e-12)
        inside = ((nuclei[b] > 0) & (cells[b] > 0)).sum() / (nuclei[b] > 0).sum()
        assert m["nuc_in_cyto"][b] == pytest.approx(inside, rel=1e-15)


def test_measure_hand_made_batch():
    sq = np.ones((4, 4))
    cell = np.ones((10, 10))
    batch = [
        (_canvas((1, sq, 10, 10)), _canvas((1, cell, 7, 7))),                     # nucleus inside its cell
        (_canvas((1, sq, 1, 1)), _canvas((1, cell, 15, 15))),                     # nucleus outside the cell
        (_canvas((1, sq, 10, 5)), _canvas((1, cell, 7, 7))),                      # half in (2 of 4 columns)
        (_canvas(), _canvas((1, cell, 7, 7))),                                    # no nucleus
        (_canvas((1, sq, 10, 10)), _canvas()),                                    # no cell
        (_canvas(), _canvas()),                                                   # empty
        (_canvas((1, np.ones((1, 1)), 8, 8), (2, sq, 10, 10)), _canvas((1, cell, 7, 7))),  # speck + square
        (_canvas((3, sq, 2, 2), (7, np.ones((2, 3)), 20, 20)), _canvas((5, cell, 0, 0))),  # sparse labels
    ]
    nuclei = np.stack([b[0] for b in batch])
    cells = np.stack([b[1] for b in batch])
    m = measure(nuclei, cells)
    assert set(m) == set(MEASURE_KEYS)
    assert all(v.dtype == np.float64 and v.shape == (len(batch),) and np.isfinite(v).all() for v in m.values())
    r_sq = 4 * math.pi * 16 / 12 ** 2
    np.testing.assert_array_equal(m["nuc_count"], [1, 1, 1, 0, 1, 0, 2, 2])
    np.testing.assert_array_equal(m["cyto_count"], [1, 1, 1, 1, 0, 0, 1, 1])
    np.testing.assert_array_equal(m["nuc_size"], [16, 16, 16, 0, 16, 0, 16, 16])
    np.testing.assert_array_equal(m["cyto_size"], [100, 100, 100, 100, 0, 0, 100, 100])
    np.testing.assert_allclose(m["roundness"], [r_sq, r_sq, r_sq, 0, r_sq, 0, r_sq, r_sq], rtol=1e-12)
    # the 2x3 nucleus (area 6 < ROUNDNESS_MIN_AREA) of the last image is left out of the mean
    np.testing.assert_array_equal(m["nuc_in_cyto"], [1.0, 0.0, 0.5, 0.0, 0.0, 0.0, 1.0, 16 / 22])


def test_roundness_min_area_option():
    speck = _canvas((1, np.ones((2, 2)), 3, 3))[None]
    assert measure(speck, speck)["roundness"][0] == 0.0  # area 4 < 9: no nucleus counts
    assert measure(speck, speck, min_roundness_area=4)["roundness"][0] == pytest.approx(math.pi)


def test_measure_accepts_other_integer_dtypes_and_empty_batch():
    lab = _canvas((1, np.ones((4, 4)), 3, 3))[None]
    a = measure(lab.astype(np.uint16), lab.astype(np.int64))
    b = measure(lab, lab)
    assert all(np.array_equal(a[k], b[k]) for k in MEASURE_KEYS)
    empty = measure(np.zeros((0, 8, 8), np.int32), np.zeros((0, 8, 8), np.int32))
    assert all(v.shape == (0,) for v in empty.values())


@pytest.mark.parametrize("nuclei, cells, message", [
    (np.zeros((2, 8, 8), np.float32), np.zeros((2, 8, 8), np.int32), "integer"),
    (np.zeros((8, 8), np.int32), np.zeros((8, 8), np.int32), "integer"),
    (np.zeros((2, 8, 8), np.int32), np.zeros((2, 8, 9), np.int32), "differ"),
    (np.full((1, 8, 8), -1, np.int32), np.zeros((1, 8, 8), np.int32), "negative"),
])
def test_measure_rejects_bad_input(nuclei, cells, message):
    with pytest.raises(CellfluxError, match=message):
        measure(nuclei, cells)


def test_object_perimeters_rejects_bad_input():
    with pytest.raises(CellfluxError):
        object_perimeters(np.zeros((8, 8), np.float64))
    with pytest.raises(CellfluxError):
        object_perimeters(np.zeros((2, 8, 8), np.int32))
    assert object_perimeters(np.zeros((8, 8), np.int32)).shape == (0,)
