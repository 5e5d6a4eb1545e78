"""The evaluation report: ``report.json``, ``report.md`` and the figures, from the evaluation's results.

A report holds one **section** per compound split (``"id"``: in-distribution compounds, the
headline as in CellFlux; ``"ood"``: the held-out compounds, never mixed into the headline), each
a full table::

    {"format": "cellfluxrl-evaluate/2", "settings": {...}, "versions": {...},
     "splits": ["id", "ood"], "sections": {"id": SECTION, "ood": SECTION}, "files": {...}}
    SECTION = {"split", "split_description", "columns", "rows", "labels", "table", "best_of_n", "paired",
               "per_condition", "distance", "n_pairs", "n_conditions", "throughput", "profile", "files"}

Rows: every reward (per pair its expectation over the K candidates, plain or best-of-N, see
:func:`~cellfluxrl.evaluation.metrics.best_of_n_weights`; then the mean, its standard error over pairs
``sem`` and its standard error clustered by compound ``sem_compound``, the one for claims about
compounds: pairs share compounds),
``overall`` (the weighted sum), ``moa_accuracy`` (the **judge**'s top-1 accuracy: an MoA classifier
fitted independently of the reward's), ``moa_accuracy_reward`` (the reward classifier's accuracy, so
reward hacking shows as the gap between the two), ``texture_hf`` (the share of image power above
half the Nyquist frequency, :mod:`cellfluxrl.evaluation.texture`: speckle shows as a gap to
``real``), ``profile_similarity`` (the cosine of each compound's median standardised morphology
profile to its real targets', mean ± s.e. over compounds, :mod:`cellfluxrl.evaluation.profiles`;
``real`` reads 1 by construction), then the distances ``<FD>_o`` (only where the pairs outnumber the
features), ``<FD>-jk_o``
(the same with its 1/n bias removed by a jackknife over pairs, :mod:`cellfluxrl.evaluation.debiased`),
``<FD>_c``, ``<KD>_o``, ``<KD>_c`` on the judge's features (or FID/KID with the Inception weights).
``paired``: per N (1 and the table's best-of) every run minus the first on the same pairs, the
pooled Frechet rows with a paired bootstrap s.e. (:func:`paired_differences`).

This module builds the report dict; :mod:`cellfluxrl.evaluation.report_text` renders and writes
``report.md`` / ``report.json``, :mod:`cellfluxrl.evaluation.report_figures` its figures.
"""

from __future__ import annotations

import platform
import sys
from typing import Sequence

import numpy as np

from cellfluxrl.evaluation.metrics import best_of_n_weights, mean_sem
from cellfluxrl.evaluation.profiles import LABEL as PROFILE_LABEL, ROW as PROFILE, profile_similarity
from cellfluxrl.evaluation.uncertainty import mean_sem_clustered


REPORT_FORMAT = "cellfluxrl-evaluate/2"
REAL = "real"
CONTROL_COLUMN = "control"
REWARD_LABELS = {"moa": "MoA", "nuc_in_cyto": "Nuc-in-Cyto", "roundness": "Roundness", "nuc_size": "NucSize",
                 "cyto_size": "CytoSize", "nuc_count": "NucCount", "cyto_count": "CytoCount"}
ACCURACY_LABELS = {"moa_accuracy": "MoA accuracy (judge)", "moa_accuracy_reward": "MoA accuracy (reward classifier)"}
TEXTURE = "texture_hf"  # evaluation.texture.high_frequency_share: compare each column with `real`
TEXTURE_LABEL = "Texture (power above Nyquist/2)"
SPLIT_TITLES = {"id": "In-distribution compounds (headline)", "ood": "Held-out (OOD) compounds",
                "all": "All compounds (in-distribution and held-out mixed)"}


def _cell(values: np.ndarray | None, compounds: np.ndarray | None = None) -> dict:
    """``{"mean", "sem", "sem_compound"}`` of per-pair values: the per-pair standard error and the one
    clustered by the pairs' compounds (:func:`~cellfluxrl.evaluation.uncertainty.mean_sem_clustered`;
    ``None`` without compounds)."""
    if values is None:
        return {"mean": None, "sem": None, "sem_compound": None}
    if compounds is None:
        mean, sem = mean_sem(values)
        return {"mean": mean, "sem": sem, "sem_compound": None}
    mean, sem, clustered = mean_sem_clustered(values, compounds)
    return {"mean": mean, "sem": sem, "sem_compound": None if not np.isfinite(clustered) else clustered}


