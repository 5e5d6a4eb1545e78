"""``cellfluxrl sample RUN --n N --out FILE.npz|DIR``: generate perturbed cells (optionally best-of-K).

What it writes, and what it refuses to write over, is :mod:`cellfluxrl.commands.sample_outputs`.
"""

from __future__ import annotations

from pathlib import Path

import click

from cellfluxrl.commands import SEED
from cellfluxrl.commands.params import DEVICE, Folder
from cellfluxrl.commands.vocabulary import renamed

from cellfluxrl.rewards.weights import weights_option


def dataset_for(run: Path, config: dict, trained_on: Path, data_dir: Path | None) -> Path:
    """The dataset to sample from: ``--data DIR`` if given (checked against the run), else the run's own.

    Raises:
        CellfluxError: the run's dataset is gone and no ``--data`` was given; ``--data`` is not a
            dataset folder or cannot fit the run (image size, embedding width).
    """
    from cellfluxrl.checkpoint import trained_on_problem
    from cellfluxrl.errors import CellfluxError

    if data_dir is None:
        if not (trained_on / "meta.json").is_file():
            raise CellfluxError(f"run {run} was trained on {trained_on}, which is gone (moved?); "
                                f"give its new place with --data DIR")
        return trained_on
    if not data_dir.is_dir() or not (data_dir / "meta.json").is_file():
        what = "a file" if data_dir.is_file() else ("a folder without meta.json" if data_dir.is_dir() else "missing")
        raise CellfluxError(f"--data {data_dir}: {what}; give a dataset folder made by `cellfluxrl prepare`")
    problem = trained_on_problem(config, str(run), data_dir)
    if problem is not None and problem[0] == "error":
        raise CellfluxError(problem[1])
    if problem is not None and (trained_on / "meta.json").is_file():
        click.echo(f"warning: {problem[1]}", err=True)
    elif problem is not None:  # the run's own dataset is gone: --data is taken to be where it moved
        click.echo(f"note: run {run} was trained on {trained_on} (gone); sampling {data_dir}", err=True)
    return data_dir


@click.command("sample", **renamed(renames={"--weights-from": "--network"},
                                   meaning={"--network": "which weights of the run sample"}))
@click.argument("run", type=Folder("run"))
@click.option("--n", "n", type=click.IntRange(min=1), default=64, show_default=True,
              help="Number of (control, target) requests: the first N treated test rows.")
@click.option("--conditions", default=None, metavar="NAME,...", help="Restrict to these compounds (comma-separated).")
@click.option("--best-of", "best_of_k", type=click.IntRange(min=1), default=1, show_default=True,
              help="Candidates per request; keep the highest weighted reward (paper Eq. 10).")
