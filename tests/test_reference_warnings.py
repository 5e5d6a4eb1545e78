"""The pooled-reference warning (issue 29 item 12): said once, naming only the MoAs the dataset has, and
only when such an MoA lacks train images (where the pooled statistics change a score)."""

from __future__ import annotations

import csv
import json
import logging

from cellfluxrl.rewards.evaluators import REFERENCE_FORMAT, load_evaluators
from cellfluxrl.rewards.refstats import POOLED, STATS

LOGGER = "cellfluxrl.rewards.evaluators"


def _entry(value: float) -> dict:
    return {"n": 10, "mean": {s: value for s in STATS}, "std": {s: 1.0 for s in STATS}}


def _write(root, reference_moas, condition_moas) -> None:
    """A dataset folder with only what load_evaluators reads: conditions.csv and reference_stats.json."""
    (root / "evaluators").mkdir(parents=True)
    reference = {"format": REFERENCE_FORMAT, "segmenter": {"name": "classical", "options": {},
                                                         "settings": {"backend": "classical"}},
                 "moas": {m: _entry(2.0 + i) for i, m in enumerate((*reference_moas, POOLED))}}
    (root / "evaluators" / "reference_stats.json").write_text(json.dumps(reference))
    with open(root / "conditions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("index", "compound", "moa", "smiles", "ood", "embedding"))
        writer.writerows((i, f"c{i}", m, "", 0, "user") for i, m in enumerate(condition_moas))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def test_warned_once_for_the_dataset_moas_without_train_images(tmp_path, caplog):
    _write(tmp_path, ("DMSO", "DNA damage"), ("DMSO", "DNA damage", "Eg5 inhibitors"))
    caplog.set_level(logging.WARNING, logger=LOGGER)
    for _ in range(3):  # sample, posttrain and evaluate each load the evaluators and read every statistic
        evaluators = load_evaluators(tmp_path)
        for stat in STATS:
            mu, _ = evaluators.reference_arrays(stat)
    assert evaluators.dataset_moas == {"DMSO", "DNA damage", "Eg5 inhibitors"}
    assert evaluators.pooled_moas() == ["Eg5 inhibitors"]
    assert _warnings(caplog) == [f"{tmp_path / 'evaluators' / 'reference_stats.json'}: no in-distribution train "
                                 f"images of MoA 'Eg5 inhibitors', which the dataset has (in held-out compounds or "
                                 f"test images only); its morphology rewards use the pooled treated statistics"]
    assert mu[0] == 2.0 and mu[1 + 3] == 3.0  # DMSO; DNA damage (index 3) keeps its own reference


def test_no_warning_for_moas_the_dataset_does_not_have(tmp_path, caplog):
    _write(tmp_path, ("DMSO", "DNA damage"), ("DMSO", "DNA damage"))
    caplog.set_level(logging.WARNING, logger=LOGGER)
    evaluators = load_evaluators(tmp_path)
    mu, _ = evaluators.reference_arrays("nuc_size")
    assert _warnings(caplog) == [] and evaluators.pooled_moas() == []
    assert mu[1] == 4.0  # an MoA absent everywhere still gets the pooled numbers (never used)
