"""``cellfluxrl measure IMAGES --data DATA --out FILE.csv``: CellProfiler-named measurements of any images."""

from __future__ import annotations

from pathlib import Path

import click

from cellfluxrl.commands.params import File, Folder

SEGMENTERS = ("classical", "cellpose")


@click.command("measure")
@click.argument("images", metavar="IMAGES")
@click.option("--data", "data_dir", type=Folder("dataset"), required=True, metavar="DIR",
              help="Dataset the images belong to (channels, compounds, MoAs, plates; its segmenter).")
@click.option("--out", type=File("FILE.csv"), required=True, metavar="FILE.csv",
              help="Image table; FILE_Nuclei.csv, FILE_Cells.csv, FILE_Cytoplasm.csv are written beside it.")
@click.option("--segmenter", type=click.Choice(SEGMENTERS), default=None,
              help="Segmentation backend. [default: the one of the dataset's reference statistics, else classical]")
@click.option("--cellpose-model", default=None, metavar="PATH", help="Cellpose model file (with --segmenter cellpose).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Images per segmentation call.")
def measure(images, data_dir, out, segmenter, cellpose_model, batch_size):
    """Segment IMAGES and write CellProfiler-named measurements (ExportToSpreadsheet layout).

    IMAGES is a FILE.npz from `sample`, a folder with samples.csv (`sample --format tiff|png`), a
    CSV of image paths (a 'file' column, or one grayscale file per channel column: actin, tubulin,
    dna; plus compound, dose, plate, well, moa), or real:SPLIT (train, val, test, all) for the
    dataset's own images.

    \b
    Writes (pycytominer conventions: Metadata_ prefix, compartments Nuclei/Cells/Cytoplasm):
      FILE.csv            one row per image: ImageNumber, Metadata_Plate, Metadata_Well,
                          Metadata_Compound, Metadata_Concentration, Metadata_MoA, Metadata_Kind,
                          Metadata_Source, Image_Count_Nuclei, Image_Count_Cells, Image_Count_Cytoplasm
      FILE_Nuclei.csv     one row per object: ImageNumber, ObjectNumber, the Metadata_ columns,
      FILE_Cells.csv      <C>_Location_Center_X/Y, <C>_AreaShape_Area, _Perimeter, _FormFactor,
      FILE_Cytoplasm.csv  _Eccentricity, ... and parent/child columns
    Files of these names are replaced only when measure wrote them. Metadata are text: in pandas
    read with dtype=str for them and keep_default_na=False. Definitions: docs/measure.md.

    \b
    Example:
      cellfluxrl measure samples.npz --data data/synthetic --out measured/samples.csv
    """
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.errors import CellfluxError
    from cellfluxrl.evaluation.image_sources import read_image_set
    from cellfluxrl.evaluation.measurement_tables import check_outputs, segmenter_for, write_measurements
    from cellfluxrl.progress import progress

    try:
        dataset = load_dataset(data_dir)
    except CellfluxError as exc:
        raise click.BadParameter(str(exc), param_hint="--data") from None
    try:
        check_outputs(out)
    except CellfluxError as exc:
        raise click.BadParameter(str(exc), param_hint="--out") from None
    try:
        found = read_image_set(images, dataset)
    except CellfluxError as exc:
        raise click.BadParameter(str(exc), param_hint="IMAGES") from None
    seg = segmenter_for(dataset, segmenter, cellpose_model)
    with progress(total=len(found), desc="measure", unit="img") as bar:
        paths = write_measurements(found, dataset, Path(out), segmenter=seg, batch_size=batch_size, on_batch=bar.update)
    click.echo(f"measured {len(found)} images ({seg.settings.get('backend', segmenter or 'segmenter')}): "
               f"{', '.join(str(p) for p in paths.values())}")
