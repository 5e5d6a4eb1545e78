"""The evaluation figures (matplotlib, Agg backend, PNG written atomically).

* :func:`best_of_n_figure` (the paper's Figure 5): one panel per reward (and the weighted overall
  reward), the mean reward of the best-of-N selection (selected by the overall reward) against N on
  a log2 axis, one curve per run, standard-error bars, and the real images' level as a dashed line.
* :func:`image_grid_figure` (the paper's Figure 4): one row per condition (labelled with compound,
  MoA and dose), columns = the control image, each generated column and the real target, a caption
  (e.g. the overall reward) under each crop and a legend naming the RGB channels.

``*_plot`` build the matplotlib Figure (tests read its artists); ``*_figure`` build, save and close.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from cellfluxrl.data.layout import follow_umask

# What each dataset channel shows (BBBC021 stains); shown in RGB order of the channels.
STAINS = {"actin": "actin (phalloidin)", "tubulin": "β-tubulin", "dna": "DNA (DAPI)"}
RGB = ("red", "green", "blue")
RGB_VALUES = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}
REAL_STYLE = {"color": "0.35", "linestyle": "--", "linewidth": 1.0}


class GridRow(NamedTuple):
    """One Figure 4 row: label, uint8 ``(H, W, 3)`` image per column, caption per column (may be empty)."""

    label: str
    images: Mapping[str, np.ndarray]
    captions: Mapping[str, str] = {}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        follow_umask(tmp)  # mkstemp files are private whatever the umask
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _save_and_close(fig, path, dpi: int = 110) -> Path:
    try:
        return _save(fig, path, dpi)
    finally:
        _pyplot().close(fig)


def channel_legend(channels: Sequence[str]) -> list[tuple[str, str]]:
    """``[(display colour, stain label), ...]`` of the first three channels, e.g. ``("red", "actin (phalloidin)")``."""
    return [(colour, STAINS.get(str(name).lower(), str(name))) for colour, name in zip(RGB, channels)]


def channel_caption(channels: Sequence[str]) -> str:
    """E.g. ``"red: actin (phalloidin), green: β-tubulin, blue: DNA (DAPI)"``."""
    return ", ".join(f"{colour}: {label}" for colour, label in channel_legend(channels))


def column_title(column: str) -> str:
    """A column header that fits a crop: ``"CellFluxRL+best-of-4" -> "CellFluxRL\\n+best-of-4"``."""
    return column.replace("+", "\n+", 1)


# --------------------------------------------------------------------------------------------------
# Figure 5


def best_of_n_plot(curves: Mapping[str, Mapping[str, Sequence[tuple[int, float, float]]]], labels: Mapping[str, str],
                   title: str = "Best-of-N selection by the overall reward", real: Mapping[str, float] | None = None):
    """The Figure 5 matplotlib Figure (the caller closes it); arguments as :func:`best_of_n_figure`.

    Each panel's ``real`` level is an ``axhline`` (``linestyle "--"``, label ``"real"``).
    """
    plt = _pyplot()
    keys = list(labels)
    n_cols = min(4, max(1, len(keys)))
    n_rows = max(1, int(np.ceil(len(keys) / n_cols)))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.2 * n_cols, 2.7 * n_rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        ns: set[int] = set()
        for run, per_reward in curves.items():
            points = per_reward.get(key)
            if not points:
                continue
            n, mean, sem = (np.array(v, dtype=float) for v in zip(*points))
            ax.errorbar(n, mean, yerr=sem, marker="o", ms=3, capsize=2, label=run)
            ns.update(int(v) for v in n)
        level = None if real is None else real.get(key)
        if level is not None:
            ax.axhline(float(level), label="real", **REAL_STYLE)
        ax.set_title(labels[key], fontsize=9)
        ax.set_xscale("log", base=2)
        if ns:
            ticks = sorted(ns)
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.xaxis.set_minor_locator(plt.NullLocator())
            pad = 2 ** 0.25
            ax.set_xlim(ticks[0] / pad, ticks[-1] * pad)
        ax.set_xlabel("N (candidates)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    order = sorted(range(len(names)), key=lambda i: names[i] == "real")  # runs first, then the real level
    handles, names = [handles[i] for i in order], [names[i] for i in order]
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=min(5, len(names)), fontsize=8,
                   bbox_to_anchor=(0.5, -0.01))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return fig


def best_of_n_figure(curves: Mapping[str, Mapping[str, Sequence[tuple[int, float, float]]]], labels: Mapping[str, str],
                     path: str | os.PathLike, title: str = "Best-of-N selection by the overall reward",
                     real: Mapping[str, float] | None = None) -> Path:
    """Figure 5: reward against N (log2 axis, ticks at the N values), one panel per reward, one curve per run.

    Args:
        curves: run name -> reward key -> ``[(N, mean, sem), ...]`` in increasing N.
        labels: reward key -> panel title (e.g. ``"nuc_size" -> "NucSize"``); panel order.
        path: the PNG to write.
        title: figure title.
        real: reward key -> the real images' mean (a dashed line per panel); ``None`` or a missing key: no line.

    Returns:
        The written path.
    """
    return _save_and_close(best_of_n_plot(curves, labels, title, real), path)


# --------------------------------------------------------------------------------------------------
# Figure 4


def image_grid_plot(rows: Sequence[GridRow | tuple], columns: Sequence[str],
                    title: str = "Control, generated and real cells", channels: Sequence[str] | None = None,
                    note: str = "", crop_inches: float = 1.35):
    """The Figure 4 matplotlib Figure (the caller closes it); arguments as :func:`image_grid_figure`.

    Row labels are the first column's y-labels, captions the crops' x-labels, the channel legend is
    the figure legend and ``note`` a text line under it.
    """
    from matplotlib.patches import Patch

    plt = _pyplot()
    n_rows, n_cols = max(1, len(rows)), max(1, len(columns))
    width, height = crop_inches * n_cols + 1.7, (crop_inches + 0.32) * n_rows + 1.0  # inches
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width, height), squeeze=False)
    # Margins in inches: row labels left, title and two-line column headers on top, a caption below.
    fig.subplots_adjust(left=1.6 / width, right=1 - 0.1 / width, top=1 - 0.7 / height, bottom=0.3 / height,
                        wspace=0.06, hspace=0.26 / crop_inches)
    for i, row in enumerate(rows):
        label, images, captions = (*row, {})[:3]
        for j, column in enumerate(columns):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            image = images.get(column)
            if image is not None:
                ax.imshow(np.asarray(image, dtype=np.uint8), interpolation="nearest")
            else:
                ax.set_facecolor("0.92")
            if captions.get(column):
                ax.set_xlabel(captions[column], fontsize=7, labelpad=2)
            if i == 0:
                ax.set_title(column_title(column), fontsize=8)
            if j == 0:
                ax.set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center", labelpad=6)
    if not rows:
        axes[0, 0].axis("off")
    if channels:
        handles = [Patch(facecolor=RGB_VALUES[colour], label=f"{colour}: {label}")
                   for colour, label in channel_legend(channels)]
        fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False,
                   title="channels", title_fontsize=8, bbox_to_anchor=(0.5, 0.0))
    if note:
        fig.text(0.5, -0.55 / height, note, ha="center", va="top", fontsize=7, wrap=True)
    fig.suptitle(title, fontsize=10, y=1 - 0.12 / height)
    return fig


def image_grid_figure(rows: Sequence[GridRow | tuple], columns: Sequence[str], path: str | os.PathLike,
                      title: str = "Control, generated and real cells", channels: Sequence[str] | None = None,
                      note: str = "") -> Path:
    """Figure 4: an image grid, one row per condition.

    Args:
        rows: :class:`GridRow` (or ``(label, images[, captions])``): images map a column name to a uint8
            ``(H, W, 3)`` image (channel order ``channels``, shown as RGB); a missing column is left
            blank; captions map a column name to the text under its crop.
        columns: column names in display order (e.g. ``["control", "base", "rl", "real"]``).
        path: the PNG to write.
        title: figure title.
        channels: the channel names (e.g. ``("actin", "tubulin", "dna")``): a legend naming the RGB colours.
        note: a line of text under the figure (e.g. what the captions are).

    Returns:
        The written path.
    """
    return _save_and_close(image_grid_plot(rows, columns, title, channels, note), path, dpi=130)
