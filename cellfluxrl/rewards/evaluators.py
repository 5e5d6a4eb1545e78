"""The evaluators stored with a dataset: per-MoA reference statistics and the MoA classifier.

``prepare`` calls :func:`fit_evaluators` after writing a dataset (``cellfluxrl rewards fit DATASET``
refits them on an existing one). Both are fitted on *real* images of the ``train`` split,
in-distribution compounds only (CellFlux's OOD compounds are held out)::

    DATASET/evaluators/
      reference_stats.json   per MoA (the 12 MoAs and DMSO): n, mean and std of the six
                             morphology statistics (cellfluxrl.rewards.morphology.measure) of the segmented
                             train images, plus the segmenter name, options and settings
      moa_classifier.pt      the reward's MoA CNN: {"format", "state_dict", "config", "info"} (weights_only)
      judge.pt               the judge: an MoA CNN fitted independently (its own seed, wider stages,
                             and the other half of the treated train images); it grades MoA
                             accuracy and gives the FD/KD features, so RL is never graded by the
                             network it was rewarded by
      classifier.json        the reward classifier's train/test accuracy, per-class test accuracy,
                             robustness to degradations, epochs, seconds; the same under "judge"

The rewards compare a generated image's statistic with the reference of its MoA (Eqs. 5-6), so
the reference must be measured with the same segmenter and settings; :class:`Evaluators` records
them and :meth:`Evaluators.check_segmenter` refuses a different one. A reference in which the
segmenter found nothing for some MoA is refused (:mod:`cellfluxrl.rewards.refstats`). Every file is written
atomically; ``prepare`` run again keeps those fitted with its settings (:mod:`cellfluxrl.rewards.evaluators_resume`).

This module *reads* the evaluators (:func:`load_evaluators`, :class:`Evaluators`); fitting them is
:mod:`cellfluxrl.rewards.evaluators_fit`; the file names and formats both use are owned by
:mod:`cellfluxrl.rewards.evaluator_files`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellfluxrl.data.compounds import CONTROL, MOAS
from cellfluxrl.errors import CellfluxError
from cellfluxrl.rewards.evaluator_files import (CLASSIFIER_FILE, CLASSIFIER_REPORT,  # noqa: F401 (re-exported)
                                                FIT_HINT, JUDGE_FILE, JUDGE_SEED_OFFSET, JUDGE_WIDTHS, REFERENCE_FILE,
                                                REFERENCE_FORMAT, jsonable)
from cellfluxrl.rewards.refstats import (POOLED, STATS, check_reference,  # noqa: F401 (re-exported)
                                         measure_images, moa_labels, reference_statistics)

logger = logging.getLogger(__name__)
_WARNED_POOLED: set[tuple[str, tuple[str, ...]]] = set()  # (reference folder, MoAs) already warned about


def moa_index(moa) -> np.ndarray:
    """MoA names -> int64 index in :data:`MOAS` (-1 for DMSO); CellfluxError on an unknown name."""
    lookup = {name: i for i, name in enumerate(MOAS)}
    lookup[CONTROL] = -1
    names = [str(name) for name in np.asarray(moa).astype(str).reshape(-1)]
    out = np.empty(len(names), dtype=np.int64)
    for i, name in enumerate(names):
        if name not in lookup:
            raise CellfluxError(f"unknown MoA {name!r} (image {i}); expected DMSO or one of: {', '.join(MOAS)}")
        out[i] = lookup[name]
    return out


def segmenter_options(name: str, cellpose_model: str | None = None) -> dict[str, Any]:
    """The ``make_segmenter`` options of a backend chosen on the command line."""
    if name == "cellpose" and cellpose_model is not None:
        return {"model": cellpose_model}
    return {}


def build_segmenter(name: str, options: dict[str, Any] | None = None):
    """``cellfluxrl.rewards.segmentation.factory.make_segmenter(name, **options)``."""
    from cellfluxrl.rewards.segmentation.factory import make_segmenter

    return make_segmenter(name, **(options or {}))


@dataclass
class Evaluators:
    """The evaluators of one dataset, loaded by :func:`load_evaluators`.

    Attributes:
        root: the ``DATASET/evaluators`` folder.
        reference: the parsed reference_stats.json.
        classifier_path: path of moa_classifier.pt (loaded lazily by :meth:`moa_classifier`).
        classifier_report: the parsed classifier.json (``{}`` when absent).
        dataset_moas: the MoAs of the dataset's conditions (``conditions.csv``), the only ones any
            image is scored under; ``None`` when unknown (then all 12 count).
    """

    root: Path
    reference: dict
    classifier_path: Path
    classifier_report: dict = field(default_factory=dict)
    dataset_moas: frozenset[str] | None = None
    _classifiers: dict = field(default_factory=dict, repr=False)

    @property
    def judge_path(self) -> Path:
        return self.root / JUDGE_FILE

    @property
    def segmenter_name(self) -> str:
        return self.reference["segmenter"]["name"]

    @property
    def segmenter_settings(self) -> dict:
        return self.reference["segmenter"]["settings"]

    def make_segmenter(self, name: str | None = None, cellpose_model: str | None = None):
        """Build the segmenter the reference was measured with, or check that a given one matches.

        Args:
            name: ``None`` (rebuild the stored one) or a backend name to use instead.
            cellpose_model: Cellpose model name or path, with ``name="cellpose"``.

        Raises:
            CellfluxError: the resulting settings differ from the stored ones (naming both).
        """
        stored = self.reference["segmenter"]
        if name is None:
            segmenter = build_segmenter(stored["name"], stored.get("options", {}))
        else:
            segmenter = build_segmenter(name, segmenter_options(name, cellpose_model))
        self.check_segmenter(segmenter.settings)
        return segmenter

    def check_segmenter(self, settings: dict) -> None:
        """CellfluxError unless ``settings`` equal the stored segmenter settings."""
        stored = self.segmenter_settings
        if jsonable(settings) != stored:
            raise CellfluxError(f"{self.root / REFERENCE_FILE}: reference statistics were measured with segmenter "
                                f"{json.dumps(stored, sort_keys=True)} but the current one is "
                                f"{json.dumps(jsonable(settings), sort_keys=True)}; use the same segmenter or "
                                f"refit with `cellfluxrl rewards fit DATASET --segmenter ...`")

    def reference_arrays(self, stat: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-MoA mean and std of one statistic, float64 ``(13,)`` each, row = moa_index + 1.

        An MoA absent from the train split gets the pooled treated reference. That changes a score
        only for an MoA the dataset has (:attr:`dataset_moas`), so only those are named, in one
        warning per process and reference file (:meth:`pooled_moas`).
        """
        if stat not in STATS:
            raise CellfluxError(f"unknown statistic {stat!r}; expected one of {', '.join(STATS)}")
        mu, sigma = np.zeros(len(MOAS) + 1), np.zeros(len(MOAS) + 1)
        for row, name in enumerate(moa_labels()):
            entry = self.reference["moas"].get(name, self.reference["moas"].get(POOLED))
            if entry is None:
                raise CellfluxError(f"{self.root / REFERENCE_FILE}: no reference statistics for {name!r}")
            mu[row], sigma[row] = entry["mean"][stat], entry["std"][stat]
        self._warn_pooled()
        return mu, sigma

    def pooled_moas(self) -> list[str]:
        """The MoAs scored against the pooled treated reference: in the dataset (all 12 when
        :attr:`dataset_moas` is unknown) but without train images in the reference, in MoA order."""
        present = [m for m in MOAS if self.dataset_moas is None or m in self.dataset_moas]
        return [m for m in present if m not in self.reference["moas"]]

    def _warn_pooled(self) -> None:
        """Log :meth:`pooled_moas` once per process and reference file (nothing when empty)."""
        pooled = self.pooled_moas()
        key = (str(self.root.resolve()), tuple(pooled))
        if not pooled or key in _WARNED_POOLED:
            return
        _WARNED_POOLED.add(key)
        names = ", ".join(repr(m) for m in pooled)
        logger.warning("%s: no in-distribution train images of MoA %s, which the dataset has (in held-out "
                       "compounds or test images only); its morphology rewards use the pooled treated statistics",
                       self.root / REFERENCE_FILE, names)

    def moa_classifier(self, device: str = "cpu"):
        """The MoA classifier on ``device`` (loaded once per device, eval mode)."""
        if device not in self._classifiers:
            from cellfluxrl.rewards.moa_classifier import load_moa_classifier

            if not self.classifier_path.is_file():
                raise CellfluxError(f"{self.classifier_path}: MoA classifier missing; {FIT_HINT}")
            self._classifiers[device] = load_moa_classifier(self.classifier_path, device)
        return self._classifiers[device]

    def judge(self, device: str = "cpu"):
        """The independent judge classifier on ``device`` (loaded once per device, eval mode)."""
        key = ("judge", device)
        if key not in self._classifiers:
            from cellfluxrl.rewards.moa_classifier import load_moa_classifier

            if not self.judge_path.is_file():
                raise CellfluxError(f"{self.judge_path}: judge classifier missing (evaluators fitted by an older "
                                    f"version); refit with `cellfluxrl rewards fit DATASET`")
            self._classifiers[key] = load_moa_classifier(self.judge_path, device)
        return self._classifiers[key]


