"""Evaluation: the paper's Table 1 (rewards, MoA accuracy, FID/KID), Figure 5 and Figure 4.

Protocol (CellFlux's, plus CellFluxRL's best-of-N, graded so that it cannot flatter a model):

* Splits: the in-distribution compounds (the headline, as CellFlux) and the held-out (OOD)
  compounds are evaluated as separate sections, never mixed (``split``).
* Pairs: the first ``n`` treated test rows of the split in CSV order, each with a same-plate DMSO
  control (:func:`cellfluxrl.model.generate.test_pairs`). Every run is evaluated on the same pairs *and*
  the same source noise: candidate ``k`` of the pair whose target is image ``i`` starts from
  ``x_0 = x_ctrl + sigma * eps``, ``eps`` drawn from a generator seeded by ``(seed, i, k)``, so two
  runs differ only by their networks (paired differences) and a sample does not depend on the
  batch it lands in.
* Sampling: every run of one evaluation is sampled at **one** setting (sampler steps, CFG, sigma;
  :class:`cellfluxrl.checkpoint.Sampling`), so a paired difference compares networks, not
  samplers: the one given by the caller (``steps``/``cfg_scale``/``sigma``), else the first run's
  recorded one (:func:`shared_sampling`). The setting and why are in ``report.json``
  (``settings.sampling``) and printed before the table; a run recorded otherwise is named there.
* Candidates: ``K = max(best_of)`` per pair, generated and scored once. The reward rows use all
  K: a run's plain column is the mean over its K candidates (the expected single-sample reward),
  best-of-N weighs each candidate by its probability of being the best, by the overall (weighted)
  reward, of N drawn from the K (:func:`cellfluxrl.evaluation.metrics.best_of_n_weights`, unbiased; per pair
  the expected best overall never decreases with N). Images (Figure 4) and distances take one
  image per pair: candidate 0, and the best of the first N.
* Images are quantised to 8 bits before scoring (generated images are as they would be saved;
  real images are exactly their uint8 pixels), then mapped to ``[-1, 1]``.
* Graders: the rewards (the MoA reward included) use the reward classifier RL optimises; the
  headline ``MoA accuracy`` and the distance features come from the **judge**, an MoA classifier
  fitted independently (its own seed and the other half of the real training images). The reward
  classifier's accuracy is reported as its own row, so reward hacking shows as the gap.
* Distances: ``<FD>_o`` pools all pairs; ``<FD>_c`` is computed per condition (compound) with fresh
  statistics, then averaged over conditions (CellFlux's FID_c/KID_c, without its per-class KID
  accumulation bug). With ``inception`` (the FID InceptionV3 weights) they are FID/KID; without
  it the offline substitutes FD-judge/KD-judge on the judge's penultimate features, which are
  *not* comparable with published FID/KID. The real column has no distance ("-").
* Streaming: pairs are processed in batches in condition order; each column keeps running
  feature statistics and a bounded reservoir for KID, and a condition's statistics are dropped as
  soon as its last pair is done. Peak memory does not grow with ``n`` (only per-pair scalars are
  kept).

* Images from elsewhere (``images_sources``, :mod:`cellfluxrl.evaluation.external`): a source whose
  images name this evaluation's pairs with at least K candidates each is a column like a run (best-of-N
  and paired differences included); one with fewer candidates, or that names only compounds (the
  ``j``-th pair of a compound takes the ``j``-th image of it), is a column like the baselines (one
  image per pair). A section none of whose pairs the images cover goes without that column, with a note.
* ``save_images``: the K candidates of every run, as scored (8 bits), with their pair, candidate and
  seed (:mod:`cellfluxrl.evaluation.saved_candidates`), so ``score`` re-grades exactly what the table graded.

Outputs: ``report.json``, ``report.md`` and per split ``fig5_best_of_n[_ood].png`` and
``fig4_grid[_ood].png`` (:mod:`cellfluxrl.evaluation.report`,
:mod:`cellfluxrl.evaluation.report_text`, :mod:`cellfluxrl.evaluation.report_figures`).

This module is the entry point (:func:`evaluate`: runs, splits, report); the scoring is in
:mod:`cellfluxrl.evaluation.scoring`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from cellfluxrl.errors import CellfluxError
from cellfluxrl.evaluation.candidates import MoAFeatures, Pairs, run_candidates
from cellfluxrl.evaluation.report import build_report, combine
from cellfluxrl.evaluation.report_figures import write_section_figures
from cellfluxrl.evaluation.report_text import write_report
from cellfluxrl.evaluation.scoring import evaluate_sources

logger = logging.getLogger(__name__)

def run_names(run_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """Column names of runs: the folder names, made unique with ``#2``, ``#3`` suffixes."""
    names, seen = [], {}
    for run in run_dirs:
        base = Path(run).name or str(run)
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return names


