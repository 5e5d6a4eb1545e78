"""Real BBBC021 into the cellfluxrl layout: from the IMPA/CellFlux crops or the raw Broad images.

Two entry points, both streaming into a :class:`~cellfluxrl.data.layout.DatasetWriter` (built in a
hidden temporary sibling of ``out`` and renamed into place only when complete), with channels
(actin, tubulin, dna) and one conditions row per compound that appears (DMSO included), embedded
as CellFlux does (:func:`~cellfluxrl.data.fingerprints.resolve_embedding`): RDKit's hashed Morgan
count fingerprint of its SMILES, else its row of CellFlux's shipped BBBC021 table (or, for every
compound, its row of a user's embeddings CSV given as ``embeddings=``):

- :func:`prepare_impa`: the IMPA reproducibility layout that CellFlux trains on (``metadata/
  bbbc021_df_all.csv`` plus one uint8 ``(96, 96, 3)`` ``.npy`` per cell).
- :func:`prepare_raw`: the Broad BBBC021 v1 release (``BBBC021_v1_image.csv``, ``_compound.csv``,
  ``_moa.csv`` and one 16-bit TIFF per channel per field of view): per-plate illumination
  correction, nucleus detection on DAPI, nucleus-centred crops, robust scaling to uint8.

Every problem a user can cause is a one-line :class:`~cellfluxrl.errors.CellfluxError` naming the
file and CSV line; the only silent-but-counted skips are listed in each function's docstring and
recorded under ``"skipped"`` in ``meta.json``.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from cellfluxrl.data.compounds import CONTROL, MOAS, OOD_COMPOUNDS
from cellfluxrl.data.fingerprints import EmbeddingTable, has_embedding_row, load_user_embeddings, resolve_embedding
from cellfluxrl.data.layout import SPLITS, DatasetWriter
from cellfluxrl.data.raw_fields import DECLUMP_H_PX, field_scale, rescale_field, split_touching
from cellfluxrl.errors import CellfluxError, finite_float
from cellfluxrl.progress import progress as progress_bar

log = logging.getLogger(__name__)

# = cellfluxrl.images.CHANNELS_BBBC021, spelled out so `prepare` does not import torch (tested equal).
CHANNELS_BBBC021 = ("actin", "tubulin", "dna")
DMSO_SMILES = "CS(C)=O"
MAX_BAD_FRACTION = 0.01  # IMPA: more missing/corrupt crops than this fraction is an error
CHUNK_IMAGES = 512  # images per DatasetWriter.add call (peak memory does not grow with N)

IMPA_CSV = Path("metadata") / "bbbc021_df_all.csv"
IMPA_COLUMNS = ("SAMPLE_KEY", "BATCH", "CPD_NAME", "SMILES", "DOSE", "ANNOT", "STATE", "SPLIT")
_TREATED = {"1", "1.0", "trt", "treated", "true"}
_CONTROL = {"0", "0.0", "control", "ctrl", "false"}

RAW_IMAGE_CSV = "BBBC021_v1_image.csv"
RAW_COMPOUND_CSV = "BBBC021_v1_compound.csv"
RAW_MOA_CSV = "BBBC021_v1_moa.csv"
RAW_CHANNEL_COLUMNS = ("Actin", "Tubulin", "DAPI")  # CSV suffixes, in CHANNELS_BBBC021 order
RAW_COLUMNS = (*(f"Image_{kind}Name_{ch}" for ch in RAW_CHANNEL_COLUMNS for kind in ("File", "Path")),
               "Image_Metadata_Plate_DAPI", "Image_Metadata_Well_DAPI",
               "Image_Metadata_Compound", "Image_Metadata_Concentration")
NUCLEUS_SIGMA_PX = 1.5  # Gaussian smoothing of DAPI before the Otsu threshold
MIN_NUCLEUS_AREA_PX = 20  # thresholded objects smaller than this are debris, not nuclei
ILLUMINATION_SIGMA_FRACTION = 1 / 20  # Gaussian sigma of the illumination function / image width
ILLUMINATION_GRID_PX = 160  # fields are block-averaged to about this width for the per-plate median
PERCENTILES = (0.1, 99.9)  # corrected plate intensities at these percentiles map to 0 and 255
SAMPLES_PER_FIELD = 8192  # pixels per field and channel kept for the plate percentiles


# ---------------------------------------------------------------------------------------------
# Shared helpers.


def _csv_rows(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """Stream ``(line number, {column: stripped value})`` for the requested columns of a CSV.

    Other columns (e.g. IMPA's junk index columns ``Unnamed: 0.1``, ``Unnamed: 0``) are ignored.

    Raises:
        CellfluxError: missing file, empty file, a missing column, or a row with the wrong number
            of fields (naming the file and line).
    """
    if not path.is_file():
        raise CellfluxError(f"{path}: missing file")
    with open(path, newline="", encoding="utf-8-sig") as f:  # tolerate a byte-order mark
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise CellfluxError(f"{path}: empty file")
        header = [h.strip() for h in header]
        missing = [c for c in columns if c not in header]
        if missing:
            raise CellfluxError(f"{path}: missing column(s) {', '.join(missing)}")
        pos = [header.index(c) for c in columns]
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise CellfluxError(f"{path} line {reader.line_num}: {len(row)} fields, expected {len(header)}")
            yield reader.line_num, {c: row[p].strip() for c, p in zip(columns, pos)}


def _blank(value: str) -> bool:
    """Empty, or pandas' spelling of a missing value."""
    return value.strip().lower() in ("", "nan", "none", "null")


def _canonical_moa(moa: str, where: str) -> str:
    """The :data:`MOAS` spelling of a MoA name (case-insensitive), or a one-line error."""
    lookup = {m.lower(): m for m in MOAS}
    if moa.strip().lower() not in lookup:
        raise CellfluxError(f"{where}: MoA {moa!r} is not one of the 12 BBBC021 MoAs")
    return lookup[moa.strip().lower()]


def _parse_float(value: str, column: str, where: str) -> float:
    return finite_float(value, f"{where}: {column}")


@dataclass
class _Compound:
    """What the conditions table needs about one compound, and where it was first seen."""

    moa: str
    smiles: str
    where: str
    fingerprint: np.ndarray
    kind: str  # "user" | "morgan" | "cellflux"


class _CompoundTable:
    """Compounds seen so far, embedded (user CSV > SMILES > CellFlux row); checks that a compound
    keeps one SMILES ("" = none) and one MoA."""

    def __init__(self, user: EmbeddingTable | None = None):
        self.compounds: dict[str, _Compound] = {}
        self.user = user

    def add(self, name: str, moa: str, smiles: str, where: str) -> None:
        known = self.compounds.get(name)
        if known is None:
            fingerprint, kind = resolve_embedding(name, smiles, self.user, where, allow_name_seeded=False)
            self.compounds[name] = _Compound(moa, smiles, where, fingerprint, kind)
        elif known.smiles != smiles:
            ours, theirs = (f"SMILES {s!r}" if s else "no SMILES" for s in (smiles, known.smiles))
            raise CellfluxError(f"{where}: compound {name!r} has {ours}, but {theirs} at {known.where}")
        elif known.moa != moa:
            raise CellfluxError(f"{where}: compound {name!r} has MoA {moa!r}, but {known.moa!r} at {known.where}")

    def conditions(self, used: set[str]) -> tuple[list[dict], np.ndarray]:
        """Conditions rows (DMSO first, then by name) and float32 ``(n, D)`` embeddings (D = 1024, or the
        user CSV's width)."""
        ood = {c.lower() for c in OOD_COMPOUNDS}
        names = sorted(used, key=lambda n: (n != CONTROL, n))
        rows = [{"compound": n, "moa": self.compounds[n].moa, "smiles": self.compounds[n].smiles,
                 "ood": n.lower() in ood, "embedding": self.compounds[n].kind} for n in names]
        embeddings = np.stack([self.compounds[n].fingerprint for n in names]).astype(np.float32)
        return rows, embeddings


def _check_plates(counts: dict[tuple[str, str], Counter], where: str) -> None:
    """Every split has treated images, and every plate with treated images in a split has controls there.

    Args:
        counts: ``{(split, batch): Counter(control=n, treated=m)}``.
        where: the input folder, named in the error.
    """
    for split in SPLITS:
        if not any(c["treated"] for (s, _), c in counts.items() if s == split):
            raise CellfluxError(f"{where}: split {split!r} has no treated images")
    for (split, batch), c in sorted(counts.items()):
        if c["treated"] and not c["control"]:
            raise CellfluxError(f"{where}: plate {batch!r} has treated images but no DMSO controls in split {split!r}")


class _ChunkBuffer:
    """Collect images and rows and hand them to the writer every :data:`CHUNK_IMAGES` images."""

    def __init__(self, writer: DatasetWriter):
        self.writer, self.images, self.rows = writer, [], []
        self.counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
        self.compounds: set[str] = set()

    def add(self, image: np.ndarray, row: dict) -> None:
        self.images.append(image)
        self.rows.append(row)
        self.counts[(row["split"], row["batch"])][row["state"]] += 1
        self.compounds.add(row["compound"])
        if len(self.rows) >= CHUNK_IMAGES:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.add(np.stack(self.images), self.rows)
            self.images, self.rows = [], []


# ---------------------------------------------------------------------------------------------
# IMPA / CellFlux layout.


def _impa_root(impa_dir: Path) -> tuple[Path, Path]:
    """``(image root, metadata CSV)`` of an IMPA folder.

    Accepted: ``DIR/metadata/bbbc021_df_all.csv`` with the ``Week*/`` image folders in ``DIR``
    (i.e. ``DIR`` is Zenodo's ``bbbc021_all``), or ``DIR/bbbc021_all/metadata/bbbc021_df_all.csv``.
    """
    if not impa_dir.is_dir():
        raise CellfluxError(f"IMPA folder {impa_dir} does not exist")
    for root in (impa_dir, impa_dir / "bbbc021_all"):
        if (root / IMPA_CSV).is_file():
            return root, root / IMPA_CSV
    raise CellfluxError(f"{impa_dir / IMPA_CSV}: missing file (expected the IMPA metadata CSV)")


def _impa_row(csv_path: Path, line: int, raw: dict[str, str]) -> tuple[dict, str]:
    """One IMPA CSV row -> (our metadata row with ``source`` = the crop's relative path, SMILES)."""
    where = f"{csv_path} line {line}"
    key = raw["SAMPLE_KEY"]
    parts = key.split("_")
    if len(parts) < 3 or not all(parts):
        raise CellfluxError(f"{where}: SAMPLE_KEY {key!r} is not Week_Plate_Table_Image_Object")
    state_value = raw["STATE"].lower()
    state = "treated" if state_value in _TREATED else "control" if state_value in _CONTROL else None
    if state is None:
        raise CellfluxError(f"{where}: STATE {raw['STATE']!r} is not 1/0 or trt/control")
    split = raw["SPLIT"].lower()
    if split not in SPLITS:
        raise CellfluxError(f"{where}: SPLIT {raw['SPLIT']!r} is not one of {SPLITS}")
    compound = raw["CPD_NAME"]
    if (state == "control") != (compound == CONTROL):
        raise CellfluxError(f"{where}: STATE {raw['STATE']!r} does not match CPD_NAME {compound!r}")
    if _blank(raw["BATCH"]):
        raise CellfluxError(f"{where}: empty BATCH")
    dose = _parse_float(raw["DOSE"], "DOSE", where) if state == "treated" else 0.0
    smiles = "" if _blank(raw["SMILES"]) else raw["SMILES"]
    if state == "control":
        moa, smiles = CONTROL, smiles or DMSO_SMILES
    else:
        moa = _canonical_moa(raw["ANNOT"], where)  # no SMILES: embedded from a table row, see _CompoundTable
    source = "/".join((parts[0], parts[1], "_".join(parts[2:]) + ".npy"))
    row = {"id": key, "split": split, "batch": raw["BATCH"], "compound": compound, "dose": dose,
           "moa": moa, "state": state, "source": source}
    return row, smiles


def _read_crop(path: Path, size: int | None) -> tuple[np.ndarray | None, str]:
    """A uint8 ``(size, size, 3)`` crop, or ``(None, reason)`` with reason ``missing``/``corrupt``.

    ``size=None`` accepts any square ``(S, S, 3)`` uint8 crop.
    """
    if not path.is_file():
        return None, "missing"
    try:
        image = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None, "corrupt"
    s = image.shape[0] if image.ndim == 3 else -1
    if image.dtype != np.uint8 or image.shape != (s, s, 3) or (size is not None and s != size):
        return None, "corrupt"
    return image, ""


def _impa_scan(csv_path: Path, root: Path, user: EmbeddingTable | None) -> tuple[int, _CompoundTable, int]:
    """Validate every row, collect compounds and plates (metadata only; no images kept).

    Returns:
        (number of rows, compound table, crop size read from the first readable .npy).
    """
    table, counts, n_rows, size = _CompoundTable(user), defaultdict(Counter), 0, None
    for line, raw in _csv_rows(csv_path, IMPA_COLUMNS):
        row, smiles = _impa_row(csv_path, line, raw)
        table.add(row["compound"], row["moa"], smiles, f"{csv_path} line {line}")
        counts[(row["split"], row["batch"])][row["state"]] += 1
        n_rows += 1
        if size is None:
            image, _ = _read_crop(root / row["source"], None)
            size = None if image is None else image.shape[0]
    if n_rows == 0:
        raise CellfluxError(f"{csv_path}: no rows")
    if size is None:
        raise CellfluxError(f"{root}: none of the {n_rows} crop .npy files named by {csv_path.name} is readable")
    _check_plates(counts, str(csv_path))
    return n_rows, table, size


def prepare_impa(impa_dir: str | os.PathLike, out: str | os.PathLike, progress: bool = True,
                 embeddings: str | os.PathLike | None = None) -> Path:
    """Convert the IMPA/CellFlux BBBC021 crops into a cellfluxrl dataset at ``out``.

    Input layout (Zenodo record 8307629, ``bbbc021_all``): ``DIR/metadata/bbbc021_df_all.csv`` and
    one uint8 ``(96, 96, 3)`` (actin, tubulin, DNA) ``.npy`` per cell at
    ``DIR/<Week>/<Plate>/<Table>_<Image>_<Object>.npy`` for ``SAMPLE_KEY``
    ``<Week>_<Plate>_<Table>_<Image>_<Object>`` (e.g. ``Week1_22123_1_11_3.0`` ->
    ``DIR/Week1/22123/1_11_3.0.npy``). ``DIR`` may also be the folder that contains ``bbbc021_all``.
    The CSV is read by column name (junk index columns are ignored): ``SAMPLE_KEY, BATCH, CPD_NAME,
    SMILES, DOSE, ANNOT, STATE`` (``1``/``0`` or ``trt``/``control``) and ``SPLIT`` (train/test).

    Decisions:
        - A treated compound without SMILES gets its row of CellFlux's shipped embeddings; one that
          is not there either is an error naming the CSV line (it cannot be embedded). DMSO gets
          SMILES ``CS(C)=O`` when the CSV has none. A compound keeps one SMILES (or none) throughout.
        - A missing or corrupt (unreadable, or not uint8 ``(S, S, 3)``) crop is skipped, counted in
          ``meta.json["skipped"]`` and logged, unless more than 1% of the rows are bad: then the
          error names the first bad file.
        - The CSV is read twice (validation, then streaming), so memory does not grow with N.
        - Batch = ``BATCH`` (plate); a plate with treated cells but no DMSO cells in a split, or a
          split without treated cells, is an error.

    Args:
        impa_dir: the IMPA folder.
        out: the dataset folder to create (must not exist or be empty).
        progress: draw a tqdm progress bar on stderr (cleared when done or on error).
        embeddings: a user's embeddings CSV with a row for every compound (DMSO included), used
            instead of SMILES and the shipped table; None: the default embeddings.

    Returns:
        The dataset folder.

    Raises:
        CellfluxError: any of the problems above, as one line naming the file and CSV line; a bad
            embeddings CSV, or one without a row for a compound of the dataset.
    """
    user = load_user_embeddings(embeddings)
    root, csv_path = _impa_root(Path(impa_dir))
    n_rows, table, size = _impa_scan(csv_path, root, user)
    max_bad = int(MAX_BAD_FRACTION * n_rows)
    skipped, first_bad = Counter(), None
    with DatasetWriter(out, size, CHANNELS_BBBC021, "bbbc021-impa") as writer, \
            progress_bar(total=n_rows, disable=not progress, desc="bbbc021 (impa)", unit="cell", leave=False) as bar:
        buffer = _ChunkBuffer(writer)
        for line, raw in _csv_rows(csv_path, IMPA_COLUMNS):
            bar.update(1)
            row, _ = _impa_row(csv_path, line, raw)
            image, why = _read_crop(root / row["source"], size)
            if image is None:
                skipped[f"{why}_npy"] += 1
                first_bad = first_bad or f"{root / row['source']}: {why} crop ({csv_path.name} line {line})"
                log.warning("skipping %s crop %s", why, root / row["source"])
                if sum(skipped.values()) > max_bad:
                    raise CellfluxError(f"{first_bad}; more than 1% of the {n_rows} crops are missing or corrupt")
                continue
            buffer.add(image, row)
        buffer.flush()
        _check_plates(buffer.counts, f"{csv_path} (after skipping bad crops)")
        conditions, embeddings = table.conditions(buffer.compounds)
        if skipped:
            log.warning("skipped %d of %d crops: %s", sum(skipped.values()), n_rows, dict(skipped))
        extra = {"skipped": dict(skipped), "preparation": {
            "impa_dir": str(Path(impa_dir).resolve()), "metadata_csv": str(csv_path.resolve()),
            "embeddings_csv": str(Path(user.path).resolve()) if user else None}}
        return writer.finish(conditions, embeddings, extra_meta=extra)


# ---------------------------------------------------------------------------------------------
# Raw Broad BBBC021 v1 layout.


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
    """``({compound: (smiles, where)}, {(compound, concentration): moa})`` from the two small CSVs."""
    smiles = {}
    path = raw_dir / RAW_COMPOUND_CSV
    for line, row in _csv_rows(path, ("compound", "smiles")):
        smiles[row["compound"]] = ("" if _blank(row["smiles"]) else row["smiles"], f"{path} line {line}")
    moas = {}
    path = raw_dir / RAW_MOA_CSV
    for line, row in _csv_rows(path, ("compound", "concentration", "moa")):
        where = f"{path} line {line}"
        concentration = _parse_float(row["concentration"], "concentration", where)
        moa = CONTROL if row["compound"] == CONTROL else _canonical_moa(row["moa"], where)
        moas[(row["compound"], round(concentration, 9))] = moa
    return smiles, moas


def _raw_fields(raw_dir: Path, user: EmbeddingTable | None) -> tuple[list[_Field], _CompoundTable, Counter]:
    """The MoA-annotated fields with SMILES or an embedding row (plus all DMSO fields), their
    compounds and skip counts."""
    smiles_of, moa_of = _raw_tables(raw_dir)
    table, skipped, fields = _CompoundTable(user), Counter(), []
    path = raw_dir / RAW_IMAGE_CSV
    for line, row in _csv_rows(path, RAW_COLUMNS):
        where = f"{path} line {line}"
        compound = row["Image_Metadata_Compound"]
        dose = _parse_float(row["Image_Metadata_Concentration"], "Image_Metadata_Concentration", where)
        if compound == CONTROL:
            moa, state, dose = CONTROL, "control", 0.0
            smiles = smiles_of.get(compound, ("", ""))[0] or DMSO_SMILES
        else:
            moa, state = moa_of.get((compound, round(dose, 9))), "treated"
            smiles = smiles_of.get(compound, ("", ""))[0]
            if moa is None:
                skipped["fields_not_moa_annotated"] += 1
                continue
            if not smiles and not has_embedding_row(compound, user):
                skipped["fields_without_smiles"] += 1  # ... and without an embedding row
                continue
        table.add(compound, moa, smiles, smiles_of.get(compound, ("", where))[1] or where)
        paths = tuple(_resolve(raw_dir, row[f"Image_PathName_{ch}"], row[f"Image_FileName_{ch}"], where)
                      for ch in RAW_CHANNEL_COLUMNS)
        batch = _raw_batch(row["Image_Metadata_Plate_DAPI"], row["Image_PathName_DAPI"])
        site = re.search(r"_s(\d+)", row["Image_FileName_DAPI"])
        field_id = f"{batch}_{row['Image_Metadata_Well_DAPI']}_s{site.group(1) if site else line}"
        fields.append(_Field(paths, batch, compound, dose, moa, state, field_id,
                             paths[2].relative_to(raw_dir).as_posix()))
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


def _read_tiff(path: Path) -> np.ndarray:
    """One grayscale TIFF plane -> float32 ``(H, W)`` in its stored units (16-bit counts)."""
    import tifffile

    try:
        image = tifffile.imread(path)
    except Exception as exc:  # tifffile raises many types (ValueError, TiffFileError, OSError) for damage
        raise CellfluxError(f"{path}: corrupt or truncated TIFF ({type(exc).__name__}: {exc})") from None
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


def illumination_function(mean_image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Smooth a plate's mean image of one channel into a multiplicative illumination function.

    Args:
        mean_image: float ``(H, W)``, the mean of all the plate's fields for one channel.
        sigma_px: Gaussian sigma (px), about 1/20 of the image width.

    Returns:
        float32 ``(H, W)`` with mean 1 and strictly positive values (all ones for a blank channel).
    """
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(np.asarray(mean_image, dtype=np.float64), sigma_px, mode="nearest")
    if smooth.mean() <= 0:
        return np.ones(mean_image.shape, dtype=np.float32)
    smooth = smooth / smooth.mean()
    return np.maximum(smooth, 1e-3).astype(np.float32)


def detect_nuclei(dna: np.ndarray, sigma_px: float = NUCLEUS_SIGMA_PX,
                  min_area_px: int = MIN_NUCLEUS_AREA_PX, declump_h_px: float = DECLUMP_H_PX) -> np.ndarray:
    """Nucleus centroids in a (corrected) DNA image: Gaussian smoothing, Otsu threshold, touching
    nuclei split (:func:`~cellfluxrl.data.raw_fields.split_touching`), labels.

    Args:
        dna: float ``(H, W)`` DNA (DAPI) intensities, any units.
        sigma_px: Gaussian smoothing sigma (px).
        min_area_px: objects smaller than this (px^2) are dropped as debris.
        declump_h_px: saddle depth (px) that keeps two touching nuclei apart; 0 = no splitting.

    Returns:
        float64 ``(K, 2)`` centroids as (row, col) in px, in label order (raster order of first pixel).
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    smooth = ndimage.gaussian_filter(np.asarray(dna, dtype=np.float32), sigma_px)
    if smooth.max() <= smooth.min():
        return np.zeros((0, 2))
    mask = smooth > threshold_otsu(smooth)
    labels, k = split_touching(mask, declump_h_px) if declump_h_px > 0 else ndimage.label(mask)
    rows, cols = np.indices(labels.shape)
    flat = labels.ravel()
    area = np.bincount(flat, minlength=k + 1)[1:]
    centroids = np.stack([np.bincount(flat, weights=rows.ravel(), minlength=k + 1)[1:],
                          np.bincount(flat, weights=cols.ravel(), minlength=k + 1)[1:]], axis=1)
    keep = area >= min_area_px
    return centroids[keep] / area[keep, None]


def crop_windows(centroids: np.ndarray, shape: tuple[int, int], crop_size: int) -> np.ndarray:
    """Top-left corners of the ``crop_size`` windows centred on each centroid that fit in the field.

    The window of a centroid (r, c) starts at ``(round(r) - crop_size // 2, round(c) - crop_size // 2)``.

    Args:
        centroids: float ``(K, 2)`` (row, col) in px.
        shape: ``(H, W)`` of the field.
        crop_size: window side (px).

    Returns:
        int64 ``(K', 2)`` corners of the windows that lie entirely inside the field (K' <= K).
    """
    corners = np.rint(np.asarray(centroids, dtype=np.float64)).astype(np.int64) - crop_size // 2
    inside = ((corners >= 0) & (corners + crop_size <= np.asarray(shape))).all(axis=1)
    return corners[inside].reshape(-1, 2)


def scale_to_uint8(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Map ``lo -> 0`` and ``hi -> 255`` per channel (last axis), rounded and clipped, as uint8."""
    lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
    scaled = (np.asarray(x, np.float32) - lo) * (255.0 / np.maximum(hi - lo, 1e-6))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """float ``(C, H, W)`` -> ``(C, H // factor, W // factor)`` means of ``factor x factor`` blocks."""
    c, h, w = image.shape
    h, w = h // factor, w // factor
    return image[:, :h * factor, :w * factor].reshape(c, h, factor, w, factor).mean(axis=(2, 4))


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
        smalls.append(_block_mean(image, factor).astype(np.float32))
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
                     "source": f"{field.dapi_rel}@{centre[0]},{centre[1]}"}


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
        - The split is drawn per field of view with ``seed`` (crops of one field never straddle
          splits), stratified by plate and state (:func:`split_fields`).
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
    splits = split_fields([(f.batch, f.state) for f in fields], test_fraction, seed)
    fields = [_Field(**{**f.__dict__, "split": s}) for f, s in zip(fields, splits)]
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
        return writer.finish(conditions, embeddings, extra_meta=extra)
