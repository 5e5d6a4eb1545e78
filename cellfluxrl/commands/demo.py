"""``cellfluxrl demo``: the main job, end to end on the embedded synthetic data.

prepare synthetic -> pretrain (tiny UNet) -> posttrain (DiffusionNFT) -> evaluate (CellFlux,
CellFluxRL, CellFluxRL + best-of-4, real), then print the table. Every stage writes into
``--out`` and is skipped when it is already finished, so an interrupted demo resumes where it
stopped (pretrain and posttrain resume from their last checkpoint)::

    OUT/demo.json   the resolved demo settings (a re-run with different settings is refused)
    OUT/data/       the synthetic dataset and its evaluators
    OUT/base/       the pretrained CellFlux run
    OUT/rl/         the CellFluxRL run
    OUT/eval/       report.json, report.md, fig5_best_of_n.png, fig4_grid.png
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import click

from cellfluxrl.commands import SEED
from cellfluxrl.commands.params import DEVICE, Folder
from cellfluxrl.commands.vocabulary import renamed


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo stages (``default``: budgeted for 30 minutes on 2 CPU cores; ``quick``: tests).

    The default uses 48x48 crops (a quarter of BBBC021's pixels) so that a small UNet gets a
    couple of thousand steps on 2 cores; ``--size 96`` reproduces BBBC021's geometry at about 4x the cost.
    Every choice below is measured in experiments/RESULTS.md ("The demo's settings"; the base's
    steps, source noise and sampler in "Base realism", chosen on the val-tune pairs of seeds 0, 1, 2).
    """

    n_images: int = 3000  # synthetic crops (treated + controls)
    size: int = 48  # crop side (px); a multiple of 16
    plates: int = 4  # plates (batches)
    classifier_epochs: int | None = 20  # MoA classifier epochs (None: the evaluators' default)
    preset: str = "micro"  # UNet preset (1 ResBlock per level: 1.8x the images/s of "tiny")
    pretrain_steps: int = 2000  # flow-matching steps (1,000 left the judge at 0.69-0.75 and a phenotype failing)
    pretrain_batch: int = 16  # images per pretraining step
    pretrain_lr: float = 1e-3  # 10x CellFlux's 1e-4: a 1.2M-parameter model, 2,000 steps, EMA 0.999
    pretrain_noise_prob: float = 1.0  # every batch from the noised control, as sampled (CellFlux: half; val-tune pairs)
    posttrain_steps: int = 60  # DiffusionNFT iterations (one optimizer step each)
    grad_steps: int = 1  # optimizer steps per iteration (more were noise: experiments/RESULTS.md)
    posttrain_lr: float = 5e-5  # half the Adam step of 1e-4; 60 such steps beat 30 at 1e-4 (val pairs)
    reward_norm: str = "per_reward"  # each reward standardised, then weighted moa=2, nuc_in_cyto=1, others 1
    kl_weight: float = 0.1  # ||v_theta - v_ref||^2 weight
    group_size: int = 4  # rollouts per (x_0, c) group
    groups_per_step: int = 8  # groups per iteration (32 rollouts)
    sample_steps: int = 10  # solver steps the base records, RL rolls out with, and evaluation uses (one setting)
    sample_solver: str = "euler"  # 10 Euler steps = the NFE of 5 Heun steps, a fifth of the speckle (val-tune pairs)
    sample_grid: str = "uniform"  # the EDM grid spends a step on t 0.998 -> 1
    cfg_scale: float = 2.0  # CFG the base records; RL trains the guided velocity at it
    train_timesteps: int = 2  # grid times trained per rollout and step
    validate_every: int = 20  # validate on val-select pairs at 20, 40, 60; sample/evaluate use the selected one
    validate_pairs: int = 64  # val-select pairs per validation (all in-distribution val-select pairs of the default data)
    validate_draws: int = 2  # draws per validation pair: paired s.e. 0.34 vs 0.69 at 1 draw; ~12-17 s a pass on 2 cores
    eval_pairs: int = 64  # test pairs evaluated per split (in-distribution and held-out compounds)
    best_of: tuple[int, ...] = (1, 2, 4, 8)  # best-of-N curves (paper Figure 5)
    tts_n: int = 4  # the table's best-of column (paper Table 1: best-of-4)
    seed: int = 0  # seed of every stage