# --split of evaluate: which compound splits get a section of their own (never mixed).
EVAL_SPLITS = {"both": ("id", "ood"), "id": ("id",), "ood": ("ood",), "all": ("all",)}


def shared_sampling(recorded: Sequence[tuple[str, "Sampling | None"]], steps: int | None = None,
                    cfg_scale: float | None = None, sigma: float | None = None) -> tuple["Sampling", str]:
    """The one sampling setting for every run of an evaluation, and why (for the preamble and report).

    Args:
        recorded: ``(name, recorded setting or None)`` per run, in column order (None: a run that
            predates recorded settings, sampled at CellFlux's defaults).
        steps, cfg_scale, sigma: the caller's overrides (``None``: not given).

    Returns:
        ``(sampling, reason)``: the first run's recorded setting with the overrides applied, and a
        sentence saying where it comes from; with several runs it says that all are sampled at it
        and names each run whose own recorded setting differs. One run without overrides:
        ``"recorded in the run"``.
    """
    from dataclasses import replace

    from cellfluxrl.checkpoint import resolve_sampling

    first_name, first = recorded[0]
    sampling, source = resolve_sampling(first, steps, cfg_scale)
    if sigma is not None:
        sampling, source = replace(sampling, sigma=float(sigma)), f"{source}; sigma given on the command line"
    if len(recorded) == 1:
        return sampling, source
    if steps is None or cfg_scale is None:
        source = f"{source} (the first run, {first_name})"
    differ = [f"{name} recorded {resolve_sampling(own)[0].describe()}" for name, own in recorded[1:]
              if resolve_sampling(own)[0] != resolve_sampling(first)[0]]
    reason = (f"{source}; every run is sampled at this one setting, so the paired differences compare networks, "
              f"not samplers")
    return sampling, reason + (f" ({'; '.join(differ)})" if differ else "")


def _load_runs(run_dirs, names, device, steps, cfg_scale, sigma, checkpoint: str = "best") -> list[dict]:
    """Load the runs (EMA weights of the ``checkpoint``: ``best``, the one a posttrain run selected on
    validation pairs, else its last; or ``last``); all are sampled at one setting (:func:`shared_sampling`)."""
    from cellfluxrl.checkpoint import load_run

    loaded = [load_run(run_dir, device=device, weights="ema", checkpoint=checkpoint) for run_dir in run_dirs]
    sampling, reason = shared_sampling([(name, run.recorded) for name, run in zip(names, loaded)], steps, cfg_scale,
                                       sigma)
    runs = []
    for name, run_dir, run in zip(names, run_dirs, loaded):
        recorded = None if run.recorded is None else run.recorded.describe()
        runs.append({"name": name, "run": run, "sampling": sampling, "info": {
            "name": name, "path": str(run_dir), "kind": run.kind, "step": run.step, "checkpoint": run.checkpoint,
            "last_step": run.last_step, "trained_on": str(run.dataset_dir),
            "sampling": sampling.to_dict(), "sampling_text": sampling.describe(), "sampling_source": reason,
            "recorded_sampling": recorded}})
    return runs


