"""Dealing images into disjoint parts by group, stratified: the one owner of that rule.

Crops of one well (and of one field of view) are near-duplicates: same cells, same plate, same
compound and dose. A part dealt image by image puts near-duplicates on both sides, so a held-out
part is not held out. Every split of the package is therefore dealt by **group**, the image's
``(batch, well)``: the train/test split of the synthetic generator and of raw BBBC021 (by well),
the validation split that :class:`~cellfluxrl.data.layout.DatasetWriter` carves from train
(:func:`validation_split`), and the two halves the reward classifier and the judge learn from
(:func:`disjoint_halves`).

Groups (:func:`group_ids`): images with the same ``batch`` and a non-empty ``well`` share a group;
an image without a well (a dataset written before the ``well`` column, or a source that does not
record one) is its own group, so old datasets behave as before (image by image).

Dealing by group keeps *near*-duplicates together; *exact* duplicates listed under two wells (a
copied plate map) would still straddle a boundary, so the writer refuses any two identical crops in
different groups or splits (:class:`cellfluxrl.data.duplicates.CropDigests`): with that, no image
content reaches two splits or both classifier halves.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

VAL_FRACTION = 0.1  # share of the eligible train groups of each MoA dealt to the validation split
VAL_RULE = ("validation: per MoA, round(0.1 n) (at least 1, at most n - 1) of the n (plate, well) groups whose "
            "images are all train, treated and in-distribution; per plate with validation targets, the same share "
            "of its all-train control wells (at least 1, at most n - 1; a plate with fewer than 2 keeps its "
            "targets in train)")


def group_ids(batch: np.ndarray, well: np.ndarray) -> np.ndarray:
    """Group index of every image: equal ``(batch, well)`` -> equal index; an empty well -> own group.

    Args:
        batch: str ``(N,)`` plate of each image.
        well: str ``(N,)`` well (or field) of each image; ``""`` = not recorded.

    Returns:
        int64 ``(N,)`` group indices in ``[0, n_groups)``, numbered by first appearance.
    """
    batch, well = np.asarray(batch).astype(str), np.asarray(well).astype(str)
    keys, seen, out = {}, 0, np.empty(batch.size, dtype=np.int64)
    for i, (b, w) in enumerate(zip(batch, well)):
        key = (b, w) if w else ("", i)
        if key not in keys:
            keys[key] = seen
            seen += 1
        out[i] = keys[key]
    return out


def _group_label(groups: np.ndarray, labels: np.ndarray) -> dict[int, object]:
    """The label of each group: that of its first image (a well holds one compound, so one MoA)."""
    first = {}
    for g, label in zip(groups.tolist(), labels.tolist()):
        first.setdefault(g, label)
    return first


def pick_groups(groups: np.ndarray, strata: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Choose whole groups, ``round(fraction * n)`` of the ``n`` groups of each stratum.

    At least 1 and at most ``n - 1`` groups of a stratum with ``n >= 2`` groups are chosen (so both
    sides keep every stratum); a stratum of one group is never chosen.

    Args:
        groups: int ``(N,)`` group of each image (:func:`group_ids`).
        strata: ``(N,)`` stratum of each image (MoA, plate, ...); a group's stratum is its first image's.
        fraction: share of each stratum's groups to choose, in ``[0, 1]``.
        rng: the generator that shuffles the groups (strata in sorted order).

    Returns:
        bool ``(N,)``: the images of the chosen groups.
    """
    groups = np.asarray(groups)
    label = _group_label(groups, np.asarray(strata))
    chosen = set()
    for stratum in sorted(set(label.values()), key=str):
        members = np.array(sorted(g for g, s in label.items() if s == stratum), dtype=np.int64)
        n = members.size
        k = int(np.clip(round(fraction * n), 1, n - 1)) if n >= 2 else 0
        chosen.update(rng.permutation(members)[:k].tolist())
    return np.isin(groups, list(chosen))


