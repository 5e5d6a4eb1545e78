"""Profiles: per-compound aggregate morphology profiles and their similarity to the real cells'.

The comparison image-based profiling makes between perturbations (pycytominer's ``normalize`` then
``aggregate``), applied to generated against real cells of the same compound:

1. **Per-image features** (:func:`image_features`, :data:`PROFILE_FEATURES`): from the nucleus and
   cell labels the rewards already segmented, the counts ``Image_Count_Nuclei`` and
   ``Image_Count_Cells`` and, for ``Nuclei`` and ``Cells``, the median over the image's objects of
   the ``AreaShape`` features of :data:`PROFILE_SHAPE_FEATURES` (as ``cellfluxrl measure`` computes
   them; pycytominer's ``aggregate(operation="median")`` of the object table by image). An image
   without objects has NaN there (a missing value, as CellProfiler leaves it).
2. **Standardisation** (:func:`fit_standardizer`, pycytominer's ``normalize(method="standardize")``
   fitted on the real images): ``z = (x - mean_real) / sd_real`` per feature, with the mean and the
   population s.d. (``ddof = 0``, scikit-learn's ``StandardScaler``) of the **real targets of the
   scored pairs**, NaN ignored; features whose real s.d. is 0 (or that fewer than two real images
   have) are dropped.
3. **Profile** of a compound (:func:`compound_profiles`): the per-feature median of ``z`` over the
   column's images of that compound (NaN ignored; pycytominer's ``aggregate(operation="median")``).
4. **Similarity** (:func:`cosine_similarity`): per compound, ``cos(p, q) = p.q / (|p| |q|)`` of the
   column's profile ``p`` and the real targets' profile ``q`` of the same compound, over the features
   finite in both; then the mean over compounds with its standard error over compounds,
   ``sd(ddof=1) / sqrt(n_compounds)`` (:func:`profile_similarity`). Only compounds with at least
   :data:`MIN_PAIRS` pairs get a profile; the others are left out (and counted in the note).

A profile made of the real targets themselves has similarity 1 (to float precision), so the
``real`` column of a report reads 1 by construction: it is the reference, shown as a check.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from cellfluxrl.errors import CellfluxError

PROFILE_SHAPE_FEATURES = ("Area", "Perimeter", "FormFactor", "Eccentricity", "MajorAxisLength", "MinorAxisLength",
                          "Extent")
"""The ``AreaShape`` features of a profile: every size and shape feature ``measure`` computes except the
positions (centre, bounding box), the orientation (an angle: its median means nothing) and the monotone
transforms of others (``EquivalentDiameter`` of ``Area``, ``Compactness`` of ``FormFactor``)."""
PROFILE_COMPARTMENTS = ("Nuclei", "Cells")
PROFILE_FEATURES = ("Image_Count_Nuclei", "Image_Count_Cells",
                    *(f"{c}_AreaShape_{f}" for c in PROFILE_COMPARTMENTS for f in PROFILE_SHAPE_FEATURES))
"""Column names (CellProfiler's) of the per-image feature matrix, in order."""
MIN_PAIRS = 2
"""Pairs a compound needs for a profile: a median of one image is that image, not an aggregate."""
ROW = "profile_similarity"
LABEL = "Profile similarity (cosine)"


def _mosaic(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A batch of label images as one: int32 ``(B * (H + 1), W)``, each image followed by a background
    row and its labels shifted by the largest labels of the images before it; and int64 ``(B + 1,)``
    those shifts (image ``i`` holds labels ``offsets[i] + 1 .. offsets[i + 1]``).

    The background row keeps every object's perimeter what it is in its own image (the frame counts as
    background there), and shape features do not depend on where an object sits (its centre and box
    do, and profiles use neither), so one call measures the whole batch.
    """
    b, h, w = labels.shape
    largest = labels.reshape(b, -1).max(axis=1).astype(np.int64) if labels.size else np.zeros(b, np.int64)
    offsets = np.concatenate([[0], np.cumsum(np.maximum(largest, 0))])
    if offsets[-1] >= np.iinfo(np.int32).max:
        raise CellfluxError(f"profiles: {offsets[-1]} labels in one batch; give fewer images at a time")
    out = np.zeros((b, h + 1, w), np.int32)
    out[:, :h] = np.where(labels > 0, labels + offsets[:-1, None, None], labels)  # negatives stay: refused below
    return out.reshape(b * (h + 1), w), offsets


def _group_medians(values: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """float64 ``(n_groups,)``: the median of the finite ``values`` of each group (NaN: none), as ``np.median``."""
    finite = np.isfinite(values)
    v, g = values[finite], group[finite]
    order = np.lexsort((v, g))
    v = v[order]
    n = np.bincount(g, minlength=n_groups)
    start = np.cumsum(n) - n
    out = np.full(n_groups, np.nan)
    has = n > 0
    lo, hi = start[has] + (n[has] - 1) // 2, start[has] + n[has] // 2
    out[has] = (v[lo] + v[hi]) / 2
    return out


def image_features(nuclei: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """The per-image profile features of a batch of label images.

    Args:
        nuclei: integer ``(B, H, W)`` nucleus labels (0 = background), e.g. ``RewardBatch.nuclei``.
        cells: integer ``(B, H, W)`` whole-cell labels, same shape.

    Returns:
        float64 ``(B, F)`` in the order of :data:`PROFILE_FEATURES`: object counts, then per compartment
        the median over its objects of each :data:`PROFILE_SHAPE_FEATURES` value (px, px^2, or unitless;
        non-finite object values, e.g. the ``FormFactor`` of a one-pixel object, ignored; NaN for an
        image without objects of that compartment). Equal, within float round-off of the moments
        (~1e-12 relative), to ``np.median`` over ``measure``'s object rows of each image.
    """
    from cellfluxrl.evaluation.measurements import shape_features

    nuclei, cells = np.asarray(nuclei), np.asarray(cells)
    if nuclei.ndim != 3 or nuclei.shape != cells.shape or not np.issubdtype(nuclei.dtype, np.integer) \
            or not np.issubdtype(cells.dtype, np.integer):
        raise CellfluxError(f"profiles: expected integer nucleus and cell labels (B, H, W) of one shape, got "
                            f"{nuclei.dtype} {nuclei.shape} and {cells.dtype} {cells.shape}")
    b = len(nuclei)
    columns = []
    for labels in (nuclei, cells):
        mosaic, offsets = _mosaic(labels)
        table = shape_features(mosaic)
        image = np.searchsorted(offsets, table.labels, side="left") - 1  # the image each object is in
        columns.append([np.bincount(image, minlength=b).astype(np.float64),
                        *(_group_medians(table.features[f], image, b) for f in PROFILE_SHAPE_FEATURES)])
    (nuclei_count, *nuclei_medians), (cells_count, *cells_medians) = columns
    return np.stack([nuclei_count, cells_count, *nuclei_medians, *cells_medians], axis=1)


def fit_standardizer(reference: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and s.d. of the reference (real) images' features, and which features are kept.

    Args:
        reference: float64 ``(N, F)`` per-image features of the real images (NaN = missing).

    Returns:
        ``(mean, sd, kept)``: float64 ``(F,)`` NaN-ignoring mean and population s.d. (``ddof = 0``, as
        scikit-learn's ``StandardScaler`` that pycytominer's ``standardize`` uses), and bool ``(F,)``
        true where the s.d. is finite and above 0 (fewer than two finite values, or all equal: dropped).
    """
    reference = np.asarray(reference, dtype=np.float64)
    if reference.ndim != 2:
        raise CellfluxError(f"profiles: expected reference features (N, F), got shape {reference.shape}")
    finite = np.isfinite(reference)
    n = finite.sum(axis=0)
    filled = np.where(finite, reference, 0.0)
    mean = np.divide(filled.sum(axis=0), n, out=np.full(reference.shape[1], np.nan), where=n > 0)
    centred = np.where(finite, reference - mean, 0.0)
    sd = np.sqrt(np.divide((centred ** 2).sum(axis=0), n, out=np.full(reference.shape[1], np.nan), where=n > 0))
    kept = (n >= 2) & np.isfinite(sd) & (sd > 0)
    return mean, sd, kept


def standardize(features: np.ndarray, mean: np.ndarray, sd: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """``(x - mean) / sd`` on the kept features (:func:`fit_standardizer`).

    Args:
        features: float64 ``(N, F)`` per-image features.
        mean, sd: float64 ``(F,)``; kept: bool ``(F,)``.

    Returns:
        float64 ``(N, F_kept)`` z-scores in units of the reference s.d. (non-finite inputs become NaN).
    """
    features = np.asarray(features, dtype=np.float64)
    z = (features[:, kept] - mean[kept]) / sd[kept]
    return np.where(np.isfinite(z), z, np.nan)


def compound_profiles(z: np.ndarray, compounds: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Per-compound median profiles.

    Args:
        z: float64 ``(N, F)`` standardised per-image features (NaN = missing).
        compounds: str ``(N,)`` compound of each image.
        names: the compounds to profile, in output order.

    Returns:
        float64 ``(G, F)``: row ``g`` is the per-feature median of ``z`` over the images of ``names[g]``,
        NaN ignored (NaN where the compound has no finite value of the feature, or no image).
    """
    compounds = np.asarray(compounds).astype(str)
    out = np.full((len(names), z.shape[1]), np.nan)
    for g, name in enumerate(names):
        rows = z[compounds == str(name)]
        for f in range(z.shape[1]):
            finite = rows[:, f][np.isfinite(rows[:, f])]
            if finite.size:
                out[g, f] = np.median(finite)
    return out


def cosine_similarity(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity over the features finite in both rows.

    Args:
        p, q: float64 ``(G, F)`` profiles (NaN = missing).

    Returns:
        float64 ``(G,)`` in ``[-1, 1]``: ``p.q / (|p| |q|)``; NaN where a row has no feature finite in
        both or a zero norm there.
    """
    p, q = np.atleast_2d(np.asarray(p, dtype=np.float64)), np.atleast_2d(np.asarray(q, dtype=np.float64))
    if p.shape != q.shape:
        raise CellfluxError(f"profiles: cosine of profiles of different shapes {p.shape} and {q.shape}")
    both = np.isfinite(p) & np.isfinite(q)
    a, b = np.where(both, p, 0.0), np.where(both, q, 0.0)
    dot = (a * b).sum(axis=1)
    norms = np.sqrt((a * a).sum(axis=1)) * np.sqrt((b * b).sum(axis=1))
    out = np.divide(dot, norms, out=np.full(len(p), np.nan), where=norms > 0)
    return np.clip(out, -1.0, 1.0)


def mean_sem_over_compounds(values: np.ndarray) -> tuple[float | None, float | None, int]:
    """Mean of per-compound values (NaN left out) and its standard error ``sd(ddof=1) / sqrt(n)``.

    Returns:
        ``(mean, sem, n)``; ``mean`` is None without a finite value, ``sem`` None below two.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None, None, 0
    sem = float(np.std(v, ddof=1) / np.sqrt(v.size)) if v.size > 1 else None
    return float(np.mean(v)), sem, int(v.size)


def profile_similarity(features: Mapping[str, np.ndarray], real: str, compounds: np.ndarray) -> dict:
    """Every column's profile similarity to the real targets' profiles, one report row.

    Args:
        features: column -> float64 ``(P, F)`` per-image features (:func:`image_features`) of the one
            image per pair the column shows, pair-aligned; ``features[real]`` are the real targets.
        real: the key of the real targets (standardisation reference and profile to compare with).
        compounds: str ``(P,)`` the compound of each pair.

    Returns:
        ``{"cells": {column: {"mean", "sem", "sem_compound": None, "sem_kind": "over compounds",
        "n_compounds"}}, "per_compound": {column: {compound: float | None}}, "note": str, "features":
        [kept names], "dropped": [names], "compounds": [profiled], "left_out": [compounds < MIN_PAIRS]}``.
    """
    compounds = np.asarray(compounds).astype(str)
    names, counts = np.unique(compounds, return_counts=True)
    profiled, left_out = names[counts >= MIN_PAIRS], names[counts < MIN_PAIRS]
    mean, sd, kept = fit_standardizer(features[real])
    q = compound_profiles(standardize(features[real], mean, sd, kept), compounds, profiled)
    cells, per_compound = {}, {}
    usable = kept.any() and profiled.size > 0
    for column, rows in features.items():
        sims = cosine_similarity(compound_profiles(standardize(rows, mean, sd, kept), compounds, profiled), q) \
            if usable else np.full(len(profiled), np.nan)
        m, sem, n = mean_sem_over_compounds(sims)
        cells[column] = {"mean": m, "sem": sem, "sem_compound": None, "sem_kind": "over compounds", "n_compounds": n}
        per_compound[column] = {str(c): (None if not np.isfinite(s) else float(s)) for c, s in zip(profiled, sims)}
    dropped = [f for f, k in zip(PROFILE_FEATURES, kept) if not k]
    note = (f"{LABEL}: per compound, the cosine of the median profile of the column's images and of its real targets "
            f"({int(kept.sum())} CellProfiler features, each standardised by the mean and s.d. of the "
            f"{len(compounds)} real targets of these pairs"
            + (f"; dropped, no spread among them: {', '.join(dropped)}" if dropped else "")
            + f"); mean ± s.e. over the {profiled.size} compound(s) with at least {MIN_PAIRS} pairs"
            + (f" ({left_out.size} with fewer left out)" if left_out.size else "")
            + "; real reads 1 by construction (it is the reference)")
    return {"cells": cells, "per_compound": per_compound, "note": note,
            "features": [f for f, k in zip(PROFILE_FEATURES, kept) if k], "dropped": dropped,
            "compounds": profiled.tolist(), "left_out": left_out.tolist()}
