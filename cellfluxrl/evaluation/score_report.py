"""``cellfluxrl score``: evaluate's report for images from any generator (:func:`score_images`).

Each source is put on its pairs (:func:`~cellfluxrl.evaluation.external.pair_images`) and split into
the in-distribution and held-out sections by its compounds. Within a section, sources naming the
same pairs form one **group**, scored together by
:func:`~cellfluxrl.evaluation.scoring.evaluate_sources` exactly as ``evaluate`` scores runs: the
real targets, the baselines (``copy-control``, ``train-real``) and the distances on the group's
pairs, with paired differences between its sources. An unpaired source is a group of its own. With
more than one group, the real and baseline columns of every group after the first carry the name
of the group's first source in brackets (``real [impa]``), and a source compared with one of
another group is compared unpaired (Welch: difference of means, standard errors added in
quadrature; per pair and clustered by compound). ``section["comparison"]`` says which, per column.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from cellfluxrl.errors import CellfluxError
from cellfluxrl.evaluation.external import (PairedImages, aligned, image_candidates, same_pairs, sections_of,
                                            unpaired_difference)
from cellfluxrl.evaluation.report import REAL, build_report, combine, paired_differences

COMPARED_ROWS = ("overall", "moa_accuracy", "moa_accuracy_reward", "texture_hf")


def default_best_of(k: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to ``k``, and ``k`` (``evaluate``'s default ``1,2,4`` for ``k = 4``)."""
    return tuple(sorted({1, k, *(2 ** i for i in range(k.bit_length()) if 2 ** i <= k)}))


def groups_of(sources: Sequence[PairedImages]) -> list[list[PairedImages]]:
    """Sources that name the same pairs, together (aligned to the first's pair order); unpaired ones alone."""
    groups: list[list[PairedImages]] = []
    for source in sources:
        home = next((g for g in groups if same_pairs(g[0], source)), None)
        if home is None:
            groups.append([source])
        else:
            home.append(aligned(source, home[0].keys()))
    return groups


def _group_results(dataset, group: list[PairedImages], graders, baselines, best_of, seed: int, options: dict,
                   on_progress) -> tuple[dict, list[str]]:
    from cellfluxrl.evaluation.baselines import baseline_sources
    from cellfluxrl.evaluation.scoring import evaluate_sources

    suite, classifier, judge, features, weights = graders
    k = min(s.k for s in group)
    best = tuple(b for b in (best_of or default_best_of(k)) if b <= k) or (1,)
    notes = [f"{s.name} has {s.k} candidates per pair; the first {k} are scored beside {group[0].name}"
             for s in group if s.k > k]
    pairs = group[0].pairs
    references, baseline_notes = baseline_sources(baselines, dataset, pairs, seed)
    with torch.inference_mode(False), torch.no_grad():
        results = evaluate_sources(dataset, pairs, {s.name: image_candidates(s) for s in group}, suite=suite,
                                   weights=weights, features=features, classifier=classifier, judge=judge,
                                   best_of=best, seed=seed, tts_n=max(best), references=references,
                                   on_progress=on_progress, **options)
    results["baseline_notes"] = baseline_notes + notes
    return results, [s.name for s in group]


def _renamed(section: dict, suffix: str) -> dict:
    """A group's section with its real and baseline columns renamed ``NAME [suffix]``."""
    rename = {c: f"{c} [{suffix}]" for c in [*section["baselines"]["columns"], REAL]}
    out = dict(section)
    out["columns"] = [rename.get(c, c) for c in section["columns"]]
    for key in ("table", "per_condition", "throughput"):
        out[key] = {rename.get(c, c): v for c, v in section[key].items()}
    out["baselines"] = {**section["baselines"], "columns": [rename[c] for c in section["baselines"]["columns"]]}
    return out


def merge_groups(sections: list[dict], names: list[list[str]]) -> dict:
    """One report section from the sections of several groups (see the module docstring)."""
    merged = dict(sections[0])
    if len(sections) == 1:
        return merged
    merged["groups"] = [{"columns": n, "n_pairs": s["n_pairs"]} for s, n in zip(sections, names)]
    for section, group in zip(sections[1:], names[1:]):
        section = _renamed(section, group[0])
        merged["columns"] = [*merged["columns"], *section["columns"]]
        for key in ("table", "per_condition", "throughput", "best_of_n"):
            merged[key] = {**merged[key], **section[key]}
        base = merged["baselines"]
        other = section["baselines"]
        merged["baselines"] = {"columns": [*base["columns"], *other["columns"]], "notes": [*base["notes"], *other["notes"]],
                               "versus_copy_control": {**base["versus_copy_control"], **other["versus_copy_control"]},
                               "learned_nothing": {**base["learned_nothing"], **other["learned_nothing"]}}
        merged["n_conditions"] = max(merged["n_conditions"], section["n_conditions"])
    notes = [f"{group[0]}'s pairs: {s['profile']['note']}" for s, group in zip(sections, names) if s.get("profile")]
    if notes:  # each group's profiles are standardised by and compared with its own real targets
        merged["profile"] = {**(sections[0].get("profile") or {}), "note": "; ".join(notes)}
    return merged


