"""``cellfluxrl posttrain BASE_RUN --out RUN``: DiffusionNFT post-training on the biological rewards."""

from __future__ import annotations

import re
import time
from pathlib import Path

import click

from cellfluxrl.commands import SEED
from cellfluxrl.commands.params import DEVICE, File, Folder
from cellfluxrl.commands.vocabulary import renamed
from cellfluxrl.commands.wording import count

from cellfluxrl.rewards.weights import TRAIN_WEIGHTS_HELP, weights_option

POS_INT, POS_FLOAT = click.IntRange(min=1), click.FloatRange(min=0, min_open=True)
NONNEG_FLOAT = click.FloatRange(min=0)


def _options(f):
    """The PosttrainConfig fields as options (defaults shown are the config's; None = keep)."""
    specs = [
        ("--iterations", POS_INT, "RL iterations (x --grad-steps optimizer steps) [1200]."),
        ("--group-size", click.IntRange(min=2), "Rollouts m per fixed (x_0, c) group [8]."),
        ("--groups-per-step", POS_INT, "Groups per iteration over all ranks [16]."),
        ("--rollout-steps", POS_INT, "Heun steps of the rollout sampler [10]."),
        ("--rollout-grid", click.Choice(["edm", "uniform"]), "Rollout time grid [edm]."),
        ("--rollout-solver", click.Choice(["heun", "euler"]), "Rollout ODE solver [heun]."),
        ("--rollout-batch", POS_INT, "Rollouts per sampler call / reward job [64]."),
        ("--sigma", NONNEG_FLOAT, "Noise std injected into the control [1.0]."),
        ("--cfg-scale", NONNEG_FLOAT, "CFG weight of the rollouts and of the trained guided velocity; the run "
                                      "records it for sampling [the base run's recorded CFG]."),
        ("--train-source", click.Choice(["fresh", "rollout"]),
         "Source x_0 of the forward process: control + fresh noise, or the rollout's own [fresh]."),
        ("--forward-noise", click.Choice(["group", "independent"]),
         "Fresh source noise and t of the forward process: shared by a group's rollouts, or drawn per rollout [group]."),
        ("--t-sampling", click.Choice(["grid", "uniform"]), "Training times: the rollout grid's, or U[0,1) [grid]."),
        ("--train-timesteps", POS_INT, "Training times per rollout per step [0.99 x rollout steps]."),
        ("--train-t-max", click.FloatRange(min=0, max=1, min_open=True),
         "Train only at times t <= this (1 = every grid time; 0.99 drops the 5-step grid's 0.998) [1.0]."),
        ("--train-batch", POS_INT, "(rollout, t) items per micro-batch [32]."),
        ("--grad-steps", POS_INT, "Optimizer steps per iteration (the items split into this many chunks) [1]."),
        ("--nft-beta", POS_FLOAT, "DiffusionNFT guidance strength beta of the implicit policies [1.0]."),
        ("--kl-weight", NONNEG_FLOAT, "Weight of ||v_theta - v_ref||^2 to the frozen base [1.0]."),
        ("--kl-target", click.Choice(["ref", "old"]),
         "KL term to the frozen base (ref, paper Eq. 7) or to the sampling policy v_old [ref]."),
        ("--trainable", click.Choice(["all", "conditioning"]),
         "Weights RL updates: all, or the conditioning path (condition + embedding projections) [all]."),
        ("--adv-clip", POS_FLOAT, "Advantage clip C [5]."),
        ("--reward-norm", click.Choice(["none", "per_reward"]),
         "Advantages of the weighted sum of each reward standardised over the iteration (a weight is the "
         "reward's share of the advantage), or of the raw weighted sum (the paper's Table 1) [per_reward]."),
        ("--lr", POS_FLOAT, "AdamW learning rate [2e-5]."),
        ("--grad-clip", NONNEG_FLOAT, "Max gradient norm, 0 = off [1.0]."),
        ("--old-rate", NONNEG_FLOAT, "Old-policy decay growth: eta_i = min(rate i, old-max) [0.001]."),
        ("--max-minutes", NONNEG_FLOAT, "Stop (with a checkpoint) once this wall time has passed, 0 = no limit [0]."),
        ("--save-every", POS_INT, "Checkpoint period in steps [10]."),
        ("--grid-every", click.IntRange(min=0), "Sample-grid period in steps, 0 = never [50]."),
        ("--validate-every", click.IntRange(min=0), "Validate the policy on val-select pairs every N steps and after the "
                                                  "last, keeping the best checkpoint for sample and evaluate; 0 = never "
                                                  "(they use the last) [50]."),
        ("--validate-pairs", POS_INT, "Val-select pairs (in-distribution compounds) of each validation [64]."),
        ("--validate-draws", POS_INT, "Source-noise draws per validation pair, the same at every validation [1]."),
        ("--select-margin", NONNEG_FLOAT, "A validated checkpoint replaces the selected one only when its paired gain "
                                          "exceeds this many compound-clustered s.e. [1.0]."),
        ("--seed", SEED, "Seed of pairs, source noise and t draws [0]."),
    ]
    dest = {"--iterations": "steps"}  # the PosttrainConfig field behind a renamed option
    for name, kind, text in reversed(specs):
        f = click.option(name, *[dest[name]] if name in dest else [], type=kind, default=None,
                         help=re.sub(r" \[([^\]]+)\]\.$", r". [default: \1]", text))(f)
    f = click.option("--adaptive/--no-adaptive", default=None, help="DiffusionNFT's adaptive loss weighting. [default: off]")(f)
    f = click.option("--reward-null/--no-reward-null", default=None,
                     help="The control run: every group's rewards permuted among its rollouts, so a gain over it is the "
                          "rewards' signal, not drift (docs/posttrain.md). [default: off]")(f)
    f = click.option("--stop-after-no-signal", "no_signal_stop", type=click.IntRange(min=0), default=None, metavar="N",
                     help="Stop (with a checkpoint) after N steps in a row without learning signal (every group's "
                          "rewards equal, or a zero gradient); 0 = never. [default: 25]")(f)
    return f


