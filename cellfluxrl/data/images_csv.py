"""A user's own plates into the cellfluxrl layout (:func:`prepare_images`, ``cellfluxrl prepare images``).

Input: one comma-separated UTF-8 CSV, one row per field of view (or per ready-cut crop), with the
columns below (every column, value and rule is in ``docs/data.md``)

=============  ==================================================================================
``actin``      image file of the actin (phalloidin) channel: TIFF or PNG, one 8- or 16-bit
``tubulin``    grayscale plane; the tubulin channel; paths relative to the CSV's folder or absolute
``dna``        the DNA (DAPI/Hoechst) channel, on which nuclei are found
``compound``   compound name, any case (``Taxol`` is the table's ``taxol``); controls: anything,
               stored as ``DMSO``; a treated row may not name DMSO
``dose``       concentration (a number >= 0, any unit; controls may leave it empty = 0)
``plate``      plate (batch) name, not empty; every plate needs controls in each split
``well``       well name (e.g. ``B02``), not empty; the train/test split is drawn per (plate, well)
``control``    ``1``/``true``/``yes`` for a DMSO (vehicle) control, ``0``/``false``/``no`` otherwise
``smiles``     optional; else the compound's SMILES or row in the shipped BBBC021 table
``moa``        optional; one of the 12 BBBC021 MoAs (the MoA reward and classifier know only these);
               else the compound's MoA in the shipped BBBC021 table
=============  ==================================================================================

Fields (images larger than the crop size) go through the raw-BBBC021 pipeline unchanged
(:mod:`cellfluxrl.data.bbbc021.raw`): per-plate illumination correction, nucleus detection on the
DNA channel, nucleus-centred crops, per-plate percentile scaling to uint8. Images exactly the crop
size are taken whole as crops (per-plate percentile scaling only); one plate holds one kind.
The well is kept in each crop's ``well`` column, ``id`` (``PLATE_WELL_lLINE_K``) and ``source``
(``PLATE/WELL/<dna file>@row,col``); the validation split is dealt from the train wells
(:mod:`cellfluxrl.data.splits`).

Every problem is a one-line :class:`CellfluxError` naming the CSV line before any pixel is cropped:
a file that is not UTF-8 or not comma-separated (:mod:`cellfluxrl.data.csv_input`), an empty plate
or well, a negative dose, a treated row naming DMSO, a missing or unreadable file, a colour or
multi-plane image, a bit depth other than 8 or 16 bit or one that differs within the plate,
channels of different shapes, a field listed twice (the same file contents as another row,
:mod:`cellfluxrl.data.duplicates`), a compound that cannot be embedded (no SMILES, no row in the
embeddings) or has no known MoA, a plate without controls.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cellfluxrl.data.bbbc021.fields import field_scale, scale_to_uint8
from cellfluxrl.data.bbbc021.raw import (_crop_field, _Field, _plate_statistics, _read_field, split_fields,
                                         DECLUMP_H_PX, ILLUMINATION_SIGMA_FRACTION, MIN_NUCLEUS_AREA_PX,
                                         NUCLEUS_SIGMA_PX, PERCENTILES)
from cellfluxrl.data.bbbc021.tables import (CHANNELS_BBBC021, DMSO_SMILES, _blank, _canonical_moa, _check_plates,
                                            _ChunkBuffer, _CompoundTable, _csv_rows, _parse_dose)
from cellfluxrl.data.compound_names import is_control_name, known_compound, tidy_name
from cellfluxrl.data.compounds import CONTROL
from cellfluxrl.data.csv_input import read_header
from cellfluxrl.data.duplicates import field_digest
from cellfluxrl.data.fingerprints import load_user_embeddings
from cellfluxrl.data.layout import DatasetWriter
from cellfluxrl.errors import CellfluxError
from cellfluxrl.progress import progress as progress_bar

REQUIRED = (*CHANNELS_BBBC021, "compound", "dose", "plate", "well", "control")
OPTIONAL = ("smiles", "moa")
TRUE, FALSE = ("1", "true", "yes", "y", "t"), ("0", "false", "no", "n", "f")
BIT_DEPTHS = {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}


@dataclass(frozen=True)
class PlaneInfo:
    """What a file's header says: ``shape`` (H, W) of its one grayscale plane and its bits per pixel."""

    shape: tuple[int, int]
    bits: int


