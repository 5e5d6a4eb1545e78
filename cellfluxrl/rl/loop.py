"""CellFluxRL post-training: DiffusionNFT on the source-to-target flow (paper Sec. 4.3, Algorithm 1).

One iteration (= one optimizer step):

1. Rollouts. ``groups_per_step`` pairs ``(x_0, c)`` are drawn from the training split (spread over
   the ranks); each is repeated ``group_size`` times and transported by the *old* policy with the
   Heun sampler. Diversity inside a group comes only from the ``sigma`` noise injected into the
   control. The exact noisy source of every rollout is kept with its sample ``x_1_hat``.
2. Rewards. Each chunk of rollouts is scored on a background thread while the next chunk is
   sampled (the reward kernels release the GIL), so only the last chunk's scoring is exposed; the
   step time is split into rollout / reward wait / train and the hidden reward time is logged.
3. Training. Group-centred advantages scaled by the global reward std, clipped, mapped to ``r``
   (:mod:`cellfluxrl.rl.nft`); the NFT loss of every (rollout, t) on the forward process
   ``x_t = (1 - t) x_0 + t x_1_hat`` plus ``kl_weight ||v_theta - v_ref||^2`` to the frozen base;
   one AdamW step (grad clip 1.0) over the whole iteration.
4. Policies. Evaluation EMA (checkpoints, ``sample``, ``evaluate``) updated every step; old
   policy ``theta_old <- eta_i theta_old + (1 - eta_i) theta`` with ``eta_i = min(0.001 i, 0.5)``.

Which ``x_0`` the forward process starts from (``train_source``): the issue asks to keep the exact
noisy source of each rollout, and it is kept (``Rollouts.x_0``, mode ``"rollout"``), but fitting
the policy on its own deterministic coupling is reflow: for a nearly straight flow
``v_old(x_t) ~ x_1_hat - x_0`` on that chord, so the flow-matching gradient, and with it the NFT
gradient ``clip(A) * grad FM`` (reference section 1.7a), nearly vanishes whatever the rewards
(``tests/test_posttrain.py`` measured no gain). The default ``"fresh"`` redraws the source from
the base model's own coupling, ``x_0 = x_ctrl + sigma * eps'`` with the group's clean control and
fresh noise, the analogue of DiffusionNFT's fresh ``eps`` (reference section 8.7). By default
(``forward_noise="group"``) a group's members share ``eps'`` and ``t`` for each of their training
times: the group-centred advantages then cancel the source noise out of the gradient instead of
adding it (:func:`~cellfluxrl.rl.rollouts.forward_draws`; docs/posttrain.md).
Dropout is off in all the networks, so ``v_theta = v_old`` holds exactly when their weights agree.

This module is the loop (resume, checkpoints, stats, grids); an iteration is in
:mod:`cellfluxrl.rl.step`, its rollouts in :mod:`cellfluxrl.rl.rollouts`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cellfluxrl.checkpoint import truncate_stats
from cellfluxrl.config import config_from_dict, config_to_dict, dump_json
from cellfluxrl.errors import CellfluxError
from cellfluxrl.rl.config import PosttrainConfig
from cellfluxrl.rl.reward_worker import RewardWorker
from cellfluxrl.rl.sample_grid import SampleGrid
from cellfluxrl.rl.step import Policies, build_policies, run_iteration

log = logging.getLogger(__name__)

STATS_FILE = "stats.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
GRID_DIR = "samples"
PLOT_FILE = "validation.png"  # the validation curve, drawn by the posttrain command (commands/selection_view.py)


def _resume_state(out_run: Path, base_run: Path) -> dict | None:
    """The checkpoint to resume from (``None`` for a fresh run), after checking ``out_run``."""
    from cellfluxrl.checkpoint import load_checkpoint

    ckpt = out_run / CHECKPOINT_FILE
    if ckpt.is_file():
        state = load_checkpoint(ckpt)
        if state["kind"] != "posttrain":
            raise CellfluxError(f"{out_run} holds a {state['kind']} run; choose a new OUT_RUN for posttrain")
        if Path(state.get("reference_run", "")).resolve() != base_run.resolve():
            raise CellfluxError(f"{out_run} was post-trained from {state.get('reference_run')}, not {base_run}")
        return state
    config = out_run / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("kind") != "posttrain":
        raise CellfluxError(f"{out_run} holds another kind of run; choose a new OUT_RUN for posttrain")
    if out_run.is_file():
        raise CellfluxError(f"output {out_run} is a file; choose a new folder")
    return None


def rollout_sampling(cfg: PosttrainConfig):
    """The :class:`~cellfluxrl.checkpoint.Sampling` a posttrain run records: its rollout sampler and
    guidance (``cfg.cfg_scale`` resolved), the setting its policy was trained for."""
    from cellfluxrl.checkpoint import Sampling

    return Sampling(steps=cfg.rollout_steps, cfg_scale=cfg.guidance, solver=cfg.rollout_solver,
                    grid=cfg.rollout_grid, sigma=cfg.sigma)


RESUMABLE_CHANGES = ("steps", "no_signal_stop")  # settings a resume may change (they do not change a step)


def _resumed_config(state: dict, cfg: PosttrainConfig) -> PosttrainConfig:
    """The stored settings win on resume, except :data:`RESUMABLE_CHANGES` (a run can be extended)."""
    stored = config_from_dict(PosttrainConfig, state["posttrain"])
    changed = [f.name for f in fields(cfg) if f.name not in RESUMABLE_CHANGES and getattr(cfg, f.name) is not None
               and getattr(cfg, f.name) != getattr(stored, f.name)]
    if changed:
        log.warning("resuming: keeping the stored %s (ignoring the new values)", ", ".join(changed))
    return replace(stored, **{name: getattr(cfg, name) for name in RESUMABLE_CHANGES})


def _reference(state: dict | None, current: dict, out_run: Path, dataset_dir: Path, accept: bool) -> list[dict]:
    """The accepted reference changes to record: the stored ones, plus this session's (if accepted).

    Raises:
        CellfluxError: the base weights or an evaluator file differ from the stored fingerprint and
            ``accept`` is off (one line naming what changed).
    """
    from cellfluxrl.provenance import check_reference, reference_changes, require_fingerprint

    if state is None:
        return []
    stored = require_fingerprint(state.get("fingerprints"), str(out_run / CHECKPOINT_FILE))
    if not stored:
        log.warning("%s predates reference fingerprints: not checked; recording them from now on", out_run)
        return list(state.get("reference_changes", []))
    changes = check_reference(reference_changes(stored, current, dataset_dir), f"posttrain {out_run}",
                              "--allow-changed-reference", accept)
    if changes:
        log.warning("%s: going on against a changed reference (recorded): %s", out_run, "; ".join(changes))
    return [*state.get("reference_changes", []), *([{"step": int(state["step"]), "changes": changes}] if changes else [])]


def no_signal(stats: dict) -> bool:
    """Whether a step had nothing to learn from: every group's rewards equal, or a zero gradient."""
    return stats.get("zero_std_groups", 0.0) >= 1.0 or stats.get("grad_norm", 1.0) == 0.0


