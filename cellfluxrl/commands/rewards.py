"""``cellfluxrl rewards``: list the installed rewards (and ``rewards fit DATASET`` to refit evaluators)."""

from __future__ import annotations

from pathlib import Path

import click

from cellfluxrl.commands import SEED
from cellfluxrl.commands.params import DEVICE, Folder


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns separated by two spaces."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


@click.group(invoke_without_command=True)
@click.option("--check", is_flag=True,
              help="Import every reward and call its factory; report failures one line each (exit 1 if any).")
@click.option("--data", "dataset", type=Folder("dataset", exists=True), default=None,
              help="With --check: build the rewards on this dataset's evaluators (without it, factories that "
                   "need a dataset are only imported).")
@click.pass_context
def rewards(ctx: click.Context, check: bool, dataset: Path | None) -> None:
    """List the installed rewards: name, entry point, package==version, origin, default weight.

    Rewards come from the entry-point group `cellfluxrl.rewards` (the seven built-ins are declared
    by cellfluxrl itself, plugins by their own packages). Use the names with --weights, e.g.
    --weights moa=5,actin_tubulin=1.
    """
    if dataset is not None and not check:
        raise click.UsageError("--data goes with --check")
    if ctx.invoked_subcommand is not None:
        return
    from cellfluxrl.errors import CellfluxError
    from cellfluxrl.rewards import DEFAULT_WEIGHTS, available_rewards

    infos = available_rewards()
    rows = [("name", "entry point", "package", "origin", "default weight")]
    for name, info in infos.items():
        weight = f"{DEFAULT_WEIGHTS[name]:g}" if name in DEFAULT_WEIGHTS else "0 (name it in --weights)"
        rows.append((name, info.value, f"{info.package}=={info.version}", "built-in" if info.builtin else "plugin",
                     weight))
    click.echo("\n".join(_table(rows)))
    if not check:
        return
    built, failures = check_all(infos, dataset)
    deferred = len(infos) - built - failures
    extra = f", {deferred} import but need a dataset to build (give --data)" if deferred else ""
    click.echo(f"checked {len(infos)} rewards: {built} build{extra}, {failures} fail")
    if failures:
        raise CellfluxError(f"{failures} reward(s) failed to import or build (see above)")


def check_all(infos: dict, dataset: Path | None) -> tuple[int, int]:
    """Import and build every reward, printing ``FAIL <one line>`` per failure; returns (built, failed)."""
    from cellfluxrl.errors import CellfluxError
    from cellfluxrl.rewards import RewardContext
    from cellfluxrl.rewards.registry import NoEvaluators, check_reward

    if dataset is not None:
        from cellfluxrl.rewards.evaluators import load_evaluators

        context = RewardContext(load_evaluators(str(dataset)), "cpu")
    else:
        context = RewardContext(NoEvaluators(), "cpu")
    built = failures = 0
    for info in infos.values():
        try:
            built += check_reward(info, context)
        except CellfluxError as exc:
            failures += 1
            click.echo(f"FAIL {exc}")
    return built, failures


@rewards.command("fit")
@click.argument("dataset", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--segmenter", type=click.Choice(["classical", "cellpose"]), default="classical", show_default=True,
              help="Segmentation backend for the reference statistics.")
@click.option("--cellpose-model", default=None, help="Cellpose model name (cached weights) or local path.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the MoA classifier training.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="MoA classifier epochs [default: about 300 optimizer steps].")
@click.option("--device", type=DEVICE, default=None, help="Torch device for the classifier: cpu, cuda, cuda:N or gpu [default: cuda if available, else cpu].")
def fit(dataset: Path, segmenter: str, cellpose_model: str | None, seed: int, epochs: int | None,
        device: str | None) -> None:
    """(Re)fit DATASET/evaluators: per-MoA reference statistics and the MoA classifier.

    `prepare` does this already; use it after changing the segmenter, or on a dataset prepared
    with --no-evaluators. A segmenter that finds nothing in some MoA's train images is refused
    (naming the MoA and statistic); one that misses nuclei in more than 5 % of them is a warning.
    The device is checked first; the new files replace the old ones only once all are fitted
    (a failure or Ctrl-C leaves DATASET/evaluators as it was), holding DATASET's lock as
    `prepare` does.
    """
    from cellfluxrl.commands.interrupts import StopSignals
    from cellfluxrl.distributed import resolve_device
    from cellfluxrl.rundir import hold

    device = str(resolve_device(device or "auto"))  # an unavailable device fails here, before any write
    with hold(dataset, "rewards fit"), StopSignals(graceful=False) as stop:
        from cellfluxrl.rewards.evaluators_fit import fit_evaluators

        try:
            summary = fit_evaluators(dataset, segmenter=segmenter, cellpose_model=cellpose_model, seed=seed,
                                     progress=True, classifier_epochs=epochs, device=device)
        except KeyboardInterrupt:
            stop.exit(f"rewards fit stopped by {stop.name}: {dataset / 'evaluators'} is as it was (the new files "
                      f"replace it only once all are fitted); run the same command to fit them again")
    for key, value in summary.items():
        click.echo(f"{key}: {value}")
