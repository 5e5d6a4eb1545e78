"""``cellfluxrl prepare``: build a dataset (synthetic or BBBC021), then fit its evaluators."""

from __future__ import annotations

from pathlib import Path

import click

from cellfluxrl.commands import SEED
from cellfluxrl.commands.params import POSITIVE, File, Folder
from cellfluxrl.commands.vocabulary import renamed


def _evaluator_options(f):
    f = click.option("--segmenter", type=click.Choice(["classical", "cellpose"]), default="classical",
                     show_default=True, help="Segmentation backend for the reference statistics.")(f)
    f = click.option("--cellpose-model", default=None,
                     help="Cellpose model name (cached weights) or local path, for --segmenter cellpose.")(f)
    f = click.option("--no-evaluators", is_flag=True,
                     help="Skip fitting reference statistics and the MoA classifier.")(f)
    return f


def _embeddings_option(f):
    """``--embeddings FILE.csv``: a user's compound embeddings (see data/README.md), passed on as ``embeddings=``."""
    return click.option(
        "--embeddings", type=File("embeddings CSV"), default=None, metavar="FILE.csv",
        help="Compound embeddings to use instead of the built-in ones: a CSV laid out like "
             "cellfluxrl/data/bbbc021_emb_fp.csv (a header line, then one line per compound: its name, "
             "then D numbers); every compound of the dataset (DMSO included) needs a row. Default: RDKit "
             "Morgan counts from the SMILES, else CellFlux's shipped BBBC021 row.")(f)


def _absolute(path: Path | None) -> str | None:
    """A path option as the dataset's meta.json records it (absolute), or None."""
    return None if path is None else str(Path(path).resolve())


def _resume(out: Path, source: str, section: str, settings: dict, segmenter: str, cellpose_model: str | None,
            no_evaluators: bool, seed: int) -> bool:
    """Whether OUT already holds this dataset (``prepare`` run again after a kill, or twice): then say
    what is left to do on stderr. A dataset or evaluator made with other settings is refused (one
    line naming the setting)."""
    from cellfluxrl.data.resume import resume_dataset
    from cellfluxrl.rewards.evaluators import segmenter_options
    from cellfluxrl.rewards.evaluators_resume import evaluators_to_fit

    if not resume_dataset(out, source, section, settings):
        return False
    missing = []
    if not no_evaluators:
        from cellfluxrl.data.layout import load_dataset
        from cellfluxrl.rewards.evaluators_fit import half_hashes

        halves = half_hashes(load_dataset(out), seed)
        missing = evaluators_to_fit(out / "evaluators", segmenter, segmenter_options(segmenter, cellpose_model), seed,
                                    halves=halves)
    todo = f"fitting the missing evaluators ({', '.join(missing)})" if missing else "nothing left to do"
    click.echo(f"resuming {out}: its images were already written with these settings; {todo}", err=True)
    return True


def _finish(out: Path, segmenter: str, cellpose_model: str | None, no_evaluators: bool, seed: int) -> None:
    """Fit the evaluators the dataset lacks (unless skipped; those already fitted with these settings
    are kept) and print its summary."""
    from cellfluxrl.data.layout import load_dataset

    evaluators = None
    if not no_evaluators:
        from cellfluxrl.rewards.evaluators_fit import fit_evaluators

        evaluators = fit_evaluators(out, segmenter=segmenter, cellpose_model=cellpose_model, seed=seed, resume=True)
    click.echo(summarize(load_dataset(out), evaluators))


def _held(out: Path, work) -> None:
    """Run ``work()`` holding OUT's lock; SIGINT/SIGTERM stop it at once and say what was kept.

    A build interrupted while writing images keeps nothing (its partial folder is removed); one
    interrupted while fitting evaluators keeps the dataset and the evaluators already written,
    which the same command resumes from. Exits 130 (SIGINT) / 143 (SIGTERM).
    """
    from cellfluxrl.commands.interrupts import StopSignals
    from cellfluxrl.rundir import hold

    with hold(out, "prepare"), StopSignals(graceful=False) as stop:
        try:
            work()
        except KeyboardInterrupt:
            if (out / "meta.json").is_file():
                kept = sorted(p.name for p in (out / "evaluators").glob("*") if not p.name.startswith(".")) \
                    if (out / "evaluators").is_dir() else []
                stop.exit(f"prepare stopped by {stop.name} while fitting the evaluators: the dataset {out} is kept, "
                          f"with {', '.join(kept) if kept else 'no evaluator files yet'}; run the same command to "
                          f"fit the rest")
            stop.exit(f"prepare stopped by {stop.name} while writing {out}: nothing was kept (the partial build is "
                      f"removed); run the same command to start again")


def size_multiple() -> int:
    """Crop sizes must be a multiple of this so that every UNet preset can take them (its downsampling)."""
    from cellfluxrl.model.unet import PRESETS

    return max(2 ** (len(preset.channel_mult) - 1) for preset in PRESETS.values())


def check_size(size: int, option: str = "--size") -> None:
    """Refuse a crop size no UNet preset can take, before anything is written (one line with the accepted ones)."""
    from cellfluxrl.errors import CellfluxError

    k = size_multiple()
    if size % k:
        near = sorted({max(32, size - size % k), size - size % k + k})
        raise CellfluxError(f"{option} {size}: the UNet presets take crops of a multiple of {k} px, at least 32 "
                            f"(e.g. {', '.join(map(str, near))}, 48 or 96)")


