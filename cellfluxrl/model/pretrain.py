"""CellFlux flow-matching pretraining: the training loop, resumable bit-for-bit.

One optimizer step (per process, ``grad_accum`` micro-batches of ``batch_size``):

1. pairs ``(x_0, x_1, c)`` from :class:`~cellfluxrl.data.pairing.PairedDataset` in an order fixed by
   ``(seed, epoch)`` and split across ranks like ``DistributedSampler(drop_last=True)``;
2. with probability ``noise_prob`` (once per micro-batch) ``x_0 <- x_0 + noise_sigma * N(0, I)``;
3. with probability ``cond_drop_prob`` (once per micro-batch) the condition is dropped (CFG);
4. ``t`` skewed (or uniform), ``x_t = (1 - t) x_0 + t x_1``, loss ``||v(x_t, t, c) - (x_1 - x_0)||^2``;
5. AdamW, then EMA with warm-up ``min(ema_decay, (1 + n) / (10 + n))``.

Everything random comes from the seed: the data order and pairs from ``(seed, epoch, i)``, the
per-batch draws from a ``torch.Generator`` and the dropout masks from a forked global RNG, both
re-seeded from ``(seed, rank, step)`` at every step, so a killed run re-started with the same
command continues exactly as if uninterrupted (bitwise on CPU) with no RNG state to save.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from cellfluxrl import __version__
from cellfluxrl.model import losses
from cellfluxrl.checkpoint import (CHECKPOINT_NAME, CONFIG_NAME, RUN_FILES, STATS_NAME, Sampling,
                                   load_cellflux_weights, load_checkpoint, load_state_strict, save_checkpoint,
                                   truncate_stats)
from cellfluxrl.config import PretrainConfig, config_to_dict, dump_json, upgrade_keys
from cellfluxrl.distributed import DistInfo, all_reduce_sum, barrier
from cellfluxrl.errors import CellfluxError
from cellfluxrl.model.batches import BatchOrder, EpochItems, batches_per_epoch, collate, micro_batch  # noqa: F401 (micro_batch re-exported)
from cellfluxrl.model.generate import autocast_for
from cellfluxrl.model.path import add_source_noise, interpolate, sample_t_skewed, sample_t_uniform
from cellfluxrl.model.unet import PRESETS, UNetConfig, VelocityUNet, count_parameters
from cellfluxrl.rundir import check_run_folder, hold

log = logging.getLogger(__name__)

# Settings that may differ when a run is resumed (they do not change the trajectory).
RESUMABLE_CHANGES = ("steps", "save_every", "log_every", "num_workers", "sample_steps", "sample_cfg_scale",
                     "sample_solver", "sample_grid")


# --------------------------------------------------------------------------------------------
# One step's pieces.

def ema_decay_at(n_updates: int, ema_decay: float) -> float:
    """CellFlux's EMA warm-up: ``min(ema_decay, (1 + n) / (10 + n))`` after ``n`` earlier updates."""
    return min(ema_decay, (1.0 + n_updates) / (10.0 + n_updates))


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * net`` for every parameter and float buffer."""
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), net.buffers()):
        e.copy_(b)


def fm_batch_loss(net: nn.Module, batch: dict, embeddings: torch.Tensor, cfg: PretrainConfig,
                  generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Mean flow-matching loss of one micro-batch with CellFlux's noise injection, CFG drop and t.

    The per-batch coin flips, ``t`` and the source noise are drawn (on CPU) from ``generator`` in a
    fixed order, so the draws do not depend on the device.

    Returns:
        scalar float32 loss (mean over the batch of :func:`cellfluxrl.model.losses.fm_loss`).
    """
    x_0 = batch["x_0"].to(device, non_blocking=True)
    x_1 = batch["x_1"].to(device, non_blocking=True)
    b = x_0.shape[0]
    add_noise = bool(torch.rand(1, generator=generator) < cfg.noise_prob)
    drop_cond = bool(torch.rand(1, generator=generator) < cfg.cond_drop_prob)
    sample_t = sample_t_skewed if cfg.time_sampling == "skewed" else sample_t_uniform
    t = sample_t(b, generator).to(device)
    if add_noise:
        x_0 = add_source_noise(x_0, cfg.noise_sigma, generator)
    cond = embeddings[batch["cond"].to(device)]
    # A dropped condition is multiplied by 0 (exactly the unconditional embedding) rather than
    # omitted, so every parameter gets a gradient and DDP ranks stay in step.
    cond_keep = torch.full((b,), 0.0 if drop_cond else 1.0, device=device)
    if cfg.channels_last:
        x_0, x_1 = x_0.contiguous(memory_format=torch.channels_last), x_1.contiguous(memory_format=torch.channels_last)
    x_t = interpolate(x_0, x_1, t)
    with autocast_for(device):
        v = net(x_t, t, cond, cond_keep=cond_keep)
    return losses.fm_loss(v, x_0, x_1).mean()


