"""Scoring candidate sources and the real targets on the same pairs (:func:`evaluate_sources`).

Pairs are processed in batches in condition order; every candidate is generated, quantised and
scored once (rewards, the judge's and the reward classifier's MoA hits), the features of the
images a column shows are streamed into running statistics (and their profile features taken from
the rewards' own segmentation), and a condition's statistics are
turned into distances and dropped as soon as its last pair is done. The protocol is in
:mod:`cellfluxrl.evaluation.pipeline`.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from cellfluxrl.errors import CellfluxError
from cellfluxrl.evaluation.candidates import CandidateFn, MoAFeatures, Pairs, quantize, real_images
from cellfluxrl.evaluation.debiased import JK_GROUPS, JK_MAX_DIM, JK_MIN_PAIRS, JK_SUFFIX, jackknife_fd, overall_rule
from cellfluxrl.evaluation.metrics import FeatureSet, best_of_n, compare_many
from cellfluxrl.evaluation.profiles import PROFILE_FEATURES, image_features
from cellfluxrl.evaluation.report import CONTROL_COLUMN, REAL
from cellfluxrl.evaluation.texture import high_frequency_share
from cellfluxrl.evaluation.uncertainty import bootstrap_fd_sem, per_compound_rule
from cellfluxrl.images import to_model, to_uint8
from cellfluxrl.rewards.refstats import empty_columns_warning

logger = logging.getLogger(__name__)

MORPHOLOGY_REWARDS = ("nuc_in_cyto", "roundness", "nuc_size", "cyto_size", "nuc_count", "cyto_count")


@dataclass
class _Scores:
    """Per-pair (and per-candidate) scores of one source: arrays ``(P, K)`` (K = 1 for real).

    ``correct``: the judge's top-1 MoA equals the target's; ``correct_reward``: the same for the
    reward classifier; ``nuc_count``: the nuclei the segmenter found; ``texture``: the share of
    image power above half the Nyquist frequency (:func:`~cellfluxrl.evaluation.texture.high_frequency_share`).
    """

    total: np.ndarray
    components: dict[str, np.ndarray]
    correct: np.ndarray
    correct_reward: np.ndarray
    nuc_count: np.ndarray
    texture: np.ndarray
    seconds: float = 0.0

    @classmethod
    def empty(cls, n_pairs: int, k: int, names: Sequence[str]) -> "_Scores":
        nan = np.full((n_pairs, k), np.nan)
        return cls(nan.copy(), {name: nan.copy() for name in names}, np.zeros((n_pairs, k), dtype=bool),
                   np.zeros((n_pairs, k), dtype=bool), nan.copy(), nan.copy())


@dataclass
class _Streams:
    """Streaming feature state: overall and open per-condition feature sets per distance column, and
    (``keep_rows``) every pair's feature row per column, in processing order (for the jackknife)."""

    dim: int
    reservoir: int
    seed: int
    keep_rows: bool = False
    overall: dict[str, FeatureSet] = field(default_factory=dict)
    per_condition: dict[int, dict[str, FeatureSet]] = field(default_factory=dict)
    rows: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def _new(self, column: str, condition: int) -> FeatureSet:
        salt = [int(self.seed), zlib.crc32(column.encode()), int(condition) + 1]
        return FeatureSet.create(self.dim, self.reservoir, int(np.random.SeedSequence(salt).generate_state(1)[0]))

    def update(self, column: str, conditions: np.ndarray, features: np.ndarray) -> None:
        if column not in self.overall:
            self.overall[column] = self._new(column, -1)
        self.overall[column].update(features)
        if self.keep_rows:
            self.rows.setdefault(column, []).append(np.asarray(features, dtype=np.float64))
        for c in np.unique(conditions):
            sets = self.per_condition.setdefault(int(c), {})
            if column not in sets:
                sets[column] = self._new(column, int(c))
            sets[column].update(features[conditions == c])


def _hits(classifier, images: torch.Tensor, moa: np.ndarray, proba: np.ndarray | None = None) -> np.ndarray:
    """bool ``(B,)``: the classifier's top-1 class (named by its ``classes``) equals ``moa``
    (``proba``: its probabilities ``(B, n_classes)`` when already computed for these images)."""
    if proba is None or proba.shape != (len(images), len(classifier.classes)):
        proba = classifier.predict_proba(images)
    return np.asarray(classifier.classes)[np.argmax(proba, axis=1)] == np.asarray(moa).astype(str)


