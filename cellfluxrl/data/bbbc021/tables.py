"""What both BBBC021 readers share: CSV streaming, the compound table (one SMILES and one MoA per
compound, embedded as CellFlux does), the per-plate control checks and the chunked writer feed."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from cellfluxrl.data.compound_names import canonical_compound, compound_key, is_ood
from cellfluxrl.data.compounds import CONTROL, MOAS
from cellfluxrl.data.csv_input import csv_rows as _csv_rows  # noqa: F401 (every user CSV is read through it)
from cellfluxrl.data.fingerprints import EmbeddingTable, resolve_embedding
from cellfluxrl.data.layout import SOURCE_SPLITS, DatasetWriter
from cellfluxrl.errors import CellfluxError, finite_float

# = cellfluxrl.images.CHANNELS_BBBC021, spelled out so `prepare` does not import torch (tested equal).
CHANNELS_BBBC021 = ("actin", "tubulin", "dna")
DMSO_SMILES = "CS(C)=O"
CHUNK_IMAGES = 512  # images per DatasetWriter.add call (peak memory does not grow with N)


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


def _parse_dose(value: str, column: str, where: str) -> float:
    """A concentration: a finite number >= 0 (any unit), or a one-line error naming the file and line."""
    dose = _parse_float(value, column, where)
    if dose < 0:
        raise CellfluxError(f"{where}: {column} {value!r} is negative; a concentration is 0 or more")
    return dose


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
    keeps one SMILES ("" = none) and one MoA.

    Names are compared by :func:`~cellfluxrl.data.compound_names.compound_key` (``Taxol`` and
    ``taxol`` are one compound) and stored under one spelling: the shipped table's, else the first
    one seen (:meth:`add` returns it; the dataset's rows must use it).
    """

    def __init__(self, user: EmbeddingTable | None = None):
        self.compounds: dict[str, _Compound] = {}
        self.spelling: dict[str, str] = {}  # compound_key -> the stored name
        self.user = user

    def add(self, name: str, moa: str, smiles: str, where: str) -> str:
        """Record one row's compound; returns the name the dataset stores it under."""
        name = self.spelling.setdefault(compound_key(name), canonical_compound(name))
        known = self.compounds.get(name)
        if known is None:
            fingerprint, kind = resolve_embedding(name, smiles, self.user, where, allow_name_seeded=False)
            self.compounds[name] = _Compound(moa, smiles, where, fingerprint, kind)
        elif known.smiles != smiles:
            ours, theirs = (f"SMILES {s!r}" if s else "no SMILES" for s in (smiles, known.smiles))
            raise CellfluxError(f"{where}: compound {name!r} has {ours}, but {theirs} at {known.where}")
        elif known.moa != moa:
            raise CellfluxError(f"{where}: compound {name!r} has MoA {moa!r}, but {known.moa!r} at {known.where}")
        return name

    def stored_name(self, name: str) -> str:
        """The spelling :meth:`add` stored for ``name`` (any spelling of a compound it has seen)."""
        return self.spelling[compound_key(name)]

    def conditions(self, used: set[str]) -> tuple[list[dict], np.ndarray]:
        """Conditions rows (DMSO first, then by name) and float32 ``(n, D)`` embeddings (D = 1024, or the
        user CSV's width)."""
        names = sorted(used, key=lambda n: (n != CONTROL, n))
        rows = [{"compound": n, "moa": self.compounds[n].moa, "smiles": self.compounds[n].smiles,
                 "ood": is_ood(n), "embedding": self.compounds[n].kind} for n in names]
        embeddings = np.stack([self.compounds[n].fingerprint for n in names]).astype(np.float32)
        return rows, embeddings


def _check_plates(counts: dict[tuple[str, str], Counter], where: str) -> None:
    """Every split has treated images, and every plate with treated images in a split has controls there.

    Args:
        counts: ``{(split, batch): Counter(control=n, treated=m)}``.
        where: the input folder, named in the error.
    """
    for split in SOURCE_SPLITS:  # val is dealt out of train by the writer, later
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
