"""CellProfiler-style measurement tables (ExportToSpreadsheet layout) and :func:`write_measurements`.

``write_measurements(images, dataset, FILE.csv)`` segments every image with the project's
segmenter, measures it (:mod:`cellfluxrl.evaluation.measurements`) and writes four CSVs:

* ``FILE.csv``: the Image table, one row per image: ``ImageNumber`` (1-based), the metadata
  columns :data:`METADATA_COLUMNS` and ``Image_Count_Nuclei``, ``Image_Count_Cells``,
  ``Image_Count_Cytoplasm``.
* ``FILE_Nuclei.csv``, ``FILE_Cells.csv``, ``FILE_Cytoplasm.csv``: one row per object:
  ``ImageNumber``, ``ObjectNumber``, the same metadata columns, ``<C>_Location_Center_X/Y``,
  ``<C>_AreaShape_<feature>`` and the relation columns (``Cells_Parent_Nuclei``, ...).

Names follow CellProfiler and pycytominer: the ``Metadata_`` prefix, compartments Nuclei / Cells /
Cytoplasm. The metadata are text: read them with ``dtype=str, keep_default_na=False`` in pandas
(a plate named ``22123`` or a concentration would otherwise be parsed as a number, an empty well as
NaN). Every file is written as ``.NAME.tmp-PID`` and renamed into place; an existing file is
replaced only if its header is exactly the one this module writes (so it was written by
``measure``), else the whole call is refused before anything is computed. :func:`named_sets` puts
several sources in one set of tables (``score --measurements``: ``Metadata_Source`` is ``NAME=SOURCE``).
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from cellfluxrl.errors import CellfluxError
from cellfluxrl.evaluation.measurements import COMPARTMENTS, SHAPE_FEATURES, measure_image
from cellfluxrl.rundir import remove_dead_temps, temp_path

if TYPE_CHECKING:
    from cellfluxrl.evaluation.image_sources import ImageSet

METADATA_COLUMNS = ("Metadata_Plate", "Metadata_Well", "Metadata_Compound", "Metadata_Concentration",
                    "Metadata_MoA", "Metadata_Kind", "Metadata_Source")
IMAGE_COUNTS = tuple(f"Image_Count_{c}" for c in COMPARTMENTS)
IMAGE_HEADER = ("ImageNumber", *METADATA_COLUMNS, *IMAGE_COUNTS)
RELATIONS = {"Nuclei": ("Nuclei_Children_Cells_Count",), "Cells": ("Cells_Parent_Nuclei",),
             "Cytoplasm": ("Cytoplasm_Parent_Cells", "Cytoplasm_Parent_Nuclei")}
INTEGER_FEATURES = {"Area", "BoundingBoxArea", "BoundingBoxMinimum_X", "BoundingBoxMaximum_X",
                    "BoundingBoxMinimum_Y", "BoundingBoxMaximum_Y"}


def object_header(compartment: str) -> tuple[str, ...]:
    """The exact column names of one compartment's object table."""
    return ("ImageNumber", "ObjectNumber", *METADATA_COLUMNS, f"{compartment}_Location_Center_X",
            f"{compartment}_Location_Center_Y", *(f"{compartment}_AreaShape_{f}" for f in SHAPE_FEATURES),
            *RELATIONS[compartment])


def output_paths(out: str | os.PathLike) -> dict[str, Path]:
    """``{"Image": FILE.csv, "Nuclei": FILE_Nuclei.csv, "Cells": ..., "Cytoplasm": ...}``."""
    out = Path(out)
    return {"Image": out, **{c: out.with_name(f"{out.stem}_{c}.csv") for c in COMPARTMENTS}}


def _header(table: str) -> tuple[str, ...]:
    return IMAGE_HEADER if table == "Image" else object_header(table)


def check_outputs(out: str | os.PathLike) -> dict[str, Path]:
    """The four output paths, refusing any that exists and was not written by ``measure``.

    Raises:
        CellfluxError: ``out`` does not end in ``.csv``; an output is a folder; an existing output's
            first line is not exactly the header ``measure`` writes for it (naming the file).
    """
    out = Path(out)
    if out.suffix.lower() != ".csv":
        raise CellfluxError(f"{out}: give a FILE.csv path (the object tables are written beside it)")
    paths = output_paths(out)
    for table, path in paths.items():
        if path.is_dir():
            raise CellfluxError(f"{path} is a folder; measure writes a file there")
        if not path.exists():
            continue
        try:
            with open(path, newline="") as f:
                first = next(csv.reader(f), [])
        except (OSError, UnicodeDecodeError):
            first = []
        if tuple(first) != _header(table):
            raise CellfluxError(f"{path} exists and was not written by `cellfluxrl measure` (its header differs); "
                                f"choose another FILE.csv or move it away")
    return paths


def _text(value: float) -> str:
    """A metadata number as text: ``""`` when unknown (NaN), else Python's shortest repr."""
    return "" if math.isnan(value) else repr(float(value))


def _number(name: str, value: float) -> int | float:
    return int(value) if name in INTEGER_FEATURES else float(value)


def segmenter_for(dataset, name: str | None = None, cellpose_model: str | None = None):
    """The segmenter to measure with: ``name`` if given, else the one the dataset's reference
    statistics were measured with (so measurements and rewards agree), else the classical default."""
    from cellfluxrl.rewards.evaluators import build_segmenter, load_evaluators, segmenter_options

    if name is not None:
        return build_segmenter(name, segmenter_options(name, cellpose_model))
    if (Path(dataset.root) / "evaluators" / "reference_stats.json").is_file():
        return load_evaluators(dataset.root).make_segmenter()
    return build_segmenter("classical")


