"""Segmentation throughput: classical backend + measure (all six morphology statistics), and
Cellpose on CPU when a model is available.

Run: python -m pytest benchmarks/bench_segment.py --benchmark-enable -p no:cacheprovider
Target: classical segmentation + measure >= 2,000 images/s on 2 cores (96x96 crops).
Cellpose: set CELLFLUXRL_CELLPOSE_NUCLEI / CELLFLUXRL_CELLPOSE_CYTO to weights files (e.g. from
``cellfluxrl prepare cellpose-model``); skipped otherwise.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from cellfluxrl.rewards.morphology import measure
from cellfluxrl.rewards.segmentation.factory import make_segmenter

BATCH = 512


@pytest.fixture(scope="module")
def crops():
    """512 synthetic 96x96 crops in model space, several MoAs."""
    from cellfluxrl.data.synthetic import synthetic_batch
    from cellfluxrl.images import to_model

    moas = ("DMSO", "Microtubule destabilizers", "Epithelial", "Actin disruptors")
    images = np.concatenate([synthetic_batch(BATCH // len(moas), moa=m, seed=9)[0] for m in moas])
    return to_model(images, dequantize=False).numpy()


def _segment_and_measure(segmenter, images):
    nuclei, cells = segmenter.segment(images)
    return measure(nuclei, cells)


def test_classical_segment_and_measure(benchmark, crops):
    seg = make_segmenter("classical")
    _segment_and_measure(seg, crops[:8])  # compile / load the numba cache
    benchmark.group = "segmentation 96x96"
    benchmark.pedantic(_segment_and_measure, args=(seg, crops), rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["images_per_s"] = len(crops) / benchmark.stats.stats.mean


def test_classical_segment_only(benchmark, crops):
    seg = make_segmenter("classical")
    seg.segment(crops[:8])
    benchmark.group = "segmentation 96x96"
    benchmark.pedantic(seg.segment, args=(crops,), rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["images_per_s"] = len(crops) / benchmark.stats.stats.mean


@pytest.mark.skipif(not (os.environ.get("CELLFLUXRL_CELLPOSE_NUCLEI") and os.environ.get("CELLFLUXRL_CELLPOSE_CYTO")),
                    reason="set CELLFLUXRL_CELLPOSE_NUCLEI and CELLFLUXRL_CELLPOSE_CYTO to Cellpose weights files")
def test_cellpose_segment_cpu(benchmark, crops):
    seg = make_segmenter("cellpose", nuclei_model=os.environ["CELLFLUXRL_CELLPOSE_NUCLEI"],
                         cyto_model=os.environ["CELLFLUXRL_CELLPOSE_CYTO"], gpu=False)
    images = crops[:32]
    seg.segment(images[:2])  # load the models
    benchmark.group = "segmentation 96x96"
    benchmark.pedantic(seg.segment, args=(images,), rounds=1, iterations=1)
    benchmark.extra_info["images_per_s"] = len(images) / benchmark.stats.stats.mean
