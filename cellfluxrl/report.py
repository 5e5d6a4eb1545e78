"""The evaluation report: ``report.json``, ``report.md`` and the figures, from :mod:`cellfluxrl.evaluate`'s results.

A report holds one **section** per compound split (``"id"``: in-distribution compounds, the
headline as in CellFlux; ``"ood"``: the held-out compounds, never mixed into the headline), each
a full table::

    {"format": "cellfluxrl-evaluate/2", "settings": {...}, "versions": {...},
     "splits": ["id", "ood"], "sections": {"id": SECTION, "ood": SECTION}, "files": {...}}
    SECTION = {"split", "split_description", "columns", "rows", "labels", "table", "best_of_n", "paired",
               "per_condition", "distance", "n_pairs", "n_conditions", "throughput", "files"}

Rows: every reward (per pair its expectation over the K candidates, plain or best-of-N, see
:func:`~cellfluxrl.metrics.best_of_n_weights`; then mean and standard error over pairs), ``overall`` (the weighted sum),
``moa_accuracy`` (the **judge**'s top-1 accuracy: an MoA classifier fitted independently of the
reward's), ``moa_accuracy_reward`` (the reward classifier's accuracy, so reward hacking shows as
the gap between the two), then the distances ``<FD>_o``, ``<FD>_c``, ``<KD>_o``, ``<KD>_c`` on the
judge's features (or FID/KID with the Inception weights). ``paired``: per N (1 and the table's
best-of) every run minus the first on the same pairs (:func:`paired_differences`).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from cellfluxrl.metrics import best_of_n, best_of_n_weights, mean_sem
from cellfluxrl.data.layout import follow_umask

REPORT_FORMAT = "cellfluxrl-evaluate/2"
REAL = "real"
CONTROL_COLUMN = "control"
REWARD_LABELS = {"moa": "MoA", "nuc_in_cyto": "Nuc-in-Cyto", "roundness": "Roundness", "nuc_size": "NucSize",
                 "cyto_size": "CytoSize", "nuc_count": "NucCount", "cyto_count": "CytoCount"}
ACCURACY_LABELS = {"moa_accuracy": "MoA accuracy (judge)", "moa_accuracy_reward": "MoA accuracy (reward classifier)"}
SPLIT_TITLES = {"id": "In-distribution compounds (headline)", "ood": "Held-out (OOD) compounds",
                "all": "All compounds (in-distribution and held-out mixed)"}


def _cell(values: np.ndarray | None) -> dict:
    if values is None:
        return {"mean": None, "sem": None}
    mean, sem = mean_sem(values)
    return {"mean": mean, "sem": sem}


def _distance_cells(result, name: str, kid_name: str, fd_c=None, kid_c=None) -> dict:
    fd = None if result is None else result.fd
    kd = None if result is None else result.kid_mean
    kd_std = None if result is None else result.kid_std
    return {f"{name}_o": {"mean": fd, "sem": None}, f"{name}_c": {"mean": fd_c, "sem": None},
            f"{kid_name}_o": {"mean": kd, "sem": None, "std": kd_std}, f"{kid_name}_c": {"mean": kid_c, "sem": None}}


def _selected(sc, names: Sequence[str], weights: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Per-pair expected values under candidate ``weights`` ``(P, K)`` (rows sum to 1): rewards +
    overall, judge and reward-classifier hit rates, each ``(P,)`` float64."""
    def expect(v: np.ndarray) -> np.ndarray:
        return (weights * np.asarray(v, dtype=np.float64)).sum(axis=1)

    values = {name: expect(sc.components[name]) for name in names}
    values["overall"] = expect(sc.total)
    return values, expect(sc.correct), expect(sc.correct_reward)


def paired_differences(results: dict, n: int, base: str | None = None) -> dict[str, dict[str, dict]]:
    """Paired differences ``column - base`` over the same pairs, source noise and seeds.

    For every generated source other than ``base`` (default: the first source), the per-pair
    best-of-``n`` expectations (:func:`~cellfluxrl.metrics.best_of_n_weights`) of every reward, the
    overall reward and the judge's accuracy minus the base's, as ``{source: {row: {"mean", "sem"}}}``
    (mean and standard error over pairs). Sources are paired because every run draws candidate
    ``k`` of pair ``i`` from the same control, condition and noise seed.
    """
    names, sources = results["names"], results["sources"]
    base = sources[0] if base is None else base
    per = {}
    for s in sources:
        sc = results["scores"][s]
        values, correct, _ = _selected(sc, names, best_of_n_weights(sc.total, n))
        per[s] = {**values, "moa_accuracy": correct}
    return {s: {row: _cell(per[s][row] - per[base][row]) for row in per[s]} for s in sources if s != base}