def _distance_cells(result, name: str, kid_name: str, fd_c=None, kid_c=None, fd_sem=None,
                    debiased: tuple[str, float | None, float | None] | None = None) -> dict:
    """The distance rows of a column; ``sem`` of ``<FD>_o`` is its bootstrap standard error over pairs.

    ``debiased``: ``(row, FD, jackknife s.e.)`` of the jackknife pooled distance (:func:`debiased_row`), if any.
    """
    fd = None if result is None else result.fd
    kd = None if result is None else result.kid_mean
    kd_std = None if result is None else result.kid_std
    cells = {f"{name}_o": {"mean": fd, "sem": fd_sem, "sem_kind": "bootstrap over pairs"}}
    if debiased is not None:
        cells[debiased[0]] = {"mean": debiased[1], "sem": debiased[2], "sem_kind": "jackknife over pairs"}
    return {**cells, f"{name}_c": {"mean": fd_c, "sem": None},
            f"{kid_name}_o": {"mean": kd, "sem": None, "std": kd_std}, f"{kid_name}_c": {"mean": kid_c, "sem": None}}


def debiased_row(results: dict) -> str | None:
    """The row of the jackknife pooled Frechet distance, e.g. ``"FD-judge-jk_o"`` (None: older results)."""
    suffix = (results.get("distances") or {}).get("jackknife", {}).get("suffix")
    return None if suffix is None else f"{results['feature_name']}-{suffix}_o"


def paired_distances(results: dict, n: int, base: str, draws: int = 100) -> dict[str, dict[str, dict]]:
    """Per run other than ``base``: ``FD(run) - FD(base)`` on the pooled Frechet rows shown (the jackknife
    one, and the plain one where ``n > D``) when every pair's features were kept, with the paired
    bootstrap s.e. (:func:`~cellfluxrl.evaluation.uncertainty.paired_fd_difference`: the same pairs
    resampled for both runs and the real targets, the distance recomputed, jackknife included, per draw).

    ``n``: the best-of-N of both columns (1: the plain ones). Returns ``{run: {row: cell}}``.
    """
    from cellfluxrl.evaluation.uncertainty import paired_fd_difference

    distances = results.get("distances") or {}
    rows = distances.get("rows")
    if not rows or not distances["jackknife"]["shown"]:
        return {}
    groups_by_row = {debiased_row(results): distances["jackknife"]["groups"]}
    if distances["full"]["shown"]:
        groups_by_row[f"{results['feature_name']}_o"] = None  # the plain distance

    def column(s: str) -> str:
        return s if n == 1 else f"{s}+best-of-{n}"

    out = {}
    for s in results["sources"]:
        if s == base:
            continue
        out[s] = {}
        for row, groups in groups_by_row.items():
            if column(s) not in rows or column(base) not in rows:
                continue
            diff, sem = paired_fd_difference(rows[REAL], rows[column(base)], rows[column(s)], draws=draws,
                                             seed=int(results.get("seed", 0)), groups=groups)
            out[s][row] = {"mean": diff, "sem": sem, "sem_compound": None, "sem_kind": "paired bootstrap over pairs"}
    return out


