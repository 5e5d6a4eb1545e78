"""The MoA classifier trained with degradations is robust to blur and resampling (small synthetic set).

A 2,500-crop 48 px synthetic dataset (about 1,140 treated in-distribution train crops, 290 test
crops), a narrow CNN (widths 12/24/48), 12 epochs of batch 64 (216 steps): about 27 s on one core
for both recipes. Measured over dataset/training seeds 0-3, accuracy after a 0.75 px blur (at 48 px,
like a 1.5 px blur at 96 px): old recipe 0.36-0.60, new recipe 0.79-0.87 (clean 0.80-0.90, down/up
2x 0.78-0.87); new minus old 0.22-0.44, 6-12 standard errors. The assertions keep 3 s.e. for the
difference and a floor of 0.70 (over 3 s.e. under the lowest seed's 0.78); seed 0 is tested
(0.865 new against 0.426 old). Those figures are of the recipe before 2026-12-04 (with gain/contrast
jitter); the fixture now trains the default degradations, without it.

The slow test at the end checks the reward classifier at the demo's 48 px against the targets of
issue 21 (clean >= 0.95, blurred and down/up-sampled >= 0.85), trained on the images ``prepare``
gives it (the first of the two (plate, well)-wise halves); a fast test checks those images are
prepare's. Every first-party name is imported at the top, so ``pytest -m slow --collect-only``
(.ci/run) fails when one moves."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cellfluxrl.data.layout import load_dataset
from cellfluxrl.data.splits import disjoint_halves
from cellfluxrl.data.synthetic import prepare_synthetic
from cellfluxrl.rewards.degradations import ROBUSTNESS_CONDITIONS
from cellfluxrl.rewards.evaluator_files import CLASSIFIER_FILE
from cellfluxrl.rewards.evaluators_fit import _treated_in_distribution, classifier_halves, half_hashes, indices_hash
from cellfluxrl.rewards.moa_classifier import robustness_report, train_moa_classifier

SEED = 0
K_SE = 3.0
FLOOR = 0.70


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
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


# --- Clean accuracy at the demo's crop size (issue 21 item 7) -------------------------------------
# The reward classifier as `prepare` fits it on a 4,000-crop 48 px set (4 plates, the demo's 20
# epochs, the first of evaluators_fit.classifier_halves: the treated in-distribution train crops
# dealt by (plate, well), as prepare deals them; tested on the treated in-distribution test crops).
# Seed 5 is a validation seed (the held-out seed 7 of experiments/RESULTS.md is never tested).
# Measured on seed 5 with image-wise halves (before the halves were dealt by well): clean 0.937,
# blur 0.75 px 0.935, down/up 2x 0.929 (recipe before: batch 128 with gain jitter, clean 0.862); with
# prepare's well-wise halves (2026-12-08, 432 test crops): clean 0.944, blur 0.75 px 0.944, down/up 2x
# 0.931 (experiments/RESULTS.md, "MoA classifier on clean crops"); about 4 minutes on a loaded 2-core
# CPU. Each threshold is the target less 3 binomial s.e. at the target and 0.01 for CPU-to-CPU float
# differences: clean >= 0.908, degraded >= 0.788 on 432 crops.
CLEAN_TARGET, DEGRADED_TARGET, CPU_MARGIN = 0.95, 0.85, 0.01
DEMO_SEED = 5


def _threshold(target: float, n: int) -> float:
    """``target`` less ``K_SE`` binomial standard errors at ``target`` on ``n`` trials and CPU_MARGIN."""
    return target - K_SE * math.sqrt(target * (1 - target) / n) - CPU_MARGIN


def reward_classifier_images(dataset, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What ``prepare`` (seed ``seed``) trains and tests the reward classifier on.

    Returns:
        ``(train_idx, train_labels, test_idx, test_labels)``: int64 image indices and MoA class
        labels of the first (plate, well)-wise half of the treated in-distribution train images, and
        of the treated in-distribution test images.
    """
    idx, labels, first, _ = classifier_halves(dataset, seed)
    test_idx, test_labels = _treated_in_distribution(dataset, "test")
    return idx[first], labels[first], test_idx, test_labels


def test_demo_size_test_trains_on_prepares_half(tmp_path):
    """The slow test's classifier learns from the very images prepare's reward classifier does (the
    hash prepare stores with it), dealt by whole wells; the image-wise halves it used before differ."""
    dataset = load_dataset(prepare_synthetic(tmp_path / "ds", n_images=300, seed=DEMO_SEED, size=32, n_plates=2,
                                             progress=False))
    train_idx, train_labels, test_idx, test_labels = reward_classifier_images(dataset, DEMO_SEED)
    assert indices_hash(dataset, train_idx) == half_hashes(dataset, DEMO_SEED)[CLASSIFIER_FILE]
    all_idx, all_labels, _, second = classifier_halves(dataset, DEMO_SEED)
    assert not set(dataset.groups[train_idx].tolist()) & set(dataset.groups[all_idx[second]].tolist())
    assert np.array_equal(train_labels, all_labels[np.isin(all_idx, train_idx)])
    assert not set(train_idx.tolist()) & set(test_idx.tolist()) and test_labels.size == test_idx.size
    image_wise = all_idx[disjoint_halves(all_labels, DEMO_SEED)[0]]
    assert indices_hash(dataset, image_wise) != indices_hash(dataset, train_idx)


@pytest.fixture(scope="module")
def demo_size_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo48") / "ds"
    prepare_synthetic(root, n_images=4000, seed=DEMO_SEED, size=48, n_plates=4, progress=False)
    dataset = load_dataset(root)
    train_idx, train_labels, test_idx, test_labels = reward_classifier_images(dataset, DEMO_SEED)
    model, _ = train_moa_classifier(np.asarray(dataset.images[train_idx]), train_labels, epochs=20, seed=DEMO_SEED)
    return robustness_report(model, np.asarray(dataset.images[test_idx]), test_labels), int(test_labels.size)


@pytest.mark.slow
@pytest.mark.parametrize("condition,target", [("clean", CLEAN_TARGET), ("blur 0.75 px", DEGRADED_TARGET),
                                              ("down/up 2x", DEGRADED_TARGET)])
def test_reward_classifier_accuracy_at_demo_size(demo_size_report, condition, target):
    report, n = demo_size_report
    assert n > 400
    assert report[condition] >= _threshold(target, n), (condition, round(_threshold(target, n), 3), report)


@pytest.mark.parametrize("n_train,epochs", [(300, 30), (909, 30), (4578, 9), (9156, 5)])
def test_default_epochs_budget_is_images_not_steps(n_train, epochs):
    """Batch 32 gets the epochs batch 128 had: 4x the optimizer steps for the same images seen."""
    from cellfluxrl.rewards.moa_classifier import DEFAULT_BATCH_SIZE, default_epochs

    assert DEFAULT_BATCH_SIZE == 32
    assert default_epochs(n_train, 32) == default_epochs(n_train, 128) == epochs