def _metadata(images, i: int) -> list[str]:
    return [str(images.plate[i]), str(images.well[i]), str(images.compound[i]), _text(images.dose[i]),
            str(images.moa[i]), str(images.kind[i]), str(images.source[i])]


def _object_rows(number: int, meta: list[str], compartment: str, measured) -> list[list]:
    table = measured.objects[compartment]
    columns = [table.features[f] for f in SHAPE_FEATURES]
    relations = [measured.relations[r] for r in RELATIONS[compartment]]
    x, y = table.features["Center_X"], table.features["Center_Y"]
    return [[number, int(label), *meta, float(x[k]), float(y[k]),
             *(_number(f, c[k]) for f, c in zip(SHAPE_FEATURES, columns)), *(int(r[k]) for r in relations)]
            for k, label in enumerate(table.labels)]


def check_set_names(names: Sequence[str]) -> None:
    """Refuse set names that :func:`named_sets` could not tell apart: none, repeated, empty or holding ``=``.

    Raises:
        CellfluxError: naming the first bad name.
    """
    if not names:
        raise CellfluxError("measurements: no image set to measure")
    for i, name in enumerate(names):
        if not name or "=" in name or name in names[:i]:
            what = "repeated" if name in names[:i] else "empty or holds '='"
            raise CellfluxError(f"measurements: the source name {name!r} is {what}; name each IMAGES as NAME=PATH "
                                f"with a NAME of its own")


def named_sets(sets: Sequence[tuple[str, ImageSet]]) -> ImageSet:
    """Several image sets as one, in order, so that one set of tables holds them all (``score --measurements``).

    Args:
        sets: ``(name, ImageSet)`` pairs (:class:`~cellfluxrl.evaluation.image_sources.ImageSet`), names
            unique and without ``=`` (``score``'s column names).

    Returns:
        An ``ImageSet`` of every image of every set (copied into one uint8 array) with its metadata;
        ``source`` is ``NAME=SOURCE`` (the set's name, then the image's own source, e.g.
        ``impa=impa.npz#3``), so ``Metadata_Source.split("=", 1)[0]`` tells the sets apart.

    Raises:
        CellfluxError: no set, a name repeated or holding ``=``, or sets of different image shapes.
    """
    from cellfluxrl.evaluation.image_sources import ImageSet

    check_set_names([name for name, _ in sets])
    shapes = {images.shape for _, images in sets}
    if len(shapes) > 1:
        raise CellfluxError(f"measurements: image sets of different shapes {sorted(shapes)} cannot share tables")

    def joined(key: str) -> np.ndarray:
        return np.concatenate([np.asarray(getattr(images, key)) for _, images in sets])

    source = np.concatenate([[f"{name}={s}" for s in images.source] for name, images in sets]).astype(str)
    pixels = np.concatenate([np.asarray(images.images[images.rows]) for _, images in sets])
    return ImageSet(pixels, np.arange(len(pixels), dtype=np.int64), joined("plate"), joined("well"),
                    joined("compound"), joined("moa"), joined("kind"), source, joined("dose").astype(np.float64),
                    ", ".join(images.origin for _, images in sets))


def write_measurements(images, dataset, out: str | os.PathLike, segmenter=None, batch_size: int = 64,
                       on_batch: Callable[[int], None] | None = None) -> dict[str, Path]:
    """Segment and measure ``images`` and write the Image and per-object tables.

    Args:
        images: an :class:`~cellfluxrl.evaluation.image_sources.ImageSet` (checked against ``dataset``).
        dataset: the loaded :class:`~cellfluxrl.data.layout.Dataset` the images belong to.
        out: ``FILE.csv``; the object tables go beside it (:func:`output_paths`).
        segmenter: a :class:`~cellfluxrl.rewards.segmentation.base.Segmenter` (``None``: :func:`segmenter_for`).
        batch_size: images segmented per call.
        on_batch: called with the number of images of each finished batch (progress).

    Returns:
        The written paths by table (``"Image"``, ``"Nuclei"``, ``"Cells"``, ``"Cytoplasm"``).

    Raises:
        CellfluxError: an output exists that ``measure`` did not write (nothing is written then).
    """
    from cellfluxrl.evaluation.image_sources import check_against
    from cellfluxrl.images import to_model

    paths = check_outputs(out)
    check_against(images, dataset)
    segmenter = segmenter if segmenter is not None else segmenter_for(dataset)
    folder = paths["Image"].absolute().parent
    folder.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(folder, [p.name for p in paths.values()])
    temps = {t: temp_path(p) for t, p in paths.items()}
    files = {t: open(p, "w", newline="") for t, p in temps.items()}
    try:
        writers = {t: csv.writer(f) for t, f in files.items()}
        for t, w in writers.items():
            w.writerow(_header(t))
        for start, batch in images.batches(batch_size):
            nuclei, cells = segmenter.segment(to_model(batch, dequantize=False).numpy())
            for j in range(len(batch)):
                i = start + j
                measured = measure_image(nuclei[j], cells[j])
                meta = _metadata(images, i)
                writers["Image"].writerow([i + 1, *meta, *(measured.count(c) for c in COMPARTMENTS)])
                for c in COMPARTMENTS:
                    writers[c].writerows(_object_rows(i + 1, meta, c, measured))
            if on_batch is not None:
                on_batch(len(batch))
        for f in files.values():
            f.close()
        for t, path in paths.items():
            temps[t].replace(path)
    except BaseException:
        for t, f in files.items():
            f.close()
            temps[t].unlink(missing_ok=True)
        raise
    return paths
