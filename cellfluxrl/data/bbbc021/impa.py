"""The IMPA/CellFlux BBBC021 crops into the cellfluxrl layout (:func:`prepare_impa`).

The IMPA reproducibility layout that CellFlux trains on: ``metadata/bbbc021_df_all.csv`` plus one
uint8 ``(96, 96, 3)`` ``.npy`` per cell, streamed (peak memory does not grow with N).
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from cellfluxrl.data.bbbc021.tables import (CHANNELS_BBBC021, DMSO_SMILES, _blank, _canonical_moa, _check_plates,
                                            _ChunkBuffer, _CompoundTable, _csv_rows, _parse_dose)
from cellfluxrl.data.compound_names import canonical_compound, is_control_name
from cellfluxrl.data.compounds import CONTROL
from cellfluxrl.data.fingerprints import EmbeddingTable, load_user_embeddings
from cellfluxrl.data.layout import SOURCE_SPLITS, DatasetWriter
from cellfluxrl.errors import CellfluxError
from cellfluxrl.progress import progress as progress_bar

log = logging.getLogger(__name__)

MAX_BAD_FRACTION = 0.01  # IMPA: more missing/corrupt crops than this fraction is an error
IMPA_CSV = Path("metadata") / "bbbc021_df_all.csv"
IMPA_COLUMNS = ("SAMPLE_KEY", "BATCH", "CPD_NAME", "SMILES", "DOSE", "ANNOT", "STATE", "SPLIT")
_TREATED = {"1", "1.0", "trt", "treated", "true"}
_CONTROL = {"0", "0.0", "control", "ctrl", "false"}


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


def impa_field(parts: list[str]) -> str:
    """The group of an IMPA crop: its field of view ``<Table>_<Image>`` (SAMPLE_KEY without week,
    plate and object). The IMPA CSV records no well; the field is the finest group it has, and the
    crops of one field are the near-duplicates that must not straddle two parts."""
    return "_".join(parts[2:-1]) if len(parts) > 3 else "_".join(parts[2:])


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
    if split not in SOURCE_SPLITS:
        raise CellfluxError(f"{where}: SPLIT {raw['SPLIT']!r} is not one of {SOURCE_SPLITS}")
    compound = canonical_compound(raw["CPD_NAME"])
    if (state == "control") != is_control_name(compound):
        raise CellfluxError(f"{where}: STATE {raw['STATE']!r} does not match CPD_NAME {compound!r}")
    if _blank(raw["BATCH"]):
        raise CellfluxError(f"{where}: empty BATCH")
    dose = _parse_dose(raw["DOSE"], "DOSE", where) if state == "treated" else 0.0
    smiles = "" if _blank(raw["SMILES"]) else raw["SMILES"]
    if state == "control":
        moa, smiles = CONTROL, smiles or DMSO_SMILES
    else:
        moa = _canonical_moa(raw["ANNOT"], where)  # no SMILES: embedded from a table row, see _CompoundTable
    source = "/".join((parts[0], parts[1], "_".join(parts[2:]) + ".npy"))
    row = {"id": key, "split": split, "batch": raw["BATCH"], "compound": compound, "dose": dose,
           "moa": moa, "state": state, "source": source, "well": impa_field(parts)}
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
        table.add(row["compound"], row["moa"], smiles, f"{csv_path} line {line}")  # compared in any spelling
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
        - Well = the crop's field of view ``<Table>_<Image>`` (:func:`impa_field`; the CSV has no well
          column), so the classifier halves and the validation split keep a field's crops together.
          The test split is CellFlux's ``SPLIT``; validation is dealt from the fields all of whose
          crops are train (:func:`cellfluxrl.data.splits.validation_split`).

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
            row["compound"] = table.stored_name(row["compound"])  # one spelling per compound
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