def _no_signal_error(out_run: Path, count: int, done: int) -> CellfluxError:
    return CellfluxError(f"posttrain {out_run}: no learning signal for {count} steps in a row (to step {done}: "
                         f"every group's rewards were equal, or the gradient was 0); stopped with a checkpoint. "
                         f"Check the reward weights (a reward at its floor for every sample teaches nothing), or "
                         f"raise --stop-after-no-signal (0 = never stop)")


def _checkpoint(policies: Policies, optimizer, step: int, run_config: dict, cfg: PosttrainConfig,
                base_run: Path, weights: dict[str, float], accepted: list[dict], selection: dict) -> dict:
    """The ``checkpoint.pt`` content (plain state dicts and Python types); ``fingerprints`` is the
    reference it stands on (:mod:`cellfluxrl.provenance`), ``reference_changes`` those accepted,
    ``selection`` the checkpoint selection's entries (:meth:`cellfluxrl.rl.selection.Selector.state`)."""
    return {**selection, "kind": "posttrain", "step": step, "config": run_config, "model": policies.theta.state_dict(),
            "ema": policies.ema.state_dict(), "old_policy": policies.old.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": {"seed": cfg.seed, "note": "all draws derive from (seed, step, rank)"},
            "posttrain": config_to_dict(cfg), "reference_run": str(base_run.resolve()),
            "reward_weights": dict(weights), "fingerprints": run_config["fingerprints"],
            "reference_changes": accepted}


