"""What a report's figures show: Figure 4's columns, rows, shown candidates and captions, Figure 5's
best-of-N curves and real levels; and writing both for one section (drawn by
:mod:`cellfluxrl.evaluation.figures`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from cellfluxrl.evaluation.figures import GridRow, best_of_n_figure, image_grid_figure
from cellfluxrl.evaluation.metrics import best_of_n
from cellfluxrl.evaluation.report import CONTROL_COLUMN, REAL, SPLIT_TITLES
from cellfluxrl.images import CHANNELS_BBBC021


def tts_of(results: dict) -> int:
    """The N of the table's and Figure 4's best-of column (older results: the largest N)."""
    return int(results.get("tts_n", results["k_max"]))


def grid_columns(sources: Sequence[str], tts_n: int) -> list[str]:
    """Figure 4's columns: control, each run, each run's best-of-N pick (N > 1), real."""
    best = [f"{s}+best-of-{tts_n}" for s in sources] if tts_n > 1 else []
    return [CONTROL_COLUMN, *sources, *best, REAL]


def shown_candidates(results: dict, column: str) -> tuple[str, np.ndarray] | None:
    """``(score column, int64 (P,) candidate index)`` of the image a grid column shows; None for control.

    A run column shows candidate 0, ``run+best-of-N`` the best of its first N by the overall
    reward (:func:`~cellfluxrl.evaluation.metrics.best_of_n`), ``real`` its only candidate.
    """
    n_pairs, tts_n = len(results["pairs"]), tts_of(results)
    for s in results["sources"]:
        if column == f"{s}+best-of-{tts_n}" and tts_n > 1:
            return s, best_of_n(results["scores"][s].total, tts_n)
    if column == REAL or column in results["sources"]:
        return column, np.zeros(n_pairs, dtype=np.int64)
    return None


def row_label(compound: str, moa: str, dose: float | None = None) -> str:
    """E.g. ``"taxol\nMicrotubule stabilizers\n0.3 µM"`` (no dose line when ``dose`` is None)."""
    lines = [str(compound), str(moa)] + ([] if dose is None else [f"{float(dose):g} µM"])
    return "\n".join(lines)


def grid_rows(results: dict, dataset=None) -> list:
    """Figure 4's rows (:class:`~cellfluxrl.evaluation.figures.GridRow`) from the results' ``grid`` pairs.

    Label: compound, MoA and (with ``dataset``) the target's dose; caption under every crop but the
    control: the overall reward of the candidate shown (:func:`shown_candidates`).
    """
    pairs = results["pairs"]
    columns = grid_columns(results["sources"], tts_of(results))
    shown = {c: shown_candidates(results, c) for c in columns}
    rows, roles = [], results.get("grid_roles", {})
    for p, images in results["grid"]:
        dose = None if dataset is None else float(dataset.table["dose"][pairs.target[p]])
        captions = {c: f"overall {results['scores'][s].total[p, pick[p]]:.2f}"
                    for c, (s, pick) in ((c, v) for c, v in shown.items() if v is not None)}
        label = row_label(pairs.compound[p], pairs.moa[p], dose)
        if p in roles:  # the compounds where the first run does worst and best are always shown
            label += f"\n({roles[p]} of {results['sources'][0]})"
        rows.append(GridRow(label, images, captions))
    return rows


def grid_note(results: dict) -> str:
    """What the numbers under the crops are (the weights of the overall reward spelled out)."""
    weights = ", ".join(f"{k}={v:g}" for k, v in results["weights"].items())
    rows = (f"Rows: the compounds where {results['sources'][0]} has its lowest and highest mean overall reward, "
            f"then the first others. " if results.get("grid_roles") else "")
    return (f"{rows}Under each crop: the overall reward of the image shown (weighted sum: {weights}); "
            f"best-of-{tts_of(results)}: the highest-overall of {tts_of(results)} candidates.")


def real_levels(section: dict, keys: Sequence[str]) -> dict[str, float]:
    """Reward key -> the real column's mean (Figure 5's dashed line); keys without a value are left out."""
    cells = section["table"].get(REAL, {})
    return {k: cells[k]["mean"] for k in keys if cells.get(k, {}).get("mean") is not None}


def write_section_figures(section: dict, results: dict, out: Path, dataset=None) -> dict[str, str]:
    """Figure 5 (best-of-N curves) and Figure 4 (image grid) of one section; returns their file names.

    ``dataset`` (optional) adds each row's dose and the dataset's channel names to Figure 4.
    """
    suffix = "" if section["split"] == "id" else f"_{section['split']}"
    paths = {"fig5": out / f"fig5_best_of_n{suffix}.png", "fig4": out / f"fig4_grid{suffix}.png"}
    keys = [*results["names"], "overall"]
    labels = {k: section["labels"].get(k, k) for k in keys}
    curves = {run: {k: [(int(n), c[k]["mean"], c[k]["sem"]) for n, c in per_n.items()] for k in keys}
              for run, per_n in section["best_of_n"].items()}
    best_of_n_figure(curves, labels, paths["fig5"], real=real_levels(section, keys))
    channels = CHANNELS_BBBC021 if dataset is None else dataset.channels
    title = f"{SPLIT_TITLES.get(section['split'], section['split'])}: control, generated and real cells"
    image_grid_figure(grid_rows(results, dataset), grid_columns(results["sources"], tts_of(results)), paths["fig4"],
                      title=title, channels=channels, note=grid_note(results))
    return {k: p.name for k, p in paths.items()}
