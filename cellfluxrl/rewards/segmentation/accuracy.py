"""Object-level accuracy of predicted labels against ground truth (IoU matching, AP50)."""

from __future__ import annotations

import numpy as np

from cellfluxrl.errors import CellfluxError


def _match_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU matrix float64 ``(n_gt, n_pred)`` of one pair of contiguous label images."""
    n_p, n_g = int(pred.max()), int(gt.max())
    if n_p == 0 or n_g == 0:
        return np.zeros((n_g, n_p))
    overlap = np.bincount(gt.ravel().astype(np.int64) * (n_p + 1) + pred.ravel(), minlength=(n_g + 1) * (n_p + 1))
    overlap = overlap.reshape(n_g + 1, n_p + 1).astype(np.float64)
    area_g = overlap.sum(axis=1)[1:, None]
    area_p = overlap.sum(axis=0)[None, 1:]
    inter = overlap[1:, 1:]
    return inter / np.maximum(area_g + area_p - inter, 1.0)


def segmentation_accuracy(pred: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5) -> dict[str, float]:
    """Object-level accuracy of predicted labels against ground truth.

    Matching is one-to-one by optimal assignment on IoU (Hungarian; at IoU > 0.5 it equals the
    greedy matching). ``ap50`` follows Cellpose / Stringer et al.: per image
    ``TP / (TP + FP + FN)`` at the IoU threshold, **averaged over images** (an image with no object
    in either counts as 1).

    Args:
        pred: integer ``(B, H, W)`` predicted labels (relabelled contiguously if needed).
        gt: integer ``(B, H, W)`` ground-truth labels.
        iou_threshold: a match needs IoU >= this.

    Returns:
        ``count_error`` (mean |#pred - #gt| per image), ``matched_iou`` (mean IoU of the matched
        pairs, pooled over images; 0 if none), ``ap50`` (mean per-image TP/(TP+FP+FN)),
        ``precision`` and ``recall`` (pooled), ``n_gt`` and ``n_pred`` (totals).
    """
    from scipy.optimize import linear_sum_assignment
    from skimage.segmentation import relabel_sequential

    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise CellfluxError(f"segmentation_accuracy: pred {pred.shape} and gt {gt.shape} must both be (B, H, W)")
    count_err, ious, aps = [], [], []
    tp_all = fp_all = fn_all = 0
    for p, g in zip(pred, gt):
        p = relabel_sequential(p.astype(np.int64))[0]
        g = relabel_sequential(g.astype(np.int64))[0]
        iou = _match_iou(p, g)
        n_g, n_p = iou.shape
        tp = 0
        if n_g and n_p:
            rows, cols = linear_sum_assignment(-iou)
            good = iou[rows, cols] >= iou_threshold
            tp = int(good.sum())
            ious.extend(iou[rows, cols][good].tolist())
        fp, fn = n_p - tp, n_g - tp
        aps.append(tp / (tp + fp + fn) if tp + fp + fn else 1.0)
        count_err.append(abs(n_p - n_g))
        tp_all, fp_all, fn_all = tp_all + tp, fp_all + fp, fn_all + fn
    return {
        "count_error": float(np.mean(count_err)) if count_err else 0.0,
        "matched_iou": float(np.mean(ious)) if ious else 0.0,
        "ap50": float(np.mean(aps)) if aps else 1.0,
        "precision": tp_all / max(tp_all + fp_all, 1),
        "recall": tp_all / max(tp_all + fn_all, 1),
        "n_gt": tp_all + fn_all,
        "n_pred": tp_all + fp_all,
    }