def graders(dataset, weights: Mapping[str, float], inception, device: str):
    """The suite (every default reward a row, whatever its weight), the reward classifier, the judge and
    the distance features (Inception with ``inception``, else the judge's): what every table is graded by."""
    from cellfluxrl.rewards import DEFAULT_WEIGHTS, RewardSuite

    suite = RewardSuite.from_dataset(dataset, {name: 1.0 for name in [*DEFAULT_WEIGHTS, *weights]}, device=device)
    classifier, judge = suite.evaluators.moa_classifier(device), suite.evaluators.judge(device)
    if inception is not None:
        from cellfluxrl.evaluation.inception import load_inception

        features = load_inception(inception, device=device)
    else:
        features = MoAFeatures(judge, source=str(suite.evaluators.judge_path))
    return suite, classifier, judge, features


def _external_columns(externals: Mapping, pairs: Pairs, k_max: int) -> tuple[dict, dict, list[str]]:
    """``images_sources`` on a section's pairs: ``(run-like sources, baseline-like references, notes)``."""
    from cellfluxrl.evaluation.external import image_candidates, map_onto

    sources, references, notes = {}, {}, []
    for name, ext in externals.items():
        if ext.paired:
            covered = set(zip(pairs.target.tolist(), pairs.control.tolist()))
            shared = sum((t, c) in covered for t, c, _ in ext.keys())
        else:
            shared = int(np.isin(np.asarray(ext.images.compound), pairs.compound).sum())
        if shared == 0:
            notes.append(f"no {name} column: its images cover none of these pairs")
            continue
        mapped = map_onto(ext, pairs)
        (sources if ext.paired and mapped.k >= k_max else references)[name] = image_candidates(mapped)
        if not ext.paired:
            notes.append(f"{name}: its images name only their compounds, so they are matched to these pairs by "
                         f"compound (the j-th pair of a compound takes its j-th image): unpaired, one image per pair")
        elif mapped.k < k_max:
            notes.append(f"{name}: {mapped.k} candidate(s) per pair, fewer than the {k_max} of the runs: one image per "
                         f"pair, scored like a baseline")
    return sources, references, notes