# --------------------------------------------------------------------------------------------
# Run set-up and resume.

def run_config(dataset_dir: Path, cfg: PretrainConfig, unet: UNetConfig, condition_dim: int,
               init_from: str | None, image_size: int | None = None) -> dict:
    """The resolved run config stored in ``config.json`` and in every checkpoint."""
    preset = cfg.preset if PRESETS.get(cfg.preset) == unet else "custom"
    return {"kind": "pretrain", "dataset": str(Path(dataset_dir).resolve()), "image_size": image_size, "preset": preset,
            "unet": unet.to_dict(), "condition_dim": int(condition_dim), "train": config_to_dict(cfg),
            "init_from": init_from, "cellfluxrl_version": __version__,
            "sampling": Sampling(steps=cfg.sample_steps, cfg_scale=cfg.sample_cfg_scale, solver=cfg.sample_solver,
                                 grid=cfg.sample_grid, sigma=cfg.noise_sigma).to_dict()}


# Settings added since runs were first stored, with the value that reproduces a run stored without them.
ADDED_KEYS = {"lr_schedule": "constant", "warmup_steps": 0, "lr_final": 0.0, "sample_solver": "heun", "sample_grid": "edm"}


def check_resume_compatible(stored: dict, new: dict, path: Path) -> None:
    """Refuse to resume a run with settings that would change its trajectory (one line naming the key).

    A run stored by an older version is read with today's keys (``ckpt_every`` is ``save_every``)."""
    for key in ("dataset", "unet", "condition_dim"):
        if stored.get(key) != new.get(key):
            raise CellfluxError(f"{path}: run was started with {key}={stored.get(key)!r}, now {new.get(key)!r}; "
                                f"use a new RUN folder")
    old_train = {**ADDED_KEYS, **upgrade_keys(stored.get("train") or {}, PretrainConfig, str(path))}
    new_train = new["train"]
    for key in sorted(set(old_train) | set(new_train)):
        if key not in RESUMABLE_CHANGES and old_train.get(key) != new_train.get(key):
            raise CellfluxError(f"{path}: run was started with {key}={old_train.get(key)!r}, now "
                                f"{new_train.get(key)!r}; use a new RUN folder (only {', '.join(RESUMABLE_CHANGES)} may change)")


def default_compile(device: torch.device) -> bool:
    """Default of ``--compile``: on for CUDA, off for CPU (no gain there, 0.96x measured; docs/model.md)."""
    return device.type == "cuda"


@dataclass
class TrainResult:
    """What :func:`train` leaves behind: the raw and EMA networks (unwrapped), steps done, run folder."""

    net: VelocityUNet
    ema: VelocityUNet
    step: int
    run_dir: Path
    resumed_from: int = 0
    last_stats: dict = field(default_factory=dict)
    interrupted: bool = False  # stopped early by ``should_stop`` (a checkpoint at ``step`` was written)


