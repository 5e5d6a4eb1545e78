"""Resuming the evaluators of a dataset: which fitted files can be kept, which must be fitted.

``prepare`` run again on a folder it already wrote (same settings) calls
:func:`cellfluxrl.rewards.evaluators_fit.fit_evaluators` with ``resume=True``: every evaluator file that exists
and was fitted with the requested settings is kept, every missing one is fitted. The files are
written atomically (temp file + rename), so one that exists is complete; a kill loses at most the
file being fitted. A file fitted with *other* settings (another segmenter, another seed) is
refused with one line naming the setting: ``cellfluxrl rewards fit`` is the way to replace it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

from cellfluxrl.errors import CellfluxError
from cellfluxrl.rewards.evaluator_files import (CLASSIFIER_FILE, CLASSIFIER_REPORT, JUDGE_FILE, JUDGE_SEED_OFFSET,
                                                REFERENCE_FILE, REFERENCE_FORMAT)
from cellfluxrl.rewards.refstats import check_reference

logger = logging.getLogger(__name__)


def evaluators_to_fit(folder: Path, segmenter: str, options: Mapping[str, Any], seed: int,
                      epochs: int | None = None, halves: Mapping[str, str] | None = None) -> list[str]:
    """The files ``fit_evaluators(..., resume=True)`` would (re)write in ``DATASET/evaluators``.

    Args:
        folder: the ``DATASET/evaluators`` folder (it need not exist).
        segmenter, options: the requested segmenter backend and its options.
        seed, epochs: the requested classifier seed and epochs (``None``: any).
        halves: ``{classifier file: hash of the images it must learn from}``
            (:func:`cellfluxrl.rewards.evaluators_fit.half_hashes`); ``None``: not checked.

    Returns:
        File names, in fitting order: those missing or unreadable, and classifier.json when it is
        missing or a classifier is fitted. Empty: nothing left to do.

    Raises:
        CellfluxError: a file fitted with other settings, or a degenerate stored reference.
    """
    from cellfluxrl.rewards.moa_classifier import FORMAT

    folder = Path(folder)
    todo = [] if stored_reference(folder / REFERENCE_FILE, segmenter, options, REFERENCE_FORMAT) else [REFERENCE_FILE]
    for name, offset in ((CLASSIFIER_FILE, 0), (JUDGE_FILE, JUDGE_SEED_OFFSET)):
        wanted = None if halves is None else halves[name]
        if stored_classifier_report(folder / name, seed, epochs, FORMAT, offset, wanted) is None:
            todo.append(name)
    if set(todo) & {CLASSIFIER_FILE, JUDGE_FILE} or not (folder / CLASSIFIER_REPORT).is_file():
        todo.append(CLASSIFIER_REPORT)
    return todo


def stored_reference(path: Path, segmenter: str, options: Mapping[str, Any], fmt: str) -> dict | None:
    """The reference_stats.json at ``path`` if it was measured with this segmenter, else None to refit.

    Args:
        path: ``DATASET/evaluators/reference_stats.json``.
        segmenter: the requested backend name (``--segmenter``).
        options: its requested options (``{"model": ...}`` for ``--cellpose-model``).
        fmt: the format string a current file carries.

    Returns:
        The parsed reference, or None when the file is absent, unreadable or of another format
        (then it is refitted; an unreadable one is logged).

    Raises:
        CellfluxError: the file was measured with another segmenter or other options (naming both),
            or is degenerate (:func:`cellfluxrl.rewards.refstats.check_reference`).
    """
    if not path.is_file():
        return None
    try:
        reference = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        logger.warning("%s: unreadable (%s); fitting it again", path, exc)
        return None
    if not isinstance(reference, dict) or reference.get("format") != fmt:
        logger.warning("%s: not format %s; fitting it again", path, fmt)
        return None
    stored = reference.get("segmenter", {})
    wanted = {"name": segmenter, "options": json.loads(json.dumps(dict(options)))}
    for key in ("name", "options"):
        if stored.get(key, {} if key == "options" else None) != wanted[key]:
            raise CellfluxError(f"{path}: measured with segmenter {key} {json.dumps(stored.get(key))}, not "
                                f"{json.dumps(wanted[key])}; re-run with the same --segmenter/--cellpose-model to "
                                f"resume, or refit with `cellfluxrl rewards fit DATASET --segmenter {segmenter}`")
    check_reference(reference["moas"], stored["settings"], str(path))
    return reference


def stored_classifier_report(path: Path, seed: int, epochs: int | None, fmt: str,
                             seed_offset: int = 0, train_hash: str | None = None) -> dict | None:
    """The report saved inside a fitted MoA classifier at ``path`` if it used ``seed`` (and, when
    ``train_hash`` is given, learnt from exactly those images), else None to fit it.

    Args:
        path: ``moa_classifier.pt`` or ``judge.pt``.
        seed: the requested ``--seed`` (the dataset's classifier seed).
        epochs: the requested epochs (``None``: any, the default is derived from the data size).
        fmt: the checkpoint format string of :mod:`cellfluxrl.rewards.moa_classifier`.
        seed_offset: added to ``seed`` for this classifier (the judge's own seed is ``seed + 1000``).
        train_hash: the hash of the half it must have learnt from
            (:func:`cellfluxrl.rewards.evaluators_fit.indices_hash`); ``None``: not checked.

    Returns:
        The ``info`` dict of the checkpoint (the classifier's report as written to classifier.json),
        or None when the file is absent, not a loadable classifier, or (``train_hash``) learnt from
        other images or recorded none (fitted before the halves were hashed): then it is refitted,
        so a reward classifier and a judge never sit side by side on overlapping images.

    Raises:
        CellfluxError: it was fitted with another seed or epoch count (naming the setting).
    """
    if not path.is_file():
        return None
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable checkpoint is refitted, never trusted
        logger.warning("%s: unreadable (%s); fitting it again", path, " ".join(str(exc).split())[:120])
        return None
    if not isinstance(payload, dict) or payload.get("format") != fmt or not isinstance(payload.get("info"), dict):
        logger.warning("%s: not a cellfluxrl MoA classifier; fitting it again", path)
        return None
    info = payload["info"]
    stored = {"seed": info["seed"] - seed_offset if "seed" in info else None, "epochs": info.get("epochs")}
    for key, wanted in (("seed", seed), ("epochs", epochs)):
        if wanted is not None and stored[key] is not None and stored[key] != wanted:
            raise CellfluxError(f"{path}: fitted with --{key} {stored[key]}, not {wanted}; re-run with --{key} "
                                f"{stored[key]} to resume, or refit with "
                                f"`cellfluxrl rewards fit DATASET --{key} {wanted}`")
    if train_hash is not None and info.get("train_hash") != train_hash:
        logger.warning("%s: fitted on other images (train_hash %s, this dataset's half is %s); fitting it again",
                       path, info.get("train_hash"), train_hash)
        return None
    return info