def summarize(dataset, evaluators: dict | None = None) -> str:
    """A short human-readable summary of a dataset (and of its fitted evaluators)."""
    meta, table = dataset.meta, dataset.table
    lines = [f"dataset {dataset.root} ({meta['source']}): {len(dataset)} images "
             f"{meta['image_size']}x{meta['image_size']}x{len(meta['channels'])} ({', '.join(meta['channels'])})"]
    for split, counts in meta["counts"].items():
        lines.append(f"  {split:5s}: {counts['treated']} treated, {counts['control']} controls")
    n_ood = int(dataset.conditions["ood"].sum())
    lines.append(f"  {len(set(table['batch']))} plates, {len(dataset.conditions['compound'])} conditions "
                 f"({n_ood} OOD), {len(set(table['moa'])) - 1} MoAs + DMSO, embedding dim {meta['embedding_dim']}")
    for key, value in (evaluators or {}).items():
        lines.append(f"  {key}: {value}")
    return "\n".join(lines)


@click.group()
def prepare() -> None:
    """Build a dataset in the cellfluxrl layout (see data/README.md)."""


@prepare.command("synthetic", **renamed(positional_out=0))
@click.option("--out", type=Folder("dataset"), required=True, metavar="DIR",
              help="Dataset folder to write (must not exist, be empty, or hold this very dataset: then it resumes).")
@click.option("--n-images", type=click.IntRange(min=100), default=20000, show_default=True,
              help="Number of crops (treated + controls).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--size", type=click.IntRange(min=32), default=96, show_default=True,
              help="Crop size (px): a multiple of 4, at least 32 (what every UNet preset takes).")
@click.option("--plates", type=click.IntRange(min=2), default=6, show_default=True, help="Number of plates.")
@_embeddings_option
@_evaluator_options
def prepare_synthetic_command(out, n_images, seed, size, plates, embeddings, segmenter, cellpose_model, no_evaluators):
    """The embedded default: a BBBC021-like cell-painting simulator with ground-truth masks.

    Run again on the same --out with the same settings, it resumes: a finished dataset is kept and
    only missing evaluators are fitted; a dataset made with other settings is refused.
    """
    from cellfluxrl.data.synthetic import prepare_synthetic, synthetic_settings

    check_size(size)
    settings = synthetic_settings(n_images, seed, size, plates, embeddings)

    def work() -> None:
        if not _resume(out, "synthetic", "generator", settings, segmenter, cellpose_model, no_evaluators, seed):
            prepare_synthetic(out, n_images=n_images, seed=seed, size=size, n_plates=plates, progress=True,
                              embeddings=embeddings)
        _finish(out, segmenter, cellpose_model, no_evaluators, seed)

    _held(out, work)


@prepare.command("bbbc021", **renamed(positional_out=0))
@click.option("--out", type=Folder("dataset"), required=True, metavar="DIR",
              help="Dataset folder to write (must not exist, be empty, or hold this very dataset: then it resumes).")
@click.option("--impa", type=Folder("IMPA"), default=None, metavar="DIR",
              help="Folder in the IMPA/CellFlux layout (metadata/bbbc021_df_all.csv + per-cell .npy).")
@click.option("--raw", type=Folder("raw BBBC021"), default=None, metavar="DIR",
              help="Folder in the Broad BBBC021 v1 layout (three CSVs + per-channel TIFFs).")
@click.option("--pixel-size", type=float, default=None, metavar="UM", callback=POSITIVE,
              help="With --raw: microns per pixel of the images when they are not BBBC021's (0.325); the "
                   "fields are resized so a 96 px crop holds a BBBC021 crop's field of view.")
@click.option("--scale", type=float, default=None, callback=POSITIVE,
              help="With --raw, instead of --pixel-size: resize factor of the fields before cropping "
                   "(e.g. 0.5 for images at twice BBBC021's magnification).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@_embeddings_option
@_evaluator_options
def prepare_bbbc021_command(out, impa, raw, pixel_size, scale, seed, embeddings, segmenter, cellpose_model,
                            no_evaluators):
    """Real BBBC021, from the IMPA/CellFlux crops (--impa) or the raw Broad images (--raw).

    Run again on the same --out with the same settings, it resumes like `prepare synthetic`.
    """
    from cellfluxrl.errors import CellfluxError

    if (impa is None) == (raw is None):
        raise CellfluxError("give exactly one of --impa DIR or --raw DIR")
    if impa is not None and (pixel_size is not None or scale is not None):
        raise CellfluxError("--pixel-size and --scale apply to --raw only (IMPA crops are already cut)")
    from cellfluxrl.data import bbbc021
    from cellfluxrl.data.bbbc021.fields import field_scale

    factor = field_scale(pixel_size, scale)  # a bad value fails here, before anything is read

    if impa is not None:  # the settings meta.json["preparation"] records, compared when OUT exists
        source, settings = "bbbc021-impa", {"impa_dir": _absolute(impa), "embeddings_csv": _absolute(embeddings)}
    else:
        source, settings = "bbbc021-raw", {"raw_dir": _absolute(raw), "seed": seed,
                                           "embeddings_csv": _absolute(embeddings), "scale": factor}

    def work() -> None:
        if _resume(out, source, "preparation", settings, segmenter, cellpose_model, no_evaluators, seed):
            pass  # finished with these settings: on to the evaluators it lacks
        elif impa is not None:
            bbbc021.prepare_impa(impa, out, progress=True, embeddings=embeddings)
        else:
            bbbc021.prepare_raw(raw, out, seed=seed, progress=True, embeddings=embeddings, pixel_size_um=pixel_size,
                                scale=scale)
        _finish(out, segmenter, cellpose_model, no_evaluators, seed)

    _held(out, work)


from cellfluxrl.commands.cellpose_train import cellpose_model as _cellpose_model  # noqa: E402 (imports only click)

prepare.add_command(_cellpose_model)

from cellfluxrl.commands.prepare_images import make_images_command  # noqa: E402 (imports only click)

prepare.add_command(make_images_command([_embeddings_option, _evaluator_options], _resume, _finish))
