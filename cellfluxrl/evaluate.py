"""Evaluation: the paper's Table 1 (rewards, MoA accuracy, FID/KID), Figure 5 and Figure 4.

Protocol (CellFlux's, plus CellFluxRL's best-of-N, graded so that it cannot flatter a model):

* Splits: the in-distribution compounds (the headline, as CellFlux) and the held-out (OOD)
  compounds are evaluated as separate sections, never mixed (``split``).
* Pairs: the first ``n`` treated test rows of the split in CSV order, each with a same-plate DMSO
  control (:func:`cellfluxrl.generate.test_pairs`). Every run is evaluated on the same pairs *and*
  the same source noise: candidate ``k`` of the pair whose target is image ``i`` starts from
  ``x_0 = x_ctrl + sigma * eps``, ``eps`` drawn from a generator seeded by ``(seed, i, k)``, so two
  runs differ only by their networks (paired differences) and a sample does not depend on the
  batch it lands in.
* Sampling: each run is sampled the way it was trained to be (its recorded sampler steps and CFG,
  :class:`cellfluxrl.checkpoint.Sampling`) unless the caller overrides them for every run.
* Candidates: ``K = max(best_of)`` per pair, generated and scored once. The reward rows use all
  K: a run's plain column is the mean over its K candidates (the expected single-sample reward),
  best-of-N weighs each candidate by its probability of being the best, by the overall (weighted)
  reward, of N drawn from the K (:func:`cellfluxrl.metrics.best_of_n_weights`, unbiased; per pair
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

Outputs: ``report.json``, ``report.md`` and per split ``fig5_best_of_n[_ood].png`` and
``fig4_grid[_ood].png`` (:mod:`cellfluxrl.report`).
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from cellfluxrl.errors import CellfluxError
from cellfluxrl.images import to_model, to_uint8
from cellfluxrl.candidates import (CandidateFn, MoAFeatures, Pairs, pair_noise, quantize, real_images,  # noqa: F401
                                   run_candidates)
from cellfluxrl.metrics import FeatureSet, best_of_n, compare_many
from cellfluxrl.refstats import empty_columns_warning
from cellfluxrl.report import (CONTROL_COLUMN, REAL, REWARD_LABELS, build_report, combine, headline,  # noqa: F401
                               markdown_report, markdown_table, write_report, write_section_figures)

logger = logging.getLogger(__name__)

MORPHOLOGY_REWARDS = ("nuc_in_cyto", "roundness", "nuc_size", "cyto_size", "nuc_count", "cyto_count")

@dataclass
class _Scores:
    """Per-pair (and per-candidate) scores of one source: arrays ``(P, K)`` (K = 1 for real).

    ``correct``: the judge's top-1 MoA equals the target's; ``correct_reward``: the same for the
    reward classifier; ``nuc_count``: the nuclei the segmenter found.
    """

    total: np.ndarray
    components: dict[str, np.ndarray]
    correct: np.ndarray
    correct_reward: np.ndarray
    nuc_count: np.ndarray
    seconds: float = 0.0

    @classmethod
    def empty(cls, n_pairs: int, k: int, names: Sequence[str]) -> "_Scores":
        nan = np.full((n_pairs, k), np.nan)
        return cls(nan.copy(), {name: nan.copy() for name in names}, np.zeros((n_pairs, k), dtype=bool),
                   np.zeros((n_pairs, k), dtype=bool), nan.copy())


@dataclass
class _Streams:
    """Streaming feature state: overall and open per-condition feature sets per distance column."""

    dim: int
    reservoir: int
    seed: int
    overall: dict[str, FeatureSet] = field(default_factory=dict)
    per_condition: dict[int, dict[str, FeatureSet]] = field(default_factory=dict)

    def _new(self, column: str, condition: int) -> FeatureSet:
        salt = [int(self.seed), zlib.crc32(column.encode()), int(condition) + 1]
        return FeatureSet.create(self.dim, self.reservoir, int(np.random.SeedSequence(salt).generate_state(1)[0]))

    def update(self, column: str, conditions: np.ndarray, features: np.ndarray) -> None:
        if column not in self.overall:
            self.overall[column] = self._new(column, -1)
        self.overall[column].update(features)
        for c in np.unique(conditions):
            sets = self.per_condition.setdefault(int(c), {})
            if column not in sets:
                sets[column] = self._new(column, int(c))
            sets[column].update(features[conditions == c])


def _hits(classifier, images: torch.Tensor, moa: np.ndarray) -> np.ndarray:
    """bool ``(B,)``: the classifier's top-1 class (named by its ``classes``) equals ``moa``."""
    predicted = np.argmax(classifier.predict_proba(images), axis=1)
    return np.asarray(classifier.classes)[predicted] == np.asarray(moa).astype(str)


