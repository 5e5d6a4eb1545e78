"""The evaluation figures (matplotlib, Agg backend, PNG written atomically).

* :func:`best_of_n_figure` (the paper's Figure 5): one panel per reward (and the weighted overall
  reward), the mean reward of the best-of-N selection (selected by the overall reward) against N,
  one curve per run, standard-error bars.
* :func:`image_grid_figure` (the paper's Figure 4): one row per condition, columns = the control
  image, each generated column, and the real target.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def best_of_n_figure(curves: Mapping[str, Mapping[str, Sequence[tuple[int, float, float]]]], labels: Mapping[str, str],
                     path: str | os.PathLike, title: str = "Best-of-N selection by the overall reward") -> Path:
    """Figure 5: reward against N, one panel per reward, one curve per run.

    Args:
        curves: run name -> reward key -> ``[(N, mean, sem), ...]`` in increasing N.
        labels: reward key -> panel title (e.g. ``"nuc_size" -> "NucSize"``); panel order.
        path: the PNG to write.
        title: figure title.

    Returns:
        The written path.
    """
    plt = _pyplot()
    keys = list(labels)
    n_cols = min(4, len(keys))
    n_rows = int(np.ceil(len(keys) / n_cols))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.2 * n_cols, 2.6 * n_rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for run, per_reward in curves.items():
            points = per_reward.get(key)
            if not points:
                continue
            n, mean, sem = (np.array(v, dtype=float) for v in zip(*points))
            ax.errorbar(n, mean, yerr=sem, marker="o", ms=3, capsize=2, label=run)
        ax.set_title(labels[key], fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=min(4, len(names)), fontsize=8,
                   bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def image_grid_figure(rows: Sequence[tuple[str, Mapping[str, np.ndarray]]], columns: Sequence[str],
                      path: str | os.PathLike, title: str = "Control, generated and real cells") -> Path:
    """Figure 4: an image grid, one row per condition.

    Args:
        rows: ``(row label, {column name: uint8 (H, W, 3) image})``; a missing column is left blank.
        columns: column names in display order (e.g. ``["control", "base", "rl", "real"]``).
        path: the PNG to write.
        title: figure title.

    Returns:
        The written path.
    """
    plt = _pyplot()
    n_rows, n_cols = max(1, len(rows)), max(1, len(columns))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.5 * n_cols + 0.8, 1.5 * n_rows + 0.4), squeeze=False)
    for i, (label, images) in enumerate(rows):
        for j, column in enumerate(columns):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            image = images.get(column)
            if image is not None:
                ax.imshow(np.asarray(image, dtype=np.uint8), interpolation="nearest")
            if i == 0:
                ax.set_title(column, fontsize=7)
            if j == 0:
                ax.set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    if not rows:
        axes[0, 0].axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
