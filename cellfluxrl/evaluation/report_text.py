"""The report as files: ``report.md`` (settings, then per split the main table, paired differences,
best-of-N and per-condition tables) and ``report.json``, each written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from cellfluxrl.data.layout import follow_umask
from cellfluxrl.evaluation.profiles import ROW as PROFILE
from cellfluxrl.evaluation.report import SPLIT_TITLES, headline


SE_LEGEND = "mean ± s.e. over pairs [s.e. clustered by compound]"


def _fmt(cell: dict | None, row: str, signed: bool = False) -> str:
    """One table cell: ``mean ± s.e. [clustered s.e.]`` (:data:`SE_LEGEND`; ``signed``: with a leading
    ``+`` on gains, for differences); a distance: its value, ``± bootstrap s.e.`` when known; a mean over
    compounds (the profile similarity): ``mean ± s.e. (over compounds)``."""
    if cell is None or cell.get("mean") is None:
        return "-"
    mean, sem, clustered = cell["mean"], cell.get("sem"), cell.get("sem_compound")
    if cell.get("sem_kind") == "over compounds":
        value = f"{mean:+.3f}" if signed else f"{mean:.3f}"
        return value if sem is None else f"{value} ± {sem:.3f} (over compounds)"
    if row.endswith("_o") or row.endswith("_c"):
        value = f"{mean:.4g}" if abs(mean) < 10 else f"{mean:.2f}"
        value = f"+{value}" if signed and mean >= 0 else value
        kind = {"paired": "paired bootstrap", "jackknife": "jackknife"}.get(cell.get("sem_kind", "").split(" ")[0],
                                                                           "bootstrap")
        return f"{value} ± {sem:.2g} ({kind})" if sem is not None else value
    value = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    if sem is None:
        return value
    return f"{value} ± {sem:.3f}" + (f" [{clustered:.3f}]" if clustered is not None else "")


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
    pairs, compounds = section["n_pairs"], section["n_conditions"]
    return (f"{title}: {pairs} test pair{'' if pairs == 1 else 's'}, "
            f"{compounds} compound{'' if compounds == 1 else 's'}")


def sampling_lines(settings: dict) -> list[str]:
    """The one sampler and guidance every run was evaluated with, and why (older reports: one line per run)."""
    shared = settings.get("sampling")
    if shared:
        return [f"- every run: {shared['text']} ({shared['reason']})"]
    return [f"- {r['name']}: {r['sampling_text']} ({r['sampling_source']})" for r in settings.get("runs", [])]


def distance_lines(section: dict) -> list[str]:
    """What the pooled distance rows of a section are: the jackknife, the n > D rule, KD (one line each)."""
    d = section.get("distance", {})
    jackknife, pooled = d.get("jackknife") or {}, d.get("pooled") or {}
    out = []
    if jackknife.get("row") and jackknife.get("note", "").startswith("-"):
        out.append(f"{jackknife['row']}: {jackknife['note'].split(': ', 1)[-1]}")
    elif jackknife.get("note"):
        out.append(jackknife["note"])
    if pooled.get("note"):
        out.append(pooled["note"])
    if d.get("kd_note"):
        out.append(d["kd_note"][:1].upper() + d["kd_note"][1:])
    return [f"- {line}." for line in out]


def _section_markdown(section: dict) -> list[str]:
    profile = (section.get("profile") or {}).get("note")
    lines = distance_lines(section) + ([f"- {profile}."] if profile else [])
    out = [f"## {section_title(section)}", "", section["split_description"] + ".", "",
           markdown_table(section), "", *(lines + [""] if lines else []), *_baseline_markdown(section),
           *_paired_markdown(section),
           "### Best-of-N (selected by the overall reward)", ""]
    names = [r for r in section["rows"] if not r[-2:] in ("_o", "_c") and r != PROFILE]  # per pair only
    out.append("| Run | N | " + " | ".join(section["labels"].get(r, r) for r in names) + " |")
    out.append("|---|---|" + "---|" * len(names))
    for run, per_n in section["best_of_n"].items():
        for n, cells in per_n.items():
            out.append(f"| {run} | {n} | " + " | ".join(_fmt(cells.get(r), r) for r in names) + " |")
    fd, kd = section["distance"]["features"], section["distance"]["kid"]
    note = section["distance"].get("per_compound", {}).get("note")
    out += ["", "### Per condition", "", *([note + ".", ""] if note else []),
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


def _baseline_markdown(section: dict) -> list[str]:
    """What the baseline columns say: why one is missing, each run minus copy-control, who learned nothing."""
    baselines = section.get("baselines") or {}
    out = [f"- {note}." for note in baselines.get("notes", [])]
    versus = baselines.get("versus_copy_control") or {}
    if versus:
        labels = section["labels"]
        out += ["", f"### Against copy-control (each run minus the control image itself, same pairs; {SE_LEGEND})", "",
                "| Run | " + " | ".join(labels.get(r, r) for r in ("moa", "moa_accuracy", "overall")) + " |",
                "|---|---|---|---|"]
        for run, cells in versus.items():
            out.append(f"| {run} | " + " | ".join(_fmt(cells.get(r), r, signed=True)
                                                   for r in ("moa", "moa_accuracy", "overall")) + " |")
    for run, rows in (baselines.get("learned_nothing") or {}).items():
        out.append(f"\n**{run} does not beat copy-control on {' and '.join(section['labels'].get(r, r) for r in rows)}: "
                   f"it has learned no perturbation there.**")
    return out + [""] if out else []


def _paired_markdown(section: dict) -> list[str]:
    """The paired-differences table (every run minus the first, at N = 1 and the table's best-of)."""
    paired = section.get("paired") or {}
    columns = [(n, s) for n, per in paired.items() for s in per]
    if not columns:
        return []
    base = section["columns"][0]
    head = [f"{s} - {base}" + ("" if n == "1" else f" (both best-of-{n})") for n, s in columns]
    first = paired[columns[0][0]][columns[0][1]]
    rows = [r for r in section["rows"] if r in first] + [r for r in first if r not in section["rows"]]
    out = [f"### Paired differences against {base} (same pairs, controls and noise seeds; {SE_LEGEND})", "",
           "| Metric | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for r in rows:
        out.append(f"| {section['labels'].get(r, r)} | " + " | ".join(_fmt(paired[n][s][r], r, signed=True) for n, s in columns) + " |")
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
           "Sampling:", *sampling_lines(s), "",
           "Rewards (higher is better): per pair the expectation over all of a run's candidates (the plain "
           "column: their mean; best-of-N: each candidate weighted by its chance of being the best of N drawn "
           "from them), then mean ± standard error over pairs [standard error clustered by compound: pairs "
           "share compounds, so a claim about compounds needs the bracketed one]. Distances (lower is "
           "better; none for the real column) and Figure 4 use one image per pair: candidate 0, and the best "
           "of the first N. The plain pooled Frechet distance (`_o`, ± bootstrap s.e. over pairs) is shown only "
           "where the pairs outnumber the features (n > D); `-jk_o` is the same distance with its 1/n bias "
           "removed by a jackknife over pairs (± jackknife s.e.), shown at any n; in the paired table their "
           "differences carry a paired bootstrap s.e. (the same pairs resampled for both runs and the real "
           "targets). Profile similarity (higher is better, at most 1): per compound, the cosine of the median "
           "standardised morphology profile of the column's images and of the real targets', mean ± s.e. over "
           "compounds; the real column reads 1 by construction.", ""]
    for section in report["sections"].values():
        out += _section_markdown(section)
    return "\n".join(out)


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    follow_umask(tmp)  # mkstemp files are private whatever the umask
    os.replace(tmp, path)


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