def _score_into(scores: _Scores, rows: np.ndarray, k: int, images: torch.Tensor, moa: np.ndarray, suite,
                weights: Mapping[str, float], classifier, judge) -> None:
    """Rewards, overall reward and MoA correctness (judge and reward classifier) of one batch,
    written into ``scores[rows, k]``."""
    result = suite.score(images, list(moa))
    total = np.zeros(len(rows), dtype=np.float64)
    for name in scores.components:
        scores.components[name][rows, k] = result.components[name]
    for name, w in weights.items():
        total += w * result.components[name]
    scores.total[rows, k] = total
    scores.correct[rows, k] = _hits(judge, images, moa)
    scores.correct_reward[rows, k] = _hits(classifier, images, moa)
    scores.nuc_count[rows, k] = result.stats["nuc_count"]


def _finish_conditions(streams: _Streams, done: Sequence[int], fd_columns: Sequence[str], names: np.ndarray,
                       out: dict, kid_subset_size: int, kid_subsets: int, seed: int) -> None:
    """Distances of finished conditions (generated column vs real), then drop their state."""
    for c in done:
        sets = streams.per_condition.pop(int(c), {})
        if REAL not in sets:
            continue
        others = {column: sets[column] for column in fd_columns if column in sets}
        for column, result in compare_many(sets[REAL], others, kid_subset_size, kid_subsets, seed).items():
            out.setdefault(column, {})[str(names[c])] = result


def _source_batch(s: str, candidates: CandidateFn, pos: np.ndarray, k_max: int, tts_n: int, scores: _Scores,
                  streams: _Streams, grid: dict, moa: np.ndarray, cond: np.ndarray, suite, weights: Mapping[str, float], classifier,
                  judge, features) -> None:
    """Generate and score the ``k_max`` candidates of a batch; stream the features of the picked ones.

    The column ``s`` takes candidate 0 (a plain sample); ``s+best-of-N`` (``N = tts_n``) takes the
    best of the first N by the overall reward. Only ``batch x K`` images are held at once.
    """
    images = []
    for k in range(k_max):
        x = quantize(candidates(pos, k))
        _score_into(scores, pos, k, x, moa, suite, weights, classifier, judge)
        images.append(x)
    picks = {s: np.zeros(len(pos), dtype=np.int64)}
    if tts_n > 1:
        picks[f"{s}+best-of-{tts_n}"] = best_of_n(scores.total[pos], tts_n)
    stacked = torch.stack(images, dim=1)  # (B, K, C, H, W)
    for column, pick in picks.items():
        chosen = stacked[torch.arange(len(pos)), torch.as_tensor(pick)]
        streams.update(column, cond, features(chosen))
        _remember(grid, pos, column, chosen)