def build_report(results: dict, split: str = "all", split_description: str = "") -> dict:
    """One report section (a dict) from :func:`cellfluxrl.evaluate.evaluate_sources`' results.

    Args:
        results: the evaluation results (scores per column, distances, pairs, grid images).
        split: the compound split the pairs come from (``"id"``, ``"ood"`` or ``"all"``).
        split_description: a sentence saying what the split is.
    """
    names, k_max, best_of = results["names"], results["k_max"], results["best_of"]
    tts_n = results.get("tts_n", k_max)
    fd_name, kid_name = results["feature_name"], results["kid_name"]
    pairs = results["pairs"]
    rows = [*names, "overall", *ACCURACY_LABELS, f"{fd_name}_o", f"{fd_name}_c", f"{kid_name}_o", f"{kid_name}_c"]
    table, per_condition, curves = {}, {}, {}
    compounds = np.unique(pairs.compound)

    def column_cells(values: dict[str, np.ndarray], correct: np.ndarray, correct_reward: np.ndarray,
                     column: str) -> dict:
        cells = {name: _cell(values[name]) for name in [*names, "overall"]}
        cells["moa_accuracy"] = _cell(correct.astype(np.float64))
        cells["moa_accuracy_reward"] = _cell(correct_reward.astype(np.float64))
        if column == REAL:
            cells.update(_distance_cells(None, fd_name, kid_name))
        else:
            per = results["per_condition_fd"].get(column, {})
            fds = [r.fd for r in per.values() if r.fd is not None]
            kds = [r.kid_mean for r in per.values() if r.kid_mean is not None]
            cells.update(_distance_cells(results["overall_fd"][column], fd_name, kid_name,
                                         float(np.mean(fds)) if fds else None, float(np.mean(kds)) if kds else None))
        per_condition[column] = {}
        for compound in compounds:
            mask = pairs.compound == compound
            entry = {"n": int(mask.sum()), "overall": mean_sem(values["overall"][mask])[0],
                     "moa_accuracy": float(correct[mask].mean()),
                     "moa_accuracy_reward": float(correct_reward[mask].mean())}
            r = results["per_condition_fd"].get(column, {}).get(str(compound))
            entry[fd_name] = None if r is None else r.fd
            entry[kid_name] = None if r is None else r.kid_mean
            per_condition[column][str(compound)] = entry
        return cells

    for s in results["sources"]:
        sc = results["scores"][s]
        curves[s] = {}
        for n in best_of:
            values, correct, correct_reward = _selected(sc, names, best_of_n_weights(sc.total, n))
            curves[s][str(n)] = {key: _cell(v) for key, v in values.items()}
            curves[s][str(n)]["moa_accuracy"] = _cell(correct.astype(np.float64))
            curves[s][str(n)]["moa_accuracy_reward"] = _cell(correct_reward.astype(np.float64))
            if n == 1:
                table[s] = column_cells(values, correct, correct_reward, s)
            if n == tts_n and tts_n > 1:
                column = f"{s}+best-of-{tts_n}"
                table[column] = column_cells(values, correct, correct_reward, column)
    real = results["scores"][REAL]
    values, correct, correct_reward = _selected(real, names, np.ones((len(pairs), 1)))
    table[REAL] = column_cells(values, correct, correct_reward, REAL)

    throughput = {}
    for s in [*results["sources"], REAL]:
        seconds = results["scores"][s].seconds
        n_images = len(pairs) * (k_max if s != REAL else 1)
        throughput[s] = {"images": n_images, "seconds": seconds, "images_per_s": n_images / seconds if seconds else None}
    labels = {row: REWARD_LABELS.get(row, row) for row in rows} | {"overall": "Overall"} | ACCURACY_LABELS
    return {
        "split": split, "split_description": split_description,
        "columns": list(table), "rows": rows, "table": table, "labels": labels,
        "best_of_n": curves, "per_condition": per_condition,
        "paired": {str(n): paired_differences(results, n) for n in sorted({1, tts_n})} if len(results["sources"]) > 1 else {},
        "distance": {"features": fd_name, "kid": kid_name, "source": results["feature_source"],
                     "note": distance_note(fd_name), **results["kid"]},
        "n_pairs": len(pairs), "n_conditions": int(compounds.size), "throughput": throughput,
    }