@weights_option
@click.option("--split", type=click.Choice(["id", "ood", "all"]), default=None,
              help="Compounds of the test pairs: in-distribution, held-out (OOD) or all. "
                   "[default: id; all with --conditions]")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Solver steps. [default: the run's recorded setting]")
@click.option("--solver", type=click.Choice(["heun", "euler"]), default=None, help="ODE solver. [default: the run's]")
@click.option("--grid", type=click.Choice(["edm", "uniform"]), default=None, help="Time grid. [default: the run's]")
@click.option("--cfg-scale", type=click.FloatRange(min=0), default=None,
              help="CFG weight w. [default: the run's recorded setting]")
@click.option("--network", "which", type=click.Choice(["ema", "model"]), default="ema", show_default=True,
              help="Network weights to sample with.")
@click.option("--checkpoint", "checkpoint", type=click.Choice(["best", "last"]), default=None,
              help="best: the checkpoint a posttrain run selected on its validation pairs (the last when it selected "
                   "none); last: its latest. [default: best; last with --network model, which the selected one lacks]")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the control draw and source noise.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Images per solver batch.")
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or gpu (= cuda).")
@click.option("--data", "data_dir", type=Folder("dataset"), default=None, metavar="DIR",
              help="Dataset to take the test pairs from. [default: the one the run was trained on]")
@click.option("--out", type=click.Path(path_type=Path), required=True, metavar="FILE.npz|DIR",
              help="Where to write: --format npz: FILE.npz, with the grid FILE.png beside it; --format tiff|png: "
                   "the folder DIR (images, samples.csv, samples.npz, grid.png), replaced whole on a re-run. "
                   "Never a file or folder sample did not write, a dataset, or a run folder itself (a new "
                   "subfolder of a run is fine).")
@click.option("--format", "fmt", type=click.Choice(["npz", "tiff", "png"]), default="npz", show_default=True,
              help="npz = FILE.npz and FILE.png; tiff = one multi-channel OME-TIFF per generated image with "
                   "channel names and intensity scale (Fiji, napari), png = RGB previews; both in DIR with "
                   "samples.csv.")
@click.option("--measurements", type=click.Path(path_type=Path), default=None, metavar="FILE.csv",
              help="Also write CellProfiler-named measurements of the generated cells: FILE.csv (per image) and "
                   "FILE_Nuclei.csv, FILE_Cells.csv, FILE_Cytoplasm.csv (per object), as `cellfluxrl measure` "
                   "does (docs/measure.md).")
def sample(run, n, conditions, best_of_k, weights, split, steps, solver, grid, cfg_scale, which, checkpoint, seed,
           batch_size, device, data_dir, out, fmt, measurements):
    """Generate perturbed cells from RUN for the first N treated test rows (same-plate controls).

    --format npz (default) writes FILE.npz (uint8 generated/control/target images and metadata) and
    the grid FILE.png beside it. --format tiff or png writes the folder DIR: one image per generated
    cell, samples.csv (pair, file, compound, dose, MoA, plate, well, kept candidate, control row,
    intensity scale, every reward), samples.npz and grid.png; it is built beside DIR and swapped in
    whole, so a re-run leaves nothing of the previous one. sample writes over only what it wrote
    itself, never into a dataset, and into a run folder only as a new subfolder; all of that is
    checked before the model is loaded.

    \b
    Example:
      cellfluxrl sample runs/base --n 32 --conditions taxol,AZ138 --best-of 4 --out samples.npz
      cellfluxrl sample runs/base --n 32 --format tiff --out samples-tiff
    """
    from cellfluxrl.commands import sample_outputs
    from cellfluxrl.distributed import resolve_device
    from cellfluxrl.rundir import hold

    out, folder_out = Path(out), fmt != "npz"
    check_out_shape(out, fmt)
    sample_outputs.check_out(out, folder_out)  # before anything is loaded or written
    check_measurements(measurements, out)
    dev = resolve_device(device)
    loaded, dataset, pairs, sampling, source, suite = _prepare(run, data_dir, conditions, n, split, steps, solver,
                                                             grid, cfg_scale, which, best_of_k, weights, dev,
                                                             seed, checkpoint)
    with hold(out, "sample"):
        sample_outputs.check_out(out, folder_out)  # again, now that no other sample can write it
        samples = _generate(loaded, dataset, pairs, sampling, seed, batch_size, best_of_k, suite, dev)
        meta = {"run": str(run), "dataset": str(dataset.root), "kind": loaded.kind, "step": loaded.step,
                "network": loaded.weights, "checkpoint": loaded.checkpoint, "num_steps": sampling.steps, "solver": sampling.solver,
                "grid": sampling.grid, "cfg_scale": sampling.cfg_scale, "sigma": sampling.sigma,
                "sampling_source": source, "split": pairs[2], "seed": seed, "best_of": best_of_k,
                "reward_weights": _weights_text(suite)}
        extra = f"; mean reward {samples.rewards.mean():.4f}" if samples.rewards is not None else ""
        count = plural(len(samples.generated), "image")
        if measurements is not None:
            _write_measurements(measurements, samples, dataset, out)
        if not folder_out:
            npz, png = sample_outputs.write_npz_outputs(out, samples, meta)
            click.echo(f"wrote {count} to {npz} and {png}{extra}")
            return
        sample_outputs.write_folder_outputs(out, samples, meta, dataset, fmt)
        kind = "OME-TIFF" if fmt == "tiff" else "PNG"
        click.echo(f"wrote {count} ({kind}), samples.csv, {sample_outputs.FOLDER_NPZ} and "
                   f"{sample_outputs.FOLDER_GRID} to {out}{extra}")


def check_measurements(measurements: Path | None, out: Path) -> None:
    """Refuse a ``--measurements`` path that would overwrite what measure did not write, lie in a
    dataset, or collide with ``--out`` (a usage error naming it); writes nothing."""
    from cellfluxrl.commands.sample_outputs import dataset_above, real_path
    from cellfluxrl.errors import CellfluxError
    from cellfluxrl.evaluation.measurement_tables import check_outputs

    if measurements is None:
        return
    try:
        paths = check_outputs(measurements)
        target = real_path(measurements)
        if dataset_above(target.parent) is not None:
            raise CellfluxError(f"{measurements} is in the dataset {dataset_above(target.parent)}; choose a path outside it")
        if any(real_path(p) == real_path(out) or real_path(out) in real_path(p).parents for p in paths.values()):
            raise CellfluxError(f"{measurements} collides with --out {out}; write the measurements beside it")
    except CellfluxError as exc:
        raise click.BadParameter(str(exc), param_hint="--measurements") from None


def _write_measurements(measurements: Path, samples, dataset, out: Path) -> None:
    """CellProfiler-named tables of the generated images (:func:`~cellfluxrl.evaluation.measurement_tables.write_measurements`)."""
    from cellfluxrl.evaluation.image_sources import generated_set
    from cellfluxrl.evaluation.measurement_tables import write_measurements

    images = generated_set(samples.generated, samples.compound, dataset, str(out), samples.moa, samples.target_index)
    write_measurements(images, dataset, measurements)
    click.echo(f"wrote the measurements of {plural(len(samples.generated), 'image')} to {measurements} and its "
               f"object tables", err=True)


def plural(n: int, word: str) -> str:
    """``"1 image"``, ``"2 images"``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def check_out_shape(out: Path, fmt: str) -> None:
    """Usage errors of ``--out`` (exit 2): FILE.npz for ``--format npz``, a folder name otherwise."""
    if fmt == "npz":
        if out.is_dir():
            raise click.BadParameter(f"{out} is a folder; give a FILE.npz file (or --format tiff|png to write a "
                                     f"folder)", param_hint="--out")
        if out.suffix != ".npz":  # FILE.png is written beside it: another suffix would be overwritten
            raise click.BadParameter(f"{out} must end in .npz (the PNG grid is written beside it)", param_hint="--out")
        return
    if out.exists() and not out.is_dir():
        raise click.BadParameter(f"{out} is a file; --format {fmt} writes a folder there", param_hint="--out")
    if out.suffix == ".npz":
        raise click.BadParameter(f"{out}: --format {fmt} writes a folder (images, samples.csv, samples.npz, "
                                 f"grid.png); give a folder name, not FILE.npz", param_hint="--out")


def _weights_text(suite) -> str:
    """The reward weights a best-of selection used, as ``name=w,...`` (``""`` without a suite)."""
    if suite is None:
        return ""
    from cellfluxrl.rewards import format_weights

    return format_weights(suite.weights)


def _prepare(run, data_dir, conditions, n, split, steps, solver, grid, cfg_scale, which, best_of_k, weights, dev,
             seed, checkpoint=None):
    """Load the run, its dataset, the test pairs, the sampling setting and the reward suite (when scored).

    Returns:
        ``(loaded run, dataset, (target rows, control rows, split), sampling, its source, suite or None)``.
    """
    from dataclasses import replace

    from cellfluxrl.checkpoint import load_run, resolve_sampling
    from cellfluxrl.commands.selection_view import checkpoint_line
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.model.generate import test_pairs

    loaded = load_run(run, device=dev, weights=which, checkpoint=checkpoint or ("last" if which == "model" else "best"))
    dataset_dir = dataset_for(run, loaded.config, loaded.dataset_dir, data_dir)
    dataset = load_dataset(dataset_dir)
    names = [c.strip() for c in conditions.split(",") if c.strip()] if conditions else None
    split = split or ("all" if names else "id")
    target_idx, control_idx = test_pairs(dataset, n, seed, names, split=split)
    sampling, source = resolve_sampling(loaded.recorded, steps, cfg_scale)
    sampling = replace(sampling, **{k: v for k, v in (("solver", solver), ("grid", grid)) if v is not None})
    click.echo(f"sampling {run} with {sampling.describe()} ({source}); {split} test pairs", err=True)
    click.echo(f"sampling {checkpoint_line(loaded)}", err=True)
    if len(target_idx) < n:
        click.echo(f"note: only {len(target_idx)} treated test rows match; sampling {len(target_idx)}", err=True)
    suite = None
    if best_of_k > 1 or weights:
        from cellfluxrl.rewards import RewardSuite, parse_weights

        suite = RewardSuite.from_dataset(dataset_dir, parse_weights(weights), device=str(dev))
    return loaded, dataset, (target_idx, control_idx, split), sampling, source, suite


def _generate(loaded, dataset, pairs, sampling, seed, batch_size, best_of_k, suite, dev):
    """Sample every pair on ``dev`` with a progress bar on stderr; returns the ``Samples``."""
    from cellfluxrl.model.generate import sample_pairs
    from cellfluxrl.progress import progress

    target_idx, control_idx, _ = pairs
    with progress(total=len(target_idx), desc="sample", unit="img") as bar:
        return sample_pairs(loaded.net, dataset, target_idx, control_idx, seed=seed, num_steps=sampling.steps,
                            cfg_scale=sampling.cfg_scale, grid=sampling.grid, solver=sampling.solver,
                            sigma=sampling.sigma, batch_size=batch_size, best_of_k=best_of_k, suite=suite,
                            device=dev, on_batch=bar.update)