def _png_header(path: Path, where: str) -> PlaneInfo:
    """Shape and bit depth from a PNG's IHDR chunk (no pixels decoded)."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise CellfluxError(f"{where}: {path} is not a readable PNG")
    width, height = struct.unpack(">II", head[16:24])
    bits, colour = head[24], head[25]
    if colour != 0:
        kind = {2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}.get(colour, f"colour type {colour}")
        raise CellfluxError(f"{where}: {path} is a {kind} PNG; give one grayscale image per channel")
    return PlaneInfo((height, width), int(bits))


def _tiff_header(path: Path, where: str) -> PlaneInfo:
    """Shape and bit depth from a TIFF's first series (no pixels decoded)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, dtype = tuple(s for s in series.shape if s != 1), np.dtype(series.dtype)
    except Exception as exc:  # tifffile raises many types for a damaged file
        raise CellfluxError(f"{where}: {path} is not a readable TIFF ({type(exc).__name__})") from None
    if len(shape) != 2:
        raise CellfluxError(f"{where}: {path} has shape {shape}; give one grayscale plane per channel file")
    if dtype not in BIT_DEPTHS:
        raise CellfluxError(f"{where}: {path} is {dtype} data; expected 8- or 16-bit unsigned integers")
    return PlaneInfo(shape, BIT_DEPTHS[dtype])


def plane_info(path: Path, where: str) -> PlaneInfo:
    """Check one channel file exists and is one 8- or 16-bit grayscale plane (TIFF or PNG)."""
    if not path.is_file():
        raise CellfluxError(f"{where}: {path} is {'a folder' if path.is_dir() else 'missing'}")
    if path.suffix.lower() == ".png":
        info = _png_header(path, where)
    elif path.suffix.lower() in (".tif", ".tiff"):
        info = _tiff_header(path, where)
    else:
        raise CellfluxError(f"{where}: {path} is neither TIFF (.tif, .tiff) nor PNG")
    if info.bits not in (8, 16):
        raise CellfluxError(f"{where}: {path} has {info.bits}-bit pixels; expected 8 or 16 bit")
    return info


def _is_control(value: str, where: str) -> bool:
    text = value.strip().lower()
    if text in TRUE or text in FALSE:
        return text in TRUE
    raise CellfluxError(f"{where}: control {value!r} is not one of 1/0, true/false, yes/no")


def _moa_and_smiles(compound: str, moa: str, smiles: str, where: str) -> tuple[str, str]:
    """The row's MoA (its own, else the shipped table's) and SMILES (its own, else the table's); the
    table is searched in any spelling of the name (:func:`~cellfluxrl.data.compound_names.compound_key`)."""
    known = known_compound(compound)
    if _blank(moa):
        if known is None or known.moa == CONTROL:
            raise CellfluxError(f"{where}: compound {compound!r} has no MoA; give it one in the moa column "
                                f"(one of the 12 BBBC021 MoAs)")
        moa = known.moa
    smiles = "" if _blank(smiles) else smiles
    if not smiles and known is not None:
        smiles = known.smiles
    return _canonical_moa(moa, where), smiles


@dataclass(frozen=True)
class _Row:
    """One checked CSV row: the field to crop, its well and whether it is a ready-cut crop."""

    field: _Field
    well: str
    crop: bool


def _row_condition(row: dict[str, str], where: str) -> tuple[bool, str, float, str, str]:
    """Check a row's plate, well, control flag, dose and compound.

    Returns:
        ``(control, compound, dose, moa, smiles)``; ``compound`` as the row spells it (``DMSO`` for
        controls), ``dose`` a float >= 0.
    """
    for column in ("plate", "well"):
        if _blank(row[column]):
            raise CellfluxError(f"{where}: empty {column}; every row needs its {column} (the train/test split is "
                                f"drawn per plate and well)")
    control = _is_control(row["control"], where)
    dose = 0.0 if control and _blank(row["dose"]) else _parse_dose(row["dose"], "dose", where)
    if control:
        return True, CONTROL, dose, CONTROL, DMSO_SMILES
    compound = tidy_name(row["compound"])
    if _blank(compound):
        raise CellfluxError(f"{where}: empty compound in a row that is not a control")
    if is_control_name(compound):
        raise CellfluxError(f"{where}: compound {compound!r} is the vehicle control, but the row has control="
                            f"{row['control']!r}; set control=1 on DMSO rows (control=0 marks a treated row)")
    moa, smiles = _moa_and_smiles(compound, row.get("moa", ""), row.get("smiles", ""), where)
    return False, compound, dose, moa, smiles