def _selector(dataset, scorer, cfg: PosttrainConfig, dev: torch.device, state: dict | None):
    """The run's checkpoint selector (continued from ``state`` on resume) and its checkpoint entries;
    ``(None, off entries)`` when selection is off (:func:`cellfluxrl.rl.selection.build_selector`)."""
    from cellfluxrl.rl.selection import build_selector, off_state

    selector, reason = build_selector(dataset, cfg, rollout_sampling(cfg), dev, scorer)
    if selector is None:
        return None, off_state(reason)
    if state is not None:
        selector.restore(state)
    return selector, selector.state()


def _agree(flag: bool, device: torch.device) -> bool:
    """True when any rank says so (every rank must stop at the same step)."""
    from cellfluxrl.distributed import all_reduce_sum

    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def posttrain(base_run: str | os.PathLike, out_run: str | os.PathLike, cfg: PosttrainConfig, *,
              device: str | torch.device | None = "auto", suite=None,
              on_step: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
              allow_changed_reference: bool = False, select_suite=None) -> Path:
    """Post-train a base run with DiffusionNFT on the rewards; resume ``out_run`` if it has a checkpoint.

    Args:
        base_run: a pretrain (or posttrain) run folder; its EMA weights are the start and the frozen
            reference of the KL term.
        out_run: the new run folder (``config.json``, ``checkpoint.pt`` with ``kind="posttrain"``,
            ``stats.jsonl``, ``samples/step_XXXXXX.png``; ``checkpoint.pt`` also keeps the checkpoint
            selected on validation pairs). Re-running on it resumes.
        cfg: the settings; on resume the stored ones are kept except ``steps``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``; under torchrun each rank takes its local GPU.
        suite: a reward scorer (default: ``RewardSuite.from_dataset`` with ``cfg.train_weights()``).
        on_step: called on every rank with each step's stats (the command draws its progress bar);
            ``stats["no_signal"]`` marks a step with nothing to learn from (:func:`no_signal`).
        should_stop: polled after every step; True on any rank stops the run after a checkpoint
            (the command's SIGINT/SIGTERM handler sets it; the library installs none).
        allow_changed_reference: resume even though the base weights or the evaluators differ from
            the fingerprints in the checkpoint (the change is recorded in it).
        select_suite: what scores the checkpoint-selection validations (default: a reward suite of
            the dataset with the paper's weights; :mod:`cellfluxrl.rl.selection`).

    The main process holds ``out_run``'s lock throughout (:mod:`cellfluxrl.rundir`). After
    ``cfg.no_signal_stop`` steps in a row without signal (0 = never) the run stops with a checkpoint.

    Returns:
        ``out_run``.

    Raises:
        CellfluxError: a bad base run or OUT_RUN (in use, foreign files, a changed reference), a
            reward/data problem, a NaN loss, or too many steps without signal.
    """
    from contextlib import ExitStack

    from cellfluxrl.distributed import is_main
    from cellfluxrl.rundir import check_run_folder, hold

    with ExitStack() as held:
        if is_main():
            held.enter_context(hold(out_run, "posttrain"))
            check_run_folder(out_run, "posttrain", (CHECKPOINT_FILE, "config.json", STATS_FILE, GRID_DIR, PLOT_FILE))
        return _posttrain(Path(base_run), Path(out_run), cfg, device, suite, on_step, should_stop,
                          allow_changed_reference, select_suite)


