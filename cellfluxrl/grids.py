"""PNG image grids (matplotlib, Agg backend): rows of labelled image panels."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np


def save_grid(path: str | os.PathLike, rows: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str],
              col_labels: Sequence[str], title: str | None = None, cell_inches: float = 1.4) -> Path:
    """Write a grid of uint8 ``(H, W, 3)`` images to a PNG.

    Args:
        path: output ``.png``.
        rows: ``rows[i][j]`` is the image in row ``i``, column ``j`` (all rows the same length).
        row_labels: one label per row (e.g. the compound and its MoA).
        col_labels: one label per column (e.g. control | generated | real target).
        title: optional figure title.
        cell_inches: size of one panel.

    Returns:
        The written path.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    n_rows, n_cols = len(rows), len(col_labels)
    fig = Figure(figsize=(cell_inches * n_cols + 1.6, cell_inches * max(n_rows, 1) + 0.6))
    axes = fig.subplots(max(n_rows, 1), n_cols, squeeze=False)
    for i in range(n_rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.imshow(np.asarray(rows[i][j]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col_labels[j], fontsize=8)
            if j == 0:
                ax.set_ylabel(row_labels[i], fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