def load_evaluators(dataset_dir: str | os.PathLike) -> Evaluators:
    """Open ``DATASET/evaluators`` (the classifier itself is loaded on first use).

    Raises:
        CellfluxError: the folder or reference_stats.json is missing or unreadable (saying how to
            fit them).
    """
    root = Path(dataset_dir) / "evaluators"
    path = root / REFERENCE_FILE
    if not path.is_file():
        raise CellfluxError(f"{path}: missing (the dataset has no fitted evaluators); {FIT_HINT}")
    try:
        reference = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CellfluxError(f"{path}: not valid JSON ({exc}); {FIT_HINT}") from None
    if reference.get("format") != REFERENCE_FORMAT:
        raise CellfluxError(f"{path}: format {reference.get('format')!r}, expected {REFERENCE_FORMAT!r}; {FIT_HINT}")
    check_reference(reference["moas"], reference["segmenter"]["settings"], str(path))
    report_path = root / CLASSIFIER_REPORT
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    return Evaluators(root, reference, root / CLASSIFIER_FILE, report, dataset_moas(Path(dataset_dir)))


def dataset_moas(dataset_dir: Path) -> frozenset[str] | None:
    """The MoAs in a dataset's ``conditions.csv`` (its treated compounds), or None when it cannot be read."""
    import csv

    try:
        with open(dataset_dir / "conditions.csv", newline="", encoding="utf-8") as f:
            return frozenset(row["moa"] for row in csv.DictReader(f))
    except (OSError, KeyError, UnicodeDecodeError, csv.Error):
        return None