def distance_note(fd_name: str) -> str:
    """What the distance rows are, in one sentence."""
    if fd_name == "FID":
        return "FID/KID on the 2048-d pool features of the FID InceptionV3 (TF 2015-12-05 weights); KID unscaled"
    return ("offline substitute: Frechet and kernel distances on the penultimate features of the judge, an MoA "
            "classifier fitted independently of the reward's (not FID/KID, not comparable with published numbers); "
            "pass --inception FILE for FID/KID")


def versions() -> dict:
    """Software versions recorded in the report."""
    import torch

    import cellfluxrl

    return {"cellfluxrl": cellfluxrl.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0], "platform": platform.platform()}


def combine(sections: dict[str, dict], settings: dict) -> dict:
    """The whole report: the sections (split -> :func:`build_report` output), settings and versions."""
    return {"format": REPORT_FORMAT, "splits": list(sections), "sections": sections, "settings": settings,
            "versions": versions()}


def headline(report: dict) -> dict:
    """The headline section of a report: in-distribution compounds when present, else the first."""
    sections = report["sections"]
    return sections.get("id", next(iter(sections.values())))


def _fmt(cell: dict | None, row: str) -> str:
    if cell is None or cell.get("mean") is None:
        return "-"
    mean, sem = cell["mean"], cell.get("sem")
    if row.endswith("_o") or row.endswith("_c"):
        return f"{mean:.4g}" if abs(mean) < 10 else f"{mean:.2f}"
    return f"{mean:.3f} ± {sem:.3f}" if sem is not None else f"{mean:.3f}"