DEMO_BASELINES = ("copy-control", "train-real")  # evaluation.baselines: in every demo table

DEMO_PRESETS = {
    "default": DemoConfig(),
    "quick": DemoConfig(n_images=300, size=48, plates=2, classifier_epochs=2, pretrain_steps=2, pretrain_batch=4,
                        posttrain_steps=1, group_size=2, groups_per_step=2, sample_steps=2, eval_pairs=6,
                        validate_pairs=4,
                        best_of=(1, 2), tts_n=2),
}


def _settings_file(out: Path, cfg: DemoConfig) -> None:
    """Record the settings on the first run; refuse a re-run of OUT with different ones."""
    from cellfluxrl.errors import CellfluxError

    path, current = out / "demo.json", json.loads(json.dumps(dataclasses.asdict(cfg)))
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise CellfluxError(f"{path}: not readable ({type(exc).__name__}: {exc}); delete it (or use a new --out) to "
                                f"record the settings again") from None
        if not isinstance(stored, dict):
            raise CellfluxError(f"{path}: not a demo settings file (a JSON object); delete it or use a new --out")
        if stored != current:
            diff = sorted(k for k in current if stored.get(k) != current[k])
            raise CellfluxError(f"{path}: this demo folder was made with other settings ({', '.join(diff)}); "
                                f"use a new --out or the same options")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(current, indent=2) + "\n")


def stage_prepare(out: Path, cfg: DemoConfig) -> Path:
    """The synthetic dataset with its evaluators (skipped when both exist)."""
    from cellfluxrl.data.synthetic import prepare_synthetic
    from cellfluxrl.rewards.evaluator_files import CLASSIFIER_FILE, CLASSIFIER_REPORT, JUDGE_FILE, REFERENCE_FILE
    from cellfluxrl.rewards.evaluators_fit import fit_evaluators

    data = out / "data"
    if not (data / "meta.json").is_file():
        prepare_synthetic(data, n_images=cfg.n_images, seed=cfg.seed, size=cfg.size, n_plates=cfg.plates, progress=True)
    files = (REFERENCE_FILE, CLASSIFIER_FILE, CLASSIFIER_REPORT, JUDGE_FILE)
    if not all((data / "evaluators" / name).is_file() for name in files):
        fit_evaluators(data, seed=cfg.seed, classifier_epochs=cfg.classifier_epochs, progress=True, resume=True)
    return data


def pretrain_config(cfg: DemoConfig):
    """The demo's :class:`~cellfluxrl.config.PretrainConfig` (also used by experiments/rl_table.py)."""
    from cellfluxrl.config import PretrainConfig

    return PretrainConfig(preset=cfg.preset, steps=cfg.pretrain_steps, batch_size=cfg.pretrain_batch,
                          lr=cfg.pretrain_lr, noise_prob=cfg.pretrain_noise_prob, seed=cfg.seed, save_every=max(1, min(100, cfg.pretrain_steps)),
                          sample_steps=cfg.sample_steps, sample_cfg_scale=cfg.cfg_scale,
                          sample_solver=cfg.sample_solver, sample_grid=cfg.sample_grid)


def posttrain_config(cfg: DemoConfig, **overrides):
    """The demo's :class:`~cellfluxrl.rl.config.PosttrainConfig` (posttrain's training weights unless ``weights=``);
    it rolls out and trains at the base's recorded sampling (``sample_steps``, ``cfg_scale``)."""
    from cellfluxrl.rl.config import PosttrainConfig

    settings = dict(steps=cfg.posttrain_steps, group_size=cfg.group_size, groups_per_step=cfg.groups_per_step,
                    rollout_steps=cfg.sample_steps, rollout_solver=cfg.sample_solver, rollout_grid=cfg.sample_grid,
                    cfg_scale=cfg.cfg_scale,
                    rollout_batch=cfg.group_size * cfg.groups_per_step,
                    train_timesteps=min(cfg.train_timesteps, cfg.sample_steps), kl_weight=cfg.kl_weight,
                    train_batch=32, grad_steps=cfg.grad_steps, lr=cfg.posttrain_lr, reward_norm=cfg.reward_norm,
                    save_every=max(1, min(10, cfg.posttrain_steps)), grid_every=0, seed=cfg.seed,
                    validate_every=cfg.validate_every, validate_pairs=cfg.validate_pairs,
                    validate_draws=cfg.validate_draws)
    return PosttrainConfig(**{**settings, **overrides})