def evaluate(dataset_dir: str | os.PathLike, run_dirs: Sequence[str | os.PathLike], *, n: int = 5120,
             best_of: Sequence[int] = (1,), weights: str | Mapping[str, float] | None = None, seed: int = 0,
             batch_size: int = 32, steps: int | None = None, cfg_scale: float | None = None,
             sigma: float | None = None, split: str = "both", inception: str | os.PathLike | None = None,
             device: str = "cpu", out: str | os.PathLike | None = None, names: Sequence[str] | None = None,
             kid_subset_size: int = 100, kid_subsets: int = 100, tts_n: int | None = None,
             on_progress: Callable[[str, int, int], None] | None = None, images: str = "test",
             baselines: Sequence[str] = (), images_sources: Mapping | None = None,
             save_images: str | os.PathLike | None = None, save_formats: Sequence[str] = ("npz", "tiff"),
             checkpoint: str = "best") -> dict:
    """Evaluate runs on a dataset's test pairs (see the module docstring for the protocol).

    Args:
        dataset_dir: the dataset folder (with fitted evaluators: reward classifier and judge).
        run_dirs: pretrain/posttrain run folders (EMA weights are used).
        n: test pairs per split (CellFlux: 5,120; fewer if the split is smaller).
        best_of: N values of the best-of-N curves.
        tts_n: the N of the table's best-of (TTS) column, one of ``best_of`` (``None``: the largest).
        weights: reward weights of the overall reward (``"moa=5,..."`` or a dict; None = the paper's).
        seed: seeds the control draw, the source noise of every candidate, reservoirs and KID subsets.
        batch_size: pairs per batch.
        steps, cfg_scale, sigma: the sampling of every run (``None``: the first run's recorded one;
            all runs share one setting, :func:`shared_sampling`).
        split: ``"both"`` (in-distribution and OOD sections, the default), ``"id"``, ``"ood"`` or
            ``"all"`` (one mixed section; never the headline of a paper table).
        inception: FID InceptionV3 weight file (state dict or TorchScript); None = the offline
            FD-judge/KD-judge substitute.
        device: torch device for generation and features (rewards run on CPU threads).
        out: folder for report.json, report.md and the figures (None: write nothing).
        names: column names of the runs (default: :func:`run_names`).
        kid_subset_size, kid_subsets: KID subsets (CellFlux: 100 and 100).
        on_progress: progress callback ``(split, pairs done, pairs total)``.
        images: the image split the pairs come from: ``"test"`` (the final evaluation, what the
            ``evaluate`` command uses), ``"val"`` (validation pairs), or its halves ``"val-tune"``
            (for choosing settings) and ``"val-select"`` (for choosing checkpoints).
        baselines: baseline columns on the same pairs, from
            :data:`~cellfluxrl.evaluation.baselines.BASELINES` (``copy-control``, ``train-real``).
        images_sources: more columns, name -> images (a path :func:`~cellfluxrl.evaluation.image_sources.read_image_set`
            reads, or :class:`~cellfluxrl.evaluation.external.PairedImages` already read and checked).
        save_images: a folder (existing, the caller's) for every run's scored candidates
            (:func:`~cellfluxrl.evaluation.saved_candidates.write_candidates`, as ``save_formats``).

    Returns:
        The report dict (as written to report.json; see :mod:`cellfluxrl.evaluation.report`).

    Raises:
        CellfluxError: missing dataset/evaluators/run/weights, an empty split, or bad options.
    """
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.evaluation.saved_candidates import CandidateRecorder, write_candidates, write_marker
    from cellfluxrl.model.generate import SPLITS
    from cellfluxrl.rewards import parse_weights

    if not run_dirs:
        raise CellfluxError("evaluate: give at least one RUN folder")
    from cellfluxrl.evaluation.baselines import baseline_sources, parse_baselines

    baselines = parse_baselines(",".join(baselines)) if not isinstance(baselines, str) else parse_baselines(baselines)
    if split not in EVAL_SPLITS:
        raise CellfluxError(f"evaluate: unknown split {split!r}; choose one of {', '.join(EVAL_SPLITS)}")
    dataset = load_dataset(dataset_dir)
    weights = parse_weights(weights) if not isinstance(weights, Mapping) else dict(weights)
    names = list(names) if names is not None else run_names(run_dirs)
    if len(names) != len(run_dirs):
        raise CellfluxError(f"evaluate: {len(names)} names for {len(run_dirs)} runs")
    externals = read_externals(images_sources or {}, dataset, seed, [*names, *baselines])
    runs = _load_runs(run_dirs, names, device, steps, cfg_scale, sigma, checkpoint)
    suite, classifier, judge, features = graders(dataset, weights, inception, device)
    saved: dict[str, list] = {name: [] for name in names}
    shared = runs[0]["info"]
    settings = {"dataset": str(dataset_dir), "runs": [r["info"] for r in runs], "n": int(n), "split": split,
                "pairs_from": images,
                "sampling": {"setting": shared["sampling"], "text": shared["sampling_text"],
                             "reason": shared["sampling_source"]},
                "best_of": sorted({1, *(int(b) for b in best_of)}), "baselines": list(baselines),
                "images": {name: {"paired": ext.paired, "origin": ext.images.origin} for name, ext in externals.items()},
                "tts_n": int(tts_n or max(best_of)), "weights": weights, "seed": int(seed),
                "batch_size": int(batch_size), "device": str(device),
                "inception": None if inception is None else str(inception),
                "graders": {"rewards": str(suite.evaluators.classifier_path), "judge": str(suite.evaluators.judge_path)},
                "seeds": {"pairs": int(seed), "candidate_noise": f"SeedSequence([{seed}, target_index, k])",
                          "kid_subsets": int(seed)}}
    sections = {}
    try:
        for part in EVAL_SPLITS[split]:
            if split == "both" and part == "ood" and images.startswith("val"):
                logger.info("validation pairs hold in-distribution compounds only; no held-out section")
                continue
            if split == "both" and part == "ood" and dataset.conditions["ood"].sum() == 0:
                logger.warning("%s has no held-out (OOD) compounds; reporting in-distribution only", dataset.root)
                continue
            pairs = Pairs.from_dataset(dataset, n, seed, part, images=images)
            sources = {r["name"]: run_candidates(r["run"].net, dataset, pairs, seed=seed, device=device,
                                                 **_sampling_kwargs(r["sampling"])) for r in runs}
            if save_images is not None:
                sources = {name: CandidateRecorder(fn, len(pairs)) for name, fn in sources.items()}
            references, notes = baseline_sources(baselines, dataset, pairs, seed)
            more, more_references, more_notes = _external_columns(externals, pairs, max(best_of))
            sources.update(more)
            references.update(more_references)
            notes += more_notes
            progress = None if on_progress is None else (lambda stage, done, total, part=part: on_progress(part, done, total))
            with torch.inference_mode(False), torch.no_grad():
                results = evaluate_sources(dataset, pairs, sources, suite=suite, weights=weights, features=features,
                                           classifier=classifier, judge=judge, best_of=best_of,
                                           batch_size=batch_size, kid_subset_size=kid_subset_size,
                                           kid_subsets=kid_subsets, seed=seed, tts_n=tts_n, references=references,
                                           on_progress=progress)
            results["baseline_notes"] = notes
            for name in saved if save_images is not None else ():
                saved[name].append((part, pairs, sources[name].stacked()))
            sections[part] = build_report(results, split=part, split_description=SPLITS[part])
            if out is not None:
                Path(out).mkdir(parents=True, exist_ok=True)
                sections[part]["files"] = write_section_figures(sections[part], results, Path(out), dataset=dataset)
    finally:
        suite.close()
    if save_images is not None:
        written = [f for name, parts in saved.items()
                   for f in write_candidates(Path(save_images), name, parts, dataset, seed, save_formats)]
        write_marker(Path(save_images), written)
    report = combine(sections, settings)
    if out is not None:
        write_report(report, out)
    return report


def read_externals(images_sources: Mapping, dataset, seed: int, taken: Sequence[str], mapping=None) -> dict:
    """``{name: PairedImages}`` of ``images_sources`` (paths are read with ``mapping``); a name that is
    a run's, a baseline's or ``real``/``control`` is refused."""
    from cellfluxrl.evaluation.external import PairedImages, pair_images
    from cellfluxrl.evaluation.image_sources import read_image_set
    from cellfluxrl.evaluation.report import CONTROL_COLUMN, REAL

    out = {}
    for name, spec in images_sources.items():
        if name in taken or name in (REAL, CONTROL_COLUMN) or "+best-of-" in name:
            raise CellfluxError(f"--images {name}=...: the column name {name!r} is taken; choose another NAME")
        out[name] = spec if isinstance(spec, PairedImages) else pair_images(read_image_set(str(spec), dataset, mapping),
                                                                            dataset, seed, name)
    return out


def _sampling_kwargs(sampling) -> dict:
    """:func:`run_candidates` keyword arguments of a :class:`~cellfluxrl.checkpoint.Sampling`."""
    return {"steps": sampling.steps, "cfg_scale": sampling.cfg_scale, "sigma": sampling.sigma,
            "solver": sampling.solver, "grid": sampling.grid}