def markdown_table(section: dict, columns: Sequence[str] | None = None) -> str:
    """A section's main table (rows x columns, default all columns) as GitHub markdown."""
    columns = list(section["columns"] if columns is None else columns)
    labels = section["labels"]
    lines = ["| Metric | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for row in section["rows"]:
        cells = [_fmt(section["table"][c].get(row), row) for c in columns]
        lines.append(f"| {labels.get(row, row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section_title(section: dict) -> str:
    """E.g. ``"In-distribution compounds (headline): 64 test pairs, 20 conditions"``."""
    title = SPLIT_TITLES.get(section["split"], section["split"])
    return f"{title}: {section['n_pairs']} test pairs, {section['n_conditions']} compounds"


def sampling_lines(settings: dict) -> list[str]:
    """One line per run: the sampler and guidance it was evaluated with, and where they came from."""
    return [f"- {r['name']}: {r['sampling_text']} ({r['sampling_source']})" for r in settings.get("runs", [])]


def _section_markdown(section: dict) -> list[str]:
    out = [f"## {section_title(section)}", "", section["split_description"] + ".", "",
           markdown_table(section), "", *_paired_markdown(section), "### Best-of-N (selected by the overall reward)", ""]
    names = [r for r in section["rows"] if not r[-2:] in ("_o", "_c")]
    out.append("| Run | N | " + " | ".join(section["labels"].get(r, r) for r in names) + " |")
    out.append("|---|---|" + "---|" * len(names))
    for run, per_n in section["best_of_n"].items():
        for n, cells in per_n.items():
            out.append(f"| {run} | {n} | " + " | ".join(_fmt(cells.get(r), r) for r in names) + " |")
    fd, kd = section["distance"]["features"], section["distance"]["kid"]
    out += ["", "### Per condition", "",
            f"| Column | Condition | n | Overall | MoA accuracy (judge) | MoA accuracy (reward) | {fd} | {kd} |",
            "|---|---|---|---|---|---|---|---|"]
    for column, per in section["per_condition"].items():
        for name, e in per.items():
            d = "-" if e[fd] is None else f"{e[fd]:.4g}"
            k = "-" if e[kd] is None else f"{e[kd]:.4g}"
            out.append(f"| {column} | {name} | {e['n']} | {e['overall']:.3f} | {e['moa_accuracy']:.3f} | "
                       f"{e['moa_accuracy_reward']:.3f} | {d} | {k} |")
    out += ["", "### Throughput (generation + rewards + features, this machine)", ""]
    for column, t in section["throughput"].items():
        ips = "-" if t["images_per_s"] is None else f"{t['images_per_s']:.1f}"
        out.append(f"- {column}: {t['images']} images in {t['seconds']:.1f} s = {ips} images/s")
    return out + [""]


def _paired_markdown(section: dict) -> list[str]:
    """The paired-differences table (every run minus the first, at N = 1 and the table's best-of)."""
    paired = section.get("paired") or {}
    columns = [(n, s) for n, per in paired.items() for s in per]
    if not columns:
        return []
    base = section["columns"][0]
    head = [f"{s} - {base}" + ("" if n == "1" else f" (both best-of-{n})") for n, s in columns]
    rows = [r for r in section["rows"] if r in paired[columns[0][0]][columns[0][1]]]
    out = [f"### Paired differences against {base} (same pairs, controls and noise seeds; mean ± s.e. over pairs)", "",
           "| Metric | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for r in rows:
        out.append(f"| {section['labels'].get(r, r)} | " + " | ".join(_fmt(paired[n][s][r], r) for n, s in columns) + " |")
    return out + [""]


def markdown_report(report: dict) -> str:
    """``report.md``: settings, then per split the main table, best-of-N and per-condition tables."""
    s = report["settings"]
    first = headline(report)
    out = [f"# Evaluation on {s.get('dataset', '?')}", "",
           f"Seed {s.get('seed')}, best-of {s.get('best_of')}. Overall reward weights: {s.get('weights')}.",
           f"Distances: {first['distance']['note']}.", "",
           "MoA accuracy (judge) is graded by a classifier that RL never optimised; MoA accuracy (reward "
           "classifier) by the one behind the MoA reward: a large gap between them is reward hacking.", "",
           "Sampling of each run:", *sampling_lines(s), "",
           "Rewards (higher is better): per pair the expectation over all of a run's candidates (the plain "
           "column: their mean; best-of-N: each candidate weighted by its chance of being the best of N drawn "
           "from them), then mean ± standard error over pairs. Distances (lower is better; none for the real "
           "column) and Figure 4 use one image per pair: candidate 0, and the best of the first N.", ""]
    for section in report["sections"].values():
        out += _section_markdown(section)
    return "\n".join(out)


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    follow_umask(tmp)  # mkstemp files are private whatever the umask
    os.replace(tmp, path)


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
    reward (:func:`~cellfluxrl.metrics.best_of_n`), ``real`` its only candidate.
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
    """Figure 4's rows (:class:`~cellfluxrl.figures.GridRow`) from the results' ``grid`` pairs.

    Label: compound, MoA and (with ``dataset``) the target's dose; caption under every crop but the
    control: the overall reward of the candidate shown (:func:`shown_candidates`).
    """
    from cellfluxrl.figures import GridRow

    pairs = results["pairs"]
    columns = grid_columns(results["sources"], tts_of(results))
    shown = {c: shown_candidates(results, c) for c in columns}
    rows = []
    for p, images in results["grid"]:
        dose = None if dataset is None else float(dataset.table["dose"][pairs.target[p]])
        captions = {c: f"overall {results['scores'][s].total[p, pick[p]]:.2f}"
                    for c, (s, pick) in ((c, v) for c, v in shown.items() if v is not None)}
        rows.append(GridRow(row_label(pairs.compound[p], pairs.moa[p], dose), images, captions))
    return rows


def grid_note(results: dict) -> str:
    """What the numbers under the crops are (the weights of the overall reward spelled out)."""
    weights = ", ".join(f"{k}={v:g}" for k, v in results["weights"].items())
    return (f"Under each crop: the overall reward of the image shown (weighted sum: {weights}); "
            f"best-of-{tts_of(results)}: the highest-overall of {tts_of(results)} candidates.")


def real_levels(section: dict, keys: Sequence[str]) -> dict[str, float]:
    """Reward key -> the real column's mean (Figure 5's dashed line); keys without a value are left out."""
    cells = section["table"].get(REAL, {})
    return {k: cells[k]["mean"] for k in keys if cells.get(k, {}).get("mean") is not None}


def write_section_figures(section: dict, results: dict, out: Path, dataset=None) -> dict[str, str]:
    """Figure 5 (best-of-N curves) and Figure 4 (image grid) of one section; returns their file names.

    ``dataset`` (optional) adds each row's dose and the dataset's channel names to Figure 4.
    """
    from cellfluxrl.figures import best_of_n_figure, image_grid_figure
    from cellfluxrl.images import CHANNELS_BBBC021

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


def write_report(report: dict, out: str | os.PathLike) -> dict[str, Path]:
    """Write ``report.md`` then ``report.json`` (last: its presence means the evaluation finished)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md"}
    report["files"] = {k: p.name for k, p in paths.items()}
    _write_text(paths["md"], markdown_report(report))
    _write_text(paths["json"], json.dumps(report, indent=2, allow_nan=False, default=_json_default) + "\n")
    return paths


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
