"""Speed of the morphology kernels against scikit-image, side by side, on the same masks.

Run: python -m pytest benchmarks/bench_morphology.py --benchmark-enable -p no:cacheprovider
Target: ``measure`` >= 50,000 images/s on 2 cores and >= 20x ``regionprops`` (area + perimeter).
"""

from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import regionprops

from cellfluxrl.rewards.morphology import measure, object_perimeters

N_MASKS = 2048


@pytest.fixture(scope="module")
def masks():
    """Ground-truth nucleus and cell labels of 2,048 synthetic 96x96 crops (several MoAs)."""
    from cellfluxrl.data.synthetic import synthetic_batch

    moas = ("DMSO", "Microtubule destabilizers", "Epithelial", "Actin disruptors")
    parts = [synthetic_batch(N_MASKS // len(moas), moa=m, seed=7)[1:] for m in moas]
    nuclei = np.ascontiguousarray(np.concatenate([p[0] for p in parts]), dtype=np.int32)
    cells = np.ascontiguousarray(np.concatenate([p[1] for p in parts]), dtype=np.int32)
    measure(nuclei[:8], cells[:8])  # compile / load the numba cache before timing
    object_perimeters(nuclei[0])
    return nuclei, cells


def _skimage_stats(nuclei: np.ndarray, cells: np.ndarray) -> float:
    """The same statistics from regionprops (area + perimeter of nuclei, area of cells)."""
    total = 0.0
    for n, c in zip(nuclei, cells):
        for r in regionprops(n):
            total += r.area + r.perimeter
        for r in regionprops(c):
            total += r.area
    return total


def test_measure_numba(benchmark, masks):
    nuclei, cells = masks
    benchmark.group = "measure 96x96"
    benchmark(measure, nuclei, cells)
    benchmark.extra_info["images_per_s"] = len(nuclei) / benchmark.stats.stats.mean


def test_measure_skimage_regionprops(benchmark, masks):
    nuclei, cells = masks
    nuclei, cells = nuclei[::8], cells[::8]  # 256 images: regionprops is slow
    benchmark.group = "measure 96x96"
    benchmark.pedantic(_skimage_stats, args=(nuclei, cells), rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["images_per_s"] = len(nuclei) / benchmark.stats.stats.mean


def test_object_perimeters_numba(benchmark, masks):
    nuclei, _ = masks
    benchmark.group = "perimeter, one 96x96 image"
    benchmark(object_perimeters, nuclei[3])