def _posttrain(base_run: Path, out_run: Path, cfg: PosttrainConfig, device, suite, on_step, should_stop,
               allow_changed_reference: bool, select_suite=None) -> Path:
    """:func:`posttrain` once ``out_run`` is held."""
    from cellfluxrl.checkpoint import load_run, load_state_strict, save_checkpoint
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.data.pairing import PairedDataset
    from cellfluxrl.distributed import barrier, init_distributed
    from cellfluxrl.provenance import reference_fingerprint

    info = init_distributed(device)
    dev, rank, world = info.device, info.rank, info.world_size
    if cfg.groups_per_step % world:
        raise CellfluxError(f"posttrain: groups_per_step {cfg.groups_per_step} is not divisible by {world} ranks")
    state = _resume_state(out_run, base_run)
    if state is not None:
        cfg = _resumed_config(state, cfg)

    # Load the base run, its dataset and the rewards.
    base = load_run(base_run, device=dev, weights="ema")
    if cfg.cfg_scale is None:  # train and roll out the guidance the base is meant to be sampled with
        cfg = replace(cfg, cfg_scale=base.sampling.cfg_scale)
        if base.recorded is None:
            log.warning("%s predates recorded sampling settings: rolling out and training with CellFlux's CFG %g "
                        "(give --cfg-scale to choose)", base_run, cfg.cfg_scale)
    fingerprints = reference_fingerprint(base_run, base.net.state_dict(), base.dataset_dir)
    accepted = _reference(state, fingerprints, out_run, base.dataset_dir, allow_changed_reference)
    dataset = load_dataset(base.dataset_dir)
    pairs = PairedDataset(dataset, "train", flip_p=0.0, include_ood=False, seed=cfg.seed)
    weights = cfg.train_weights()
    if suite is None:
        from cellfluxrl.rewards import RewardSuite

        suite = RewardSuite.from_dataset(str(base.dataset_dir), weights, device=str(dev))
    policies = build_policies(base.net, dev, world, cfg.trainable)
    optimizer = torch.optim.AdamW([p for p in policies.theta.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=cfg.weight_decay)
    start = 0
    if state is not None:
        path = out_run / CHECKPOINT_FILE
        for net, key in ((policies.theta, "model"), (policies.ema, "ema"), (policies.old, "old_policy")):
            load_state_strict(net, state[key], path, key)
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        log.info("resuming %s at step %d", out_run, start)
    run_config = {**base.config, "kind": "posttrain", "base_run": str(base_run.resolve()),
                  "posttrain": config_to_dict(cfg), "reward_weights": dict(weights),
                  "sampling": rollout_sampling(cfg).to_dict(), "fingerprints": fingerprints}
    if info.is_main:
        out_run.mkdir(parents=True, exist_ok=True)
        dump_json(run_config, out_run / "config.json")
        truncate_stats(out_run / STATS_FILE, start)
    grid = SampleGrid(dataset, policies.ref, cfg, dev) if info.is_main and cfg.grid_every else None
    selector, selection = _selector(dataset, select_suite, cfg, dev, state) if info.is_main else (None, {})
    embeddings = torch.as_tensor(np.array(dataset.embeddings), device=dev)
    worker = RewardWorker(suite)
    began, silent, warned = time.perf_counter(), 0, False
    try:
        for step in range(start, cfg.steps):
            stats = run_iteration(policies, optimizer, pairs, embeddings, worker, cfg, step, rank, world, dev)
            done = step + 1
            stats["no_signal"] = no_signal(stats)
            silent = silent + 1 if stats["no_signal"] else 0
            if stats["no_signal"] and not warned:
                warned = True
                log.warning("posttrain %s: step %d had no learning signal (every group's rewards equal, or a zero "
                            "gradient); %s", out_run, done, "stopping after %d such steps in a row" % cfg.no_signal_stop
                            if cfg.no_signal_stop else "it will not stop for that (--stop-after-no-signal 0)")
            starved = cfg.no_signal_stop > 0 and silent >= cfg.no_signal_stop
            out_of_time = cfg.max_minutes > 0 and _agree(time.perf_counter() - began > 60 * cfg.max_minutes, dev)
            stop = should_stop is not None and _agree(should_stop(), dev)
            if selector is not None and (selector.due(done, cfg.steps) or out_of_time):  # the run's end counts too
                stats.update(selector.validate(done, policies.ema))
                selection = selector.state()
            if info.is_main:
                with open(out_run / STATS_FILE, "a") as f:
                    f.write(json.dumps(stats) + "\n")
                if done % cfg.save_every == 0 or done == cfg.steps or out_of_time or stop or starved:
                    save_checkpoint(out_run / CHECKPOINT_FILE, _checkpoint(policies, optimizer, done, run_config, cfg,
                                                                           base_run, weights, accepted, selection))
                if grid is not None and (done % cfg.grid_every == 0 or done == cfg.steps or out_of_time):
                    grid.write(out_run / GRID_DIR / f"step_{done:06d}.png", policies.ema, done)
            if on_step is not None:
                on_step(stats)
            if starved:
                barrier()
                raise _no_signal_error(out_run, silent, done)
            if out_of_time or stop:
                log.info("stopping after step %d: %s", done, "asked to stop" if stop else
                         f"the {cfg.max_minutes:.1f}-minute limit is reached")
                break
        barrier()
    finally:
        worker.close()
    return out_run
