"""``cellfluxrl sample RUN --n N --out FILE.npz``: generate perturbed cells (optionally best-of-K)."""

from __future__ import annotations

from pathlib import Path

import click

from cellfluxrl.commands import SEED
from cellfluxrl.commands.params import DEVICE, File, Folder
from cellfluxrl.commands.vocabulary import renamed

from cellfluxrl.rewards.weights import weights_option


def write_outputs(out: Path, samples, meta: dict) -> tuple[Path, Path]:
    """Write ``FILE.npz`` (images + metadata) and ``FILE.png`` (control | generated | real target per condition)."""
    import numpy as np

    from cellfluxrl.grids import save_grid

    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"generated": samples.generated, "controls": samples.controls, "targets": samples.targets,
              "target_index": samples.target_index, "control_index": samples.control_index,
              "compound": samples.compound, "moa": samples.moa, "seeds": samples.seeds}
    if samples.rewards is not None:
        arrays["rewards"] = samples.rewards
        arrays["candidate_rewards"] = samples.candidate_rewards
        for name, values in samples.components.items():
            arrays[f"reward_{name}"] = values
    arrays.update({f"meta_{k}": np.asarray(v) for k, v in meta.items()})
    tmp = out.with_name(f".{out.stem}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(out)
    rows, labels = [], []
    for name in dict.fromkeys(samples.compound.tolist()):
        i = int(np.flatnonzero(samples.compound == name)[0])
        rows.append([samples.controls[i], samples.generated[i], samples.targets[i]])
        labels.append(f"{name}\n{samples.moa[i]}")
    png = out.with_suffix(".png")
    save_grid(png, rows, labels, ["control", "generated", "real target"], title=meta.get("run"))
    return out, png


def check_writable(out: Path) -> None:
    """Refuse an --out that cannot be written, before anything is generated (one line naming it).

    Creates nothing: an existing folder gets a probe file (removed at once); a folder still to be
    made needs a writable nearest existing parent.
    """
    import os

    from cellfluxrl.errors import CellfluxError

    for path in (out, out.with_suffix(".png")):
        if path.is_dir():
            raise CellfluxError(f"--out {out}: {path} is a folder; give a FILE.npz path")
    folder = out.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise CellfluxError(f"--out {out}: cannot write in {folder} (not a folder)")
    if folder != out.absolute().parent:  # created when writing: the parent must let us
        if not os.access(folder, os.W_OK | os.X_OK):
            raise CellfluxError(f"--out {out}: cannot write in {folder} (Permission denied)")
        return
    probe = folder / f".{out.name}.probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as exc:
        raise CellfluxError(f"--out {out}: cannot write in {folder} ({exc.strerror or type(exc).__name__})") from None


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
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the control draw and source noise.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Images per solver batch.")
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or gpu (= cuda).")
@click.option("--data", "data_dir", type=Folder("dataset"), default=None, metavar="DIR",
              help="Dataset to take the test pairs from. [default: the one the run was trained on]")
@click.option("--out", type=File("FILE.npz"), required=True, metavar="FILE.npz")
@click.option("--format", "fmt", type=click.Choice(["npz", "tiff", "png"]), default="npz", show_default=True,
              help="Also write each generated image to the folder FILE/ with samples.csv: tiff = one "
                   "multi-channel OME-TIFF per image with channel names (Fiji, napari); png = RGB previews.")
def sample(run, n, conditions, best_of_k, weights, split, steps, solver, grid, cfg_scale, which, seed, batch_size,
           device, data_dir, out, fmt):
    """Generate perturbed cells from RUN for the first N treated test rows (same-plate controls).

    Writes FILE.npz (uint8 generated/control/target images and metadata) and FILE.png; with
    --format tiff or png also FILE/ (one image per generated cell and samples.csv: pair, candidate,
    compound, dose, MoA, plate, control image and every reward).

    \b
    Example:
      cellfluxrl sample runs/base --n 32 --conditions taxol,AZ138 --best-of 4 --out samples.npz
    """
    from dataclasses import replace

    from cellfluxrl.checkpoint import load_run, resolve_sampling
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.distributed import resolve_device
    from cellfluxrl.model.generate import sample_pairs, test_pairs
    from cellfluxrl.progress import progress

    if Path(out).suffix != ".npz":  # FILE.png is written beside it: another suffix would be overwritten
        raise click.BadParameter(f"{out} must end in .npz (the PNG grid is written beside it)", param_hint="--out")
    check_writable(Path(out))
    if fmt != "npz" and Path(out).with_suffix("").exists() and not Path(out).with_suffix("").is_dir():
        raise click.BadParameter(f"{Path(out).with_suffix('')} is a file; --format {fmt} writes a folder there",
                                 param_hint="--out")
    dev = resolve_device(device)
    loaded = load_run(run, device=dev, weights=which)
    dataset_dir = dataset_for(run, loaded.config, loaded.dataset_dir, data_dir)
    dataset = load_dataset(dataset_dir)
    names = [c.strip() for c in conditions.split(",") if c.strip()] if conditions else None
    split = split or ("all" if names else "id")
    target_idx, control_idx = test_pairs(dataset, n, seed, names, split=split)
    sampling, source = resolve_sampling(loaded.recorded, steps, cfg_scale)
    sampling = replace(sampling, **{k: v for k, v in (("solver", solver), ("grid", grid)) if v is not None})
    click.echo(f"sampling {run} with {sampling.describe()} ({source}); {split} test pairs", err=True)
    if len(target_idx) < n:
        click.echo(f"note: only {len(target_idx)} treated test rows match; sampling {len(target_idx)}", err=True)
    suite = None
    if best_of_k > 1 or weights:
        from cellfluxrl.rewards import RewardSuite, format_weights, parse_weights

        suite = RewardSuite.from_dataset(dataset_dir, parse_weights(weights), device=str(dev))
    with progress(total=len(target_idx), desc="sample", unit="img") as bar:
        samples = sample_pairs(loaded.net, dataset, target_idx, control_idx, seed=seed, num_steps=sampling.steps,
                               cfg_scale=sampling.cfg_scale, grid=sampling.grid, solver=sampling.solver,
                               sigma=sampling.sigma, batch_size=batch_size, best_of_k=best_of_k, suite=suite,
                               device=dev, on_batch=bar.update)
    meta = {"run": str(run), "dataset": str(dataset_dir), "kind": loaded.kind, "step": loaded.step, "weights_from": loaded.weights,
            "num_steps": sampling.steps, "solver": sampling.solver, "grid": sampling.grid,
            "cfg_scale": sampling.cfg_scale, "sigma": sampling.sigma, "sampling_source": source, "split": split,
            "seed": seed,
            "best_of": best_of_k, "reward_weights": format_weights(suite.weights) if suite is not None else ""}
    npz, png = write_outputs(Path(out), samples, meta)
    extra = f"; mean reward {samples.rewards.mean():.4f}" if samples.rewards is not None else ""
    click.echo(f"wrote {len(samples.generated)} images to {npz} and {png}{extra}")
    if fmt != "npz":
        from cellfluxrl.export import export_samples

        table = export_samples(Path(out).with_suffix(""), samples, dataset.table, dataset.channels, fmt)
        click.echo(f"wrote {len(samples.generated)} {fmt.upper()} files and {table.name} to {table.parent}")