def comparison(section: dict, group_results: list[tuple[dict, list[str]]]) -> dict:
    """Every source minus the first: paired where both name the same pairs, else unpaired (Welch)."""
    names = [n for _, group in group_results for n in group]
    base = names[0]
    rows = [*group_results[0][0]["names"], *COMPARED_ROWS]
    out = {"base": base, "kind": {}, "versus": {}}
    first_results, first_names = group_results[0]
    paired = paired_differences(first_results, 1, base) if len(first_names) > 1 else {}
    for name in names[1:]:
        if name in first_names:
            out["kind"][name] = "paired"
            out["versus"][name] = {r: paired[name][r] for r in rows}
        else:
            out["kind"][name] = "unpaired"
            out["versus"][name] = {r: unpaired_difference(section["table"][name][r], section["table"][base][r])
                                   for r in rows}
    return out


def comparison_lines(section: dict) -> list[str]:
    """The comparison as text: which columns are paired, which unpaired, and the differences."""
    from cellfluxrl.evaluation.report_text import markdown_table

    found = section.get("comparison") or {}
    if not found.get("versus"):
        return []
    base, kinds = found["base"], found["kind"]
    lines = []
    for kind, how in (("paired", "paired: the same pairs (targets, controls and noise seeds), per-pair differences"),
                      ("unpaired", "unpaired: different pairs, Welch's difference of means, standard errors added "
                                   "in quadrature (per pair and clustered by compound)")):
        shown = [c for c, k in kinds.items() if k == kind]
        if shown:
            lines.append(f"{', '.join(shown)} - {base}: {how}")
    rows = list(next(iter(found["versus"].values())))
    table = {"columns": [f"{c} - {base}" for c in found["versus"]], "rows": rows, "labels": section["labels"],
             "table": {f"{c} - {base}": cells for c, cells in found["versus"].items()}}
    return [*lines, "", markdown_table(table)]


def score_images(dataset, sources: Sequence[PairedImages], *, weights: Mapping[str, float], seed: int = 0,
                 best_of: Sequence[int] | None = None, split: str = "both", baselines: Sequence[str] = (),
                 inception=None, device: str = "cpu", batch_size: int = 32, kid_subset_size: int = 100,
                 kid_subsets: int = 100, settings: Mapping | None = None,
                 on_progress: Callable[[str, int, int], None] | None = None) -> tuple[dict, dict]:
    """Score image sources on their pairs: the report (as ``evaluate``'s) and, per section, the first
    group's results (for the figures).

    Args:
        dataset: the loaded dataset (with evaluators).
        sources: the sources on their pairs, in column order (names unique).
        weights: the overall reward's weights.
        seed: seeds the baselines' draws, reservoirs and KID subsets (``evaluate``'s ``--seed``).
        best_of: N values of the best-of-N curves (``None``: :func:`default_best_of` of the candidates).
        split: ``"both"``, ``"id"``, ``"ood"`` or ``"all"`` (:func:`~cellfluxrl.evaluation.external.sections_of`).
        baselines: baseline column names.
        inception, device, batch_size, kid_subset_size, kid_subsets: as ``evaluate``.
        settings: more entries for ``report["settings"]``.
        on_progress: ``(section, pairs done, pairs total)``.
    """
    from cellfluxrl.evaluation.pipeline import graders
    from cellfluxrl.model.generate import SPLITS

    suite, classifier, judge, features = graders(dataset, weights, inception, device)
    options = {"batch_size": batch_size, "kid_subset_size": kid_subset_size, "kid_subsets": kid_subsets}
    sections, firsts = {}, {}
    try:
        for part in ("id", "ood", "all"):
            parts = [s.subset(sections_of(s, dataset, split)[part]) for s in sources if part in sections_of(s, dataset, split)]
            if not parts:
                continue
            progress = None if on_progress is None else (lambda st, d, t, part=part: on_progress(part, d, t))
            found = [_group_results(dataset, g, (suite, classifier, judge, features, weights), baselines, best_of, seed,
                                    options, progress) for g in groups_of(parts)]
            built = [build_report(r, split=part, split_description=SPLITS[part]) for r, _ in found]
            section = merge_groups(built, [n for _, n in found])
            section["comparison"] = comparison(section, found)
            sections[part], firsts[part] = section, found[0][0]
    finally:
        suite.close()
    if not sections:
        raise CellfluxError(f"no images of the {split!r} split to score")
    report = combine(sections, {"command": "score", "seed": int(seed), "split": split, "weights": dict(weights),
                                "baselines": list(baselines), "batch_size": int(batch_size), "device": str(device),
                                "inception": None if inception is None else str(inception),
                                "graders": {"rewards": str(suite.evaluators.classifier_path),
                                            "judge": str(suite.evaluators.judge_path)},
                                "sampling": {"text": "none (images read from files, not sampled by cellfluxrl)",
                                             "reason": "cellfluxrl score"},
                                "best_of": sorted({int(b) for s in sections.values() for b in _curves(s)}),
                                **dict(settings or {})})
    return report, firsts


def _curves(section: dict) -> list[int]:
    return [int(n) for per in section["best_of_n"].values() for n in per] or [1]
