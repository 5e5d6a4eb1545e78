"""Reference statistics: a segmenter that finds nothing is refused; images without a nucleus are warned about."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from cellfluxrl.data.compounds import MOAS
from cellfluxrl.errors import CellfluxError
from cellfluxrl.rewards.refstats import (STATS, check_reference, degenerate_statistics, empty_columns_warning,
                                         empty_fraction_warning, reference_statistics)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cli import run_main, visible_lines  # noqa: E402

SEGMENTER = {"backend": "classical", "version": 1}
PREPARE = ["prepare", "synthetic", "--n-images", "300", "--size", "32", "--plates", "2"]


class EmptySegmenter:
    """A segmenter that finds nothing (like an offline Cellpose model on foreign crops)."""

    settings = {"backend": "empty-test"}

    def segment(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels = np.zeros((x.shape[0], x.shape[2], x.shape[3]), np.int32)
        return labels, labels.copy()


class BlankEvery:
    """The classical segmenter, except that it finds nothing in every ``k``-th image of a batch."""

    def __init__(self, k: int):
        from cellfluxrl.rewards.segmentation.factory import make_segmenter

        self.inner, self.k = make_segmenter("classical"), k
        self.settings = self.inner.settings

    def segment(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        nuclei, cells = self.inner.segment(x)
        nuclei[::self.k] = 0
        cells[::self.k] = 0
        return nuclei, cells


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """300 synthetic 32x32 crops, no evaluators (188 in-distribution train images, >= 4 per MoA)."""
    from cellfluxrl.data.synthetic import prepare_synthetic

    return prepare_synthetic(tmp_path_factory.mktemp("refstats") / "ds", n_images=300, seed=0, size=32, n_plates=2,
                             progress=False)


@pytest.fixture
def fast_classifier(monkeypatch):
    """One epoch per MoA classifier (the CLI has no --epochs)."""
    import cellfluxrl.rewards.moa_classifier as mc

    monkeypatch.setattr(mc, "default_epochs", lambda n, batch_size: 1)


def _toy_moas(zero: dict[str, tuple[str, ...]] | None = None, constant: dict[str, str] | None = None) -> dict:
    """``reference_statistics`` of 10 random images per label; ``zero``: MoA -> stats set to 0 on all
    its images; ``constant``: MoA -> a stat set to 3.0 on all its images (std 0, mean 3)."""
    labels = np.repeat(["DMSO", *MOAS], 10)
    rng = np.random.default_rng(0)
    stats = {k: rng.uniform(1, 5, labels.size) for k in STATS}
    for moa, keys in (zero or {}).items():
        for k in keys:
            stats[k][labels == moa] = 0.0
    for moa, k in (constant or {}).items():
        stats[k][labels == moa] = 3.0
    return reference_statistics(stats, labels)


def test_check_reference_names_the_moa_the_statistic_and_the_segmenter():
    check_reference(_toy_moas(constant={"DNA damage": "nuc_count"}), SEGMENTER, "ds")  # std 0, mean 3: usable
    moas = _toy_moas(zero={"Eg5 inhibitors": STATS})
    assert degenerate_statistics(moas) == [("Eg5 inhibitors", "nuc_count")]  # the cause, not nuc_size
    with pytest.raises(CellfluxError) as err:
        check_reference(moas, SEGMENTER, "ds")
    message = str(err.value)
    assert "\n" not in message and message.startswith("ds: degenerate reference statistics: nuc_count is 0 on all 10")
    assert "'Eg5 inhibitors'" in message and "the classical segmenter found no nucleus" in message
    assert "more MoA" not in message
    with pytest.raises(CellfluxError, match=r"cyto_count is 0 .* of MoA 'DMSO' \(and 1 more MoA\(s\)\).* found no cell"):
        check_reference(_toy_moas(zero={"DMSO": ("cyto_count", "cyto_size", "nuc_in_cyto"),
                                        "Kinase inhibitors": ("cyto_count", "cyto_size", "nuc_in_cyto")}),
                        SEGMENTER, "ds")
    broken = _toy_moas()
    broken["DMSO"]["std"]["roundness"] = float("nan")
    with pytest.raises(CellfluxError, match="roundness of MoA 'DMSO' has mean .* and std nan"):
        check_reference(broken, SEGMENTER, "ds")


def test_empty_fraction_warning_names_the_worst_group():
    groups = np.repeat(["a", "b", "c"], 100)
    counts = np.ones(300)
    assert empty_fraction_warning(counts, groups, what="images of", segmenter="S") is None
    counts[:5] = 0  # exactly 5 % of 'a': tolerated
    assert empty_fraction_warning(counts, groups, what="images of", segmenter="S") is None
    counts[100:120] = 0  # 20 % of 'b'
    counts[200:210] = 0  # 10 % of 'c'
    line = empty_fraction_warning(counts, groups, what="train images of MoA", segmenter="the X segmenter")
    assert line.startswith("the X segmenter found no nucleus in 20.0% of the 100 train images of MoA 'b', "
                           "and more than 5% in 1 other(s); 11.7% of all 300 (warning above 5%)")
    assert "\n" not in line
    assert empty_fraction_warning(counts, groups, what="x", segmenter="S", threshold=0.25) is None
    with pytest.raises(ValueError):
        empty_fraction_warning(counts, groups[:10], what="x", segmenter="S")
    column = empty_columns_warning({"real": np.ones((8, 1)), "run": np.array([[0, 1], [1, 1], [1, 1]])}, SEGMENTER)
    assert column.startswith("the classical segmenter found no nucleus in 16.7% of the 6 images of column 'run'")
    assert empty_columns_warning({"real": np.full((4, 1), np.nan)}, SEGMENTER) is None  # not scored: not empty


def test_fit_reference_refuses_a_segmenter_that_finds_nothing(small, monkeypatch):
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.rewards import evaluators_fit as evaluators

    (small / "evaluators" / "reference_stats.json").unlink(missing_ok=True)
    monkeypatch.setattr(evaluators, "build_segmenter", lambda name, options=None: EmptySegmenter())
    with pytest.raises(CellfluxError) as err:
        evaluators.fit_reference(load_dataset(small))
    message = str(err.value)
    assert "nuc_count is 0 on all" in message and "of MoA 'DMSO' (and 12 more MoA(s))" in message
    assert "the empty-test segmenter found no nucleus" in message and "--segmenter" in message
    assert not (small / "evaluators" / "reference_stats.json").exists()


def test_fit_reference_warns_when_images_have_no_nucleus(small, monkeypatch, caplog):
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.rewards import evaluators_fit as evaluators

    dataset = load_dataset(small)
    with caplog.at_level(logging.WARNING, logger="cellfluxrl.rewards.evaluators"):
        evaluators.fit_reference(dataset)
    assert not [r for r in caplog.records if "no nucleus" in r.getMessage()]  # classical finds every nucleus
    monkeypatch.setattr(evaluators, "build_segmenter", lambda name, options=None: BlankEvery(5))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cellfluxrl.rewards.evaluators"):
        reference = evaluators.fit_reference(dataset)
    warnings = [r.getMessage() for r in caplog.records if "no nucleus" in r.getMessage()]
    assert len(warnings) == 1 and "the classical segmenter found no nucleus in" in warnings[0], warnings
    overall = re.search(r"([\d.]+)% of all ([\d,]+)", warnings[0])
    n_train = dataset.select(split="train", include_ood=False).size  # controls + in-distribution treated
    assert "train images of MoA" in warnings[0] and int(overall[2].replace(",", "")) == n_train
    assert 19.0 <= float(overall[1]) <= 21.0  # every 5th image of each batch left blank
    assert reference["moas"]["DMSO"]["mean"]["nuc_count"] > 0  # still written: a warning, not an error


def test_loading_a_degenerate_reference_is_refused(tmp_path):
    from cellfluxrl.rewards.evaluators import REFERENCE_FORMAT, load_evaluators

    (tmp_path / "evaluators").mkdir()
    reference = {"format": REFERENCE_FORMAT, "segmenter": {"name": "cellpose", "options": {},
                                                         "settings": {"backend": "cellpose", "nuclei_model": "nuclei"}},
                 "moas": _toy_moas(zero={"DMSO": STATS})}
    (tmp_path / "evaluators" / "reference_stats.json").write_text(json.dumps(reference))
    with pytest.raises(CellfluxError, match=r"reference_stats.json: .* 'DMSO' .* the cellpose segmenter \(nuclei "
                                            r"model nuclei\) found no nucleus"):
        load_evaluators(tmp_path)


def test_prepare_refuses_then_resumes_with_a_working_segmenter(tmp_path, capsys, monkeypatch, fast_classifier):
    """The CLI: one line naming MoA, statistic and segmenter, exit 1, no reference; the same command
    with a segmenter that works resumes the folder (images kept) and fits the evaluators."""
    from cellfluxrl.rewards import evaluators_fit as evaluators

    out = str(tmp_path / "ds")
    with monkeypatch.context() as patch:
        patch.setattr(evaluators, "build_segmenter", lambda name, options=None: EmptySegmenter())
        code, _, err = run_main(capsys, *PREPARE[:2], out, *PREPARE[2:])
    errors = [line for line in visible_lines(err) if not line.startswith("synthetic: 100%")]  # the images' bar stays
    assert code == 1 and len(errors) == 1 and errors[0].startswith("error: ") and "Traceback" not in err, err
    assert "'DMSO'" in errors[0] and "nuc_count" in errors[0] and "empty-test segmenter found no nucleus" in errors[0]
    assert (tmp_path / "ds" / "meta.json").is_file() and not (tmp_path / "ds" / "evaluators" / "reference_stats.json").exists()
    images = (tmp_path / "ds" / "images.npy").stat().st_mtime_ns
    code, out_text, err = run_main(capsys, *PREPARE[:2], out, *PREPARE[2:])
    assert code == 0, err
    assert "resuming" in err and "reference_stats.json" in err and "reference stats: 13 MoAs" in out_text
    assert (tmp_path / "ds" / "images.npy").stat().st_mtime_ns == images


def test_rewards_fit_refuses_a_segmenter_that_finds_nothing(small, capsys, monkeypatch):
    from cellfluxrl.rewards import evaluators_fit as evaluators

    monkeypatch.setattr(evaluators, "build_segmenter", lambda name, options=None: EmptySegmenter())
    code, _, err = run_main(capsys, "rewards", "fit", str(small))
    lines = visible_lines(err)
    assert code == 1 and len(lines) == 1 and "nuc_count is 0 on all" in lines[0] and "'DMSO'" in lines[0], err


def test_evaluate_warns_about_a_column_without_nuclei(small, caplog):
    """A run whose images hold no nucleus is named, with its fraction; the real column is not."""
    import torch

    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.evaluation.candidates import MoAFeatures, Pairs, real_images
    from cellfluxrl.evaluation.scoring import evaluate_sources
    from cellfluxrl.rewards import DEFAULT_WEIGHTS, RewardSuite
    from cellfluxrl.rewards.evaluators_fit import fit_evaluators

    fit_evaluators(small, seed=0, classifier_epochs=1, progress=False)
    dataset = load_dataset(small)
    pairs = Pairs.from_dataset(dataset, 8, seed=0)
    suite = RewardSuite.from_dataset(dataset, dict(DEFAULT_WEIGHTS))
    judge = suite.evaluators.judge("cpu")

    def blank(pos, k):
        return -torch.ones_like(real_images(dataset, pairs, pos))

    with caplog.at_level(logging.WARNING, logger="cellfluxrl.evaluation.scoring"):
        evaluate_sources(dataset, pairs, {"blank": blank, "copy": lambda pos, k: real_images(dataset, pairs, pos)},
                         suite=suite, weights=dict(DEFAULT_WEIGHTS), features=MoAFeatures(judge),
                         classifier=suite.evaluators.moa_classifier("cpu"), judge=judge, batch_size=4,
                         kid_subset_size=4, kid_subsets=2)
    suite.close()
    warnings = [r.getMessage() for r in caplog.records if "no nucleus" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("evaluate: the classical segmenter found no nucleus in 100.0% of the 8 images of "
                                  "column 'blank'") and "other(s)" not in warnings[0]