def first_iteration_line(step: int, total: int, seconds: float) -> str:
    """After the first iteration of this invocation: what it took (start-up included) and what the
    remaining ones would take at that speed (an upper bound: start-up is paid once)."""
    from cellfluxrl.progress import format_duration

    left = total - step
    return (f"posttrain: iteration {step} took {format_duration(seconds)} (start-up included); the "
            f"{count(left, 'remaining iteration')} {'needs' if left == 1 else 'need'} at most about "
            f"{format_duration(left * seconds)} at this speed")


RUN_OUTPUTS = ("config.json", "stats.jsonl", "checkpoint.pt", "samples", "validation.png")  # what a posttrain run folder may hold


def written_line(out_run: Path) -> str:
    """The last line of ``posttrain``: the run folder and what it holds (``samples/`` only when sample grids
    were written: ``--grid-every 0`` writes none; ``validation.png`` once a validation ran)."""
    held = [f"{name}/" if (out_run / name).is_dir() else name for name in RUN_OUTPUTS if (out_run / name).exists()]
    return f"posttrain run written to {out_run} ({', '.join(held) or 'nothing yet'})"


def selection_report(out_run: Path) -> None:
    """After a run: draw ``RUN/validation.png`` and say which checkpoint ``sample`` and ``evaluate`` will use."""
    from cellfluxrl.commands.selection_view import read_records, validation_curve, write_validation_plot

    curve = validation_curve(read_records(out_run / "stats.jsonl"))
    best = curve[-1]["best_step"] if curve else None
    write_validation_plot(out_run, best)
    if best is not None:
        row = next((r for r in curve if r["step"] == best), curve[-1])
        click.echo(f"posttrain: selected step {best} of {curve[-1]['step']} on validation pairs (overall "
                   f"{row['val_overall']:.4g} [s.e. {row['val_overall_se'] or 0.0:.2g}]; {out_run / 'validation.png'}); "
                   f"sample and evaluate use it by default, --checkpoint last the last step", err=True)
        return
    from cellfluxrl.checkpoint import load_checkpoint

    selection = load_checkpoint(out_run / "checkpoint.pt").get("selection") or {}
    if selection.get("status") == "off":
        click.echo(f"posttrain: checkpoint selection {selection['reason']}", err=True)


def resolve_config(config_file: Path | None, weights: str | None, **options):
    """Defaults -> TOML file -> CLI options; the file's own errors (a bad ``weights`` value, a value out
    of range) name the file and the key, not an option.

    Returns:
        The :class:`~cellfluxrl.rl.config.PosttrainConfig`.

    Raises:
        CellfluxError: a bad file or setting (one line).
    """
    from cellfluxrl.config import load_toml_overrides, replace_validated
    from cellfluxrl.errors import CellfluxError
    from cellfluxrl.rl.config import PosttrainConfig

    cfg = PosttrainConfig()
    if config_file is not None:
        over = load_toml_overrides(config_file, PosttrainConfig)
        try:
            cfg = replace_validated(cfg, **over)
        except CellfluxError as exc:
            raise CellfluxError(f"{config_file}: {exc}") from None
        if cfg.weights is not None:
            cfg.train_weights(where=f"{config_file}: weights = {cfg.weights!r}")
    cfg = replace_validated(cfg, weights=weights, **options)
    cfg.train_weights()  # a bad weight (moa=inf, unknown name) is refused before anything runs
    return cfg


def check_base_run(base_run: Path) -> None:
    """Refuse, before anything runs (``--dry-run`` too), a BASE_RUN that cannot be post-trained: no
    run config, a missing, corrupt or foreign ``checkpoint.pt``, or a dataset that is gone.

    Raises:
        CellfluxError: one line naming BASE_RUN and the problem.
    """
    from cellfluxrl.checkpoint import CHECKPOINT_NAME, load_checkpoint, read_run_config
    from cellfluxrl.errors import CellfluxError

    config = read_run_config(base_run)
    load_checkpoint(base_run / CHECKPOINT_NAME)
    dataset = config.get("dataset")
    if not dataset or not (Path(dataset) / "meta.json").is_file():
        raise CellfluxError(f"BASE_RUN {base_run}: its dataset {dataset or '(unrecorded)'} is gone (moved or "
                            f"deleted); put it back there to post-train this run")


