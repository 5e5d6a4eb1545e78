"""Frozen compound embeddings, as CellFlux uses them.

CellFlux conditions on RDKit's hashed Morgan *count* fingerprint (radius 2, 1024 bits,
``GetHashedMorganFingerprint``), unnormalised, stored as float. Its BBBC021 configs read them from
IMPA's ``embeddings/csv/emb_fp.csv`` (theislab/IMPA, commit 13eb82f), which ships here byte for byte
as ``cellfluxrl/data/bbbc021_emb_fp.csv``: 35 rows (34 compounds + DMSO, named as BBBC021 spells
them) x 1024 integer counts. For the 22 compounds with a SMILES in ``bbbc021_compounds.csv`` our
RDKit fingerprint equals that row exactly (tested); the other 13 (taxol, etoposide, AZ138, ...) get
their row from the file, so they carry real chemistry too.

Which embedding a compound gets (:func:`resolve_embedding`), recorded as the ``embedding`` column
of a dataset's ``conditions.csv``:

1. ``"user"``: the compound's row of the user's embeddings CSV, when one is given (then every
   compound of the dataset needs a row: all vectors of a dataset share one width);
2. ``"morgan"``: the Morgan count fingerprint of its SMILES;
3. ``"cellflux"``: its row of the shipped CellFlux table;
4. ``"name-seeded"``: :func:`name_seeded_embedding`, a fixed vector seeded by the name with the
   statistics of a real fingerprint (a few dozen small counts) but no chemistry.

An embeddings CSV (:func:`read_embeddings_csv`) is laid out like the shipped file: a header line
(``,0,1,...,1023``; the labels are not used), then one line per compound: its name, then ``D``
numbers. Every problem is a one-line :class:`~cellfluxrl.errors.CellfluxError` naming the file,
line and compound. Rows are found by compound name in any spelling
(:func:`cellfluxrl.data.compound_names.compound_key`: ``Taxol`` finds ``taxol``), so two rows whose
names differ only in case or spacing are refused as a repeat.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import numpy as np

from cellfluxrl.data.compound_names import compound_key
from cellfluxrl.data.csv_input import all_lines
from cellfluxrl.errors import CellfluxError, finite_float

FINGERPRINT_BITS = 1024
FINGERPRINT_RADIUS = 2
CELLFLUX_EMBEDDINGS_CSV = "bbbc021_emb_fp.csv"  # inside the cellfluxrl.data package
KINDS = ("user", "morgan", "cellflux", "name-seeded")


def morgan_count_fingerprint(smiles: str, radius: int = FINGERPRINT_RADIUS,
                             n_bits: int = FINGERPRINT_BITS) -> np.ndarray:
    """Hashed Morgan count fingerprint of ``smiles`` -> float32 ``(n_bits,)`` of non-negative counts.

    Raises:
        CellfluxError: the SMILES does not parse.
    """
    from rdkit import Chem, RDLogger
    from rdkit.Chem import rdFingerprintGenerator

    RDLogger.DisableLog("rdApp.*")
    mol = Chem.MolFromSmiles(smiles) if smiles else None
    if mol is None:
        raise CellfluxError(f"invalid SMILES {smiles!r}")
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)
    return generator.GetCountFingerprintAsNumPy(mol).astype(np.float32)


def name_seeded_embedding(name: str, n_bits: int = FINGERPRINT_BITS) -> np.ndarray:
    """A fixed pseudo-fingerprint for a compound without SMILES -> float32 ``(n_bits,)``.

    Deterministic in ``name`` alone (SHA-256 seed): about 40 active bits with counts 1-4, the
    typical sparsity of a real Morgan count fingerprint of a drug-like molecule.
    """
    seed = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    vector = np.zeros(n_bits, dtype=np.float32)
    active = rng.choice(n_bits, size=40, replace=False)
    vector[active] = rng.integers(1, 5, size=active.size)
    return vector


# ---------------------------------------------------------------------------------------------
# Embeddings CSVs: the shipped CellFlux table and a user's own.


@dataclass(frozen=True)
class EmbeddingTable:
    """The rows of an embeddings CSV.

    Attributes:
        path: the file, as named in error messages.
        vectors: compound name -> float32 ``(width,)``, read-only, in file order.
        width: ``D``, the number of values per row (the same for every row).
        names: :func:`~cellfluxrl.data.compound_names.compound_key` -> the name as the file spells it.
    """

    path: str
    vectors: Mapping[str, np.ndarray]
    width: int
    names: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def row(self, name: str) -> np.ndarray | None:
        """The vector of compound ``name`` in any spelling (``Taxol`` finds ``taxol``), or None."""
        if name in self.vectors:
            return self.vectors[name]
        spelled = self.names.get(compound_key(name))
        return None if spelled is None else self.vectors[spelled]


def _parse_value(text: str, column: int, name: str, where: str) -> float:
    """One cell (1-based CSV ``column``) -> a finite float, or a one-line error naming the compound."""
    return finite_float(text, f"{where}: compound {name!r}: column {column} value")


def _looks_like_data(header: list[str]) -> bool:
    """True when a first line is a compound row rather than a header (a name, then numbers that are
    not the column labels ``0..D-1``): the user forgot the header line."""
    labels = [h.strip() for h in header[1:]]
    if not header[0].strip() or labels == [str(i) for i in range(len(labels))]:
        return False
    try:
        [float(x) for x in labels]
    except ValueError:
        return False
    return True


def parse_embeddings_csv(lines: list[str], path: str) -> EmbeddingTable:
    """Parse the lines of an embeddings CSV (see the module docstring) -> :class:`EmbeddingTable`.

    Blank lines are ignored; names are stripped of surrounding spaces.

    Raises:
        CellfluxError: no header, no rows or no value columns; a row whose width differs from the
            header's; an empty name; a value that is not a finite number; a name given twice. The
            message names ``path``, the line and the compound.
    """
    reader = csv.reader(lines)
    try:
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise CellfluxError(f"{path}: empty file (expected a header line ',0,1,...' then one row per compound)")
        if _looks_like_data(header):
            raise CellfluxError(f"{path} line 1: compound {header[0].strip()!r} where the header belongs "
                                f"(the first line must be ',0,1,...,{len(header) - 2}')")
        width = len(header) - 1
        if width < 1:
            raise CellfluxError(f"{path} line 1: no value columns after the compound name")
        vectors, names, first_line = {}, {}, {}
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            where, name = f"{path} line {reader.line_num}", row[0].strip()
            if not name:
                raise CellfluxError(f"{where}: empty compound name")
            if len(row) - 1 != width:
                raise CellfluxError(f"{where}: compound {name!r} has {len(row) - 1} values, "
                                    f"expected {width} (the header's width)")
            key = compound_key(name)
            if key in names:
                same = "" if names[key] == name else f" ({names[key]!r}: names differing only in case or spacing " \
                                                     f"are one compound)"
                raise CellfluxError(f"{where}: compound {name!r} repeats line {first_line[key]}{same}")
            values = [_parse_value(v, j, name, where) for j, v in enumerate(row[1:], start=2)]
            vector = np.array(values, dtype=np.float32)
            vector.setflags(write=False)
            vectors[name], names[key], first_line[key] = vector, name, reader.line_num
    except csv.Error as exc:
        raise CellfluxError(f"{path} line {reader.line_num}: not a readable CSV ({exc})") from None
    if not vectors:
        raise CellfluxError(f"{path}: no compound rows after the header")
    return EmbeddingTable(path, MappingProxyType(vectors), width, MappingProxyType(names))


def read_embeddings_csv(path: str | os.PathLike) -> EmbeddingTable:
    """Read and validate an embeddings CSV file (see :func:`parse_embeddings_csv`).

    Raises:
        CellfluxError: the file is missing, not UTF-8 text (naming the line), or any problem of
            :func:`parse_embeddings_csv`, as one line naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise CellfluxError(f"{path}: missing embeddings CSV")
    return parse_embeddings_csv(all_lines(path), str(path))  # UTF-8 (a byte-order mark is dropped)


