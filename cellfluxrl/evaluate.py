"""Evaluation: the paper's Table 1 (rewards, MoA accuracy, FID/KID), Figure 5 and Figure 4.

Protocol (CellFlux's, plus CellFluxRL's best-of-N):

* Pairs: the first ``n`` treated test rows in CSV order, each with a same-plate DMSO control
  (:func:`cellfluxrl.generate.test_pairs`). Every run is evaluated on the same pairs *and* the same
  source noise: candidate ``k`` of the pair whose target is image ``i`` starts from
  ``x_0 = x_ctrl + sigma * eps``, ``eps`` drawn from a generator seeded by ``(seed, i, k)``, so two
  runs differ only by their networks (paired differences) and a sample does not depend on the
  batch it lands in.
* Candidates: ``K = max(best_of)`` per pair, generated and scored once. Best-of-N for every N
  asked takes the best of the *first* N candidates by the overall (weighted) reward, so the
  curves are nested: per pair, the selected overall reward never decreases with N.
* Images are quantised to 8 bits before scoring (generated images are as they would be saved;
  real images are exactly their uint8 pixels), then mapped to ``[-1, 1]``.
* Columns: each run (N = 1), each run with best-of-``max(best_of)``, and ``real`` (the real
  test targets: the rewards of real cells, a reference the generated columns can be read against).
* Rows: every reward of the suite (the paper's seven by default; mean and standard error over
  pairs), ``overall`` (the weighted sum given by ``weights``), ``moa_accuracy`` (argmax of the MoA
  classifier == target MoA), and the distances ``<FD>_o``, ``<FD>_c``, ``<KD>_o``, ``<KD>_c``.
  ``_o`` pools all pairs; ``_c`` is computed per condition (compound) with fresh statistics, then
  averaged over conditions (CellFlux's FID_c/KID_c, without its per-class KID accumulation bug).
  With ``inception`` (the FID InceptionV3 weights) the distances are FID/KID; without it they
  are the offline substitutes FD-MoA/KD-MoA on the MoA classifier's penultimate features, which
  are *not* comparable with published FID/KID. The real column has no distance ("-").
* Streaming: pairs are processed in batches in condition order; each column keeps running
  feature statistics and a bounded reservoir for KID, and a condition's statistics are dropped as
  soon as its last pair is done. Peak memory does not grow with ``n`` (only per-pair scalars are
  kept).

Outputs (:func:`write_report`): ``report.json``, ``report.md``, ``fig5_best_of_n.png``,
``fig4_grid.png``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from cellfluxrl.errors import CellfluxError
from cellfluxrl.images import to_model, to_uint8
from cellfluxrl.metrics import FeatureSet, best_of_n, compare_many, mean_sem

logger = logging.getLogger(__name__)

REPORT_FORMAT = "cellfluxrl-evaluate/1"
REWARD_LABELS = {"moa": "MoA", "nuc_in_cyto": "Nuc-in-Cyto", "roundness": "Roundness", "nuc_size": "NucSize",
                 "cyto_size": "CytoSize", "nuc_count": "NucCount", "cyto_count": "CytoCount"}
MORPHOLOGY_REWARDS = ("nuc_in_cyto", "roundness", "nuc_size", "cyto_size", "nuc_count", "cyto_count")
REAL = "real"
CONTROL_COLUMN = "control"

# A source of candidates: (pair positions int64 (B,), candidate index k) -> float (B, C, H, W) in [-1, 1].
CandidateFn = Callable[[np.ndarray, int], torch.Tensor]


@dataclass
class Pairs:
    """The evaluation pairs.

    Attributes:
        target, control: int64 ``(P,)`` image indices of the treated targets and their controls.
        condition: int64 ``(P,)`` row of the target's compound in ``dataset.conditions``.
        compound, moa: str ``(P,)`` compound and MoA names of the targets.
    """

    target: np.ndarray
    control: np.ndarray
    condition: np.ndarray
    compound: np.ndarray
    moa: np.ndarray

    def __len__(self) -> int:
        return int(self.target.size)

    @classmethod
    def from_dataset(cls, dataset, n: int, seed: int) -> "Pairs":
        from cellfluxrl.generate import test_pairs

        target, control = test_pairs(dataset, n, seed)
        return cls(target, control, dataset.condition[target], dataset.table["compound"][target].astype(str),
                   dataset.table["moa"][target].astype(str))

    def order(self) -> np.ndarray:
        """Processing order: grouped by condition (stable, so CSV order within a condition)."""
        return np.argsort(self.condition, kind="stable")


class MoAFeatures:
    """The offline substitute feature extractor: MoA-classifier penultimate features (FD-MoA/KD-MoA)."""

    name = "FD-MoA"
    kid_name = "KD-MoA"

    def __init__(self, classifier, source: str = ""):
        self.classifier, self.source = classifier, source
        self.dim = int(classifier.config["widths"][-1])

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return np.asarray(self.classifier.features(images), dtype=np.float64)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """float ``(B, C, H, W)`` -> the same images through 8 bits: clamp, floor to uint8, back to [-1, 1]."""
    return to_model(to_uint8(images), dequantize=False)


def pair_noise(target_index: int, k: int, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The source noise ``eps`` of candidate ``k`` of a pair: float32 ``shape``, fixed by ``(seed, target, k)``."""
    state = np.random.SeedSequence([int(seed), int(target_index), int(k)]).generate_state(2, np.uint64)
    generator = torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def run_candidates(net: torch.nn.Module, dataset, pairs: Pairs, *, seed: int, steps: int, cfg_scale: float,
                   sigma: float = 1.0, device: str | torch.device = "cpu", solver: str = "heun",
                   grid: str = "edm") -> CandidateFn:
    """The candidates of a velocity network: CellFlux sampling from per-(pair, k) seeded source noise."""
    from cellfluxrl.generate import generate

    embeddings = torch.tensor(np.array(dataset.embeddings), dtype=torch.float32)

    def candidates(pos: np.ndarray, k: int) -> torch.Tensor:
        x_ctrl = to_model(np.asarray(dataset.images[pairs.control[pos]]), dequantize=False)
        eps = torch.stack([pair_noise(pairs.target[p], k, seed, tuple(x_ctrl.shape[1:])) for p in pos])
        x_0 = (x_ctrl + float(sigma) * eps).to(device)
        cond = embeddings[pairs.condition[pos]].to(device)
        x_1_hat, _ = generate(net, x_0, cond, generator=torch.Generator(), sigma=0.0, num_steps=steps,
                              grid=grid, solver=solver, cfg_scale=cfg_scale)
        return x_1_hat.float().cpu()

    return candidates