def stage_pretrain(data: Path, out: Path, cfg: DemoConfig, device: str, should_stop=None) -> Path:
    """Pretrain (or resume) the demo's CellFlux model; a finished run returns at once."""
    from cellfluxrl.distributed import init_distributed
    from cellfluxrl.model.pretrain import train
    from cellfluxrl.progress import progress

    run = out / "base"
    pcfg = pretrain_config(cfg)
    with progress(total=pcfg.steps, desc="pretrain", unit="step") as bar:
        def on_step(stats: dict) -> None:
            bar.n = stats["step"]
            bar.set_postfix(loss=f"{stats['loss']:.4f}")
            bar.refresh()

        train(data, run, pcfg, dist=init_distributed(device), on_step=on_step, should_stop=should_stop)
    return run


def stage_posttrain(base: Path, out: Path, cfg: DemoConfig, device: str, should_stop=None) -> Path:
    """Post-train (or resume) CellFluxRL from the base run on the seven rewards (posttrain's training weights)."""
    from cellfluxrl.progress import progress
    from cellfluxrl.rl.loop import posttrain

    run = out / "rl"
    pcfg = posttrain_config(cfg)
    with progress(total=pcfg.steps, desc="posttrain", unit="step") as bar:
        def on_step(stats: dict) -> None:
            bar.n = stats["step"]
            bar.set_postfix(reward=f"{stats['reward']:.3f}")
            bar.refresh()

        posttrain(base, run, pcfg, device=device, on_step=on_step, should_stop=should_stop)
    from cellfluxrl.commands.selection_view import read_records, validation_curve, write_validation_plot

    curve = validation_curve(read_records(run / "stats.jsonl"))
    write_validation_plot(run, curve[-1]["best_step"] if curve else None)  # the curve and the selected step
    return run


def stage_evaluate(data: Path, base: Path, rl: Path, out: Path, cfg: DemoConfig, device: str) -> dict:
    """Evaluate base and RL runs on the same pairs at one sampling setting (the base's), in-distribution
    and held-out compounds apart; returns the report (read back if already written).

    The report is built in a staged folder and swapped in whole (:mod:`cellfluxrl.commands.report_folder`),
    with the fingerprints of both runs and of the evaluators.
    """
    from cellfluxrl.checkpoint import read_run_config
    from cellfluxrl.commands import report_folder as folder
    from cellfluxrl.evaluation.pipeline import evaluate
    from cellfluxrl.evaluation.report_text import write_report
    from cellfluxrl.progress import progress
    from cellfluxrl.rundir import check_owned

    target = out / "eval"
    if (target / "report.json").is_file():  # the staged folder is swapped in only when complete
        return folder.read_report(target / "report.json")
    check_owned(target, "demo", folder.REPORT_FILES, "folder")  # figures of a killed older run are replaced
    staged = folder.staged_folder(target)
    try:
        report = _evaluate_demo(evaluate, progress, data, base, rl, staged, cfg, device)
        runs = [base, rl]
        report["settings"]["fingerprints"] = folder.report_fingerprints(
            runs, ["CellFlux", "CellFluxRL"], [read_run_config(run) for run in runs], data, [])
        write_report(report, staged)
        folder.replace_folder(staged, target)
    finally:
        if staged.exists():
            folder.discard(staged)
    return report


def _evaluate_demo(evaluate, progress, data: Path, base: Path, rl: Path, into: Path, cfg: DemoConfig,
                   device: str) -> dict:
    """The demo's evaluation call (with its progress bar), writing into ``into``."""
    with progress(total=None, desc="evaluate", unit="pair") as bar:
        current = []

        def on_progress(stage: str, done: int, total: int) -> None:
            if current != [stage]:  # a new split: restart the bar
                current[:] = [stage]
                bar.reset(total=total)
                bar.set_description(f"evaluate ({stage})")
            bar.update(done - bar.n)

        return evaluate(data, [base, rl], names=["CellFlux", "CellFluxRL"], n=cfg.eval_pairs, best_of=cfg.best_of,
                        seed=cfg.seed, batch_size=16, split="both", device=device, out=into, tts_n=cfg.tts_n,
                        baselines=DEMO_BASELINES, on_progress=on_progress)


