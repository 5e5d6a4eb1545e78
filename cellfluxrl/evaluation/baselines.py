"""Baseline columns of every evaluation: what a model must beat to have learned anything.

Both are image sources on the evaluation's own pairs (:data:`~cellfluxrl.evaluation.candidates.CandidateFn`,
one candidate per pair: they need no network and no noise):

- ``copy-control``: the "generated" image is the pair's control ``x_0`` itself. A model that does not
  beat it on the MoA reward and the judge's MoA accuracy has learned no perturbation; on distances
  it can score well, since controls and treated cells share most of their look.
- ``train-real``: a real *training* image of the pair's compound, drawn by the pair's seed: what a
  perfect sampler of the training distribution scores on these test pairs. Held-out (OOD)
  compounds have no training images, so their section has no ``train-real`` column
  (:func:`train_real_problem` says why).
"""

from __future__ import annotations

import numpy as np
import torch

from cellfluxrl.errors import CellfluxError
from cellfluxrl.images import to_model

BASELINES = ("copy-control", "train-real")
TRAIN_REAL_SALT = 0x7472  # separates the train-real draw from the candidate noise of the same (seed, target)


def parse_baselines(text: str | None) -> tuple[str, ...]:
    """``"copy-control,train-real"`` -> the names in canonical order; ``""``/``None``/``"none"`` -> ``()``.

    Raises:
        CellfluxError: an unknown name (the known ones are listed).
    """
    if text is None or text.strip().lower() in ("", "none"):
        return ()
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        raise CellfluxError(f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(BASELINES)} (or none)")
    return tuple(name for name in BASELINES if name in names)


def copy_control(dataset, pairs):
    """The control ``x_0`` of each pair as its candidate: float32 ``(B, C, H, W)`` in [-1, 1] (exact uint8 levels)."""
    def candidates(pos: np.ndarray, k: int) -> torch.Tensor:
        return to_model(np.asarray(dataset.images[pairs.control[pos]]), dequantize=False)

    return candidates


def train_real_index(dataset, pairs, seed: int) -> np.ndarray:
    """int64 ``(P,)``: per pair, a real treated *train* image of the pair's compound.

    The draw of pair ``i`` depends only on ``(seed, target index of i)``, so it is the same
    whatever the batch, the other pairs, or the columns beside it.

    Raises:
        CellfluxError: a pair's compound has no treated train image (:func:`train_real_problem`).
    """
    problem = train_real_problem(dataset, pairs)
    if problem:
        raise CellfluxError(problem)
    train = dataset.select(split="train", state="treated")
    by_condition = {int(c): train[dataset.condition[train] == c] for c in np.unique(pairs.condition)}
    out = np.empty(len(pairs), dtype=np.int64)
    for i, (target, condition) in enumerate(zip(pairs.target, pairs.condition)):
        rng = np.random.default_rng([int(seed), int(target), TRAIN_REAL_SALT])
        out[i] = rng.choice(by_condition[int(condition)])
    return out


def train_real_problem(dataset, pairs) -> str | None:
    """Why the pairs cannot have a ``train-real`` column (held-out compounds), or ``None``."""
    train = dataset.select(split="train", state="treated")
    have = set(np.unique(dataset.condition[train]).tolist())
    missing = sorted({str(name) for name, c in zip(pairs.compound, pairs.condition) if int(c) not in have})
    if not missing:
        return None
    shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    return (f"no train-real column: {shown} {'has' if len(missing) == 1 else 'have'} no training images "
            f"(held-out compounds are never trained on)")


def train_real(dataset, pairs, seed: int):
    """A real training image of each pair's compound as its candidate (:func:`train_real_index`)."""
    index = train_real_index(dataset, pairs, seed)

    def candidates(pos: np.ndarray, k: int) -> torch.Tensor:
        return to_model(np.asarray(dataset.images[index[pos]]), dequantize=False)

    return candidates


def baseline_sources(names, dataset, pairs, seed: int) -> tuple[dict, list[str]]:
    """The candidate functions of the requested baselines for these pairs, and one note per one left out.

    Returns:
        ``({name: CandidateFn}, [note, ...])``: ``train-real`` is left out (with a note) when a
        pair's compound has no training images.
    """
    sources, notes = {}, []
    for name in names:
        if name == "copy-control":
            sources[name] = copy_control(dataset, pairs)
        elif name == "train-real":
            problem = train_real_problem(dataset, pairs)
            if problem:
                notes.append(problem)
            else:
                sources[name] = train_real(dataset, pairs, seed)
    return sources, notes


def learned_nothing(versus: dict, rows=("moa", "moa_accuracy")) -> dict[str, list[str]]:
    """Runs that do not beat ``copy-control``: ``{run: [rows where the paired difference is <= 0]}``.

    Args:
        versus: ``{run: {row: {"mean", ...}}}``, each run minus ``copy-control`` on the same pairs.
        rows: the rows a learned perturbation must raise (the MoA reward and the judge's accuracy).
    """
    out = {}
    for run, cells in versus.items():
        failing = [row for row in rows if cells.get(row, {}).get("mean") is not None and cells[row]["mean"] <= 0]
        if failing:
            out[run] = failing
    return out