def real_images(dataset, pairs: Pairs, pos: np.ndarray) -> torch.Tensor:
    """The real targets of some pairs, float32 ``(B, C, H, W)`` in [-1, 1] (exact uint8 levels)."""
    return to_model(np.asarray(dataset.images[pairs.target[pos]]), dequantize=False)


@dataclass
class _Scores:
    """Per-pair (and per-candidate) scores of one source: arrays ``(P, K)`` (K = 1 for real)."""

    total: np.ndarray
    components: dict[str, np.ndarray]
    correct: np.ndarray
    seconds: float = 0.0

    @classmethod
    def empty(cls, n_pairs: int, k: int, names: Sequence[str]) -> "_Scores":
        nan = np.full((n_pairs, k), np.nan)
        return cls(nan.copy(), {name: nan.copy() for name in names}, np.zeros((n_pairs, k), dtype=bool))


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


def _score_into(scores: _Scores, rows: np.ndarray, k: int, images: torch.Tensor, moa: np.ndarray, suite,
                weights: Mapping[str, float], classifier) -> None:
    """Rewards, overall reward and MoA correctness of one batch, written into ``scores[rows, k]``."""
    from cellfluxrl.data.compounds import MOAS

    result = suite.score(images, list(moa))
    total = np.zeros(len(rows), dtype=np.float64)
    for name in scores.components:
        scores.components[name][rows, k] = result.components[name]
    for name, w in weights.items():
        total += w * result.components[name]
    scores.total[rows, k] = total
    predicted = np.argmax(classifier.predict_proba(images), axis=1)
    scores.correct[rows, k] = np.array([MOAS[i] for i in predicted]) == moa


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