def evaluate_sources(dataset, pairs: Pairs, sources: Mapping[str, CandidateFn], *, suite, weights: Mapping[str, float],
                     features, classifier, judge, best_of: Sequence[int] = (1,), batch_size: int = 32,
                     kid_subset_size: int = 100, kid_subsets: int = 100, reservoir_size: int = 1000,
                     seed: int = 0, grid_conditions: int = 6, tts_n: int | None = None,
                     on_progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Score candidate sources and the real targets on the same pairs; the core of :func:`evaluate`.

    Args:
        dataset: the loaded dataset.
        pairs: the evaluation pairs.
        sources: column name -> candidate function (a run, or any image source in tests).
        suite: a :class:`~cellfluxrl.rewards.RewardSuite` whose rewards are the report's reward rows.
        weights: name -> weight of the overall reward (names must be in the suite).
        features: feature extractor ``(B, C, H, W) in [-1, 1] -> float64 (B, F)`` with ``name``,
            ``kid_name`` and ``dim`` (:class:`~cellfluxrl.inception.InceptionFeatures`, or
            :class:`MoAFeatures` of the judge).
        classifier: the reward's MoA classifier (``predict_proba``, ``classes``): the
            ``moa_accuracy_reward`` row.
        judge: the independent MoA classifier: the ``moa_accuracy`` row.
        best_of: the N values of the best-of-N curves (K = max candidates per pair; 1 is always added).
        tts_n: the N of the table's and Figure 4's best-of column (paper Table 1: 4; one of
            ``best_of``; ``None``: the largest).
        batch_size: pairs per batch.
        kid_subset_size, kid_subsets: KID subsets (CellFlux: 100, 100).
        reservoir_size: feature rows kept per column (per condition) for KID.
        seed: seeds the reservoirs and the KID subsets (the pairs and noise are fixed by the caller).
        grid_conditions: conditions shown in Figure 4.
        on_progress: ``(stage, pairs done, pairs total)`` after every batch.

    Returns:
        The results dict consumed by :func:`build_report`.
    """
    best_of = sorted({1, *(int(b) for b in best_of)})  # N = 1 is the plain run column
    if best_of[0] < 1:
        raise CellfluxError(f"--best-of values must be >= 1, got {best_of}")
    k_max, n_pairs = best_of[-1], len(pairs)
    tts_n = k_max if tts_n is None else int(tts_n)
    if tts_n not in best_of:
        raise CellfluxError(f"evaluate: the table's best-of-{tts_n} is not one of the best-of-N values {best_of}")
    names = list(suite.weights)
    missing = [w for w in weights if w not in names]
    if missing:
        raise CellfluxError(f"evaluate: weighted reward(s) {', '.join(missing)} are not in the reward suite")
    fd_columns = [c for s in sources for c in ([s, f"{s}+best-of-{tts_n}"] if tts_n > 1 else [s])]
    streams = _Streams(features.dim, reservoir_size, seed)
    scores = {s: _Scores.empty(n_pairs, k_max, names) for s in sources}
    scores[REAL] = _Scores.empty(n_pairs, 1, names)
    per_condition_fd: dict[str, dict] = {}
    condition_names = np.asarray(dataset.conditions["compound"]).astype(str)
    order = pairs.order()
    last_position = {int(c): i for i, c in enumerate(pairs.condition[order])}
    grid_pairs = _grid_pairs(pairs, order, grid_conditions)
    grid: dict[int, dict[str, np.ndarray]] = {int(p): {} for p in grid_pairs}

    for start in range(0, n_pairs, batch_size):
        pos = order[start:start + batch_size]
        moa, cond = pairs.moa[pos], pairs.condition[pos]
        t0 = time.perf_counter()
        x_real = real_images(dataset, pairs, pos)
        _score_into(scores[REAL], pos, 0, x_real, moa, suite, weights, classifier, judge)
        streams.update(REAL, cond, features(x_real))
        scores[REAL].seconds += time.perf_counter() - t0
        _remember(grid, pos, REAL, x_real)
        _remember(grid, pos, CONTROL_COLUMN, to_model(np.asarray(dataset.images[pairs.control[pos]]), dequantize=False))
        for s, candidates in sources.items():
            t0 = time.perf_counter()
            _source_batch(s, candidates, pos, k_max, tts_n, scores[s], streams, grid, moa, cond, suite, weights, classifier,
                          judge, features)
            scores[s].seconds += time.perf_counter() - t0
        done = [c for c in np.unique(cond) if last_position[int(c)] < start + len(pos)]
        _finish_conditions(streams, done, fd_columns, condition_names, per_condition_fd, kid_subset_size,
                           kid_subsets, seed)
        if on_progress is not None:
            on_progress("evaluate", min(start + batch_size, n_pairs), n_pairs)

    overall = compare_many(streams.overall[REAL], {c: streams.overall[c] for c in fd_columns}, kid_subset_size,
                           kid_subsets, seed)
    warning = empty_columns_warning({c: s.nuc_count for c, s in scores.items()}, suite.segmenter.settings)
    if warning:  # more than 5 % of a column's images (all K candidates of a run) without a nucleus
        logger.warning("evaluate: %s", warning)
    return {"pairs": pairs, "sources": list(sources), "best_of": best_of, "k_max": k_max, "tts_n": tts_n,
            "names": names,
            "weights": dict(weights), "scores": scores, "fd_columns": fd_columns, "overall_fd": overall,
            "per_condition_fd": per_condition_fd, "feature_name": features.name, "kid_name": features.kid_name,
            "feature_source": getattr(features, "source", ""), "grid": [(int(p), grid[int(p)]) for p in grid_pairs],
            "kid": {"subset_size": kid_subset_size, "n_subsets": kid_subsets, "reservoir_size": reservoir_size}}


def _grid_pairs(pairs: Pairs, order: np.ndarray, n_conditions: int) -> list[int]:
    """The first pair (in processing order) of the first ``n_conditions`` conditions."""
    chosen, seen = [], set()
    for p in order:
        c = int(pairs.condition[p])
        if c not in seen and len(chosen) < n_conditions:
            seen.add(c)
            chosen.append(int(p))
    return chosen


def _remember(grid: dict[int, dict[str, np.ndarray]], pos: np.ndarray, column: str, images: torch.Tensor) -> None:
    for i, p in enumerate(pos):
        if int(p) in grid:
            grid[int(p)][column] = to_uint8(images[i:i + 1])[0]


# --------------------------------------------------------------------------------------------------
# The library entry point.


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


def _load_runs(run_dirs, names, device, steps, cfg_scale, sigma) -> list[dict]:
    """Load the runs (EMA weights) and resolve how each is sampled (recorded unless overridden)."""
    from dataclasses import replace

    from cellfluxrl.checkpoint import load_run, resolve_sampling

    runs = []
    for name, run_dir in zip(names, run_dirs):
        run = load_run(run_dir, device=device, weights="ema")
        sampling, source = resolve_sampling(run.recorded, steps, cfg_scale)
        if sigma is not None:
            sampling, source = replace(sampling, sigma=float(sigma)), f"{source}; sigma given on the command line"
        runs.append({"name": name, "run": run, "sampling": sampling, "info": {
            "name": name, "path": str(run_dir), "kind": run.kind, "step": run.step, "trained_on": str(run.dataset_dir),
            "sampling": sampling.to_dict(), "sampling_text": sampling.describe(), "sampling_source": source}})
    return runs


def evaluate(dataset_dir: str | os.PathLike, run_dirs: Sequence[str | os.PathLike], *, n: int = 5120,
             best_of: Sequence[int] = (1,), weights: str | Mapping[str, float] | None = None, seed: int = 0,
             batch_size: int = 32, steps: int | None = None, cfg_scale: float | None = None,
             sigma: float | None = None, split: str = "both", inception: str | os.PathLike | None = None,
             device: str = "cpu", out: str | os.PathLike | None = None, names: Sequence[str] | None = None,
             kid_subset_size: int = 100, kid_subsets: int = 100, tts_n: int | None = None,
             on_progress: Callable[[str, int, int], None] | None = None) -> dict:
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
        steps, cfg_scale, sigma: override every run's recorded sampling (``None``: each run's own).
        split: ``"both"`` (in-distribution and OOD sections, the default), ``"id"``, ``"ood"`` or
            ``"all"`` (one mixed section; never the headline of a paper table).
        inception: FID InceptionV3 weight file (state dict or TorchScript); None = the offline
            FD-judge/KD-judge substitute.
        device: torch device for generation and features (rewards run on CPU threads).
        out: folder for report.json, report.md and the figures (None: write nothing).
        names: column names of the runs (default: :func:`run_names`).
        kid_subset_size, kid_subsets: KID subsets (CellFlux: 100 and 100).
        on_progress: progress callback ``(split, pairs done, pairs total)``.

    Returns:
        The report dict (as written to report.json; see :mod:`cellfluxrl.report`).

    Raises:
        CellfluxError: missing dataset/evaluators/run/weights, an empty split, or bad options.
    """
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.generate import SPLITS
    from cellfluxrl.rewards import DEFAULT_WEIGHTS, RewardSuite, parse_weights

    if not run_dirs:
        raise CellfluxError("evaluate: give at least one RUN folder")
    if split not in EVAL_SPLITS:
        raise CellfluxError(f"evaluate: unknown split {split!r}; choose one of {', '.join(EVAL_SPLITS)}")
    dataset = load_dataset(dataset_dir)
    weights = parse_weights(weights) if not isinstance(weights, Mapping) else dict(weights)
    names = list(names) if names is not None else run_names(run_dirs)
    if len(names) != len(run_dirs):
        raise CellfluxError(f"evaluate: {len(names)} names for {len(run_dirs)} runs")
    runs = _load_runs(run_dirs, names, device, steps, cfg_scale, sigma)
    # Every default reward is reported as a row, whatever its weight in the overall reward.
    suite = RewardSuite.from_dataset(dataset, {name: 1.0 for name in [*DEFAULT_WEIGHTS, *weights]}, device=device)
    classifier, judge = suite.evaluators.moa_classifier(device), suite.evaluators.judge(device)
    if inception is not None:
        from cellfluxrl.inception import load_inception

        features = load_inception(inception, device=device)
    else:
        features = MoAFeatures(judge, source=str(suite.evaluators.judge_path))
    settings = {"dataset": str(dataset_dir), "runs": [r["info"] for r in runs], "n": int(n), "split": split,
                "best_of": sorted({1, *(int(b) for b in best_of)}),
                "tts_n": int(tts_n or max(best_of)), "weights": weights, "seed": int(seed),
                "batch_size": int(batch_size), "device": str(device),
                "inception": None if inception is None else str(inception),
                "graders": {"rewards": str(suite.evaluators.classifier_path), "judge": str(suite.evaluators.judge_path)},
                "seeds": {"pairs": int(seed), "candidate_noise": f"SeedSequence([{seed}, target_index, k])",
                          "kid_subsets": int(seed)}}
    sections = {}
    try:
        for part in EVAL_SPLITS[split]:
            if split == "both" and part == "ood" and dataset.conditions["ood"].sum() == 0:
                logger.warning("%s has no held-out (OOD) compounds; reporting in-distribution only", dataset.root)
                continue
            pairs = Pairs.from_dataset(dataset, n, seed, part)
            sources = {r["name"]: run_candidates(r["run"].net, dataset, pairs, seed=seed, device=device,
                                                 **_sampling_kwargs(r["sampling"])) for r in runs}
            progress = None if on_progress is None else (lambda stage, done, total, part=part: on_progress(part, done, total))
            with torch.inference_mode(False), torch.no_grad():
                results = evaluate_sources(dataset, pairs, sources, suite=suite, weights=weights, features=features,
                                           classifier=classifier, judge=judge, best_of=best_of,
                                           batch_size=batch_size, kid_subset_size=kid_subset_size,
                                           kid_subsets=kid_subsets, seed=seed, tts_n=tts_n, on_progress=progress)
            sections[part] = build_report(results, split=part, split_description=SPLITS[part])
            if out is not None:
                Path(out).mkdir(parents=True, exist_ok=True)
                sections[part]["files"] = write_section_figures(sections[part], results, Path(out), dataset=dataset)
    finally:
        suite.close()
    report = combine(sections, settings)
    if out is not None:
        write_report(report, out)
    return report


def _sampling_kwargs(sampling) -> dict:
    """:func:`run_candidates` keyword arguments of a :class:`~cellfluxrl.checkpoint.Sampling`."""
    return {"steps": sampling.steps, "cfg_scale": sampling.cfg_scale, "sigma": sampling.sigma,
            "solver": sampling.solver, "grid": sampling.grid}