def _selected(sc, names: Sequence[str], weights: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Per-pair expected values under candidate ``weights`` ``(P, K)`` (rows sum to 1): rewards +
    overall, judge and reward-classifier hit rates, each ``(P,)`` float64."""
    def expect(v: np.ndarray) -> np.ndarray:
        return (weights * np.asarray(v, dtype=np.float64)).sum(axis=1)

    values = {name: expect(sc.components[name]) for name in names}
    values["overall"] = expect(sc.total)
    values[TEXTURE] = expect(sc.texture)
    return values, expect(sc.correct), expect(sc.correct_reward)


def paired_differences(results: dict, n: int, base: str | None = None,
                       distances: bool = True) -> dict[str, dict[str, dict]]:
    """Paired differences ``column - base`` over the same pairs, source noise and seeds.

    For every generated source other than ``base`` (default: the first source), the per-pair
    best-of-``n`` expectations (:func:`~cellfluxrl.evaluation.metrics.best_of_n_weights`) of every reward, the
    overall reward, the texture statistic, the judge's and the reward classifier's accuracies and
    their gap (``moa_accuracy_gap``: judge minus reward classifier) minus the base's, as ``{source: {row: {"mean", "sem",
    "sem_compound"}}}`` (mean, standard error over pairs, and standard error clustered by compound). Sources are paired because every run draws candidate
    ``k`` of pair ``i`` from the same control, condition and noise seed. With ``distances``, also the
    pooled Frechet rows' differences with their paired bootstrap s.e. (:func:`paired_distances`).
    """
    names, sources = results["names"], results["sources"]
    base = sources[0] if base is None else base
    per = {}
    for s in dict.fromkeys([*sources, base]):
        sc = results["scores"][s]
        values, correct, correct_reward = _selected(sc, names, best_of_n_weights(sc.total, n))
        per[s] = {**values, "moa_accuracy": correct, "moa_accuracy_reward": correct_reward,
                  "moa_accuracy_gap": correct - correct_reward}
    compounds = results["pairs"].compound
    fd = paired_distances(results, n, base) if distances else {}
    return {s: {**{row: _cell(per[s][row] - per[base][row], compounds) for row in per[s]}, **fd.get(s, {})}
            for s in sources if s != base}


def baseline_comparison(results: dict) -> dict:
    """Every run (plain, N = 1) minus ``copy-control`` on the same pairs, and the runs that do not beat it.

    Returns:
        ``{"columns": [baseline columns], "notes": [why one is missing], "versus_copy_control":
        {run: {row: cell}}, "learned_nothing": {run: [rows <= 0]}}`` (the last two empty without a
        ``copy-control`` column): a run that does not raise the MoA reward and the judge's accuracy
        above copying the control has learned no perturbation.
    """
    from cellfluxrl.evaluation.baselines import learned_nothing

    references = list(results.get("references", []))
    out = {"columns": references, "notes": list(results.get("baseline_notes", [])), "versus_copy_control": {},
           "learned_nothing": {}}
    if "copy-control" in references and results["sources"]:
        versus = paired_differences(results, 1, base="copy-control", distances=False)
        out["versus_copy_control"] = {s: versus[s] for s in results["sources"]}
        out["learned_nothing"] = learned_nothing(out["versus_copy_control"])
    return out


def build_report(results: dict, split: str = "all", split_description: str = "") -> dict:
    """One report section (a dict) from :func:`cellfluxrl.evaluation.scoring.evaluate_sources`' results.

    Args:
        results: the evaluation results (scores per column, distances, pairs, grid images).
        split: the compound split the pairs come from (``"id"``, ``"ood"`` or ``"all"``).
        split_description: a sentence saying what the split is.
    """
    names, k_max, best_of = results["names"], results["k_max"], results["best_of"]
    tts_n = results.get("tts_n", k_max)
    fd_name, kid_name = results["feature_name"], results["kid_name"]
    pairs = results["pairs"]
    debiased = debiased_row(results)
    distances = results.get("distances") or {}
    rows = [*names, "overall", *ACCURACY_LABELS, TEXTURE, PROFILE, f"{fd_name}_o", *([debiased] if debiased else []),
            f"{fd_name}_c", f"{kid_name}_o", f"{kid_name}_c"]
    table, per_condition, curves = {}, {}, {}
    compounds = np.unique(pairs.compound)
    profile = profile_similarity(results["profiles"], REAL, pairs.compound) if results.get("profiles") else None

    def column_cells(values: dict[str, np.ndarray], correct: np.ndarray, correct_reward: np.ndarray,
                     column: str) -> dict:
        cells = {name: _cell(values[name], pairs.compound) for name in [*names, "overall", TEXTURE]}
        cells["moa_accuracy"] = _cell(correct.astype(np.float64), pairs.compound)
        cells["moa_accuracy_reward"] = _cell(correct_reward.astype(np.float64), pairs.compound)
        cells[PROFILE] = _cell(None) if profile is None else profile["cells"][column]
        if column == REAL:
            cells.update(_distance_cells(None, fd_name, kid_name, debiased=None if debiased is None else
                                         (debiased, None, None)))
        else:
            per = results["per_condition_fd"].get(column, {})
            fds = [r.fd for r in per.values() if r.fd is not None]
            kds = [r.kid_mean for r in per.values() if r.kid_mean is not None]
            cells.update(_distance_cells(results["overall_fd"][column], fd_name, kid_name,
                                         float(np.mean(fds)) if fds else None, float(np.mean(kds)) if kds else None,
                                         results.get("overall_fd_sem", {}).get(column),
                                         None if debiased is None else (debiased, distances["fd"].get(column),
                                                                        distances["fd_sem"].get(column))))
        per_condition[column] = {}
        for compound in compounds:
            mask = pairs.compound == compound
            entry = {"n": int(mask.sum()), "overall": mean_sem(values["overall"][mask])[0],
                     "moa_accuracy": float(correct[mask].mean()),
                     "moa_accuracy_reward": float(correct_reward[mask].mean())}
            r = results["per_condition_fd"].get(column, {}).get(str(compound))
            entry[fd_name] = None if r is None else r.fd
            entry[kid_name] = None if r is None else r.kid_mean
            entry[PROFILE] = None if profile is None else profile["per_compound"][column].get(str(compound))
            per_condition[column][str(compound)] = entry
        return cells

    for s in results["sources"]:
        sc = results["scores"][s]
        curves[s] = {}
        for n in best_of:
            values, correct, correct_reward = _selected(sc, names, best_of_n_weights(sc.total, n))
            curves[s][str(n)] = {key: _cell(v, pairs.compound) for key, v in values.items()}
            curves[s][str(n)]["moa_accuracy"] = _cell(correct.astype(np.float64), pairs.compound)
            curves[s][str(n)]["moa_accuracy_reward"] = _cell(correct_reward.astype(np.float64), pairs.compound)
            if n == 1:
                table[s] = column_cells(values, correct, correct_reward, s)
            if n == tts_n and tts_n > 1:
                column = f"{s}+best-of-{tts_n}"
                table[column] = column_cells(values, correct, correct_reward, column)
    references = list(results.get("references", []))
    for column in [*references, REAL]:
        values, correct, correct_reward = _selected(results["scores"][column], names, np.ones((len(pairs), 1)))
        table[column] = column_cells(values, correct, correct_reward, column)

    throughput = {}
    for s in [*results["sources"], *references, REAL]:
        seconds = results["scores"][s].seconds
        n_images = len(pairs) * (k_max if s in results["sources"] else 1)
        throughput[s] = {"images": n_images, "seconds": seconds, "images_per_s": n_images / seconds if seconds else None}
    labels = ({row: REWARD_LABELS.get(row, row) for row in rows} | {"overall": "Overall"} | ACCURACY_LABELS
              | {TEXTURE: TEXTURE_LABEL, PROFILE: PROFILE_LABEL,
                 "moa_accuracy_gap": "MoA accuracy gap (judge - reward classifier)"})
    return {
        "split": split, "split_description": split_description,
        "columns": list(table), "rows": rows, "table": table, "labels": labels,
        "best_of_n": curves, "per_condition": per_condition,
        "paired": {str(n): paired_differences(results, n) for n in sorted({1, tts_n})} if len(results["sources"]) > 1 else {},
        "baselines": baseline_comparison(results),
        "distance": {"features": fd_name, "kid": kid_name, "source": results["feature_source"],
                     "note": distance_note(fd_name), **results["kid"],
                     "per_compound": results.get("per_compound", {"shown": True, "note": ""}),
                     "pooled": distances.get("full", {"shown": True, "note": ""}),
                     "jackknife": {**distances.get("jackknife", {"suffix": None}), "row": debiased},
                     "kd_note": KD_NOTE},
        "n_pairs": len(pairs), "n_conditions": int(compounds.size), "throughput": throughput,
        "profile": None if profile is None else {k: v for k, v in profile.items()
                                                 if k not in ("cells", "per_compound")},
    }


KD_NOTE = ("kernel distances (unbiased MMD^2, polynomial kernel) stay on all features: their expectation is 0 for two "
           "samples of one distribution at any n, so they may be slightly negative")


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