def step_seed(seed: int, rank: int, step: int, stream: int) -> int:
    """A 63-bit seed for the random draws of optimizer step ``step`` on ``rank`` (``stream`` 0:
    coin flips / t / noise, 1: dropout). Re-seeding every step makes resume exact without saving
    RNG states."""
    return int(np.random.SeedSequence([int(seed), int(rank), int(step), int(stream)]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based) under ``cfg``'s schedule.

    Linear warm-up over ``warmup_steps`` (step ``i`` gets ``lr (i + 1) / warmup_steps``), then
    ``constant``: ``lr``; ``cosine``: ``lr_final lr + (1 - lr_final) lr (1 + cos(pi p)) / 2`` with
    ``p`` going from 0 after the warm-up to 1 at the last step.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(cfg.steps - cfg.warmup_steps - 1, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.lr * (cfg.lr_final + (1.0 - cfg.lr_final) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train(dataset_dir: str | Path, run_dir: str | Path, cfg: PretrainConfig, *,
          unet: UNetConfig | None = None, dist: DistInfo | None = None, compile: bool | None = None,
          init_from: str | Path | None = None, on_step: Callable[[dict], None] | None = None,
          on_start: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None
          ) -> TrainResult:
    """Pretrain (or resume pretraining) a CellFlux velocity model in ``run_dir``.

    The main process holds ``run_dir``'s lock (:mod:`cellfluxrl.rundir`) throughout and refuses a
    folder holding files a pretrain run does not write (a dataset, a foreign ``config.json``).

    Args:
        dataset_dir: a prepared dataset folder.
        run_dir: the run folder; a ``checkpoint.pt`` there is resumed from.
        cfg: training settings.
        unet: the architecture (default: ``PRESETS[cfg.preset]``).
        dist: the process's place in a torchrun job (default: one CPU process).
        compile: ``torch.compile`` the network (default: :func:`default_compile` of the device).
        init_from: a CellFlux checkpoint to initialise a fresh run from (ignored when resuming).
        on_step: called on rank 0 after every optimizer step with that step's stats dict.
        on_start: called on rank 0 once everything is checked and loaded, before the first step, with
            ``{"parameters", "device", "start", "steps"}`` (the command says what it is about to train).
        should_stop: polled on every rank after each optimizer step; when it returns True on any
            rank, the run writes a checkpoint and returns with ``interrupted`` set (the command's
            SIGINT/SIGTERM handler sets it; the library installs none).

    Returns:
        :class:`TrainResult`.

    Raises:
        CellfluxError: bad dataset/checkpoint/settings, a run folder in use by another process or
            holding foreign files, or a non-finite loss (the last checkpoint is left untouched).
    """
    dist = dist or DistInfo()
    with ExitStack() as held:
        if dist.is_main:
            held.enter_context(hold(run_dir, "pretrain"))
            check_run_folder(run_dir, "pretrain", RUN_FILES)
        return _train(Path(dataset_dir), Path(run_dir), cfg, unet, dist, compile, init_from, on_step, on_start,
                      should_stop)


def _train(dataset_dir: Path, run_dir: Path, cfg: PretrainConfig, unet: UNetConfig | None, dist: DistInfo,
           compile: bool | None, init_from, on_step, on_start, should_stop) -> TrainResult:
    """:func:`train` once the run folder is held."""
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.data.pairing import PairedDataset

    device = dist.device
    dataset = load_dataset(dataset_dir)
    if unet is None:
        if cfg.preset not in PRESETS:
            raise CellfluxError(f"unknown UNet preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
        unet = PRESETS[cfg.preset]
    config = run_config(dataset_dir, cfg, unet, dataset.embeddings.shape[1], str(init_from) if init_from else None,
                        image_size=int(dataset.images.shape[1]))
    ckpt_path = run_dir / CHECKPOINT_NAME

    # Build the networks and the optimizer.
    with torch.random.fork_rng(devices=[]):  # initial weights from the seed, caller's RNG untouched
        torch.manual_seed(int(cfg.seed))
        net = VelocityUNet(unet, config["condition_dim"])
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay)
    generator = torch.Generator()
    state, start = None, 0
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path, kinds=("pretrain",))
        check_resume_compatible(state["config"], config, ckpt_path)
        config["init_from"] = state["config"].get("init_from")
        load_state_strict(net, state["model"], ckpt_path, "model")
        start = int(state["step"])
        log.info("resuming %s from step %d", run_dir, start)
    elif init_from:
        load_cellflux_weights(init_from, net)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    if state is not None:
        load_state_strict(ema, state["ema"], ckpt_path, "ema")
        optimizer.load_state_dict(state["optimizer"])
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_json(config, run_dir / CONFIG_NAME)
        truncate_stats(run_dir / STATS_NAME, start)  # steps logged after the checkpoint are run (and logged) again
    net.to(device)
    ema.to(device)
    _optimizer_to(optimizer, device)
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    result = TrainResult(net=net, ema=ema, step=start, run_dir=run_dir, resumed_from=start)
    if start >= cfg.steps:
        log.info("%s already has %d >= %d steps", run_dir, start, cfg.steps)
        return result

    # Wrap for DDP / compile.
    model: nn.Module = net
    if dist.distributed:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if default_compile(device) if compile is None else compile:
        model = torch.compile(model)

    # Data in a resumable order.
    paired = PairedDataset(dataset, "train", flip_p=cfg.flip_p, include_ood=cfg.include_ood,
                           dequantize=cfg.dequantize, seed=cfg.seed)
    order = BatchOrder(len(paired), cfg.batch_size, cfg.seed, dist.rank, dist.world_size,
                        start * cfg.grad_accum, cfg.steps * cfg.grad_accum)
    loader = torch.utils.data.DataLoader(
        EpochItems(paired), batch_sampler=order, num_workers=cfg.num_workers, collate_fn=collate,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed))
    embeddings = torch.tensor(np.asarray(dataset.embeddings, dtype=np.float32), device=device)
    bpe = batches_per_epoch(len(paired), cfg.batch_size, dist.world_size)
    images_per_step = cfg.batch_size * cfg.grad_accum * dist.world_size
    if dist.is_main and on_start is not None:
        on_start({"parameters": count_parameters(net), "device": str(device), "start": start, "steps": cfg.steps})

    # Train, with dropout drawing from a forked (saved and restored) global RNG.
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices, device_type=device.type if fork_devices else "cuda"):
        model.train()
        batches = iter(loader)
        last_saved = start if state is not None else None
        step, t_last, window = start, time.perf_counter(), []
        while step < cfg.steps:
            generator.manual_seed(step_seed(cfg.seed, dist.rank, step, 0))
            torch.manual_seed(step_seed(cfg.seed, dist.rank, step, 1))  # dropout (forked global RNG)
            loss_sum = torch.zeros((), device=device)
            for a in range(cfg.grad_accum):
                batch = next(batches)
                sync = a == cfg.grad_accum - 1 or not dist.distributed
                with (model.no_sync() if not sync and hasattr(model, "no_sync") else _null()):
                    loss = fm_batch_loss(model, batch, embeddings, cfg, generator, device)
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach() / cfg.grad_accum
            loss_all = all_reduce_sum(loss_sum) / dist.world_size
            if not torch.isfinite(loss_all):
                optimizer.zero_grad(set_to_none=True)
                where = (f"{ckpt_path} (step {last_saved})" if last_saved is not None and ckpt_path.exists()
                         else "nowhere (no checkpoint written yet)")
                raise CellfluxError(f"non-finite loss at step {step + 1}; last good checkpoint kept at {where}")
            grad_norm = nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            for group in optimizer.param_groups:  # a function of the step alone: a resume continues it exactly
                group["lr"] = lr_at(step, cfg)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema_update(ema, net, ema_decay_at(step, cfg.ema_decay))
            step += 1
            result.step = step

            # Log.
            now = time.perf_counter()
            window.append(now - t_last)
            t_last = now
            stats = {"step": step, "epoch": (step * cfg.grad_accum - 1) // bpe, "loss": float(loss_all),
                     "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm),
                     "images_per_s": images_per_step / max(window[-1], 1e-9)}
            if step % cfg.log_every == 0 or step == cfg.steps:
                stats["images_per_s"] = images_per_step * len(window) / max(sum(window), 1e-9)
                window = []
                if dist.is_main:
                    with open(run_dir / STATS_NAME, "a") as f:
                        f.write(json.dumps(stats) + "\n")
            result.last_stats = stats
            if dist.is_main and on_step is not None:
                on_step(stats)

            # Save (also when asked to stop: the checkpoint is the resume point).
            stop = should_stop is not None and _any_rank(should_stop(), device)
            if step % cfg.save_every == 0 or step == cfg.steps or stop:
                if dist.is_main:
                    save_checkpoint(ckpt_path, {
                        "kind": "pretrain", "format_version": 1, "step": step, "config": config,
                        "model": net.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                        "rng_scheme": "per-step reseed (seed, rank, step)"})
                last_saved = step
                barrier()
            if stop and step < cfg.steps:
                result.interrupted = True
                break
    return result


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is set on any rank (every rank must stop at the same step)."""
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Move loaded optimizer state tensors (except the scalar ``step``) to ``device``."""
    for st in optimizer.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and k != "step":
                st[k] = v.to(device)