def _row_planes(row: dict[str, str], root: Path, where: str) -> tuple[tuple[Path, ...], PlaneInfo]:
    """The row's channel files (relative to ``root`` unless absolute) and their common shape and depth."""
    paths = tuple(Path(row[ch]) if Path(row[ch]).is_absolute() else root / row[ch] for ch in CHANNELS_BBBC021)
    infos = [plane_info(p, f"{where}, {ch}") for p, ch in zip(paths, CHANNELS_BBBC021)]
    if len({i.shape for i in infos}) > 1 or len({i.bits for i in infos}) > 1:
        raise CellfluxError(f"{where}: channels differ: " + ", ".join(
            f"{ch} {i.shape[0]}x{i.shape[1]} {i.bits}-bit" for ch, i in zip(CHANNELS_BBBC021, infos)))
    return paths, infos[0]


def read_rows(csv_path: Path, crop_size: int, factor: float, user) -> tuple[list[_Row], _CompoundTable]:
    """Check every row of the images CSV (files, shapes, bit depths, compounds, repeats) before any cropping.

    A row whose three files hold the same bytes as an earlier row's (:func:`field_digest`, whatever
    the file names) is refused, naming both lines: the same field listed twice.

    Returns:
        The rows (split still unset) and the compound table (embeddings resolved).
    """
    root, table, rows = csv_path.parent, _CompoundTable(user), []
    plates: dict[str, tuple[PlaneInfo, bool, str]] = {}
    seen: dict[bytes, int] = {}
    present = read_header(csv_path, REQUIRED)
    columns = REQUIRED + tuple(c for c in OPTIONAL if c in present)
    for line, row in _csv_rows(csv_path, columns):
        where = f"{csv_path} line {line}"
        control, compound, dose, moa, smiles = _row_condition(row, where)
        compound = table.add(compound, moa, smiles, where)
        paths, info = _row_planes(row, root, where)
        first = seen.setdefault(field_digest(paths), line)
        if first != line:
            raise CellfluxError(f"{where}: the same images as line {first} (identical actin, tubulin and dna file "
                                f"contents); a field listed twice would repeat its cells, maybe in both train and "
                                f"test: remove one of the two rows")
        plate = row["plate"]
        is_crop = info.shape == (crop_size, crop_size) and factor == 1.0
        if min(info.shape) * factor < crop_size:
            raise CellfluxError(f"{where}: images of {info.shape[0]}x{info.shape[1]} px are smaller than a "
                                f"{crop_size} px crop")
        first_info = plates.setdefault(plate, (info, is_crop, where))
        if (first_info[0], first_info[1]) != (info, is_crop):
            old = first_info[0]
            raise CellfluxError(f"{where}: {info.shape[0]}x{info.shape[1]} px {info.bits}-bit images, but plate "
                                f"{plate!r} has {old.shape[0]}x{old.shape[1]} px {old.bits}-bit ones at {first_info[2]}")
        dna_rel = paths[2].relative_to(root).as_posix() if paths[2].is_relative_to(root) else str(paths[2])
        field = _Field(paths, plate, compound, dose, moa, "control" if control else "treated",
                       f"{plate}_{row['well']}_l{line}", f"{plate}/{row['well']}/{dna_rel}", well=row["well"])
        rows.append(_Row(field, row["well"], is_crop))
    if not rows:
        raise CellfluxError(f"{csv_path}: no rows")
    check_controls(rows, csv_path)
    return rows, table


def check_controls(rows: list[_Row], csv_path: Path) -> None:
    """Every plate with treated rows has control rows (else one line naming its first treated row)."""
    with_controls = {r.field.batch for r in rows if r.field.state == "control"}
    for r in rows:
        if r.field.batch not in with_controls:
            line = r.field.field_id.rsplit("_l", 1)[1]
            raise CellfluxError(f"{csv_path} line {line}: plate {r.field.batch!r} has no control rows (control=1); "
                                f"every plate needs DMSO controls to pair its treated images with")


def split_by_well(rows: list[_Row], test_fraction: float, seed: int) -> list[_Row]:
    """Draw the split per (plate, well), stratified by (plate, state), so a well's fields share a side."""
    wells = list(dict.fromkeys((r.field.batch, r.well) for r in rows))
    state = {}
    for r in rows:
        state.setdefault((r.field.batch, r.well), r.field.state)
    splits = dict(zip(wells, split_fields([(p, state[(p, w)]) for p, w in wells], test_fraction, seed)))
    return [replace(r, field=replace(r.field, split=splits[(r.field.batch, r.well)])) for r in rows]


def _crop_ranges(fields: list[_Field], bar) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``lo, hi`` (float32 ``(3,)``) at :data:`PERCENTILES` of a crop plate's pixels."""
    pixels = []
    for field in fields:
        pixels.append(_read_field(field, None).reshape(3, -1))
        bar.update(1)
    lo, hi = np.percentile(np.concatenate(pixels, axis=1), PERCENTILES, axis=1)
    return lo.astype(np.float32), np.maximum(hi, lo + 1e-3).astype(np.float32)


