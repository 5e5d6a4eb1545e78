"""Fitting the evaluators of a dataset: reference statistics, the reward classifier and the judge.

``prepare`` calls :func:`fit_evaluators` after writing a dataset (``cellfluxrl rewards fit DATASET``
refits them on an existing one); the files and what they hold are described in
:mod:`cellfluxrl.rewards.evaluators`, which reads them. The two classifiers learn from disjoint
halves of the treated in-distribution train images, dealt by (plate, well) groups
(:func:`classifier_halves`); each stores a hash of its half, so a resumed ``prepare`` never keeps a
classifier trained on other images (:mod:`cellfluxrl.rewards.evaluators_resume`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from cellfluxrl.data.compounds import MOAS
from cellfluxrl.data.splits import disjoint_halves
from cellfluxrl.errors import CellfluxError
from cellfluxrl.rewards.evaluator_files import (CLASSIFIER_FILE, CLASSIFIER_REPORT, JUDGE_FILE, JUDGE_SEED_OFFSET,
                                                JUDGE_WIDTHS, REFERENCE_FILE, REFERENCE_FORMAT, jsonable, write_json)
from cellfluxrl.rewards.evaluators import build_segmenter, moa_index, segmenter_options
from cellfluxrl.rewards.evaluators_resume import stored_classifier_report, stored_reference
from cellfluxrl.rewards.refstats import (POOLED, STATS, check_reference, empty_fraction_warning, measure_images,
                                         reference_statistics, segmenter_label)

logger = logging.getLogger(__name__)


def _treated_in_distribution(dataset, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices and MoA class labels of the treated, in-distribution images of a split."""
    idx = dataset.select(split=split, state="treated", include_ood=False)
    return idx, moa_index(dataset.table["moa"][idx])


def fit_reference(dataset, segmenter: str = "classical", cellpose_model: str | None = None,
                  progress: bool = False, folder: Path | None = None) -> dict:
    """Measure the train split and write ``evaluators/reference_stats.json``; returns its content.

    Args:
        dataset: a loaded :class:`~cellfluxrl.data.layout.Dataset`.
        segmenter: segmentation backend (``"classical"`` or ``"cellpose"``).
        cellpose_model: Cellpose model name or local path (``segmenter="cellpose"``).
        progress: draw a tqdm bar.
        folder: where to write it (default ``dataset.evaluators_dir``; a staging folder for ``rewards fit``).

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
                 "segmenter": {"name": segmenter, "options": options, "settings": jsonable(seg.settings)},
                 "seconds": round(time.perf_counter() - start, 2),
                 "moas": reference_statistics(stats, dataset.table["moa"][idx])}
    check_reference(reference["moas"], seg.settings, str(dataset.root))
    warning = empty_fraction_warning(stats["nuc_count"], dataset.table["moa"][idx], what="train images of MoA",
                                     segmenter=segmenter_label(seg.settings))
    if warning:
        logger.warning("%s: %s", dataset.root, warning)
    folder = dataset.evaluators_dir if folder is None else Path(folder)
    folder.mkdir(exist_ok=True)
    write_json(folder / REFERENCE_FILE, reference)
    return reference


def indices_hash(dataset, idx: np.ndarray) -> str:
    """A fingerprint of which images a classifier learns from: SHA-256 (16 hex digits) of their ids,
    in index order. Stored with the classifier, so resume refits one trained on other images."""
    ids = "\n".join(str(i) for i in dataset.table["id"][np.sort(np.asarray(idx))])
    return hashlib.sha256(ids.encode("utf-8")).hexdigest()[:16]


def classifier_halves(dataset, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The images the reward classifier and the judge learn from.

    The treated, in-distribution train images are dealt into two disjoint halves by whole
    (plate, well) groups, stratified by MoA (:func:`cellfluxrl.data.splits.disjoint_halves`), so no
    well (or, for IMPA, field of view) has crops on both sides.

    Returns:
        ``(idx, labels, first, second)``: int64 image indices and MoA labels of the treated
        in-distribution train images, and the positions (into ``idx``) of the two halves.
    """
    idx, labels = _treated_in_distribution(dataset, "train")
    first, second = disjoint_halves(labels, seed, dataset.groups[idx])
    return idx, labels, first, second


def half_hashes(dataset, seed: int) -> dict[str, str]:
    """``{classifier file: indices_hash of its half}`` for both classifiers (what resume compares)."""
    idx, _, first, second = classifier_halves(dataset, seed)
    return {CLASSIFIER_FILE: indices_hash(dataset, idx[first]), JUDGE_FILE: indices_hash(dataset, idx[second])}


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
              "train_hash": indices_hash(dataset, train_idx),
              "n_classes": int(len(np.unique(train_labels))), "n_test": test["n"], "test_accuracy": test["accuracy"],
              "per_class_test_accuracy": test["per_class"], "robustness": robustness, "classes": list(MOAS)}
    save_moa_classifier(model, path, info=report)
    return report


