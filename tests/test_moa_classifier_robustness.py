"""The MoA classifier trained with degradations is robust to blur and resampling (small synthetic set).

A 2,500-crop 48 px synthetic dataset (about 1,140 treated in-distribution train crops, 290 test
crops), a narrow CNN (widths 12/24/48), 12 epochs of batch 64 (216 steps): about 27 s on one core
for both recipes. Measured over dataset/training seeds 0-3, accuracy after a 0.75 px blur (at 48 px,
like a 1.5 px blur at 96 px): old recipe 0.36-0.60, new recipe 0.79-0.87 (clean 0.80-0.90, down/up
2x 0.78-0.87); new minus old 0.22-0.44, 6-12 standard errors. The assertions keep 3 s.e. for the
difference and a floor of 0.70 (over 3 s.e. under the lowest seed's 0.78); seed 0 is tested
(0.865 new against 0.426 old)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cellfluxrl.rewards.degradations import ROBUSTNESS_CONDITIONS
from cellfluxrl.rewards.moa_classifier import robustness_report, train_moa_classifier

SEED = 0
K_SE = 3.0
FLOOR = 0.70


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.data.synthetic import prepare_synthetic
    from cellfluxrl.rewards.evaluators import _treated_in_distribution

    root = tmp_path_factory.mktemp("robust") / "ds"
    prepare_synthetic(root, n_images=2500, seed=SEED, size=48, n_plates=3, progress=False)
    dataset = load_dataset(root)
    train_idx, train_labels = _treated_in_distribution(dataset, "train")
    test_idx, test_labels = _treated_in_distribution(dataset, "test")
    train, test = np.asarray(dataset.images[train_idx]), np.asarray(dataset.images[test_idx])
    out = {}
    for name, degrade in (("old", False), ("new", True)):
        model, info = train_moa_classifier(train, train_labels, epochs=12, batch_size=64, widths=(12, 24, 48),
                                           seed=SEED, degrade=degrade)
        assert info["degrade"] is degrade
        out[name] = robustness_report(model, test, test_labels)
        if name == "new":
            assert robustness_report(model, test, test_labels) == out[name]  # deterministic (fixed noise seed)
    out["n"] = int(test_labels.size)
    return out


def _diff_se(p: float, q: float, n: int) -> float:
    """Standard error of the difference of two independent binomial proportions on n trials each."""
    return math.sqrt(max(p * (1 - p) + q * (1 - q), 1e-4) / n)


def test_report_has_every_condition(reports):
    assert reports["n"] > 200
    for name in ("old", "new"):
        assert list(reports[name]) == list(ROBUSTNESS_CONDITIONS)
        assert all(0.0 <= v <= 1.0 for v in reports[name].values())


@pytest.mark.parametrize("condition", ["blur 0.75 px", "blur 1.0 px", "down/up 2x"])
def test_degradation_training_beats_old_recipe(reports, condition):
    old, new, n = reports["old"][condition], reports["new"][condition], reports["n"]
    assert new - old > K_SE * _diff_se(new, old, n), (condition, old, new)


@pytest.mark.parametrize("condition", ["clean", "blur 0.75 px", "down/up 2x", "noise 0.05"])
def test_new_recipe_accuracy_floor(reports, condition):
    assert reports["new"][condition] >= FLOOR, (condition, reports["new"])


def test_new_recipe_gap_clean_to_blurred_is_small(reports):
    new = reports["new"]
    for condition in ("blur 0.75 px", "down/up 2x"):
        assert new["clean"] - new[condition] < 0.1, (condition, new)
