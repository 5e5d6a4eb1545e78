"""Sampling from a velocity network: CFG, noisy source, ODE solve; and the evaluation pairs.

CellFlux at test time: ``x_0 = x_ctrl + 1.0 N(0, I)`` (control from the same plate, noise always
added), Heun on the 51-point EDM grid, CFG ``v = (1 + w) v(x, t, c) - w v(x, t, None)`` with
``w = 0.2``, EMA weights.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from cellfluxrl.errors import CellfluxError, did_you_mean
from cellfluxrl.model.path import add_source_noise
from cellfluxrl.model.sampler import solve, time_grid
from cellfluxrl.model.unet import VelocityUNet


def unwrap(net: nn.Module) -> nn.Module:
    """The plain module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(net, "_orig_mod"):
            net = net._orig_mod
        elif isinstance(net, nn.parallel.DistributedDataParallel):
            net = net.module
        else:
            return net


def autocast_for(device: torch.device | str, enabled: bool = True):
    """bf16 autocast on CUDA, a no-op context elsewhere."""
    device = torch.device(device)
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def guided_velocity(net: nn.Module, cond: torch.Tensor, cfg_scale: float = 0.2,
                    autocast: bool = True) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The classifier-free-guided velocity ``(1 + w) v(x, t, c) - w v(x, t, None)`` as a callable.

    Args:
        net: a velocity network ``net(x_t, t, cond)`` (a :class:`VelocityUNet`, maybe wrapped).
        cond: float ``(B, D)`` compound embeddings.
        cfg_scale: the guidance weight ``w``; ``0`` gives exactly one conditional evaluation.
        autocast: bf16 autocast when the inputs are on CUDA.

    Returns:
        ``velocity(x_t (B, C, H, W), t (B,)) -> float32 (B, C, H, W)``. With ``w != 0`` and a
        :class:`VelocityUNet`, the conditional and unconditional passes run as one batch of ``2B``.
    """
    w = float(cfg_scale)
    batched = isinstance(unwrap(net), VelocityUNet)

    def velocity(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast_for(x_t.device, autocast):
            if w == 0.0:
                return net(x_t, t, cond).float()
            if batched:
                keep = torch.cat([torch.ones(len(x_t), device=x_t.device), torch.zeros(len(x_t), device=x_t.device)])
                v = net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, cond]), cond_keep=keep).float()
                v_cond, v_uncond = v.chunk(2)
            else:
                v_cond, v_uncond = net(x_t, t, cond).float(), net(x_t, t, None).float()
        return (1.0 + w) * v_cond - w * v_uncond

    return velocity


@torch.no_grad()
def generate(net: nn.Module, x_0_clean: torch.Tensor, cond: torch.Tensor, *, generator: torch.Generator,
             sigma: float = 1.0, num_steps: int = 50, grid: str = "edm", solver: str = "heun",
             cfg_scale: float = 0.2, return_trajectory: bool = False):
    """Perturbed images from controls: noise the source, integrate the guided velocity to ``t = 1``.

    Args:
        net: the velocity network (put it in eval mode first; EMA weights for CellFlux results).
        x_0_clean: clean controls, float32 ``(B, C, H, W)`` in ``[-1, 1]``.
        cond: float32 ``(B, D)`` compound embeddings of the requested perturbations.
        generator: source of the source noise (fixes the result).
        sigma: source-noise std in the ``[-1, 1]`` scale (CellFlux: 1.0, always at sampling).
        num_steps: solver steps (grid has ``num_steps + 1`` points).
        grid: ``"edm"`` (CellFlux) or ``"uniform"``.
        solver: ``"heun"`` (NFE 2 per step) or ``"euler"`` (1 per step).
        cfg_scale: CFG weight ``w`` (CellFlux BBBC021: 0.2); each NFE costs 2 passes when ``w != 0``.
        return_trajectory: also return the states on the grid, ``(num_steps + 1, B, C, H, W)``.

    Returns:
        ``(x_1_hat, x_0_noisy)`` float32 ``(B, C, H, W)`` (unclamped), plus the trajectory if asked.
        ``x_0_noisy`` is the exact source the ODE started from (RL keeps it).
    """
    if x_0_clean.shape[0] != cond.shape[0]:
        raise ValueError(f"{x_0_clean.shape[0]} controls but {cond.shape[0]} conditions")
    x_0_noisy = add_source_noise(x_0_clean.float(), sigma, generator)
    ts = time_grid(num_steps, grid)
    out = solve(guided_velocity(net, cond.float(), cfg_scale), x_0_noisy, ts, solver, return_trajectory)
    if return_trajectory:
        x_1_hat, traj = out
        return x_1_hat, x_0_noisy, traj
    return out, x_0_noisy


SPLITS = {"id": "in-distribution compounds (seen in training; CellFlux's headline protocol)",
          "ood": "held-out (OOD) compounds, never seen in training",
          "all": "all compounds (in-distribution and held-out mixed)"}


# Image splits pairs are read from: the final evaluation reads test; tuning reads validation.
PAIR_SPLITS = ("test", "val", "val-select", "val-tune")  # data.splits.VAL_SUBSETS: val's two disjoint halves


def split_targets(dataset, split: str = "id", images: str = "test") -> np.ndarray:
    """Treated rows (int64, CSV order) of a compound split (``"id"``, ``"ood"``, ``"all"``) in an
    image split (``images``: ``"test"``, the final evaluation; ``"val"``, the validation pairs
    every tuning script reads, dealt by plate and well apart from test, :mod:`cellfluxrl.data.splits`).

    CellFlux evaluates the in-distribution compounds and the held-out (OOD) ones separately; a
    number over ``"all"`` mixes the two and is never a headline.
    """
    if split not in SPLITS:
        raise CellfluxError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if images not in PAIR_SPLITS:
        raise CellfluxError(f"unknown image split {images!r}; choose one of {', '.join(PAIR_SPLITS)}")
    everything = dataset.select(split=images, state="treated", include_ood=True)
    if split == "all":
        return everything
    in_distribution = dataset.select(split=images, state="treated", include_ood=False)
    return in_distribution if split == "id" else np.setdiff1d(everything, in_distribution)


def test_pairs(dataset, n: int, seed: int, conditions: Sequence[str] | None = None, split: str = "id",
               images: str = "test"):
    """Evaluation pairs: the first ``n`` treated test rows of a split in CSV order, same-plate controls
    (``images="val"``: validation rows and controls instead, for tuning).

    As CellFlux (first 5,120 test rows, in-distribution compounds; the OOD compounds are evaluated
    apart with ``split="ood"``). ``conditions`` restricts the targets to those compound names
    (within the split; with ``conditions`` the split defaults to ``"all"`` in the commands).
    Fewer than ``n`` pairs come back when fewer rows exist.

    Args:
        dataset: a :class:`cellfluxrl.data.layout.Dataset`.
        n: number of pairs wanted.
        seed: seed of the control draw (:func:`cellfluxrl.data.pairing.draw_controls`).
        conditions: compound names, or ``None`` for all.
        split: ``"id"`` (default), ``"ood"`` or ``"all"`` (:data:`SPLITS`).
        images: ``"test"`` (default), ``"val"``, or one of its disjoint halves ``"val-tune"`` (tuning
            settings) and ``"val-select"`` (selecting checkpoints) (:data:`PAIR_SPLITS`).

    Returns:
        ``(target_idx, control_idx)``, int64 ``(m,)`` each with ``m = min(n, available)``.

    Raises:
        CellfluxError: an unknown compound name or split, or no treated test rows for the request.
    """
    from cellfluxrl.data.pairing import draw_controls

    targets = split_targets(dataset, split, images)
    if conditions:
        from cellfluxrl.data.compound_names import compound_key

        known = set(dataset.conditions["compound"].tolist())
        stored = {compound_key(name): name for name in known}  # any spelling finds the stored one
        for name in conditions:
            if compound_key(name) not in stored:
                raise CellfluxError(f"{dataset.root}: unknown condition {name!r} (not in conditions.csv); "
                                    f"{did_you_mean(name, known)}")
        conditions = [stored[compound_key(name)] for name in conditions]
        targets = targets[np.isin(dataset.table["compound"][targets], list(conditions))]
    if targets.size == 0:
        what = f" for {', '.join(conditions)}" if conditions else ""
        hint = "; datasets prepared before the validation split have none: prepare it again" if images.startswith("val") else ""
        raise CellfluxError(f"{dataset.root}: no treated {images} images of the {split!r} split{what}{hint}")
    targets = targets[: int(n)]
    return targets.astype(np.int64), draw_controls(dataset, images, targets, seed)


test_pairs.__test__ = False  # not a pytest test despite the name


# --------------------------------------------------------------------------------------------
# Sampling a run on evaluation pairs, optionally best-of-K by reward (paper Eq. 10).

def best_of(totals: np.ndarray) -> np.ndarray:
    """Index of the best of K candidates per request: ``argmax_k totals[i, k]`` (first on ties).

    Args:
        totals: float ``(n, K)`` weighted reward sums.

    Returns:
        int64 ``(n,)`` in ``[0, K)``.
    """
    totals = np.asarray(totals, dtype=np.float64)
    if totals.ndim != 2 or totals.shape[1] < 1:
        raise ValueError(f"totals must be (n, K) with K >= 1, got {totals.shape}")
    return np.argmax(totals, axis=1).astype(np.int64)


def item_seed(seed: int, i: int, k: int = 0) -> int:
    """Seed of the source noise of request ``i``, candidate ``k`` (independent of batching)."""
    return int(np.random.SeedSequence([int(seed), int(i), int(k)]).generate_state(1, np.uint32)[0])


def noisy_sources(x_0_clean: torch.Tensor, seeds: Sequence[int], sigma: float = 1.0) -> torch.Tensor:
    """``x_0 + sigma * eps_j`` with ``eps_j`` drawn on CPU from ``torch.Generator().manual_seed(seeds[j])``."""
    eps = torch.stack([torch.randn(x_0_clean.shape[1:], generator=torch.Generator().manual_seed(int(s)))
                       for s in seeds])
    return x_0_clean.float() + float(sigma) * eps.to(x_0_clean.device)


@dataclass
class Samples:
    """Generated images for evaluation pairs (uint8 ``(n, H, W, 3)`` images; per-request metadata).

    ``rewards`` is the chosen candidate's weighted reward (best-of only), ``candidate_rewards`` all
    ``(n, K)`` totals, ``components`` name -> ``(n,)`` for the chosen candidates.
    """

    generated: np.ndarray
    controls: np.ndarray
    targets: np.ndarray
    target_index: np.ndarray
    control_index: np.ndarray
    compound: np.ndarray
    moa: np.ndarray
    seeds: np.ndarray
    rewards: np.ndarray | None = None
    candidate_rewards: np.ndarray | None = None
    components: dict = field(default_factory=dict)


def sample_pairs(net: nn.Module, dataset, target_idx: np.ndarray, control_idx: np.ndarray, *, seed: int = 0,
                 num_steps: int = 50, cfg_scale: float = 0.2, grid: str = "edm", solver: str = "heun",
                 sigma: float = 1.0, batch_size: int = 64, best_of_k: int = 1, suite=None,
                 device: str | torch.device = "cpu", on_batch: Callable[[int], None] | None = None) -> Samples:
    """Generate one image per ``(control, target)`` pair; with ``best_of_k > 1`` keep the best of K.

    Request ``i``'s candidate ``k`` starts from ``control + sigma * eps`` with ``eps`` seeded by
    :func:`item_seed` ``(seed, i, k)``, so results do not depend on ``batch_size``. Controls enter
    without dequantisation noise (pixel ``p`` -> ``p / 255 * 2 - 1``).

    Args:
        net: velocity network in eval mode (on ``device``).
        dataset: the run's :class:`~cellfluxrl.data.layout.Dataset`.
        target_idx, control_idx: int64 ``(n,)`` from :func:`test_pairs`.
        batch_size: images per solver batch (candidates included).
        best_of_k: candidates per request (paper Eq. 10); needs ``suite``. With a suite and
            ``best_of_k = 1`` the single samples are scored too.
        suite: an object with ``score(images (B, C, H, W) in [-1, 1], moa: list[str])`` returning
            ``.total`` ``(B,)`` and ``.components`` (a :class:`cellfluxrl.rewards.RewardSuite`).
        on_batch: called with the number of requests finished after each batch (progress bars).

    Returns:
        :class:`Samples`.
    """
    from cellfluxrl.images import to_model, to_uint8

    if best_of_k > 1 and suite is None:
        raise CellfluxError("best-of-K needs a reward suite (give --weights / a dataset with evaluators)")
    device = torch.device(device)
    target_idx, control_idx = np.asarray(target_idx, np.int64), np.asarray(control_idx, np.int64)
    n, k_c = len(target_idx), int(best_of_k)
    emb = torch.tensor(np.asarray(dataset.embeddings, dtype=np.float32))
    compounds = dataset.table["compound"][target_idx]
    moas = dataset.table["moa"][target_idx]
    generated, seeds = [], np.zeros(n, np.int64)
    chosen_rewards = np.zeros(n) if suite is not None else None
    all_rewards = np.zeros((n, k_c)) if suite is not None else None
    components: dict[str, np.ndarray] = {}
    per_batch = max(1, int(batch_size) // k_c)
    for lo in range(0, n, per_batch):
        idx = np.arange(lo, min(n, lo + per_batch))
        rep = np.repeat(idx, k_c)  # request of every candidate
        cand = np.tile(np.arange(k_c), len(idx))
        x_ctrl = to_model(np.asarray(dataset.images[control_idx[rep]]), dequantize=False).to(device)
        cand_seeds = [item_seed(seed, i, k) for i, k in zip(rep, cand)]
        x_0 = noisy_sources(x_ctrl, cand_seeds, sigma)
        cond = emb[dataset.condition[target_idx[rep]]].to(device)
        x_1_hat, _ = generate(net, x_0, cond, generator=torch.Generator(), sigma=0.0, num_steps=num_steps,
                              grid=grid, solver=solver, cfg_scale=cfg_scale)
        x_1_hat = x_1_hat.clamp(-1.0, 1.0)
        pick = np.zeros(len(idx), np.int64)
        if suite is not None:
            res = suite.score(x_1_hat, [str(m) for m in moas[rep]])
            totals = np.asarray(res.total, np.float64).reshape(len(idx), k_c)
            pick = best_of(totals)
            all_rewards[idx] = totals
            chosen_rewards[idx] = totals[np.arange(len(idx)), pick]
            for name, values in res.components.items():
                values = np.asarray(values, np.float64).reshape(len(idx), k_c)
                components.setdefault(name, np.zeros(n))[idx] = values[np.arange(len(idx)), pick]
        rows = np.arange(len(idx)) * k_c + pick
        generated.append(to_uint8(x_1_hat[torch.as_tensor(rows)]))
        seeds[idx] = np.asarray(cand_seeds, np.int64)[rows]
        if on_batch is not None:
            on_batch(len(idx))
    return Samples(generated=np.concatenate(generated) if generated else np.zeros((0,) + dataset.images.shape[1:], np.uint8),
                   controls=np.asarray(dataset.images[control_idx]), targets=np.asarray(dataset.images[target_idx]),
                   target_index=target_idx, control_index=control_idx, compound=np.asarray(compounds, dtype=str),
                   moa=np.asarray(moas, dtype=str), seeds=seeds, rewards=chosen_rewards,
                   candidate_rewards=all_rewards, components=components)