def _source_batch(s: str, candidates: CandidateFn, pos: np.ndarray, k_max: int, scores: _Scores, streams: _Streams,
                  grid: dict, moa: np.ndarray, cond: np.ndarray, suite, weights: Mapping[str, float], classifier,
                  features) -> None:
    """Generate and score the ``k_max`` candidates of a batch; stream the features of the picked ones.

    The column ``s`` takes candidate 0 (a plain sample); ``s+best-of-K`` takes the best of all K by
    the overall reward. Only ``batch x K`` images are held at once.
    """
    images = []
    for k in range(k_max):
        x = quantize(candidates(pos, k))
        _score_into(scores, pos, k, x, moa, suite, weights, classifier)
        images.append(x)
    picks = {s: np.zeros(len(pos), dtype=np.int64)}
    if k_max > 1:
        picks[f"{s}+best-of-{k_max}"] = best_of_n(scores.total[pos], k_max)
    stacked = torch.stack(images, dim=1)  # (B, K, C, H, W)
    for column, pick in picks.items():
        chosen = stacked[torch.arange(len(pos)), torch.as_tensor(pick)]
        streams.update(column, cond, features(chosen))
        _remember(grid, pos, column, chosen)


def evaluate_sources(dataset, pairs: Pairs, sources: Mapping[str, CandidateFn], *, suite, weights: Mapping[str, float],
                     features, classifier, best_of: Sequence[int] = (1,), batch_size: int = 32,
                     kid_subset_size: int = 100, kid_subsets: int = 100, reservoir_size: int = 1000,
                     seed: int = 0, grid_conditions: int = 6,
                     on_progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Score candidate sources and the real targets on the same pairs; the core of :func:`evaluate`.

    Args:
        dataset: the loaded dataset.
        pairs: the evaluation pairs.
        sources: column name -> candidate function (a run, or any image source in tests).
        suite: a :class:`~cellfluxrl.rewards.RewardSuite` whose rewards are the report's reward rows.
        weights: name -> weight of the overall reward (names must be in the suite).
        features: feature extractor ``(B, C, H, W) in [-1, 1] -> float64 (B, F)`` with ``name``,
            ``kid_name`` and ``dim`` (:class:`~cellfluxrl.inception.InceptionFeatures` or
            :class:`MoAFeatures`).
        classifier: the MoA classifier (``predict_proba``) for the accuracy row.
        best_of: the N values of the best-of-N curves (K = max candidates per pair; 1 is always added).
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
    names = list(suite.weights)
    missing = [w for w in weights if w not in names]
    if missing:
        raise CellfluxError(f"evaluate: weighted reward(s) {', '.join(missing)} are not in the reward suite")
    fd_columns = [c for s in sources for c in ([s, f"{s}+best-of-{k_max}"] if k_max > 1 else [s])]
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
        _score_into(scores[REAL], pos, 0, x_real, moa, suite, weights, classifier)
        streams.update(REAL, cond, features(x_real))
        scores[REAL].seconds += time.perf_counter() - t0
        _remember(grid, pos, REAL, x_real)
        _remember(grid, pos, CONTROL_COLUMN, to_model(np.asarray(dataset.images[pairs.control[pos]]), dequantize=False))
        for s, candidates in sources.items():
            t0 = time.perf_counter()
            _source_batch(s, candidates, pos, k_max, scores[s], streams, grid, moa, cond, suite, weights, classifier,
                          features)
            scores[s].seconds += time.perf_counter() - t0
        done = [c for c in np.unique(cond) if last_position[int(c)] < start + len(pos)]
        _finish_conditions(streams, done, fd_columns, condition_names, per_condition_fd, kid_subset_size,
                           kid_subsets, seed)
        if on_progress is not None:
            on_progress("evaluate", min(start + batch_size, n_pairs), n_pairs)

    overall = compare_many(streams.overall[REAL], {c: streams.overall[c] for c in fd_columns}, kid_subset_size,
                           kid_subsets, seed)
    return {"pairs": pairs, "sources": list(sources), "best_of": best_of, "k_max": k_max, "names": names,
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
# Report.


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


def build_report(results: dict, settings: dict) -> dict:
    """The report dict (everything ``report.json`` holds) from :func:`evaluate_sources`' results."""
    names, k_max, best_of = results["names"], results["k_max"], results["best_of"]
    fd_name, kid_name = results["feature_name"], results["kid_name"]
    pairs: Pairs = results["pairs"]
    rows = [*names, "overall", "moa_accuracy", f"{fd_name}_o", f"{fd_name}_c", f"{kid_name}_o", f"{kid_name}_c"]
    table, per_condition, curves = {}, {}, {}
    compounds = np.unique(pairs.compound)

    def column_cells(values: dict[str, np.ndarray], correct: np.ndarray, column: str) -> dict:
        cells = {name: _cell(values[name]) for name in names}
        cells["overall"] = _cell(values["overall"])
        cells["moa_accuracy"] = _cell(correct.astype(np.float64))
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
                     "moa_accuracy": float(correct[mask].mean())}
            r = results["per_condition_fd"].get(column, {}).get(str(compound))
            entry[fd_name] = None if r is None else r.fd
            entry[kid_name] = None if r is None else r.kid_mean
            per_condition[column][str(compound)] = entry
        return cells

    rows_idx = np.arange(len(pairs))
    for s in results["sources"]:
        sc = results["scores"][s]
        curves[s] = {}
        for n in best_of:
            pick = best_of_n(sc.total, n)
            values = {name: sc.components[name][rows_idx, pick] for name in names}
            values["overall"] = sc.total[rows_idx, pick]
            correct = sc.correct[rows_idx, pick]
            curves[s][str(n)] = {key: _cell(v) for key, v in values.items()}
            curves[s][str(n)]["moa_accuracy"] = _cell(correct.astype(np.float64))
            if n == 1:
                table[s] = column_cells(values, correct, s)
            if n == k_max and k_max > 1:
                table[f"{s}+best-of-{k_max}"] = column_cells(values, correct, f"{s}+best-of-{k_max}")
    real = results["scores"][REAL]
    values = {name: real.components[name][:, 0] for name in names}
    values["overall"] = real.total[:, 0]
    table[REAL] = column_cells(values, real.correct[:, 0], REAL)

    throughput = {}
    for s in [*results["sources"], REAL]:
        seconds = results["scores"][s].seconds
        n_images = len(pairs) * (k_max if s != REAL else 1)
        throughput[s] = {"images": n_images, "seconds": seconds, "images_per_s": n_images / seconds if seconds else None}
    return {
        "format": REPORT_FORMAT,
        "columns": list(table), "rows": rows, "table": table,
        "labels": {row: REWARD_LABELS.get(row, row) for row in rows} | {"overall": "Overall",
                                                                         "moa_accuracy": "MoA accuracy"},
        "best_of_n": curves, "per_condition": per_condition,
        "distance": {"features": fd_name, "kid": kid_name, "source": results["feature_source"],
                     "note": _distance_note(fd_name), **results["kid"]},
        "n_pairs": len(pairs), "n_conditions": int(compounds.size),
        "settings": settings, "versions": versions(), "throughput": throughput,
    }


def _distance_note(fd_name: str) -> str:
    if fd_name == "FID":
        return "FID/KID on the 2048-d pool features of the FID InceptionV3 (TF 2015-12-05 weights); KID unscaled"
    return ("offline substitute: Frechet and kernel distances on the MoA classifier's penultimate features "
            "(not FID/KID, not comparable with published numbers); pass --inception FILE for FID/KID")


def versions() -> dict:
    """Software versions recorded in the report."""
    import cellfluxrl

    return {"cellfluxrl": cellfluxrl.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0], "platform": platform.platform()}


