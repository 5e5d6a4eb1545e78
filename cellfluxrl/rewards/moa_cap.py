"""The real images' own MoA probability: the cap of the ``moa_capped`` reward.

The ``moa`` reward (paper Eq. 3) keeps paying as a phenotype grows stronger than any real cell's:
the classifier's probability rises with the strength of the evidence it was trained on (enlarged
nuclei for DNA replication and DNA damage), so RL on it can push nuclei past their real size
(experiments/RESULTS.md, "What RL trades"). ``moa_capped`` pays ``min(p_c(x), q_c)``, where ``q_c``
is the mean probability the *same* classifier gives real images of MoA ``c`` that it never saw:
an image that the classifier finds as typical of its MoA as a real one earns the full reward, and
nothing is paid for being more so.

``q_c`` is measured on the judge's half of the treated in-distribution train images
(:func:`cellfluxrl.rewards.evaluators_fit.classifier_halves`, with the seed recorded in
``classifier.json``): train-split images the reward classifier was not fitted on (its own half
would give over-confident caps near 1), and never a test image.
"""

from __future__ import annotations

import logging

import numpy as np

from cellfluxrl.data.compounds import MOAS
from cellfluxrl.errors import CellfluxError

log = logging.getLogger(__name__)


def class_means(proba: np.ndarray, labels: np.ndarray, n_classes: int = len(MOAS)) -> np.ndarray:
    """Per class, the mean probability of the true class: float64 ``(n_classes,)``, NaN where absent.

    Args:
        proba: float ``(N, n_classes)`` class probabilities, rows summing to 1.
        labels: int ``(N,)`` true classes in ``[0, n_classes)``.
    """
    proba, labels = np.asarray(proba, np.float64), np.asarray(labels, np.int64)
    own = proba[np.arange(labels.size), labels]
    sums = np.bincount(labels, weights=own, minlength=n_classes)
    counts = np.bincount(labels, minlength=n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def capped_probability(p: np.ndarray, moa_index: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """``min(p, caps[moa])`` per image, 0 for a control (``moa_index = -1``): float64 ``(B,)`` in [0, 1].

    Args:
        p: float ``(B,)`` the classifier's probability of each image's target MoA.
        moa_index: int ``(B,)`` target MoA index, -1 for DMSO.
        caps: float ``(n_classes,)`` per-MoA caps in [0, 1]; NaN means no cap (1).
    """
    caps = np.nan_to_num(np.asarray(caps, np.float64), nan=1.0)
    moa_index = np.asarray(moa_index, np.int64)
    capped = np.minimum(np.asarray(p, np.float64), caps[np.maximum(moa_index, 0)])
    return np.where(moa_index >= 0, capped, 0.0)


def real_class_probability(evaluators, classifier) -> np.ndarray:
    """``q_c`` for every MoA: float64 ``(12,)`` in [0, 1] (NaN for an MoA the held-out half lacks).

    Args:
        evaluators: the dataset's :class:`~cellfluxrl.rewards.evaluators.Evaluators` (its folder's
            parent is the dataset; ``classifier.json`` gives the halves' seed).
        classifier: the reward's MoA classifier.

    Raises:
        CellfluxError: ``classifier.json`` is missing (the halves' seed is unknown).
    """
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.images import to_model
    from cellfluxrl.rewards.evaluators_fit import classifier_halves

    seed = evaluators.classifier_report.get("seed")
    if seed is None:
        raise CellfluxError(f"{evaluators.root}: classifier.json (with the classifier's seed) is missing; the "
                            f"moa_capped reward needs it to find the real images the classifier never saw; "
                            f"refit with `cellfluxrl rewards fit DATASET`")
    dataset = load_dataset(evaluators.root.parent)
    idx, labels, _, held_out = classifier_halves(dataset, int(seed))
    proba = classifier.predict_proba(to_model(np.asarray(dataset.images[idx[held_out]]), dequantize=False))
    caps = class_means(proba, labels[held_out])
    log.info("moa_capped: per-MoA caps %s", ", ".join(f"{m} {c:.2f}" for m, c in zip(MOAS, caps)))
    return caps