def fit_classifier(dataset, seed: int = 0, epochs: int | None = None, device: str = "cpu",
                   progress: bool = False, resume: bool = False, folder: Path | None = None) -> dict:
    """Train the reward's MoA classifier and the independent judge; write both and ``classifier.json``.

    The treated, in-distribution train images are split into two disjoint halves by whole
    (plate, well) groups, stratified by MoA (:func:`classifier_halves`): the reward classifier
    learns from the first (seed ``seed``, the default stages), the judge from the second (seed ``seed + 1000``, wider stages), so the
    judge shares neither data, initialisation nor architecture with the network RL optimises.
    Both are tested on the treated in-distribution test images, clean and degraded. With
    ``resume``, a classifier file already fitted with ``seed`` on the same half (its stored
    ``train_hash``, :func:`indices_hash`) is kept (its stored report reused); one fitted on other
    images is refitted; one fitted with another seed is refused
    (:mod:`cellfluxrl.rewards.evaluators_resume`).

    The files go to ``folder`` (default ``dataset.evaluators_dir``).

    Returns:
        The report written to classifier.json: the reward classifier's figures at the top level
        (accuracies, robustness, epochs, seconds, ...) and the judge's under ``"judge"``.
    """
    train_idx, train_labels, first, second = classifier_halves(dataset, seed)
    test_idx, test_labels = _treated_in_distribution(dataset, "test")
    if min(len(np.unique(train_labels[first])), len(np.unique(train_labels[second]))) < 2:
        raise CellfluxError(f"{dataset.root}: too few treated train images to fit two MoA classifiers "
                            f"({train_idx.size} images)")
    folder = dataset.evaluators_dir if folder is None else Path(folder)
    folder.mkdir(exist_ok=True)
    from cellfluxrl.rewards.moa_classifier import FORMAT

    reports = []
    for name, half, offset, widths in ((CLASSIFIER_FILE, first, 0, None),
                                       (JUDGE_FILE, second, JUDGE_SEED_OFFSET, JUDGE_WIDTHS)):
        path = folder / name
        wanted = indices_hash(dataset, train_idx[half])
        kept = stored_classifier_report(path, seed, epochs, FORMAT, offset, wanted) if resume else None
        reports.append(kept if kept is not None else _fit_one(
            dataset, train_idx[half], train_labels[half], test_idx, test_labels, seed=seed + offset, widths=widths,
            path=path, epochs=epochs, device=device, progress=progress))
    report = reports[0]
    report["judge"] = reports[1]
    n_groups = [np.unique(dataset.groups[train_idx[h]]).size for h in (first, second)]
    report["halves"] = (f"treated in-distribution train images dealt by (plate, well) groups, stratified by MoA "
                        f"(disjoint_halves(seed={seed})): {first.size} images in {n_groups[0]} groups for the reward "
                        f"classifier, {second.size} in {n_groups[1]} other groups for the judge")
    write_json(folder / CLASSIFIER_REPORT, report)
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
            missing ones, each written as soon as it is fitted (``prepare`` run again;
            :mod:`cellfluxrl.rewards.evaluators_resume`); False refits everything (``rewards fit``)
            in a staging folder and moves the files into ``DATASET/evaluators`` only once all are
            fitted: a failure or an interrupt leaves the old evaluators untouched.

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
    if resume:
        return _summary(*_fit(dataset, dataset.evaluators_dir, segmenter, cellpose_model, seed, progress,
                              classifier_epochs, device, resume=True), segmenter)
    staging = staging_folder(dataset)
    try:
        reference, report = _fit(dataset, staging, segmenter, cellpose_model, seed, progress, classifier_epochs,
                                 device, resume=False)
        commit(staging, dataset.evaluators_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _summary(reference, report, segmenter)


def staging_folder(dataset) -> Path:
    """A new hidden folder ``DATASET/.evaluators.partial-HOST-PID-XXXX`` to fit into (those of killed runs
    are removed first: :func:`cellfluxrl.data.partials.remove_stale_partials`)."""
    from cellfluxrl.data.partials import partial_prefix, remove_stale_partials

    remove_stale_partials(dataset.evaluators_dir)
    try:
        return Path(tempfile.mkdtemp(prefix=f"{partial_prefix(dataset.evaluators_dir)}{os.getpid()}-",
                                     dir=dataset.root))
    except OSError as exc:
        raise CellfluxError(f"{dataset.root}: cannot write its evaluators ({exc.strerror or exc})") from None


def commit(staging: Path, folder: Path) -> None:
    """Move every file fitted in ``staging`` into ``folder`` (each by an atomic rename), classifier.json last."""
    folder.mkdir(exist_ok=True)
    names = sorted((p.name for p in staging.iterdir() if not p.name.startswith(".")),
                   key=lambda name: name == CLASSIFIER_REPORT)
    for name in names:
        os.replace(staging / name, folder / name)


def _fit(dataset, folder: Path, segmenter: str, cellpose_model: str | None, seed: int, progress: bool,
         classifier_epochs: int | None, device: str, resume: bool) -> tuple[dict, dict]:
    """Fit (or, with ``resume``, keep) the reference and both classifiers into ``folder``; returns
    ``(reference, classifier report)``."""
    reference = None
    if resume:
        reference = stored_reference(folder / REFERENCE_FILE, segmenter, segmenter_options(segmenter, cellpose_model),
                                     REFERENCE_FORMAT)
    if reference is None:
        reference = fit_reference(dataset, segmenter, cellpose_model, progress=progress, folder=folder)
    report = fit_classifier(dataset, seed=seed, epochs=classifier_epochs, device=device, progress=progress,
                            resume=resume, folder=folder)
    logger.info("fitted evaluators of %s: %s", dataset.root, report)
    return reference, report


def _summary(reference: dict, report: dict, segmenter: str) -> dict[str, str]:
    """The short summary :func:`fit_evaluators` returns."""
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