def base_notice(base_run: Path) -> str | None:
    """A one-line notice when BASE_RUN is itself a posttrain run (allowed: RL continues from RL)."""
    from cellfluxrl.checkpoint import read_run_config
    from cellfluxrl.errors import CellfluxError

    try:
        config = read_run_config(base_run)
    except CellfluxError:  # posttrain itself reports a bad base run
        return None
    if config.get("kind") != "posttrain":
        return None
    return (f"note: BASE_RUN {base_run} is itself a posttrain run (from {config.get('base_run', '?')}): RL continues "
            f"from its EMA weights, which are also the KL reference")


@click.command("posttrain", **renamed(renames={"--steps": "--iterations"}, positional_out=1,
                                      meaning={"--iterations": "RL iterations"}))
@click.argument("base_run", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", "out_run", type=Folder("run"), required=True, metavar="RUN",
              help="Run folder to write (checkpoint.pt, config.json, stats.jsonl; samples/ unless --grid-every 0; "
                   "validation.png unless --validate-every 0); re-run to resume.")
@weights_option(help=TRAIN_WEIGHTS_HELP)
@_options
@click.option("--config", "config_file", type=File("TOML settings"), default=None, metavar="FILE.toml",
              help="TOML file of posttrain settings (options given here win).")
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or gpu (= cuda).")
@click.option("--dry-run", is_flag=True,
              help="Print the resolved settings as TOML (which --config reads back unchanged) and exit.")
@click.option("--allow-changed-reference", is_flag=True,
              help="Resume although the base run's weights or the dataset's evaluators changed since --out RUN "
                   "started (refused by default; the change is recorded in the checkpoint).")
def posttrain(base_run, out_run, weights, config_file, device, dry_run, allow_changed_reference, **options):
    """Post-train BASE_RUN with DiffusionNFT on the weighted rewards into --out RUN (re-run to resume).

    \b
    Example (CPU, tiny model):
      cellfluxrl posttrain runs/base --out runs/rl --iterations 100 --groups-per-step 4 --rollout-steps 6
    """
    from cellfluxrl.config import config_to_dict
    from cellfluxrl.distributed import is_main
    from cellfluxrl.rl.loop import posttrain as run

    cfg = resolve_config(config_file, weights, **options)
    check_base_run(base_run)
    notice = base_notice(base_run) if is_main() else None
    if notice:
        click.echo(notice, err=True)
    if dry_run:
        from cellfluxrl.config_toml import dump_toml

        click.echo(dump_toml(config_to_dict(cfg), header="cellfluxrl posttrain: resolved settings (defaults < --config "
                                                         "< options).\nRead back with: cellfluxrl posttrain BASE_RUN "
                                                         "--out RUN --config THIS.toml"), nl=False)
        return
    from cellfluxrl.commands.interrupts import StopSignals
    from cellfluxrl.progress import progress
    from cellfluxrl.rundir import hold_as_main

    bars: list = []
    last: dict = {}

    started = time.perf_counter()

    def on_step(stats: dict) -> None:
        last.update(stats)
        if not bars:  # created on the first step, so an error before it prints no bar
            if is_main():
                click.echo(first_iteration_line(stats["step"], cfg.steps, time.perf_counter() - started), err=True)
            bars.append(progress(total=cfg.steps, desc="posttrain", unit="step", disable=not is_main()))
        bars[0].n = stats["step"]
        if "val_overall" in stats:
            last["val"] = f"{stats['val_overall']:.3f}@{stats['step']} best@{stats['val_best_step']}"
        bars[0].set_postfix(reward=f"{stats['reward']:.3f}", kl=f"{stats['kl']:.2e}",
                            img_s=f"{stats['images_per_s']:.1f}", wait=f"{stats['reward_wait_share']:.0%}",
                            **({"val": last["val"]} if "val" in last else {}), refresh=False)
        bars[0].refresh()

    try:
        with hold_as_main(out_run, "posttrain"), StopSignals() as stop:
            run(base_run, out_run, cfg, device=device, on_step=on_step, should_stop=stop,
                allow_changed_reference=allow_changed_reference)
            if is_main():
                selection_report(out_run)
    finally:
        for bar in bars:
            bar.close()
    if stop() and last.get("step", cfg.steps) < cfg.steps:
        stop.exit(f"posttrain stopped by {stop.name} at step {last['step']} of {cfg.steps}; checkpoint "
                  f"{out_run / 'checkpoint.pt'} holds it: run the same command to resume" if is_main() else None)
    if is_main():
        click.echo(written_line(out_run))
