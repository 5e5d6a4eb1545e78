"""``cellfluxrl prepare``: build a dataset (synthetic, BBBC021 or the user's images), then fit its evaluators.

Every subcommand checks its inputs first, then works holding the dataset folder's lock, with
SIGINT/SIGTERM handled (:mod:`cellfluxrl.commands.prepare_steps`, shared with ``prepare images``).
"""

from __future__ import annotations

import click

from cellfluxrl.commands import SEED
from cellfluxrl.commands.params import POSITIVE, Folder
from cellfluxrl.commands.prepare_images import check_resize, images
from cellfluxrl.commands.prepare_steps import (CROP_SIZE, absolute, check_size, embeddings_option,  # noqa: F401
                                               evaluator_options, finish, held, resume)  # (check_size: demo's)
from cellfluxrl.commands.vocabulary import renamed

_held = held  # the name older callers (tests) use


@click.group()
def prepare() -> None:
    """Build a dataset in the cellfluxrl layout (see data/README.md)."""


@prepare.command("synthetic", **renamed(positional_out=0))
@click.option("--out", type=Folder("dataset"), required=True, metavar="DIR",
              help="Dataset folder to write (must not exist, be empty, or hold this very dataset: then it resumes).")
@click.option("--n-images", type=click.IntRange(min=100), default=20000, show_default=True,
              help="Number of crops (treated + controls).")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed of the simulator (cells, plates, train/test split) and of the evaluators' MoA classifiers.")
@click.option("--size", type=CROP_SIZE, default=96, show_default=True,
              help="Crop size (px): a multiple of 4, at least 32 (what every UNet preset takes).")
@click.option("--plates", type=click.IntRange(min=2), default=6, show_default=True, help="Number of plates.")
@embeddings_option
@evaluator_options
def prepare_synthetic_command(out, n_images, seed, size, plates, embeddings, segmenter, cellpose_model, no_evaluators):
    """The embedded default: a BBBC021-like cell-painting simulator with ground-truth masks.

    Run again on the same --out with the same settings, it resumes: a finished dataset is kept and
    only missing evaluators are fitted; a dataset made with other settings is refused.
    """
    from cellfluxrl.data.synthetic import prepare_synthetic, synthetic_settings

    check_size(size)
    settings = synthetic_settings(n_images, seed, size, plates, embeddings)

    def work() -> None:
        if not resume(out, "synthetic", "generator", settings, segmenter, cellpose_model, no_evaluators, seed):
            prepare_synthetic(out, n_images=n_images, seed=seed, size=size, n_plates=plates, progress=True,
                              embeddings=embeddings)
        finish(out, segmenter, cellpose_model, no_evaluators, seed)

    held(out, work)


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
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed of the train/test split (--raw) and of the evaluators' MoA classifiers.")
@embeddings_option
@evaluator_options
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

    check_resize(pixel_size, scale)  # both at once: a usage error (exit 2)
    factor = field_scale(pixel_size, scale)  # a bad value fails here, before anything is read

    if impa is not None:  # the settings meta.json["preparation"] records, compared when OUT exists
        source, settings = "bbbc021-impa", {"impa_dir": absolute(impa), "embeddings_csv": absolute(embeddings)}
    else:
        source, settings = "bbbc021-raw", {"raw_dir": absolute(raw), "seed": seed,
                                           "embeddings_csv": absolute(embeddings), "scale": factor}

    def work() -> None:
        if resume(out, source, "preparation", settings, segmenter, cellpose_model, no_evaluators, seed):
            pass  # finished with these settings: on to the evaluators it lacks
        elif impa is not None:
            bbbc021.prepare_impa(impa, out, progress=True, embeddings=embeddings)
        else:
            bbbc021.prepare_raw(raw, out, seed=seed, progress=True, embeddings=embeddings, pixel_size_um=pixel_size,
                                scale=scale)
        finish(out, segmenter, cellpose_model, no_evaluators, seed)

    held(out, work)


from cellfluxrl.commands.cellpose_train import cellpose_model as _cellpose_model  # noqa: E402 (imports only click)

prepare.add_command(_cellpose_model)

prepare.add_command(images)
