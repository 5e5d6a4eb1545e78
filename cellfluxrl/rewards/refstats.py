"""Per-MoA reference statistics: measuring real images, pooling them per MoA, and refusing nonsense.

The morphology rewards compare a generated image's statistic with the mean and std of the real
train images of its MoA (Eqs. 5-6). Two checks guard that comparison:

* :func:`check_reference` refuses a *degenerate* reference: a statistic that is 0 on every image
  of an MoA (mean 0, std 0; the statistics are never negative), i.e. the segmenter found nothing
  there (say an offline-trained Cellpose model on real crops). Every morphology reward against it
  would be meaningless, so ``prepare`` / ``rewards fit`` stop with one line naming the MoA, the
  statistic and the segmenter instead of writing it, and loading such a file is refused too.
* :func:`empty_fraction_warning` words one warning line when the segmenter finds no nucleus in more
  than :data:`EMPTY_WARN_FRACTION` of some group of images (the train images of an MoA while the
  reference is fitted; the images of one column in ``evaluate``). Such images score the worst
  value on the nucleus rewards, and in a reference their zeros pull the MoA's mean down.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from cellfluxrl.data.compounds import CONTROL, MOAS
from cellfluxrl.errors import CellfluxError

STATS = ("nuc_in_cyto", "roundness", "nuc_size", "cyto_size", "nuc_count", "cyto_count")
POOLED = "all treated"  # fallback reference for an MoA without train images
SEGMENT_BATCH = 512
EMPTY_WARN_FRACTION = 0.05  # warn when more than 5 % of a group's images hold no nucleus
# What a statistic that is 0 on an image means the segmenter found there; checked in this order so
# the error names the cause (no nucleus) rather than a consequence (nucleus size 0).
NOTHING_FOUND = {"nuc_count": "no nucleus", "cyto_count": "no cell", "nuc_size": "no nucleus",
                 "cyto_size": "no cell", "roundness": "no nucleus large enough for a roundness",
                 "nuc_in_cyto": "no nucleus inside a cell"}


def moa_labels() -> tuple[str, ...]:
    """Row order of the reference arrays: DMSO first, then the 12 MoAs (row = moa_index + 1)."""
    return (CONTROL, *MOAS)


def measure_images(images_uint8: np.ndarray, segmenter, batch_size: int = SEGMENT_BATCH,
                   progress: bool = False, desc: str = "segment") -> dict[str, np.ndarray]:
    """Segment uint8 ``(N, H, W, C)`` images and measure them: dict of float64 ``(N,)`` per stat."""
    from cellfluxrl.images import to_model
    from cellfluxrl.rewards.morphology import measure

    n = images_uint8.shape[0]
    out = {k: np.zeros(n, dtype=np.float64) for k in STATS}
    starts = range(0, n, batch_size)
    if progress:
        from cellfluxrl.progress import progress_iter

        starts = progress_iter(starts, desc=desc, unit="batch", leave=False)
    for start in starts:
        x = to_model(np.asarray(images_uint8[start:start + batch_size]), dequantize=False).numpy()
        nuclei, cells = segmenter.segment(x)
        stats = measure(nuclei, cells)
        for k in STATS:
            out[k][start:start + batch_size] = stats[k]
    return out


def reference_statistics(stats: dict[str, np.ndarray], moa: np.ndarray) -> dict[str, dict]:
    """Per-MoA ``{"n", "mean": {stat: x}, "std": {stat: x}}`` (population std), plus the pooled treated."""
    moa = np.asarray(moa).astype(str)
    groups = {name: moa == name for name in moa_labels() if np.any(moa == name)}
    groups[POOLED] = moa != CONTROL
    out = {}
    for name, keep in groups.items():
        if not np.any(keep):
            continue
        out[name] = {"n": int(keep.sum()),
                     "mean": {k: float(stats[k][keep].mean()) for k in STATS},
                     "std": {k: float(stats[k][keep].std()) for k in STATS}}
    return out


def segmenter_label(settings: Mapping) -> str:
    """Name a segmenter in a message from its ``settings`` dict, e.g. ``"the classical segmenter"``
    or ``"the cellpose segmenter (nuclei model nuclei)"``."""
    backend = settings.get("backend", "unknown")
    model = settings.get("nuclei_model")
    return f"the {backend} segmenter" + (f" (nuclei model {model})" if model else "")


def degenerate_statistics(moas: Mapping[str, Mapping]) -> list[tuple[str, str]]:
    """The ``(MoA, statistic)`` pairs of a reference that are 0 on every image or not finite.

    Args:
        moas: the ``"moas"`` entry of reference_stats.json (:func:`reference_statistics`).

    Returns:
        The degenerate pairs, MoAs in their stored order (the pooled entry is skipped), at most one
        statistic per MoA (the first in :data:`NOTHING_FOUND` order, i.e. the cause); empty when
        the reference is usable.
    """
    bad = []
    for name, entry in moas.items():
        if name == POOLED:  # degenerate only when every treated MoA is
            continue
        for stat in NOTHING_FOUND:
            mean, std = float(entry["mean"][stat]), float(entry["std"][stat])
            if not (math.isfinite(mean) and math.isfinite(std)) or (mean == 0.0 and std == 0.0):
                bad.append((name, stat))
                break
    return bad


def check_reference(moas: Mapping[str, Mapping], segmenter_settings: Mapping, where: str) -> None:
    """Refuse a degenerate reference (see :func:`degenerate_statistics`) with one line.

    Args:
        moas: the ``"moas"`` entry of reference_stats.json.
        segmenter_settings: the settings of the segmenter that measured it.
        where: what to name first in the message (the dataset or the reference file).

    Raises:
        CellfluxError: naming the first degenerate MoA and statistic, how many other MoAs are
            degenerate too, and the segmenter that found nothing.
    """
    bad = degenerate_statistics(moas)
    if not bad:
        return
    name, stat = bad[0]
    entry = moas[name]
    mean, std = entry["mean"][stat], entry["std"][stat]
    others = f" (and {len(bad) - 1} more MoA(s))" if len(bad) > 1 else ""
    if not (math.isfinite(float(mean)) and math.isfinite(float(std))):
        raise CellfluxError(f"{where}: degenerate reference statistics: {stat} of MoA {name!r} has mean {mean} and "
                            f"std {std}{others}; refit with `cellfluxrl rewards fit DATASET`")
    raise CellfluxError(f"{where}: degenerate reference statistics: {stat} is 0 on all {entry['n']:,} train images "
                        f"of MoA {name!r}{others} (mean 0, std 0): {segmenter_label(segmenter_settings)} found "
                        f"{NOTHING_FOUND[stat]} in them, so every morphology reward would be meaningless; check the "
                        f"images, or choose another segmenter (--segmenter, --cellpose-model)")


def empty_fraction_warning(nuc_count: np.ndarray, groups: np.ndarray, *, what: str, segmenter: str,
                           threshold: float = EMPTY_WARN_FRACTION) -> str | None:
    """One warning line when the segmenter found no nucleus in more than ``threshold`` of a group.

    Args:
        nuc_count: ``(N,)`` nuclei found per image (any numeric dtype).
        groups: ``(N,)`` group name of each image (its MoA; its evaluation column).
        what: the images and the group kind as the message names them, e.g. ``"train images of MoA"``
            gives ``"... of the 120 train images of MoA 'Eg5 inhibitors'"``.
        segmenter: the segmenter as named in the message (:func:`segmenter_label`).
        threshold: the largest tolerated fraction of images without a nucleus, in [0, 1].

    Returns:
        ``None`` when every group is at or below ``threshold``; otherwise the line, naming the worst
        group, its fraction and size, how many other groups are above it, and the overall fraction.
    """
    empty = np.asarray(nuc_count).reshape(-1) == 0
    groups = np.asarray(groups).astype(str).reshape(-1)
    if empty.shape != groups.shape:
        raise ValueError(f"nuc_count {empty.shape} and groups {groups.shape} differ in shape")
    if not empty.any():
        return None
    names = list(dict.fromkeys(groups.tolist()))  # first-seen order: ties name the first group
    fractions = {g: float(empty[groups == g].mean()) for g in names}
    above = [g for g in names if fractions[g] > threshold]
    if not above:
        return None
    worst = max(above, key=lambda g: fractions[g])
    more = f", and more than {threshold:.0%} in {len(above) - 1} other(s)" if len(above) > 1 else ""
    overall = f"; {empty.mean():.1%} of all {empty.size:,}" if len(names) > 1 else ""
    return (f"{segmenter} found no nucleus in {fractions[worst]:.1%} of the {int((groups == worst).sum()):,} {what} "
            f"{worst!r}{more}{overall} (warning above {threshold:.0%}): those images score the worst value on the "
            f"nucleus rewards; check the images or the segmenter")


def empty_columns_warning(nuc_counts: Mapping[str, np.ndarray], segmenter_settings: Mapping,
                          threshold: float = EMPTY_WARN_FRACTION) -> str | None:
    """:func:`empty_fraction_warning` over named columns of images (``evaluate``).

    Args:
        nuc_counts: column name -> nuclei found in each of its images (any shape; NaN = not scored).
        segmenter_settings: the settings of the segmenter that counted them.
        threshold: the largest tolerated fraction of images without a nucleus per column.
    """
    counts = [np.asarray(v, dtype=np.float64).reshape(-1) for v in nuc_counts.values()]
    if not counts:
        return None
    columns = np.repeat(np.asarray(list(nuc_counts), dtype=str), [c.size for c in counts])
    return empty_fraction_warning(np.concatenate(counts), columns, what="images of column",
                                  segmenter=segmenter_label(segmenter_settings), threshold=threshold)