def _fmt(cell: dict | None, row: str) -> str:
    if cell is None or cell.get("mean") is None:
        return "-"
    mean, sem = cell["mean"], cell.get("sem")
    if row.endswith("_o") or row.endswith("_c"):
        return f"{mean:.4g}" if abs(mean) < 10 else f"{mean:.2f}"
    return f"{mean:.3f} ± {sem:.3f}" if sem is not None else f"{mean:.3f}"


def markdown_table(report: dict, columns: Sequence[str] | None = None) -> str:
    """The main table (rows x columns, default all columns) as GitHub markdown."""
    columns = list(report["columns"] if columns is None else columns)
    labels = report["labels"]
    lines = ["| Metric | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for row in report["rows"]:
        cells = [_fmt(report["table"][c].get(row), row) for c in columns]
        lines.append(f"| {labels.get(row, row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(report: dict) -> str:
    """``report.md``: settings, the main table, the best-of-N table and per-condition distances."""
    s = report["settings"]
    out = [f"# Evaluation on {s.get('dataset', '?')}", "",
           f"{report['n_pairs']} test pairs, {report['n_conditions']} conditions, seed {s.get('seed')}, "
           f"best-of {s.get('best_of')}, {s.get('steps')} sampler steps, CFG {s.get('cfg_scale')}.",
           f"Overall reward weights: {s.get('weights')}.", f"Distances: {report['distance']['note']}.", "",
           "Rewards: mean ± standard error over pairs (higher is better). Distances: lower is better "
           "(the real column has none).", "", markdown_table(report), "", "## Best-of-N (selected by the overall reward)", ""]
    names = [r for r in report["rows"] if r in report["table"][report["columns"][0]] and not r[-2:] in ("_o", "_c")]
    out.append("| Run | N | " + " | ".join(report["labels"].get(r, r) for r in names) + " |")
    out.append("|---|---|" + "---|" * len(names))
    for run, per_n in report["best_of_n"].items():
        for n, cells in per_n.items():
            out.append(f"| {run} | {n} | " + " | ".join(_fmt(cells.get(r), r) for r in names) + " |")
    fd, kd = report["distance"]["features"], report["distance"]["kid"]
    out += ["", "## Per condition", "", f"| Column | Condition | n | Overall | MoA accuracy | {fd} | {kd} |",
            "|---|---|---|---|---|---|---|"]
    for column, per in report["per_condition"].items():
        for name, e in per.items():
            d = "-" if e[fd] is None else f"{e[fd]:.4g}"
            k = "-" if e[kd] is None else f"{e[kd]:.4g}"
            out.append(f"| {column} | {name} | {e['n']} | {e['overall']:.3f} | {e['moa_accuracy']:.3f} | {d} | {k} |")
    out += ["", "## Throughput (generation + rewards + features, this machine)", ""]
    for column, t in report["throughput"].items():
        ips = "-" if t["images_per_s"] is None else f"{t['images_per_s']:.1f}"
        out.append(f"- {column}: {t['images']} images in {t['seconds']:.1f} s = {ips} images/s")
    return "\n".join(out) + "\n"


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_report(report: dict, results: dict, out: str | os.PathLike) -> dict[str, Path]:
    """Write report.json, report.md and the two figures into ``out``; returns their paths."""
    from cellfluxrl.figures import best_of_n_figure, image_grid_figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "fig5": out / "fig5_best_of_n.png",
             "fig4": out / "fig4_grid.png"}
    keys = [*results["names"], "overall"]
    labels = {k: report["labels"].get(k, k) for k in keys}
    curves = {run: {k: [(int(n), c[k]["mean"], c[k]["sem"]) for n, c in per_n.items()] for k in keys}
              for run, per_n in report["best_of_n"].items()}
    best_of_n_figure(curves, labels, paths["fig5"])
    pairs: Pairs = results["pairs"]
    columns = [CONTROL_COLUMN, *results["fd_columns"], REAL]
    rows = [(f"{pairs.compound[p]}\n({pairs.moa[p]})", images) for p, images in results["grid"]]
    image_grid_figure(rows, columns, paths["fig4"])
    report = dict(report, files={k: p.name for k, p in paths.items()})
    _write_text(paths["md"], markdown_report(report))
    # report.json last: its presence means the evaluation finished (the demo relies on it).
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


def evaluate(dataset_dir: str | os.PathLike, run_dirs: Sequence[str | os.PathLike], *, n: int = 5120,
             best_of: Sequence[int] = (1,), weights: str | Mapping[str, float] | None = None, seed: int = 0,
             batch_size: int = 32, steps: int = 50, cfg_scale: float = 0.2, sigma: float = 1.0,
             inception: str | os.PathLike | None = None, device: str = "cpu", out: str | os.PathLike | None = None,
             names: Sequence[str] | None = None, kid_subset_size: int = 100, kid_subsets: int = 100,
             on_progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Evaluate runs on a dataset's test pairs (see the module docstring for the protocol).

    Args:
        dataset_dir: the dataset folder (with fitted evaluators).
        run_dirs: pretrain/posttrain run folders (EMA weights are used).
        n: number of test pairs (CellFlux: 5,120; fewer if the split is smaller).
        best_of: N values of the best-of-N curves; the table's TTS column uses the largest.
        weights: reward weights of the overall reward (``"moa=5,..."`` or a dict; None = the paper's).
        seed: seeds the control draw, the source noise of every candidate, reservoirs and KID subsets.
        batch_size: pairs per batch.
        steps: Heun steps on the EDM grid (CellFlux: 50).
        cfg_scale: classifier-free guidance weight (CellFlux BBBC021: 0.2).
        sigma: source-noise std (CellFlux: 1.0).
        inception: FID InceptionV3 weight file (state dict or TorchScript); None = the offline
            FD-MoA/KD-MoA substitute.
        device: torch device for generation and features (rewards run on CPU threads).
        out: folder for report.json, report.md and the figures (None: write nothing).
        names: column names of the runs (default: :func:`run_names`).
        kid_subset_size, kid_subsets: KID subsets (CellFlux: 100 and 100).
        on_progress: progress callback ``(stage, done, total)``.

    Returns:
        The report dict (as written to report.json).

    Raises:
        CellfluxError: missing dataset/evaluators/run/weights, a run trained on images of another
            size, or bad options.
    """
    from cellfluxrl.checkpoint import load_run
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.rewards import DEFAULT_WEIGHTS, RewardSuite, parse_weights

    if not run_dirs:
        raise CellfluxError("evaluate: give at least one RUN folder")
    dataset = load_dataset(dataset_dir)
    weights = parse_weights(weights) if not isinstance(weights, Mapping) else dict(weights)
    # Every default reward is reported as a row, whatever its weight in the overall reward.
    suite = RewardSuite.from_dataset(dataset, {name: 1.0 for name in [*DEFAULT_WEIGHTS, *weights]}, device=device)
    classifier = suite.evaluators.moa_classifier(device)
    if inception is not None:
        from cellfluxrl.inception import load_inception

        features = load_inception(inception, device=device)
    else:
        features = MoAFeatures(classifier, source=str(suite.evaluators.classifier_path))
    pairs = Pairs.from_dataset(dataset, n, seed)
    names = list(names) if names is not None else run_names(run_dirs)
    if len(names) != len(run_dirs):
        raise CellfluxError(f"evaluate: {len(names)} names for {len(run_dirs)} runs")
    sources, runs_info = {}, []
    for name, run_dir in zip(names, run_dirs):
        run = load_run(run_dir, device=device, weights="ema")
        sources[name] = run_candidates(run.net, dataset, pairs, seed=seed, steps=steps, cfg_scale=cfg_scale,
                                       sigma=sigma, device=device)
        runs_info.append({"name": name, "path": str(run_dir), "kind": run.kind, "step": run.step,
                          "trained_on": str(run.dataset_dir)})
    settings = {"dataset": str(dataset_dir), "runs": runs_info, "n": int(n), "best_of": sorted({1, *(int(b) for b in best_of)}),
                "weights": weights, "seed": int(seed), "batch_size": int(batch_size), "steps": int(steps),
                "cfg_scale": float(cfg_scale), "sigma": float(sigma), "solver": "heun", "grid": "edm",
                "device": str(device), "inception": None if inception is None else str(inception),
                "seeds": {"pairs": int(seed), "candidate_noise": f"SeedSequence([{seed}, target_index, k])",
                          "kid_subsets": int(seed)}}
    with torch.inference_mode(False), torch.no_grad():
        results = evaluate_sources(dataset, pairs, sources, suite=suite, weights=weights, features=features,
                                   classifier=classifier, best_of=best_of, batch_size=batch_size,
                                   kid_subset_size=kid_subset_size, kid_subsets=kid_subsets, seed=seed,
                                   on_progress=on_progress)
    report = build_report(results, settings)
    if out is not None:
        paths = write_report(report, results, out)
        report["files"] = {k: p.name for k, p in paths.items()}
    suite.close()
    return report