def _whole_crop(field: _Field, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, dict]:
    """A ready-cut crop scaled to uint8 ``(S, S, 3)`` and its metadata row."""
    image = np.moveaxis(_read_field(field, None), 0, -1)
    return scale_to_uint8(image, lo, hi), {
        "id": f"{field.field_id}_1", "split": field.split, "batch": field.batch, "compound": field.compound,
        "dose": field.dose, "moa": field.moa, "state": field.state, "source": field.dapi_rel, "well": field.well}


def file_digest(path: Path) -> str:
    """SHA-256 of a file (the CSV), so ``prepare`` run again notices an edited CSV."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def images_settings(csv_path: str | os.PathLike, seed: int, crop_size: int, factor: float,
                    embeddings: str | os.PathLike | None) -> dict:
    """The settings ``meta.json["preparation"]`` records and a resumed ``prepare images`` compares."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        what = "a folder" if csv_path.is_dir() else "missing"
        raise CellfluxError(f"--csv {csv_path}: {what}; give the images CSV file")
    return {"images_csv": str(csv_path.resolve()), "csv_sha256": file_digest(csv_path), "seed": seed,
            "crop_size": crop_size, "scale": factor,
            "embeddings_csv": None if embeddings is None else str(Path(embeddings).resolve())}


def prepare_images(csv_path: str | os.PathLike, out: str | os.PathLike, seed: int = 0, progress: bool = True,
                   crop_size: int = 96, test_fraction: float = 0.2, embeddings: str | os.PathLike | None = None,
                   pixel_size_um: float | None = None, scale: float | None = None) -> Path:
    """Build a dataset at ``out`` from the images CSV (layout in the module docstring).

    Args:
        csv_path: the images CSV.
        out: the dataset folder to create (must not exist or be empty).
        seed: seed of the train/test split (drawn per plate and well).
        progress: draw a progress bar on stderr.
        crop_size: crop side (px); 96 as CellFlux.
        test_fraction: fraction of wells in the test split, in (0, 1).
        embeddings: a user's embeddings CSV (every compound and DMSO need a row), else SMILES or
            CellFlux's shipped rows.
        pixel_size_um, scale: resize fields to BBBC021's pixel size (as ``prepare bbbc021 --raw``).

    Returns:
        The dataset folder.
    """
    csv_path = Path(csv_path)
    factor = field_scale(pixel_size_um, scale)
    settings = images_settings(csv_path, seed, crop_size, factor, embeddings)
    rows, table = read_rows(csv_path, crop_size, factor, load_user_embeddings(embeddings))
    rows = split_by_well(rows, test_fraction, seed)
    counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for r in rows:
        counts[(r.field.split, r.field.batch)][r.field.state] += 1
    _check_plates(counts, str(csv_path))
    plates: dict[str, list[_Row]] = defaultdict(list)
    for r in rows:
        plates[r.field.batch].append(r)
    skipped, ranges = Counter(), {}
    with DatasetWriter(out, crop_size, CHANNELS_BBBC021, "images") as writer, \
            progress_bar(total=2 * len(rows), disable=not progress, desc="images", unit="field", leave=False) as bar:
        buffer = _ChunkBuffer(writer)
        for plate, plate_rows in plates.items():
            fields = [r.field for r in plate_rows]
            if plate_rows[0].crop:
                lo, hi = _crop_ranges(fields, bar)
                for field in fields:
                    buffer.add(*_whole_crop(field, lo, hi))
                    bar.update(1)
            else:
                illumination, lo, hi = _plate_statistics(fields, bar)
                for field in fields:
                    for crop, row in _crop_field(field, illumination, lo, hi, crop_size, skipped, factor):
                        buffer.add(crop, row)
                    bar.update(1)
            ranges[plate] = {"lo": lo.tolist(), "hi": hi.tolist()}
        buffer.flush()
        _check_plates(buffer.counts, f"{csv_path} (after cropping)")
        conditions, vectors = table.conditions(buffer.compounds)
        extra = {"skipped": dict(skipped), "preparation": {
            **settings, "test_fraction": test_fraction, "n_fields": len(rows), "pixel_size_um": pixel_size_um,
            "nucleus_sigma_px": NUCLEUS_SIGMA_PX, "declump_h_px": DECLUMP_H_PX,
            "min_nucleus_area_px": MIN_NUCLEUS_AREA_PX, "illumination_sigma_fraction": ILLUMINATION_SIGMA_FRACTION,
            "percentiles": list(PERCENTILES), "intensity_ranges": ranges}}
        return writer.finish(conditions, vectors, extra_meta=extra, val_seed=seed)