@lru_cache(maxsize=1)
def cellflux_embeddings() -> EmbeddingTable:
    """The shipped CellFlux table: 35 BBBC021 rows (DMSO included) x 1024 Morgan counts (cached)."""
    resource = resources.files("cellfluxrl.data").joinpath(CELLFLUX_EMBEDDINGS_CSV)
    lines = resource.read_text(encoding="utf-8").splitlines()
    return parse_embeddings_csv(lines, f"cellfluxrl/data/{CELLFLUX_EMBEDDINGS_CSV}")


def load_user_embeddings(path: str | os.PathLike | None) -> EmbeddingTable | None:
    """:func:`read_embeddings_csv` of ``path``, or None when no user CSV is given."""
    return None if path is None else read_embeddings_csv(path)


# ---------------------------------------------------------------------------------------------
# Which embedding a compound gets.


def has_embedding_row(name: str, user: EmbeddingTable | None = None) -> bool:
    """Whether ``name`` (any spelling) can be embedded without a SMILES: it has a row in ``user`` if
    given, else in the shipped CellFlux table."""
    return (user if user is not None else cellflux_embeddings()).row(name) is not None


def resolve_embedding(name: str, smiles: str, user: EmbeddingTable | None = None, where: str = "",
                      allow_name_seeded: bool = True) -> tuple[np.ndarray, str]:
    """The embedding of one compound and its kind (precedence in the module docstring).

    Args:
        name: the compound (looked up in any spelling, :func:`~cellfluxrl.data.compound_names.compound_key`).
        smiles: its SMILES, or ``""`` when unknown.
        user: the user's embeddings table; when given, it is the only source.
        where: the data file and line that names the compound, prefixed to error messages.
        allow_name_seeded: when False, a compound with neither SMILES nor a table row is an error.

    Returns:
        (float32 ``(D,)`` vector, a copy; kind: ``"user" | "morgan" | "cellflux" | "name-seeded"``).
        ``D`` is ``user.width`` with a user table, else 1024.

    Raises:
        CellfluxError: the compound has no row in ``user``; the SMILES does not parse; or (with
            ``allow_name_seeded=False``) nothing embeds it.
    """
    prefix = f"{where}: " if where else ""
    if user is not None:
        row = user.row(name)
        if row is None:
            needed = f" (needed by {where})" if where else ""
            raise CellfluxError(f"{user.path}: no row for compound {name!r}{needed}")
        return np.array(row, dtype=np.float32), "user"
    if smiles:
        try:
            return morgan_count_fingerprint(smiles), "morgan"
        except CellfluxError:
            raise CellfluxError(f"{prefix}compound {name!r} has an invalid SMILES {smiles!r}") from None
    shipped = cellflux_embeddings().row(name)
    if shipped is not None:
        return np.array(shipped, dtype=np.float32), "cellflux"
    if not allow_name_seeded:
        raise CellfluxError(f"{prefix}compound {name!r} has no SMILES and no row in the CellFlux embeddings "
                            f"(cannot embed it; give it a SMILES or a row in an embeddings CSV)")
    return name_seeded_embedding(name), "name-seeded"


def compound_embedding(name: str, smiles: str) -> tuple[np.ndarray, str]:
    """Embedding of one compound without a user table: ``("morgan" | "cellflux" | "name-seeded")``."""
    return resolve_embedding(name, smiles)
