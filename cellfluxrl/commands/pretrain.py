"""``cellfluxrl pretrain DATASET RUN``: CellFlux flow-matching pretraining (resumable, DDP-ready)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from cellfluxrl.commands import SEED
from cellfluxrl.commands.params import DEVICE, File, Folder
from cellfluxrl.commands.vocabulary import renamed


def resolve_config(config_file: Path | None, **options):
    """Defaults -> TOML file (``[unet]`` table allowed) -> CLI options; returns ``(PretrainConfig, UNetConfig)``."""
    from cellfluxrl.config import PretrainConfig, load_toml_overrides, replace_validated
    from cellfluxrl.errors import CellfluxError
    from cellfluxrl.model.unet import PRESETS, UNetConfig

    cfg, unet_over = PretrainConfig(), {}
    if config_file is not None:
        over = load_toml_overrides(config_file, PretrainConfig, tables={"unet": UNetConfig})
        unet_over = over.pop("unet", {})
        cfg = replace_validated(cfg, **over)
    cfg = replace_validated(cfg, **options)
    if cfg.preset not in PRESETS:
        raise CellfluxError(f"unknown UNet preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    return cfg, dataclasses.replace(PRESETS[cfg.preset], **unet_over)


def settings_toml(cfg, unet) -> str:
    """The resolved pretraining settings as TOML: PretrainConfig keys, then the ``[unet]`` table."""
    from cellfluxrl.config import config_to_dict
    from cellfluxrl.config_toml import dump_toml

    return dump_toml(config_to_dict(cfg), {"unet": config_to_dict(unet)},
                     header="cellfluxrl pretrain: resolved settings (defaults < --config < options).\n"
                            "Read back with: cellfluxrl pretrain DATASET --out RUN --config THIS.toml")


BIG_ON_CPU = 10_000_000  # parameters above which a CPU run gets the "slow" notice


def model_line(info: dict, unet, cfg) -> str:
    """What is about to be trained, before the first (possibly very long) step: size, preset, device.

    Args:
        info: what :func:`cellfluxrl.model.pretrain.train` reports before its first step (``parameters``,
            ``device``, ``start``).
    """
    from cellfluxrl.model.unet import PRESETS

    preset = cfg.preset if PRESETS.get(cfg.preset) == unet else "custom"
    cpu = info["device"] == "cpu"
    line = (f"pretrain: {info['parameters'] / 1e6:.1f}M-parameter UNet ({preset}) on {'a CPU' if cpu else info['device']}, "
            f"steps {info['start'] + 1}-{cfg.steps} of {cfg.batch_size * cfg.grad_accum} images per process")
    if cpu and info["parameters"] >= BIG_ON_CPU:
        line += "; slow on a CPU (--preset tiny or a GPU is much faster): timing the first step"
    return line


def first_step_line(stats: dict, cfg, world_size: int = 1) -> str:
    """After the first step on a CPU: how long it took and what all the remaining steps would take."""
    from cellfluxrl.progress import format_duration

    seconds = cfg.batch_size * cfg.grad_accum * world_size / max(stats["images_per_s"], 1e-9)
    left = cfg.steps - stats["step"]
    return (f"pretrain: step {stats['step']} took {format_duration(seconds)}; the {left} remaining steps need "
            f"about {format_duration(left * seconds)} at this speed")


@click.command("pretrain", **renamed(renames={"--steps": "--train-steps", "--ckpt-every": "--save-every"},
                                     positional_out=1, meaning={"--train-steps": "optimizer steps"}))
@click.argument("dataset", type=Folder("dataset"))
@click.option("--out", "run", type=Folder("run"), required=True, metavar="RUN",
              help="Run folder to write (checkpoint.pt, config.json, stats.jsonl); re-run to resume.")
@click.option("--preset", type=click.Choice(["paper", "tiny", "micro"]), default=None,
              help="UNet preset: paper (CellFlux, 56.2M), tiny (CPU, 1.7M) or micro (the demo's, 1.2M). [default: paper]")
@click.option("--train-steps", "steps", type=click.IntRange(min=1), default=None,
              help="Optimizer steps in total. [default: 100000]")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images per process per micro-batch. [default: 32]")
@click.option("--grad-accum", type=click.IntRange(min=1), default=None, help="Micro-batches per optimizer step. [default: 1]")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="AdamW learning rate. [default: 1e-4]")
@click.option("--save-every", "ckpt_every", type=click.IntRange(min=1), default=None, metavar="STEPS",
              help="Write checkpoint.pt every STEPS steps (and at the end). [default: 1000]")
@click.option("--log-every", type=click.IntRange(min=1), default=None, metavar="STEPS", help="stats.jsonl interval. [default: 10]")
@click.option("--num-workers", type=click.IntRange(min=0), default=None, help="DataLoader workers. [default: 0]")
@click.option("--seed", type=SEED, default=None, help="Seed of data order, pairing, noise and dropout. [default: 0]")
@click.option("--sample-steps", type=click.IntRange(min=1), default=None, metavar="N",
              help="Solver steps this run is meant to be sampled with (recorded; used by sample/evaluate). [default: 50]")
@click.option("--sample-cfg-scale", type=click.FloatRange(min=0), default=None, metavar="W",
              help="CFG weight this run is meant to be sampled with (recorded). [default: 0.2]")
@click.option("--sample-solver", type=click.Choice(["heun", "euler"]), default=None,
              help="ODE solver this run is meant to be sampled with (recorded). [default: heun]")
@click.option("--sample-grid", type=click.Choice(["edm", "uniform"]), default=None,
              help="Time grid this run is meant to be sampled on (recorded). [default: edm]")
@click.option("--config", "config_file", type=File("TOML settings"), default=None, metavar="FILE.toml",
              help="TOML overrides (PretrainConfig keys; a [unet] table overrides the preset).")
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or gpu (= cuda).")
@click.option("--compile/--no-compile", "compile_", default=None,
              help="torch.compile the network. [default: on for CUDA, off for CPU]")
@click.option("--init-from", type=File("CellFlux checkpoint"), default=None, metavar="CKPT",
              help="Initialise a new run from a CellFlux checkpoint (ADM UNet names).")
@click.option("--dry-run", is_flag=True,
              help="Print the resolved settings as TOML (which --config reads back unchanged) and exit.")
def pretrain(dataset, run, preset, steps, batch_size, grad_accum, lr, ckpt_every, log_every, num_workers, seed,
             sample_steps, sample_cfg_scale, sample_solver, sample_grid, config_file, device, compile_, init_from,
             dry_run):
    """Pretrain the CellFlux base model on DATASET into --out RUN.

    Re-running the same command on a RUN that has a checkpoint resumes it exactly. Several
    processes: torchrun --no-python --nproc_per_node N cellfluxrl pretrain DATASET --out RUN ...

    \b
    Example:
      cellfluxrl pretrain data/synth --out runs/base --preset tiny --train-steps 2000 --batch-size 16
    """
    options = dict(preset=preset, steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                   ckpt_every=ckpt_every, log_every=log_every, num_workers=num_workers, seed=seed,
                   sample_steps=sample_steps, sample_cfg_scale=sample_cfg_scale, sample_solver=sample_solver,
                   sample_grid=sample_grid)
    if dry_run:  # touches nothing: no lock, no run folder
        click.echo(settings_toml(*resolve_config(config_file, **options)), nl=False)
        return
    from cellfluxrl.rundir import hold_as_main

    with hold_as_main(run, "pretrain"):  # a second writer is refused at once, before torch loads
        _pretrain(dataset, run, config_file, device, compile_, init_from, **options)


def _pretrain(dataset: Path, run: Path, config_file, device: str, compile_, init_from, **options) -> None:
    """The command once RUN is held: train, then say where the run stands."""
    from cellfluxrl.commands.interrupts import StopSignals
    from cellfluxrl.distributed import cleanup, init_distributed
    from cellfluxrl.model.pretrain import train
    from cellfluxrl.progress import progress

    cfg, unet = resolve_config(config_file, **options)
    dist = init_distributed(device)
    bars: list = []
    try:
        def on_step(stats: dict) -> None:
            if not bars:  # created on the first step, so errors before training print no bar
                if dist.device.type == "cpu":
                    click.echo(first_step_line(stats, cfg, dist.world_size), err=True)
                bars.append(progress(total=cfg.steps, initial=stats["step"] - 1, desc="pretrain", unit="step"))
            bars[0].update(1)
            bars[0].set_postfix(loss=f"{stats['loss']:.4f}", img_s=f"{stats['images_per_s']:.1f}")

        def on_start(info: dict) -> None:
            click.echo(model_line(info, unet, cfg), err=True)

        with StopSignals() as stop:
            result = train(dataset, run, cfg, unet=unet, dist=dist, compile=compile_, init_from=init_from,
                           on_step=on_step if dist.is_main else None, on_start=on_start if dist.is_main else None,
                           should_stop=stop)
    finally:
        for bar in bars:
            bar.close()
        cleanup()
    if result.interrupted:
        stop.exit(f"pretrain stopped by {stop.name} at step {result.step} of {cfg.steps}; checkpoint "
                  f"{Path(run) / 'checkpoint.pt'} holds it: run the same command to resume" if dist.is_main else None)
    if dist.is_main:
        what = "already complete" if result.step == result.resumed_from else f"trained to step {result.step}"
        resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from else ""
        click.echo(f"{run}: {what}{resumed}; checkpoint {Path(run) / 'checkpoint.pt'}")