def demo_columns(report: dict) -> list[str]:
    """The printed columns: base, RL, RL + best-of-N (largest N), the baselines the headline has, real."""
    from cellfluxrl.evaluation.report import headline

    k = report["settings"].get("tts_n", max(report["settings"]["best_of"]))
    baselines = [c for c in DEMO_BASELINES if c in headline(report)["columns"]]
    return ["CellFlux", f"CellFlux+best-of-{k}", "CellFluxRL", f"CellFluxRL+best-of-{k}", *baselines, "real"]


@click.command("demo", **renamed(renames={"--pretrain-steps": "--train-steps", "--posttrain-steps": "--iterations"},
                                 meaning={"--train-steps": "pretraining optimizer steps",
                                          "--iterations": "RL iterations"}))
@click.option("--out", type=Folder("demo"), default=Path("runs/demo"), show_default=True, metavar="DIR",
              help="Folder for the dataset, both runs and the evaluation (re-run to resume).")
@click.option("--quick", is_flag=True, help="Tiny sizes (about a minute): a smoke test, not a result.")
@click.option("--size", type=click.IntRange(min=32), default=None, help=f"Crop size in px, a multiple of 16. [default: {DemoConfig().size}]")
@click.option("--train-steps", "pretrain_steps", type=click.IntRange(min=1), default=None,
              help=f"Pretraining optimizer steps. [default: {DemoConfig().pretrain_steps}]")
@click.option("--iterations", "posttrain_steps", type=click.IntRange(min=1), default=None,
              help=f"DiffusionNFT iterations. [default: {DemoConfig().posttrain_steps}]")
@click.option("--eval-pairs", type=click.IntRange(min=2), default=None, help=f"Evaluated test pairs per split. [default: {DemoConfig().eval_pairs}]")
@click.option("--seed", type=SEED, default=None, help="Seed of every stage (data, pretraining, RL, evaluation). [default: 0]")
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or gpu (= cuda).")
def demo(out, quick, size, pretrain_steps, posttrain_steps, eval_pairs, seed, device):
    """The main job: prepare synthetic -> pretrain -> posttrain -> evaluate, then print the table.

    \b
    Example:
      cellfluxrl demo                       # budgeted for 30 minutes on 2 CPU cores
      cellfluxrl demo --size 96 --device cuda --out runs/demo96
      cellfluxrl demo --quick --out /tmp/demo-quick
    """
    from cellfluxrl.commands.evaluate import print_report, resolve_device
    from cellfluxrl.commands.interrupts import StopSignals
    from cellfluxrl.commands.prepare import check_size
    from cellfluxrl.rundir import hold

    cfg, device, began = DEMO_PRESETS["quick" if quick else "default"], resolve_device(device), time.perf_counter()
    overrides = {"size": size, "pretrain_steps": pretrain_steps, "posttrain_steps": posttrain_steps,
                 "eval_pairs": eval_pairs, "seed": seed}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    check_size(cfg.size)
    timings = {}
    with hold(out, "demo"), StopSignals() as stop:
        _settings_file(out, cfg)
        for name, stage, graceful in (
                ("prepare", lambda: stage_prepare(out, cfg), False),
                ("pretrain", lambda: stage_pretrain(out / "data", out, cfg, device, stop), True),
                ("posttrain", lambda: stage_posttrain(out / "base", out, cfg, device, stop), True),
                ("evaluate", lambda: stage_evaluate(out / "data", out / "base", out / "rl", out, cfg, device), False)):
            t0 = time.perf_counter()
            click.echo(f"== {name}", err=True)
            stop.graceful = graceful  # a training step is finished and saved; other stages stop at once
            try:
                result = stage()
            except KeyboardInterrupt:
                stop.exit(f"demo stopped by {stop.name} during {name}: the finished stages in {out} are kept; run the "
                          f"same command to resume")
            if stop():
                stop.exit(f"demo stopped by {stop.name} during {name} (its checkpoint is written); run the same "
                          f"command to resume")
            timings[name] = time.perf_counter() - t0
    click.echo(print_report(result, columns=demo_columns(result)))
    click.echo(f"stages: {', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}; "
               f"total {time.perf_counter() - began:.0f} s; report {out / 'eval' / 'report.md'}")
