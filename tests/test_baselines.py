"""Baseline columns (evaluation.baselines): copy-control and train-real on the evaluation's own pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellfluxrl.errors import CellfluxError


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    from cellfluxrl.data.synthetic import prepare_synthetic
    from cellfluxrl.rewards.evaluators_fit import fit_evaluators

    root = tmp_path_factory.mktemp("baselines") / "data"
    prepare_synthetic(root, n_images=300, seed=0, size=48, n_plates=2, progress=False)
    fit_evaluators(root, seed=0, classifier_epochs=2, progress=False)
    return root


def test_parse_baselines_names_and_refusals():
    from cellfluxrl.evaluation.baselines import parse_baselines

    assert parse_baselines("train-real, copy-control") == ("copy-control", "train-real")
    assert parse_baselines("none") == parse_baselines("") == parse_baselines(None) == ()
    with pytest.raises(CellfluxError, match="unknown baseline.*copy-contrl.*choose from copy-control, train-real"):
        parse_baselines("copy-contrl")


def test_copy_control_is_the_control_and_train_real_a_train_image_of_the_compound(dataset_dir):
    """copy-control returns each pair's x_0 exactly; train-real a treated train image of the pair's
    compound, drawn per pair (a subset of the pairs gets the same images)."""
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.evaluation.baselines import copy_control, train_real, train_real_index
    from cellfluxrl.evaluation.candidates import Pairs
    from cellfluxrl.images import to_model

    dataset = load_dataset(dataset_dir)
    pairs = Pairs.from_dataset(dataset, 12, seed=3)
    pos = np.arange(len(pairs))
    assert torch.equal(copy_control(dataset, pairs)(pos, 0),
                       to_model(np.asarray(dataset.images[pairs.control]), dequantize=False))
    index = train_real_index(dataset, pairs, seed=5)
    table = dataset.table
    assert (table["split"][index] == "train").all() and (table["state"][index] == "treated").all()
    assert np.array_equal(table["compound"][index].astype(str), pairs.compound)
    assert not np.isin(index, pairs.target).any()
    assert np.array_equal(train_real_index(dataset, pairs, seed=5), index)
    sub = Pairs(pairs.target[::2], pairs.control[::2], pairs.condition[::2], pairs.compound[::2], pairs.moa[::2])
    assert np.array_equal(train_real_index(dataset, sub, seed=5), index[::2])
    assert torch.equal(train_real(dataset, pairs, 5)(pos[:3], 0),
                       to_model(np.asarray(dataset.images[index[:3]]), dequantize=False))


def test_held_out_compounds_get_no_train_real_column_and_say_why(dataset_dir):
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.evaluation.baselines import baseline_sources, train_real_index
    from cellfluxrl.evaluation.candidates import Pairs

    dataset = load_dataset(dataset_dir)
    pairs = Pairs.from_dataset(dataset, 6, seed=0, split="ood")
    sources, notes = baseline_sources(("copy-control", "train-real"), dataset, pairs, seed=0)
    assert list(sources) == ["copy-control"]
    assert len(notes) == 1 and notes[0].startswith("no train-real column: ") and "no training images" in notes[0]
    with pytest.raises(CellfluxError, match="no train-real column"):
        train_real_index(dataset, pairs, 0)


def test_report_has_baseline_columns_and_flags_a_run_that_copies_the_control(dataset_dir):
    """A 'run' that returns the control scores exactly as the copy-control column, its paired
    difference against copy-control is 0 and the report says it learned no perturbation; a run
    returning the real targets scores as `real`, and its paired difference is the columns' gap (the
    2-epoch classifiers of this toy dataset are near chance, so no sign is asserted here: see
    test_learned_nothing_flags_rows_at_or_below_zero)."""
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.evaluation.baselines import baseline_sources
    from cellfluxrl.evaluation.candidates import MoAFeatures, Pairs, real_images
    from cellfluxrl.evaluation.report import build_report
    from cellfluxrl.evaluation.report_text import _section_markdown
    from cellfluxrl.evaluation.scoring import evaluate_sources
    from cellfluxrl.rewards import DEFAULT_WEIGHTS, RewardSuite

    dataset = load_dataset(dataset_dir)
    pairs = Pairs.from_dataset(dataset, 16, seed=0)
    suite = RewardSuite.from_dataset(dataset, dict(DEFAULT_WEIGHTS))
    judge = suite.evaluators.judge("cpu")
    references, notes = baseline_sources(("copy-control", "train-real"), dataset, pairs, seed=0)
    assert notes == []
    sources = {"targets": lambda pos, k: real_images(dataset, pairs, pos), "copier": references["copy-control"]}
    results = evaluate_sources(dataset, pairs, sources, suite=suite, weights=dict(DEFAULT_WEIGHTS),
                               features=MoAFeatures(judge), classifier=suite.evaluators.moa_classifier("cpu"),
                               judge=judge, best_of=(1, 2), batch_size=8, kid_subset_size=2, kid_subsets=2,
                               references=references)
    suite.close()
    report = build_report(results, split="id")
    assert report["columns"] == ["targets", "targets+best-of-2", "copier", "copier+best-of-2", "copy-control",
                                 "train-real", "real"]
    for row in ("moa", "overall", "moa_accuracy", "texture_hf"):
        assert report["table"]["copier"][row]["mean"] == pytest.approx(report["table"]["copy-control"][row]["mean"],
                                                                      abs=1e-12)
        assert report["table"]["targets"][row]["mean"] == pytest.approx(report["table"]["real"][row]["mean"],
                                                                       abs=1e-12)
    # 16 pairs < 128 features: no plain pooled FD, the jackknife-corrected one instead
    assert report["table"]["copy-control"]["FD-judge_o"]["mean"] is None
    assert report["table"]["copy-control"]["FD-judge-jk_o"]["mean"] > 0
    versus = report["baselines"]["versus_copy_control"]
    assert versus["copier"]["moa"]["mean"] == 0 and versus["copier"]["moa_accuracy"]["mean"] == 0
    for row in ("moa", "moa_accuracy", "overall"):  # the paired difference is the difference of the columns
        gap = report["table"]["targets"][row]["mean"] - report["table"]["copy-control"][row]["mean"]
        assert versus["targets"][row]["mean"] == pytest.approx(gap, abs=1e-12)
    assert "copier" in report["baselines"]["learned_nothing"]
    assert report["baselines"]["learned_nothing"]["copier"] == ["moa", "moa_accuracy"]
    text = "\n".join(_section_markdown(report))
    assert "copier does not beat copy-control on MoA and MoA accuracy (judge)" in text
    assert "### Against copy-control" in text
    assert report["throughput"]["copy-control"]["images"] == len(pairs)


def test_learned_nothing_flags_rows_at_or_below_zero():
    from cellfluxrl.evaluation.baselines import learned_nothing

    versus = {"rl": {"moa": {"mean": 0.02}, "moa_accuracy": {"mean": 0.05}},
              "flat": {"moa": {"mean": 0.01}, "moa_accuracy": {"mean": 0.0}},
              "worse": {"moa": {"mean": -0.01}, "moa_accuracy": {"mean": -0.1}},
              "unknown": {"moa": {"mean": None}}}
    assert learned_nothing(versus) == {"flat": ["moa_accuracy"], "worse": ["moa", "moa_accuracy"]}
