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
from cellfluxrl.data.layout import follow_umask
from cellfluxrl.errors import CellfluxError
from cellfluxrl.rewards.evaluators_resume import stored_classifier_report, stored_reference
from cellfluxrl.rewards.refstats import (POOLED, STATS, check_reference,  # noqa: F401 (re-exported)
                                         empty_fraction_warning, measure_images, moa_labels, reference_statistics,
                                         segmenter_label)

REFERENCE_FILE = "reference_stats.json"
CLASSIFIER_FILE = "moa_classifier.pt"
CLASSIFIER_REPORT = "classifier.json"
JUDGE_FILE = "judge.pt"
JUDGE_WIDTHS = (32, 64, 128)  # another architecture than the reward classifier's (24, 48, 96)
JUDGE_SEED_OFFSET = 1000  # the judge's seed is the dataset seed + this
REFERENCE_FORMAT = "cellfluxrl-reference-stats/1"
FIT_HINT = "run `cellfluxrl prepare ...` (which fits them) or `cellfluxrl rewards fit DATASET`"

logger = logging.getLogger(__name__)


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
    """``cellfluxrl.rewards.segmentation.base.make_segmenter(name, **options)``."""
    from cellfluxrl.rewards.segmentation.base import make_segmenter

    return make_segmenter(name, **(options or {}))


@dataclass
class Evaluators:
    """The evaluators of one dataset, loaded by :func:`load_evaluators`.

    Attributes:
        root: the ``DATASET/evaluators`` folder.
        reference: the parsed reference_stats.json.
        classifier_path: path of moa_classifier.pt (loaded lazily by :meth:`moa_classifier`).
        classifier_report: the parsed classifier.json (``{}`` when absent).
    """

    root: Path
    reference: dict
    classifier_path: Path
    classifier_report: dict = field(default_factory=dict)
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
        if _jsonable(settings) != stored:
            raise CellfluxError(f"{self.root / REFERENCE_FILE}: reference statistics were measured with segmenter "
                                f"{json.dumps(stored, sort_keys=True)} but the current one is "
                                f"{json.dumps(_jsonable(settings), sort_keys=True)}; use the same segmenter or "
                                f"refit with `cellfluxrl rewards fit DATASET --segmenter ...`")

    def reference_arrays(self, stat: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-MoA mean and std of one statistic, float64 ``(13,)`` each, row = moa_index + 1.

        An MoA absent from the train split gets the pooled treated reference (logged once).
        """
        if stat not in STATS:
            raise CellfluxError(f"unknown statistic {stat!r}; expected one of {', '.join(STATS)}")
        mu, sigma = np.zeros(len(MOAS) + 1), np.zeros(len(MOAS) + 1)
        for row, name in enumerate(moa_labels()):
            entry = self.reference["moas"].get(name)
            if entry is None:
                entry = self.reference["moas"].get(POOLED)
                if entry is None:
                    raise CellfluxError(f"{self.root / REFERENCE_FILE}: no reference statistics for {name!r}")
                logger.warning("no train images of %r in the reference; using the pooled treated statistics", name)
            mu[row], sigma[row] = entry["mean"][stat], entry["std"][stat]
        return mu, sigma

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


def _jsonable(value: Any) -> Any:
    """Round-trip through JSON so stored and fresh settings compare equal (tuples -> lists)."""
    return json.loads(json.dumps(value))


def _write_json(path: Path, payload: dict) -> None:
    """Write JSON atomically (temp file + os.replace)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(payload, indent=2) + "\n")
    follow_umask(tmp)  # mkstemp files are private whatever the umask
    os.replace(tmp, path)


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
    return Evaluators(root, reference, root / CLASSIFIER_FILE, report)


