"""Reward throughput: classical segmentation + the six morphology rewards, and the MoA reward.

Run: python -m pytest benchmarks/bench_rewards.py --benchmark-enable -p no:cacheprovider
Targets: segmentation + six morphology rewards >= 2,000 images/s on 2 cores (96x96, batch 256);
MoA reward images/s on CPU reported.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cellfluxrl.data.compounds import MOAS
from cellfluxrl.images import to_model
from cellfluxrl.rewards import RewardBatch, RewardSuite
from cellfluxrl.rewards.evaluators import Evaluators, moa_index, reference_statistics
from cellfluxrl.rewards.morphology import measure
from cellfluxrl.rewards.segmentation.factory import make_segmenter

BATCH = 256
MORPHOLOGY = {"nuc_in_cyto": 2.0, "roundness": 1.0, "nuc_size": 1.0, "cyto_size": 1.0, "nuc_count": 1.0,
              "cyto_count": 1.0}


@pytest.fixture(scope="module")
def crops():
    """256 synthetic 96x96 crops over DMSO and the 12 MoAs, with their ground-truth masks."""
    from cellfluxrl.data.synthetic import synthetic_batch

    names = ("DMSO", *MOAS)
    per = -(-BATCH // len(names))
    parts = [synthetic_batch(per, moa=m, seed=1, size=96) for m in names]
    images = np.concatenate([p[0] for p in parts])[:BATCH]
    nuclei = np.concatenate([p[1] for p in parts])[:BATCH]
    cells = np.concatenate([p[2] for p in parts])[:BATCH]
    moa = np.repeat(names, per)[:BATCH]
    return to_model(images, dequantize=False).numpy(), moa, nuclei, cells


@pytest.fixture(scope="module")
def evaluators(crops, tmp_path_factory):
    """In-memory evaluators: reference from the crops' GT masks, an (untrained) MoA classifier."""
    from cellfluxrl.rewards.moa_classifier import MoAClassifier, save_moa_classifier

    _, moa, nuclei, cells = crops
    segmenter = make_segmenter("classical")
    reference = {"segmenter": {"name": "classical", "options": {}, "settings": segmenter.settings},
                 "moas": reference_statistics(measure(nuclei, cells), moa)}
    path = save_moa_classifier(MoAClassifier(), Path(tmp_path_factory.mktemp("bench")) / "moa_classifier.pt")
    return Evaluators(path.parent, reference, path)


def _rate(benchmark) -> float:
    rate = BATCH / benchmark.stats.stats.mean
    benchmark.extra_info["images_per_s"] = round(rate, 1)
    return rate


def test_segmentation_and_morphology_rewards(benchmark, crops, evaluators):
    x, moa, _, _ = crops
    suite = RewardSuite(evaluators, MORPHOLOGY, make_segmenter("classical"))
    suite.score(x, moa)  # compile
    result = benchmark(suite.score, x, moa)
    assert result.total.shape == (BATCH,) and np.isfinite(result.total).all()
    print(f"\nsegmentation + 6 morphology rewards: {_rate(benchmark):,.0f} images/s (96x96, batch {BATCH})")


def test_moa_reward(benchmark, crops, evaluators):
    x, moa, nuclei, cells = crops
    suite = RewardSuite(evaluators, {"moa": 1.0}, make_segmenter("classical"))
    reward = suite.rewards["moa"]
    stats = measure(nuclei, cells)
    index = moa_index(moa)

    def score():  # a fresh batch each round, so the shared class probabilities are recomputed
        return reward(RewardBatch(x, moa, index, nuclei, cells, stats))

    values = benchmark(score)
    assert values.shape == (BATCH,) and np.isfinite(values).all()
    print(f"\nMoA reward (CNN on CPU): {_rate(benchmark):,.0f} images/s (96x96, batch {BATCH})")