def disjoint_halves(labels: np.ndarray, seed: int, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``0..N-1`` into two disjoint halves by whole groups, stratified by label.

    Within each class the groups are shuffled (seeded) and dealt one by one to the half that holds
    fewer images of that class so far (the first on a tie). With one image per group (``groups``
    None) this is the alternate deal of single images, as before groups existed.

    Args:
        labels: int ``(N,)`` class labels (a group's class is its first image's).
        seed: seed of the shuffle.
        groups: int ``(N,)`` group of each position (:func:`group_ids`); None: every position alone.

    Returns:
        ``(first, second)``: sorted int64 position arrays, disjoint, together ``0..N-1``; no group
        has positions in both.
    """
    labels = np.asarray(labels)
    groups = np.arange(labels.size) if groups is None else np.asarray(groups)
    rng = np.random.default_rng([int(seed), 0x7A1F])
    label = _group_label(groups, labels)
    size_of = Counter(groups.tolist())
    in_first = set()
    for c in np.unique(labels).tolist():
        members = np.array(sorted(g for g, lab in label.items() if lab == c), dtype=np.int64)
        counts = [0, 0]
        for g in rng.permutation(members).tolist():
            half = 0 if counts[0] <= counts[1] else 1
            counts[half] += size_of[g]
            if half == 0:
                in_first.add(g)
    first = np.isin(groups, list(in_first))
    return np.flatnonzero(first), np.flatnonzero(~first)


def validation_split(split: np.ndarray, state: np.ndarray, moa: np.ndarray, batch: np.ndarray, groups: np.ndarray,
                     ood: np.ndarray, seed: int, fraction: float = VAL_FRACTION) -> np.ndarray:
    """Deal a validation split out of the train split by whole groups (the rule in :data:`VAL_RULE`).

    Eligible targets are the groups whose images are all ``train``, ``treated`` and in-distribution;
    per MoA a share of them becomes ``val``. Pairs need same-plate controls in the same split
    (:func:`cellfluxrl.data.pairing.draw_controls`), so each plate with validation targets gives the
    same share of its all-train control groups to ``val``; a plate with fewer than two such groups
    keeps its targets in train. Validation is thus disjoint from test by image and by group
    (plate + well), and from the images every model trains on.

    Args:
        split: str ``(N,)`` ``"train"``/``"test"`` per image.
        state: str ``(N,)`` ``"control"``/``"treated"``.
        moa: str ``(N,)`` MoA (the stratum of treated groups).
        batch: str ``(N,)`` plate (the stratum of control groups).
        groups: int ``(N,)`` (:func:`group_ids`).
        ood: bool ``(N,)`` the image's compound is held out.
        seed: seed of the deal.
        fraction: share of each stratum's eligible groups.

    Returns:
        str ``(N,)``: ``split`` with the dealt images set to ``"val"``.
    """
    split, state, groups = np.asarray(split).astype(str), np.asarray(state).astype(str), np.asarray(groups)
    moa, batch = np.asarray(moa).astype(str), np.asarray(batch).astype(str)
    all_train = _all(groups, split == "train")
    treated_ok = all_train & _all(groups, (state == "treated") & ~np.asarray(ood, dtype=bool))
    control_ok = all_train & _all(groups, state == "control")
    rng = np.random.default_rng([int(seed), 0x5A11])
    targets = np.zeros(split.size, dtype=bool)
    if treated_ok.any():
        targets[treated_ok] = pick_groups(groups[treated_ok], moa[treated_ok], fraction, rng)
    controls = np.zeros(split.size, dtype=bool)
    for plate in sorted(set(batch[targets].tolist())):
        on_plate = control_ok & (batch == plate)
        if np.unique(groups[on_plate]).size < 2:
            targets &= batch != plate  # no control to spare: the plate's targets stay in train
            continue
        controls[on_plate] = pick_groups(groups[on_plate], batch[on_plate], fraction, rng)
    out = split.copy()
    out[targets | controls] = "val"
    return out


def _all(groups: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per image: whether ``mask`` holds for every image of its group."""
    bad = np.unique(groups[~mask])
    return ~np.isin(groups, bad)


VAL_SUBSETS = ("val-select", "val-tune")  # checkpoint selection reads one, the tuning of settings the other
VAL_SUBSET_RULE = ("validation subsets: the validation (plate, well) groups of treated images, per MoA (MoAs in "
                   "sorted order, groups in a fixed shuffle), dealt alternately to val-tune and val-select, the "
                   "alternation running on across MoAs; each plate's validation control wells dealt the same way, a "
                   "plate with a single one sharing it between both (controls are sources, never targets)")


def validation_subsets(split: np.ndarray, state: np.ndarray, moa: np.ndarray, batch: np.ndarray,
                       groups: np.ndarray) -> dict[str, np.ndarray]:
    """The two disjoint halves of the validation split (the rule in :data:`VAL_SUBSET_RULE`).

    Settings (sampler, guidance, learning rates) are tuned on ``val-tune``; the checkpoint of a run
    is selected on ``val-select``, so neither choice is made on the pairs the other was fitted to.
    Their target groups are disjoint by (plate, well); the deal depends only on the dataset.

    Args:
        split, state, moa, batch: str ``(N,)`` per image (as in :func:`validation_split`).
        groups: int ``(N,)`` (:func:`group_ids`).

    Returns:
        ``{"val-select": bool (N,), "val-tune": bool (N,)}``, both ``False`` outside ``val``.
    """
    split, state, groups = np.asarray(split).astype(str), np.asarray(state).astype(str), np.asarray(groups)
    moa, batch = np.asarray(moa).astype(str), np.asarray(batch).astype(str)
    val = split == "val"
    out = {name: np.zeros(split.size, dtype=bool) for name in VAL_SUBSETS}
    rng = np.random.default_rng(0x5E7EC7)
    turn = 0
    treated = val & (state == "treated")
    for stratum in sorted(set(moa[treated].tolist())):
        dealt = np.unique(groups[treated & (moa == stratum)])
        for g in dealt[rng.permutation(dealt.size)]:
            out[VAL_SUBSETS[1 - turn % 2]][groups == g] = True  # the first group of all goes to val-tune
            turn += 1
    controls = val & (state == "control")
    for plate in sorted(set(batch[controls].tolist())):
        dealt = np.unique(groups[controls & (batch == plate)])
        if dealt.size == 1:
            for name in VAL_SUBSETS:
                out[name][groups == dealt[0]] = True
            continue
        for i, g in enumerate(dealt[rng.permutation(dealt.size)]):
            out[VAL_SUBSETS[1 - i % 2]][groups == g] = True
    return out