def _treated_in_distribution(dataset, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices and MoA class labels of the treated, in-distribution images of a split."""
    idx = dataset.select(split=split, state="treated", include_ood=False)
    return idx, moa_index(dataset.table["moa"][idx])


def fit_reference(dataset, segmenter: str = "classical", cellpose_model: str | None = None,
                  progress: bool = False) -> dict:
    """Measure the train split and write ``evaluators/reference_stats.json``; returns its content.

    Args:
        dataset: a loaded :class:`~cellfluxrl.data.layout.Dataset`.
        segmenter: segmentation backend (``"classical"`` or ``"cellpose"``).
        cellpose_model: Cellpose model name or local path (``segmenter="cellpose"``).
        progress: draw a tqdm bar.

    Raises:
        CellfluxError: an empty train split, or a degenerate reference (a statistic 0 on every image
            of an MoA: the segmenter found nothing; :func:`cellfluxrl.rewards.refstats.check_reference`),
            which is then not written. More than 5 % of an MoA's images without a nucleus is a warning.
    """
    options = segmenter_options(segmenter, cellpose_model)
    seg = build_segmenter(segmenter, options)
    idx = dataset.select(split="train", include_ood=False)  # controls + in-distribution treated
    if idx.size == 0:
        raise CellfluxError(f"{dataset.root}: the train split is empty; cannot fit reference statistics")
    start = time.perf_counter()
    stats = measure_images(dataset.images[idx], seg, progress=progress, desc="reference statistics")
    reference = {"format": REFERENCE_FORMAT, "split": "train", "n_images": int(idx.size),
                 "excluded": "OOD compounds", "stats": list(STATS),
                 "segmenter": {"name": segmenter, "options": options, "settings": _jsonable(seg.settings)},
                 "seconds": round(time.perf_counter() - start, 2),
                 "moas": reference_statistics(stats, dataset.table["moa"][idx])}
    check_reference(reference["moas"], seg.settings, str(dataset.root))
    warning = empty_fraction_warning(stats["nuc_count"], dataset.table["moa"][idx], what="train images of MoA",
                                     segmenter=segmenter_label(seg.settings))
    if warning:
        logger.warning("%s: %s", dataset.root, warning)
    dataset.evaluators_dir.mkdir(exist_ok=True)
    _write_json(dataset.evaluators_dir / REFERENCE_FILE, reference)
    return reference


def disjoint_halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``0..N-1`` into two disjoint halves, stratified by label.

    Within each class the positions are shuffled (seeded) and dealt alternately, so both halves
    hold every class in (almost) equal numbers.

    Args:
        labels: int ``(N,)`` class labels.
        seed: seed of the shuffle.

    Returns:
        ``(first, second)``: sorted int64 position arrays, disjoint, together ``0..N-1``.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng([int(seed), 0x7A1F])
    first = np.zeros(labels.size, dtype=bool)
    for c in np.unique(labels):
        first[rng.permutation(np.flatnonzero(labels == c))[0::2]] = True
    return np.flatnonzero(first), np.flatnonzero(~first)


def _fit_one(dataset, train_idx: np.ndarray, train_labels: np.ndarray, test_idx: np.ndarray,
             test_labels: np.ndarray, *, seed: int, epochs: int | None, widths, device: str, progress: bool,
             path: Path) -> dict:
    """Train one MoA classifier, test it (clean and degraded), save it; returns its report."""
    from cellfluxrl.rewards.moa_classifier import (DEFAULT_WIDTHS, accuracy_report, robustness_report,
                                                   save_moa_classifier, train_moa_classifier)

    model, info = train_moa_classifier(np.asarray(dataset.images[train_idx]), train_labels, epochs=epochs,
                                       seed=seed, device=device, progress=progress,
                                       widths=tuple(widths or DEFAULT_WIDTHS))
    test_images = np.asarray(dataset.images[test_idx])
    test = accuracy_report(model, test_images, test_labels)
    robustness = robustness_report(model, test_images, test_labels) if test_labels.size else {}
    report = {**info, "widths": list(model.config["widths"]), "n_train": int(train_idx.size),
              "n_classes": int(len(np.unique(train_labels))), "n_test": test["n"], "test_accuracy": test["accuracy"],
              "per_class_test_accuracy": test["per_class"], "robustness": robustness, "classes": list(MOAS)}
    save_moa_classifier(model, path, info=report)
    return report


def fit_classifier(dataset, seed: int = 0, epochs: int | None = None, device: str = "cpu",
                   progress: bool = False, resume: bool = False) -> dict:
    """Train the reward's MoA classifier and the independent judge; write both and ``classifier.json``.

    The treated, in-distribution train images are split into two disjoint halves stratified by
    MoA (:func:`disjoint_halves`): the reward classifier learns from the first (seed ``seed``,
    the default stages), the judge from the second (seed ``seed + 1000``, wider stages), so the
    judge shares neither data, initialisation nor architecture with the network RL optimises.
    Both are tested on the treated in-distribution test images, clean and degraded. With
    ``resume``, a classifier file already fitted with ``seed`` is kept (its stored report reused;
    one fitted with another seed is refused, :mod:`cellfluxrl.rewards.evaluators_resume`).

    Returns:
        The report written to classifier.json: the reward classifier's figures at the top level
        (accuracies, robustness, epochs, seconds, ...) and the judge's under ``"judge"``.
    """
    train_idx, train_labels = _treated_in_distribution(dataset, "train")
    test_idx, test_labels = _treated_in_distribution(dataset, "test")
    first, second = disjoint_halves(train_labels, seed)
    if min(len(np.unique(train_labels[first])), len(np.unique(train_labels[second]))) < 2:
        raise CellfluxError(f"{dataset.root}: too few treated train images to fit two MoA classifiers "
                            f"({train_idx.size} images)")
    dataset.evaluators_dir.mkdir(exist_ok=True)
    from cellfluxrl.rewards.moa_classifier import FORMAT

    reports = []
    for name, half, offset, widths in ((CLASSIFIER_FILE, first, 0, None),
                                       (JUDGE_FILE, second, JUDGE_SEED_OFFSET, JUDGE_WIDTHS)):
        path = dataset.evaluators_dir / name
        kept = stored_classifier_report(path, seed, epochs, FORMAT, offset) if resume else None
        reports.append(kept if kept is not None else _fit_one(
            dataset, train_idx[half], train_labels[half], test_idx, test_labels, seed=seed + offset, widths=widths,
            path=path, epochs=epochs, device=device, progress=progress))
    report = reports[0]
    report["judge"] = reports[1]
    report["halves"] = (f"treated in-distribution train images split by disjoint_halves(seed={seed}): "
                        f"{first.size} for the reward classifier, {second.size} for the judge")
    _write_json(dataset.evaluators_dir / CLASSIFIER_REPORT, report)
    return report


def fit_evaluators(dataset_dir: str | os.PathLike, segmenter: str = "classical", cellpose_model: str | None = None,
                   seed: int = 0, progress: bool = True, classifier_epochs: int | None = None,
                   device: str = "cpu", resume: bool = False) -> dict[str, str]:
    """Fit the reference statistics and the MoA classifier of a dataset; write ``DATASET/evaluators``.

    Args:
        dataset_dir: a dataset folder (see data/README.md).
        segmenter: segmentation backend for the reference statistics (``"classical"`` or ``"cellpose"``).
        cellpose_model: Cellpose model name or local path (``segmenter="cellpose"``).
        seed: seed of the classifier's initialisation, shuffling and augmentation.
        progress: draw tqdm bars (commands only).
        classifier_epochs: passes over the training images (``None``: about 300 optimizer steps,
            see :func:`cellfluxrl.rewards.moa_classifier.default_epochs`).
        device: torch device for the classifier (``"cuda"`` when available is faster).
        resume: keep every evaluator file already fitted with these settings and fit only the
            missing ones (``prepare`` run again; :mod:`cellfluxrl.rewards.evaluators_resume`); False
            refits everything (``rewards fit``).

    Returns:
        A short summary, e.g. ``{"reference stats": "13 MoAs on 9,876 train images (classical)",
        "MoA classifier": "test accuracy 0.950 on 2,345 images (12 classes, 4 epochs, 41 s)"}``.

    Raises:
        CellfluxError: unreadable dataset, no train images, fewer than two MoAs to classify, a
            degenerate reference (the segmenter found nothing in an MoA's images), or (``resume``)
            a file fitted with another segmenter or seed.
    """
    from cellfluxrl.data.layout import load_dataset

    dataset = load_dataset(dataset_dir)
    reference = None
    if resume:
        reference = stored_reference(dataset.evaluators_dir / REFERENCE_FILE, segmenter,
                                     segmenter_options(segmenter, cellpose_model), REFERENCE_FORMAT)
    if reference is None:
        reference = fit_reference(dataset, segmenter, cellpose_model, progress=progress)
    report = fit_classifier(dataset, seed=seed, epochs=classifier_epochs, device=device, progress=progress,
                            resume=resume)
    logger.info("fitted evaluators of %s: %s", dataset.root, report)
    n_moas = len([m for m in reference["moas"] if m != POOLED])
    accuracy = f"{report['test_accuracy']:.3f}" if report["n_test"] else "n/a (no test images)"
    judge = report["judge"]
    judge_accuracy = f"{judge['test_accuracy']:.3f}" if judge["n_test"] else "n/a"
    return {"reference stats": f"{n_moas} MoAs on {reference['n_images']:,} train images ({segmenter})",
            "MoA classifier": f"test accuracy {accuracy} on {report['n_test']:,} images ({report['n_classes']} "
                              f"classes, {report['n_train']:,} train images, {report['epochs']} epochs, "
                              f"{report['seconds']:.0f} s)",
            "judge": f"test accuracy {judge_accuracy} ({judge['n_train']:,} other train images, own seed, "
                     f"{judge['seconds']:.0f} s)"}