def _judge_pass(judge, features, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    """The judge's probabilities and, when ``features`` are the judge's own (:class:`MoAFeatures`),
    the distance features of the same forward pass (else ``None``): one pass instead of two."""
    if type(features) is MoAFeatures and features.classifier is judge:  # exactly the judge's GAP features
        embedded = features(images)
        with torch.no_grad():
            logits = judge.head(torch.as_tensor(embedded, dtype=torch.float32, device=next(judge.parameters()).device))
        return torch.softmax(logits.float(), dim=1).cpu().numpy().astype(np.float64), embedded
    return judge.predict_proba(images), None


def _score_into(scores: _Scores, rows: np.ndarray, k: int, images: torch.Tensor, moa: np.ndarray, suite,
                weights: Mapping[str, float], classifier, judge,
                features=None) -> tuple[np.ndarray | None, tuple[np.ndarray, np.ndarray]]:
    """Rewards, overall reward, MoA correctness (judge and reward classifier) and the texture
    statistic of one batch, written into ``scores[rows, k]``. Returns ``(distance features, labels)``:
    with ``features``, the batch's distance features (float64 ``(B, F)``, from the judge's pass when
    they are its own), else None; and the rewards' nucleus and cell labels (int32 ``(B, H, W)`` each),
    so the profiles reuse the segmentation.

    The reward classifier's probabilities come from the MoA reward's own pass when the suite has
    one (``RewardResult.shared["moa_proba"]``), so every image goes through each classifier once."""
    batch = suite.make_batch(images, list(moa))
    result = suite.score_batch(batch)
    labels = (batch.nuclei, batch.cells)
    total = np.zeros(len(rows), dtype=np.float64)
    for name in scores.components:
        scores.components[name][rows, k] = result.components[name]
    for name, w in weights.items():
        total += w * result.components[name]
    scores.total[rows, k] = total
    judge_proba, embedded = _judge_pass(judge, features, images) if features is not None else (None, None)
    scores.correct[rows, k] = _hits(judge, images, moa, judge_proba)
    scores.correct_reward[rows, k] = _hits(classifier, images, moa, result.shared.get("moa_proba"))
    scores.nuc_count[rows, k] = result.stats["nuc_count"]
    scores.texture[rows, k] = high_frequency_share(images)
    if features is None:
        return None, labels
    return (embedded if embedded is not None else features(images)), labels


def _finish_conditions(streams: _Streams, done: Sequence[int], fd_columns: Sequence[str], names: np.ndarray,
                       out: dict, kid_subset_size: int, kid_subsets: int, seed: int, compute: bool = True) -> None:
    """Distances of finished conditions (generated column vs real; ``compute`` False: none), then
    drop their state."""
    for c in done:
        sets = streams.per_condition.pop(int(c), {})
        if REAL not in sets or not compute:
            continue
        others = {column: sets[column] for column in fd_columns if column in sets}
        for column, result in compare_many(sets[REAL], others, kid_subset_size, kid_subsets, seed).items():
            out.setdefault(column, {})[str(names[c])] = result


def _source_batch(s: str, candidates: CandidateFn, pos: np.ndarray, k_max: int, tts_n: int, scores: _Scores,
                  streams: _Streams, grid: dict, moa: np.ndarray, cond: np.ndarray, suite, weights: Mapping[str, float], classifier,
                  judge, features, profiles: dict[str, np.ndarray]) -> None:
    """Generate and score the ``k_max`` candidates of a batch; stream the features of the picked ones
    and store their profile features (``profiles[column][pos]``, from the rewards' labels).

    The column ``s`` takes candidate 0 (a plain sample); ``s+best-of-N`` (``N = tts_n``) takes the
    best of the first N by the overall reward. Only ``batch x K`` images are held at once.
    """
    images, labels = [], []
    for k in range(k_max):
        x = quantize(candidates(pos, k))
        labels.append(_score_into(scores, pos, k, x, moa, suite, weights, classifier, judge)[1])
        images.append(x)
    picks = {s: np.zeros(len(pos), dtype=np.int64)}
    if tts_n > 1:
        picks[f"{s}+best-of-{tts_n}"] = best_of_n(scores.total[pos], tts_n)
    stacked = torch.stack(images, dim=1)  # (B, K, C, H, W)
    for column, pick in picks.items():
        chosen = stacked[torch.arange(len(pos)), torch.as_tensor(pick)]
        streams.update(column, cond, features(chosen))
        _remember(grid, pos, column, chosen)
        picked = [np.stack([labels[k][m][i] for i, k in enumerate(pick)]) for m in (0, 1)]  # nuclei, cells
        profiles.setdefault(column, _no_profiles(len(scores.total)))[pos] = image_features(*picked)


def evaluate_sources(dataset, pairs: Pairs, sources: Mapping[str, CandidateFn], *, suite, weights: Mapping[str, float],
                     features, classifier, judge, best_of: Sequence[int] = (1,), batch_size: int = 32,
                     kid_subset_size: int = 100, kid_subsets: int = 100, reservoir_size: int = 1000,
                     seed: int = 0, grid_conditions: int = 6, tts_n: int | None = None,
                     references: Mapping[str, CandidateFn] | None = None,
                     on_progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Score candidate sources and the real targets on the same pairs; the core of :func:`evaluate`.

    Args:
        dataset: the loaded dataset.
        pairs: the evaluation pairs.
        sources: column name -> candidate function (a run, or any image source in tests).
        suite: a :class:`~cellfluxrl.rewards.RewardSuite` whose rewards are the report's reward rows.
        weights: name -> weight of the overall reward (names must be in the suite).
        features: feature extractor ``(B, C, H, W) in [-1, 1] -> float64 (B, F)`` with ``name``,
            ``kid_name`` and ``dim`` (:class:`~cellfluxrl.evaluation.inception.InceptionFeatures`, or
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
        grid_conditions: conditions shown in Figure 4: those where the first source's mean overall is
            lowest and highest (:func:`pick_grid_rows`), then the first others in processing order.
        references: baseline columns (:mod:`cellfluxrl.evaluation.baselines`): name -> image source,
            scored like ``real`` with one candidate per pair (no best-of-N), with distances.
        on_progress: ``(stage, pairs done, pairs total)`` after every batch.

    Returns:
        The results dict consumed by :func:`build_report`; ``"profiles"``: column -> float64 ``(P, F)``
        profile features (:func:`~cellfluxrl.evaluation.profiles.image_features` of the rewards' labels)
        of the one image per pair the column shows (the distances' image), ``real`` included.
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
    references = dict(references or {})
    clash = [r for r in references if r in sources or r == REAL]
    if clash:
        raise CellfluxError(f"evaluate: column name(s) {', '.join(clash)} used twice (a run and a baseline)")
    fd_columns = [c for s in sources for c in ([s, f"{s}+best-of-{tts_n}"] if tts_n > 1 else [s])] + list(references)
    keep_rows = features.dim <= JK_MAX_DIM and n_pairs * features.dim <= ROWS_KEPT
    streams = _Streams(features.dim, reservoir_size, seed, keep_rows)
    scores = {s: _Scores.empty(n_pairs, k_max, names) for s in sources}
    scores.update({r: _Scores.empty(n_pairs, 1, names) for r in references})
    scores[REAL] = _Scores.empty(n_pairs, 1, names)
    per_condition_fd: dict[str, dict] = {}
    condition_names = np.asarray(dataset.conditions["compound"]).astype(str)
    order = pairs.order()
    last_position = {int(c): i for i, c in enumerate(pairs.condition[order])}
    grid_pairs = _grid_pairs(pairs, order)  # every condition's first pair; the rows are picked at the end
    grid: dict[int, dict[str, np.ndarray]] = {int(p): {} for p in grid_pairs}
    per_compound, per_compound_note = per_compound_rule(np.unique(pairs.condition, return_counts=True)[1], features.dim)
    profiles: dict[str, np.ndarray] = {}  # column -> float64 (P, F): profile features of the image it shows per pair

    def reference(column: str, x: torch.Tensor, pos: np.ndarray, moa: np.ndarray, cond: np.ndarray) -> None:
        t0 = time.perf_counter()
        embedded, labels = _score_into(scores[column], pos, 0, x, moa, suite, weights, classifier, judge, features)
        streams.update(column, cond, embedded)
        profiles.setdefault(column, _no_profiles(n_pairs))[pos] = image_features(*labels)
        scores[column].seconds += time.perf_counter() - t0

    for start in range(0, n_pairs, batch_size):
        pos = order[start:start + batch_size]
        moa, cond = pairs.moa[pos], pairs.condition[pos]
        t0 = time.perf_counter()
        x_real = real_images(dataset, pairs, pos)
        scores[REAL].seconds += time.perf_counter() - t0
        reference(REAL, x_real, pos, moa, cond)
        _remember(grid, pos, REAL, x_real)
        _remember(grid, pos, CONTROL_COLUMN, to_model(np.asarray(dataset.images[pairs.control[pos]]), dequantize=False))
        for r, candidates in references.items():
            t0 = time.perf_counter()
            x = quantize(candidates(pos, 0))
            scores[r].seconds += time.perf_counter() - t0
            reference(r, x, pos, moa, cond)
        for s, candidates in sources.items():
            t0 = time.perf_counter()
            _source_batch(s, candidates, pos, k_max, tts_n, scores[s], streams, grid, moa, cond, suite, weights, classifier,
                          judge, features, profiles)
            scores[s].seconds += time.perf_counter() - t0
        done = [c for c in np.unique(cond) if last_position[int(c)] < start + len(pos)]
        _finish_conditions(streams, done, fd_columns, condition_names, per_condition_fd, kid_subset_size,
                           kid_subsets, seed, compute=per_compound)
        if on_progress is not None:
            on_progress("evaluate", min(start + batch_size, n_pairs), n_pairs)

    overall = compare_many(streams.overall[REAL], {c: streams.overall[c] for c in fd_columns}, kid_subset_size,
                           kid_subsets, seed)
    full_shown, full_note = overall_rule(n_pairs, n_pairs, features.dim)
    real = streams.overall[REAL].reservoir.sample
    draws = 100 if features.dim <= 512 else 20  # 2048-d Inception features: two eighs per draw
    overall_fd_sem = {c: bootstrap_fd_sem(real, streams.overall[c].reservoir.sample, n_pairs, draws, seed)
                      if full_shown else None for c in fd_columns}
    if not full_shown:  # n <= D: the plain pooled FD is mostly bias; KD is unbiased and kept
        overall = {c: replace(r, fd=None) for c, r in overall.items()}
    distances = _jackknife_distances(streams, fd_columns, n_pairs, features.dim)
    distances["full"] = {"shown": full_shown, "note": full_note, "dim": int(features.dim)}
    warning = empty_columns_warning({c: s.nuc_count for c, s in scores.items()}, suite.segmenter.settings)
    if warning:  # more than 5 % of a column's images (all K candidates of a run) without a nucleus
        logger.warning("evaluate: %s", warning)
    first = scores[next(iter(sources))].total.mean(axis=1) if sources else None
    shown, roles = pick_grid_rows(grid_pairs, pairs.condition, first, grid_conditions)
    return {"pairs": pairs, "sources": list(sources), "references": list(references), "best_of": best_of, "k_max": k_max, "tts_n": tts_n,
            "names": names,
            "weights": dict(weights), "seed": int(seed), "scores": scores, "fd_columns": fd_columns,
            "overall_fd": overall, "overall_fd_sem": overall_fd_sem, "distances": distances, "per_compound": {"shown": per_compound, "note": per_compound_note},
            "per_condition_fd": per_condition_fd, "feature_name": features.name, "kid_name": features.kid_name,
            "feature_source": getattr(features, "source", ""), "grid": [(int(p), grid[int(p)]) for p in shown],
            "grid_roles": roles, "profiles": profiles,
            "kid": {"subset_size": kid_subset_size, "n_subsets": kid_subsets, "reservoir_size": reservoir_size}}


def _no_profiles(n_pairs: int) -> np.ndarray:
    return np.full((n_pairs, len(PROFILE_FEATURES)), np.nan)


ROWS_KEPT = 1 << 22  # at most this many floats of per-pair features per column (32 MiB) for the jackknife


def _jackknife_distances(streams: _Streams, fd_columns: Sequence[str], n_pairs: int, dim: int) -> dict:
    """The jackknife bias-corrected pooled Frechet distance of every column to ``real``
    (:func:`~cellfluxrl.evaluation.debiased.jackknife_fd`), its jackknife s.e., and every pair's rows
    (for the paired bootstrap of the report).

    Returns:
        ``{"jackknife": {"suffix", "groups", "shown", "note"}, "fd": {column: float | None}, "fd_sem":
        {column: float | None}, "rows": {column: float64 (P, D)} or None}``.
    """
    groups = min(JK_GROUPS, n_pairs)
    info = {"suffix": JK_SUFFIX, "groups": groups, "shown": False,
            "note": (f"-{JK_SUFFIX}: the pooled Frechet distance on all D = {dim} features with its 1/n bias removed by "
                     f"a delete-a-group jackknife over pairs (G = {groups} groups, each left out of the real and "
                     f"generated samples together); ± its jackknife s.e.")}
    out = {"jackknife": info, "fd": {c: None for c in fd_columns}, "fd_sem": {c: None for c in fd_columns},
           "rows": None}
    if not streams.keep_rows:
        info["note"] = (f"no jackknife distance: it needs every pair's features (at most {JK_MAX_DIM} dimensions and "
                        f"{ROWS_KEPT} floats per column; here {dim} x {n_pairs})")
        return out
    if n_pairs < JK_MIN_PAIRS:
        info["note"] += f"; omitted here: it needs at least {JK_MIN_PAIRS} pairs, and there are {n_pairs}"
        return out
    rows = {c: np.concatenate(streams.rows[c]) for c in [REAL, *fd_columns]}
    for c in fd_columns:
        out["fd"][c], out["fd_sem"][c] = jackknife_fd(rows[REAL], rows[c], groups)
    info["shown"] = True
    out["rows"] = rows
    return out


def _grid_pairs(pairs: Pairs, order: np.ndarray) -> list[int]:
    """The first pair (in processing order) of every condition: Figure 4's candidates."""
    chosen, seen = [], set()
    for p in order:
        c = int(pairs.condition[p])
        if c not in seen:
            seen.add(c)
            chosen.append(int(p))
    return chosen


def pick_grid_rows(candidates: Sequence[int], condition: np.ndarray, overall: np.ndarray | None,
                   n_rows: int) -> tuple[list[int], dict[int, str]]:
    """Figure 4's rows: the pairs of the conditions where the first run scores worst and best, then the first others.

    Args:
        candidates: one pair per condition (:func:`_grid_pairs`), in processing order.
        condition: int ``(P,)`` condition of every pair.
        overall: float ``(P,)`` the first run's overall reward per pair (``None``: no run, keep the order).
        n_rows: rows to show.

    Returns:
        ``(pairs, roles)``: the chosen pairs (worst condition first, best second, then in processing
        order) and ``{pair: "lowest ..." | "highest ..."}`` for the two whose choice the caption names,
        so a figure cannot hide the failing compound.
    """
    candidates = [int(p) for p in candidates]
    if overall is None or len(candidates) < 2 or n_rows < 2:
        return candidates[:n_rows], {}
    mean = {int(condition[p]): float(np.nanmean(overall[condition == condition[p]])) for p in candidates}
    by_score = sorted(candidates, key=lambda p: mean[int(condition[p])])
    worst, best = by_score[0], by_score[-1]
    rest = [p for p in candidates if p not in (worst, best)]
    roles = {worst: f"lowest mean overall {mean[int(condition[worst])]:.2f}",
             best: f"highest mean overall {mean[int(condition[best])]:.2f}"}
    return [worst, best, *rest][:n_rows], roles


def _remember(grid: dict[int, dict[str, np.ndarray]], pos: np.ndarray, column: str, images: torch.Tensor) -> None:
    for i, p in enumerate(pos):
        if int(p) in grid:
            grid[int(p)][column] = to_uint8(images[i:i + 1])[0]
