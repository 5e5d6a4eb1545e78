"""``cellfluxrl prepare images --out DIR --csv FILE.csv``: a dataset from the user's own plates.

Like every ``prepare`` subcommand it checks its inputs first (crop size, resize options), then
builds and fits the evaluators holding ``OUT``'s lock, with SIGINT/SIGTERM handled
(:mod:`cellfluxrl.commands.prepare_steps`).
"""

from __future__ import annotations

import click

from cellfluxrl.commands import SEED
from cellfluxrl.commands.params import POSITIVE, File, Folder
from cellfluxrl.commands.prepare_steps import (CROP_SIZE, check_size, embeddings_option, evaluator_options, finish,
                                               held, resume)
from cellfluxrl.commands.vocabulary import renamed

HELP = """Your own plates: nucleus-centred crops from per-channel images listed in a CSV.

    Fields go through the raw-BBBC021 pipeline (per-plate illumination correction, nuclei on the
    DNA channel, crops of --size px, per-plate scaling to uint8); the split is drawn per plate and
    well. Run again on the same --out with the same CSV and settings, it resumes like `prepare
    synthetic`; a second run on the same --out while one works is refused (the folder's lock).
    The CSV's columns are in docs/data.md.

    \b
    Example CSV (paths relative to the CSV):
      actin,tubulin,dna,compound,dose,plate,well,control,smiles,moa
      P1/B02_w2.tif,P1/B02_w3.tif,P1/B02_w1.tif,DMSO,0,P1,B02,1,,
      P1/C05_w2.tif,P1/C05_w3.tif,P1/C05_w1.tif,taxol,0.3,P1,C05,0,,
    """


def check_resize(pixel_size: float | None, scale: float | None) -> None:
    """``--pixel-size`` and ``--scale`` say the same thing two ways: both at once is a usage error (exit 2)."""
    if pixel_size is not None and scale is not None:
        raise click.UsageError("give --pixel-size or --scale, not both")


@click.command("images", help=HELP, **renamed(positional_out=0))
@click.option("--out", type=Folder("dataset"), required=True, metavar="DIR",
              help="Dataset folder to write (must not exist, be empty, or hold this very dataset: then it resumes).")
@click.option("--csv", "csv_path", type=File("images CSV"), required=True, metavar="FILE.csv",
              help="One row per field (or crop): actin, tubulin, dna (image files, TIFF or PNG, 8/16-bit grayscale, "
                   "relative to the CSV), compound, dose, plate, well, control (1/0); optional smiles, moa.")
@click.option("--size", type=CROP_SIZE, default=96, show_default=True,
              help="Crop size (px): a multiple of 4, at least 32 (what every UNet preset takes); images of exactly "
                   "this size are taken whole as crops.")
@click.option("--pixel-size", type=float, default=None, metavar="UM", callback=POSITIVE,
              help="Microns per pixel of the fields when not BBBC021's (0.325); they are resized so a crop holds a "
                   "BBBC021 crop's field of view.")
@click.option("--scale", type=float, default=None, callback=POSITIVE,
              help="Instead of --pixel-size: resize factor of the fields before cropping.")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed of the train/test split (per well) and of the evaluators' MoA classifiers.")
@embeddings_option
@evaluator_options
def images(out, csv_path, size, pixel_size, scale, seed, embeddings, segmenter, cellpose_model, no_evaluators):
    check_resize(pixel_size, scale)
    check_size(size)
    from cellfluxrl.data.bbbc021.fields import field_scale
    from cellfluxrl.data.images_csv import images_settings, prepare_images

    factor = field_scale(pixel_size, scale)  # a bad value fails here, before anything is read
    settings = images_settings(csv_path, seed, size, factor, embeddings)

    def work() -> None:
        if not resume(out, "images", "preparation", settings, segmenter, cellpose_model, no_evaluators, seed):
            prepare_images(csv_path, out, seed=seed, progress=True, crop_size=size, embeddings=embeddings,
                           pixel_size_um=pixel_size, scale=scale)
        finish(out, segmenter, cellpose_model, no_evaluators, seed)

    held(out, work)
