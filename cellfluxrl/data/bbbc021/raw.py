"""The raw Broad BBBC021 v1 images into the cellfluxrl layout (:func:`prepare_raw`).

Input: ``BBBC021_v1_image.csv``, ``_compound.csv``, ``_moa.csv`` and one 16-bit TIFF per channel
per field of view. Per plate: illumination correction, nucleus detection on DAPI, nucleus-centred
crops, robust scaling to uint8 (the image operations are in :mod:`cellfluxrl.data.bbbc021.fields`).
Every skip is counted in ``meta.json["skipped"]``.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from cellfluxrl.data.bbbc021.fields import (DECLUMP_H_PX, MIN_NUCLEUS_AREA_PX, NUCLEUS_SIGMA_PX, block_mean,
                                            crop_windows, detect_nuclei, field_scale, illumination_function,
                                            rescale_field, scale_to_uint8)
from cellfluxrl.data.bbbc021.tables import (CHANNELS_BBBC021, DMSO_SMILES, _blank, _canonical_moa, _check_plates,
                                            _ChunkBuffer, _CompoundTable, _csv_rows, _parse_dose)
from cellfluxrl.data.compound_names import canonical_compound, compound_key, is_control_name
from cellfluxrl.data.compounds import CONTROL
from cellfluxrl.data.fingerprints import EmbeddingTable, has_embedding_row, load_user_embeddings
from cellfluxrl.data.layout import DatasetWriter
from cellfluxrl.errors import CellfluxError
from cellfluxrl.progress import progress as progress_bar

log = logging.getLogger(__name__)

RAW_IMAGE_CSV = "BBBC021_v1_image.csv"
RAW_COMPOUND_CSV = "BBBC021_v1_compound.csv"
RAW_MOA_CSV = "BBBC021_v1_moa.csv"
RAW_CHANNEL_COLUMNS = ("Actin", "Tubulin", "DAPI")  # CSV suffixes, in CHANNELS_BBBC021 order
RAW_COLUMNS = (*(f"Image_{kind}Name_{ch}" for ch in RAW_CHANNEL_COLUMNS for kind in ("File", "Path")),
               "Image_Metadata_Plate_DAPI", "Image_Metadata_Well_DAPI",
               "Image_Metadata_Compound", "Image_Metadata_Concentration")
ILLUMINATION_SIGMA_FRACTION = 1 / 20  # Gaussian sigma of the illumination function / image width
ILLUMINATION_GRID_PX = 160  # fields are block-averaged to about this width for the per-plate median
PERCENTILES = (0.1, 99.9)  # corrected plate intensities at these percentiles map to 0 and 255
SAMPLES_PER_FIELD = 8192  # pixels per field and channel kept for the plate percentiles


@dataclass(frozen=True)
class _Field:
    """One field of view to crop: its three TIFFs (actin, tubulin, dna) and its metadata."""

    paths: tuple[Path, Path, Path]
    batch: str
    compound: str
    dose: float
    moa: str
    state: str
    field_id: str
    dapi_rel: str
    split: str = ""
    well: str = ""


def _resolve(raw_dir: Path, path_name: str, file_name: str, where: str) -> Path:
    """The TIFF named by a CSV row: ``DIR/<PathName>/<FileName>``, else ``DIR/<last part of PathName>/
    <FileName>`` (archives unzipped side by side), else ``DIR/<FileName>``."""
    path_name = path_name.replace("\\", "/").strip("/")
    candidates = [raw_dir / path_name / file_name, raw_dir / Path(path_name).name / file_name, raw_dir / file_name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise CellfluxError(f"{candidates[0]}: missing TIFF ({where})")


def _raw_batch(plate: str, path_name: str) -> str:
    """``<Week>_<plate>`` (IMPA's BATCH spelling) from the plate column and the DAPI path."""
    if plate.lower().startswith("week"):
        return plate
    week = next((p for p in re.split(r"[/\\]", path_name) if re.fullmatch(r"Week\d+", p, re.IGNORECASE)), None)
    return f"{week}_{plate}" if week else plate


def _raw_tables(raw_dir: Path) -> tuple[dict[str, tuple[str, str]], dict[tuple[str, float], str]]:
    """``({compound key: (smiles, where)}, {(compound key, concentration): moa})`` from the two small
    CSVs, keyed by :func:`~cellfluxrl.data.compound_names.compound_key` (any spelling matches)."""
    smiles = {}
    path = raw_dir / RAW_COMPOUND_CSV
    for line, row in _csv_rows(path, ("compound", "smiles")):
        smiles[compound_key(row["compound"])] = ("" if _blank(row["smiles"]) else row["smiles"],
                                                 f"{path} line {line}")
    moas = {}
    path = raw_dir / RAW_MOA_CSV
    for line, row in _csv_rows(path, ("compound", "concentration", "moa")):
        where = f"{path} line {line}"
        concentration = _parse_dose(row["concentration"], "concentration", where)
        moa = CONTROL if is_control_name(row["compound"]) else _canonical_moa(row["moa"], where)
        moas[(compound_key(row["compound"]), round(concentration, 9))] = moa
    return smiles, moas


def _raw_fields(raw_dir: Path, user: EmbeddingTable | None) -> tuple[list[_Field], _CompoundTable, Counter]:
    """The MoA-annotated fields with SMILES or an embedding row (plus all DMSO fields), their
    compounds and skip counts."""
    smiles_of, moa_of = _raw_tables(raw_dir)
    table, skipped, fields = _CompoundTable(user), Counter(), []
    path = raw_dir / RAW_IMAGE_CSV
    for line, row in _csv_rows(path, RAW_COLUMNS):
        where = f"{path} line {line}"
        name = row["Image_Metadata_Compound"]
        compound, key = canonical_compound(name), compound_key(name)
        dose = _parse_dose(row["Image_Metadata_Concentration"], "Image_Metadata_Concentration", where)
        if is_control_name(compound):
            moa, state, dose = CONTROL, "control", 0.0
            smiles = smiles_of.get(key, ("", ""))[0] or DMSO_SMILES
        else:
            moa, state = moa_of.get((key, round(dose, 9))), "treated"
            smiles = smiles_of.get(key, ("", ""))[0]
            if moa is None:
                skipped["fields_not_moa_annotated"] += 1
                continue
            if not smiles and not has_embedding_row(compound, user):
                skipped["fields_without_smiles"] += 1  # ... and without an embedding row
                continue
        compound = table.add(compound, moa, smiles, smiles_of.get(key, ("", where))[1] or where)
        paths = tuple(_resolve(raw_dir, row[f"Image_PathName_{ch}"], row[f"Image_FileName_{ch}"], where)
                      for ch in RAW_CHANNEL_COLUMNS)
        batch = _raw_batch(row["Image_Metadata_Plate_DAPI"], row["Image_PathName_DAPI"])
        site = re.search(r"_s(\d+)", row["Image_FileName_DAPI"])
        field_id = f"{batch}_{row['Image_Metadata_Well_DAPI']}_s{site.group(1) if site else line}"
        fields.append(_Field(paths, batch, compound, dose, moa, state, field_id,
                             paths[2].relative_to(raw_dir).as_posix(), well=row["Image_Metadata_Well_DAPI"]))
    if not fields:
        raise CellfluxError(f"{path}: no MoA-annotated fields with SMILES or an embedding row "
                            f"(or DMSO controls) to crop")
    return fields, table, skipped


def split_fields(keys: list[tuple[str, str]], test_fraction: float, seed: int) -> list[str]:
    """Assign each field of view to train or test, stratified by ``(plate, state)``.

    Within each group of ``n`` fields, ``round(test_fraction * n)`` fields drawn with ``seed`` go to
    test, clipped to ``[1, n - 1]`` when ``n >= 2`` (so every plate keeps controls, and treated
    fields when it has two or more, in both splits); a lone field goes to train.

    Args:
        keys: ``(plate, state)`` of each field.
        test_fraction: fraction of fields in test, in ``(0, 1)``.
        seed: seed of the draw.

    Returns:
        ``"train"``/``"test"`` per field, in input order.
    """
    rng = np.random.default_rng(seed)
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    splits = ["train"] * len(keys)
    for key in sorted(groups):
        members = np.asarray(groups[key])
        n = members.size
        n_test = int(np.clip(round(test_fraction * n), 1, n - 1)) if n >= 2 else 0
        for i in rng.permutation(members)[:n_test]:
            splits[int(i)] = "test"
    return splits


def split_units(fields: list[_Field]) -> list[tuple[str, str, str]]:
    """What the train/test split deals whole, per field: ``(plate, state, well)``, or ``(plate, state,
    field)`` when the plate has a single well of that state (a plate with one DMSO well shares it
    between the splits by field, or it could not be paired in both)."""
    wells: dict[tuple[str, str], set[str]] = defaultdict(set)
    for f in fields:
        wells[(f.batch, f.state)].add(f.well)
    return [(f.batch, f.state, f.well if f.well and len(wells[(f.batch, f.state)]) > 1 else f.field_id)
            for f in fields]


def _read_tiff(path: Path) -> np.ndarray:
    """One grayscale TIFF (or PNG, for ``prepare images``) plane -> float32 ``(H, W)`` in its stored
    units (8- or 16-bit counts)."""
    try:
        if path.suffix.lower() == ".png":
            from PIL import Image

            with Image.open(path) as png:
                image = np.asarray(png)
        else:
            import tifffile

            image = tifffile.imread(path)
    except Exception as exc:  # tifffile raises many types (ValueError, TiffFileError, OSError) for damage
        kind = "PNG" if path.suffix.lower() == ".png" else "TIFF"
        raise CellfluxError(f"{path}: corrupt or truncated {kind} ({type(exc).__name__}: {exc})") from None
    image = np.squeeze(image)
    if image.ndim != 2:
        raise CellfluxError(f"{path}: expected one grayscale plane, found shape {image.shape}")
    return image.astype(np.float32)


def _read_field(field: _Field, shape: tuple[int, int] | None) -> np.ndarray:
    """float32 ``(3, H, W)`` (actin, tubulin, dna) of one field; all planes must share ``shape``."""
    planes = [_read_tiff(p) for p in field.paths]
    for p, plane in zip(field.paths, planes):
        if plane.shape != (shape or planes[0].shape):
            raise CellfluxError(f"{p}: shape {plane.shape}, but the plate's other fields are {shape or planes[0].shape}")
    return np.stack(planes)


def _plate_statistics(fields: list[_Field], bar) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Illumination functions ``(3, H, W)`` and percentile ranges ``lo, hi`` ``(3,)`` of one plate.

    One pass over the plate's fields. The illumination function is the per-pixel median over the
    fields (robust to the nuclei themselves, which dominate a mean when a plate has few fields),
    computed on fields block-averaged to about :data:`ILLUMINATION_GRID_PX` px wide (it is smooth
    anyway), smoothed with sigma = width / 20 and resized back. Memory: about 0.25 MB per field of
    the plate, never the full-resolution fields. The percentiles come from a fixed pseudo-random
    sample of raw pixels per field, divided by the illumination function afterwards.
    """
    from skimage.transform import resize

    smalls, samples, shape, index, factor = [], [], None, None, 1
    for field in fields:
        image = _read_field(field, shape)
        if shape is None:
            shape = image.shape[1:]
            n_px, factor = shape[0] * shape[1], max(1, shape[1] // ILLUMINATION_GRID_PX)
            index = np.random.default_rng(0).choice(n_px, size=min(SAMPLES_PER_FIELD, n_px), replace=False)
        smalls.append(block_mean(image, factor).astype(np.float32))
        samples.append(image.reshape(3, -1)[:, index])
        bar.update(1)
    median = np.median(np.stack(smalls), axis=0)
    sigma_px = ILLUMINATION_SIGMA_FRACTION * shape[1] / factor
    illumination = np.stack([resize(illumination_function(median[c], sigma_px), shape, order=1, mode="edge")
                             for c in range(3)])
    illumination = np.maximum(illumination / illumination.mean(axis=(1, 2), keepdims=True), 1e-3).astype(np.float32)
    at_samples = illumination.reshape(3, -1)[:, index]
    corrected = np.concatenate([s / at_samples for s in samples], axis=1)
    lo, hi = np.percentile(corrected, PERCENTILES, axis=1)
    return illumination, lo.astype(np.float32), np.maximum(hi, lo + 1e-3).astype(np.float32)


def _crop_field(field: _Field, illumination: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                crop_size: int, skipped: Counter, scale: float = 1.0) -> Iterator[tuple[np.ndarray, dict]]:
    """Yield ``(uint8 (crop_size, crop_size, 3) crop, metadata row)`` for every nucleus of a field,
    after resizing the corrected field by ``scale``; the row's ``source`` gives the crop centre in
    the pixels of the original field."""
    corrected = rescale_field(_read_field(field, illumination.shape[1:]) / illumination, scale)
    centroids = detect_nuclei(corrected[2])
    corners = crop_windows(centroids, corrected.shape[1:], crop_size)
    skipped["crops_leaving_field"] += len(centroids) - len(corners)
    image = np.moveaxis(corrected, 0, -1)  # (H, W, 3)
    for k, (r, c) in enumerate(corners, start=1):
        crop = scale_to_uint8(image[r:r + crop_size, c:c + crop_size], lo, hi)
        centre = (round((r + crop_size // 2) / scale), round((c + crop_size // 2) / scale))
        yield crop, {"id": f"{field.field_id}_{k}", "split": field.split, "batch": field.batch,
                     "compound": field.compound, "dose": field.dose, "moa": field.moa, "state": field.state,
                     "source": f"{field.dapi_rel}@{centre[0]},{centre[1]}", "well": field.well}


def prepare_raw(raw_dir: str | os.PathLike, out: str | os.PathLike, seed: int = 0, progress: bool = True,
                crop_size: int = 96, test_fraction: float = 0.2,
                embeddings: str | os.PathLike | None = None, pixel_size_um: float | None = None,
                scale: float | None = None) -> Path:
    """Crop single cells from the raw Broad BBBC021 v1 images into a cellfluxrl dataset at ``out``.

    Input layout: ``DIR/BBBC021_v1_image.csv`` (one row per field of view: ``Image_FileName_*`` and
    ``Image_PathName_*`` for DAPI, Tubulin and Actin, ``Image_Metadata_Plate_DAPI``,
    ``Image_Metadata_Well_DAPI``, ``Image_Metadata_Compound``, ``Image_Metadata_Concentration``),
    ``DIR/BBBC021_v1_compound.csv`` (compound, smiles), ``DIR/BBBC021_v1_moa.csv`` (compound,
    concentration, moa) and the TIFFs at ``DIR/<PathName>/<FileName>`` (or ``DIR/<last folder of
    PathName>/<FileName>``, or ``DIR/<FileName>``).

    Pipeline, per plate: illumination function per channel = per-pixel median of the plate's
    fields (block-averaged to about 160 px wide) smoothed with a Gaussian of sigma = width / 20,
    normalised to mean 1, divided out; the corrected field resized to BBBC021's pixel size when
    ``pixel_size_um`` or ``scale`` is given; nuclei = Otsu foreground of the smoothed corrected
    DAPI, touching nuclei split (distance-transform watershed, h = 2 px), objects of at least
    20 px^2, centroids;
    ``crop_size`` crops centred on each centroid (crops that leave the field are skipped and
    counted); intensities scaled per plate and channel so the 0.1 and 99.9 percentiles of the
    corrected plate map to 0 and 255 (clipped). Channels (actin, tubulin, dna).

    Decisions:
        - Fields whose (compound, concentration) is not in the MoA table are skipped (not
          annotated), except DMSO (kept as controls); compounds with neither SMILES nor a row in the
          embeddings (the user's CSV if given, else CellFlux's shipped table) are skipped (why
          CellFlux has 34 of the 38 MoA compounds). Both counted in ``meta.json["skipped"]``.
        - The split is drawn per well with ``seed`` (the crops of one well's fields never straddle
          splits), stratified by plate and state (:func:`split_fields` on the wells; a plate with
          a single well of a state deals that well's fields instead, :func:`split_units`); the
          validation split is dealt from the train wells (:mod:`cellfluxrl.data.splits`). Every
          crop records its plate and well.
        - Batch = ``<Week>_<plate>`` like IMPA's ``BATCH``; a plate with treated images but no DMSO
          controls in a split, or a split without treated images, is an error naming it.
        - A missing, corrupt or truncated TIFF, or one whose shape differs from its plate's, is an
          error naming the file (a field is a large share of a plate's cells; no silent skips).

    Args:
        raw_dir: the raw BBBC021 folder.
        out: the dataset folder to create (must not exist or be empty).
        seed: seed of the train/test split.
        progress: draw a tqdm progress bar on stderr (two steps per field: statistics, crops).
        crop_size: crop side (px); 96 as CellFlux.
        test_fraction: fraction of fields of view in the test split, in (0, 1).
        embeddings: a user's embeddings CSV, used instead of SMILES and the shipped table; every
            kept compound with SMILES (and DMSO) needs a row. None: the default embeddings.
        pixel_size_um: microns per pixel of the images, when not BBBC021's (0.325 um/px): fields
            are resized by ``pixel_size_um / 0.325`` before nuclei are detected, so a ``crop_size``
            crop holds the field of view of a BBBC021 crop.
        scale: the resize factor itself, instead of ``pixel_size_um`` (e.g. 0.5 for images at
            twice BBBC021's magnification).

    Returns:
        The dataset folder.

    Raises:
        CellfluxError: any of the problems above, as one line naming the file (and CSV line); a
            pixel size or scale that is not a positive finite number, or both given.
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise CellfluxError(f"raw BBBC021 folder {raw_dir} does not exist")
    if not 0 < test_fraction < 1 or crop_size < 8:
        raise CellfluxError(f"need 0 < test_fraction < 1 and crop_size >= 8, got {test_fraction} and {crop_size}")
    factor = field_scale(pixel_size_um, scale)
    fields, table, skipped = _raw_fields(raw_dir, load_user_embeddings(embeddings))
    units = split_units(fields)
    keys = sorted(set(units))
    unit_split = dict(zip(keys, split_fields([(b, st) for b, st, _ in keys], test_fraction, seed)))
    fields = [_Field(**{**f.__dict__, "split": unit_split[u]}) for f, u in zip(fields, units)]
    counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for f in fields:
        counts[(f.split, f.batch)][f.state] += 1
    _check_plates(counts, str(raw_dir / RAW_IMAGE_CSV))
    plates: dict[str, list[_Field]] = defaultdict(list)
    for f in fields:
        plates[f.batch].append(f)
    ranges = {}
    with DatasetWriter(out, crop_size, CHANNELS_BBBC021, "bbbc021-raw") as writer, \
            progress_bar(total=2 * len(fields), disable=not progress, desc="bbbc021 (raw)", unit="field",
                 leave=False) as bar:
        buffer = _ChunkBuffer(writer)
        for batch, plate_fields in plates.items():
            illumination, lo, hi = _plate_statistics(plate_fields, bar)
            ranges[batch] = {"lo": lo.tolist(), "hi": hi.tolist()}
            for field in plate_fields:
                for crop, row in _crop_field(field, illumination, lo, hi, crop_size, skipped, factor):
                    buffer.add(crop, row)
                bar.update(1)
        buffer.flush()
        _check_plates(buffer.counts, f"{raw_dir} (after cropping)")
        conditions, embeddings = table.conditions(buffer.compounds)
        log.info("cropped %d cells from %d fields; skipped %s", writer.n_images, len(fields), dict(skipped))
        extra = {"skipped": dict(skipped), "preparation": {
            "raw_dir": str(raw_dir.resolve()), "seed": seed, "test_fraction": test_fraction,
            "embeddings_csv": str(Path(table.user.path).resolve()) if table.user else None,
            "crop_size": crop_size, "n_fields": len(fields), "nucleus_sigma_px": NUCLEUS_SIGMA_PX,
            "pixel_size_um": pixel_size_um, "scale": factor, "declump_h_px": DECLUMP_H_PX,
            "min_nucleus_area_px": MIN_NUCLEUS_AREA_PX, "illumination_sigma_fraction": ILLUMINATION_SIGMA_FRACTION,
            "percentiles": list(PERCENTILES), "intensity_ranges": ranges}}
        return writer.finish(conditions, embeddings, extra_meta=extra, val_seed=seed)
