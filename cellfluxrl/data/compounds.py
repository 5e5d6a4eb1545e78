"""The BBBC021 compound / mode-of-action table used by CellFlux and CellFluxRL (paper Table 3).

34 compounds (26 in-distribution, 8 held out as out-of-distribution by CellFlux) plus the DMSO
control, each with its MoA. SMILES are given only where the structure is certain; a compound
without one gets its row of CellFlux's shipped embeddings (``bbbc021_emb_fp.csv``, see
:mod:`cellfluxrl.data.fingerprints`). Stereochemistry is omitted on purpose: CellFlux's hashed Morgan
count fingerprint ignores chirality. Each SMILES gives exactly CellFlux's vector (tested); cisplatin
is written bonded, ``N[Pt](N)(Cl)Cl``, since the disconnected ``N.N.Cl[Pt]Cl`` hashes differently.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

CONTROL = "DMSO"

# The 12 modes of action, in a fixed order (class index of the MoA classifier), then the control.
MOAS = (
    "Actin disruptors", "Aurora kinase inhibitors", "Cholesterol-lowering", "DNA damage",
    "DNA replication", "Eg5 inhibitors", "Epithelial", "Kinase inhibitors",
    "Microtubule destabilizers", "Microtubule stabilizers", "Protein degradation", "Protein synthesis",
)

# CellFlux's `ood_set` for BBBC021: removed from training, evaluated as unseen compounds.
OOD_COMPOUNDS = (
    "docetaxel", "AZ841", "cytochalasin D", "simvastatin", "cyclohexamide", "latrunculin B",
    "epothilone B", "lactacystin",
)


@dataclass(frozen=True)
class Compound:
    """One row of the table: name, MoA, OOD flag (CellFlux held-out) and SMILES ('' if unknown)."""

    name: str
    moa: str
    ood: bool
    smiles: str


@lru_cache(maxsize=1)
def bbbc021_compounds() -> tuple[Compound, ...]:
    """The 35 rows (DMSO first), read from the CSV shipped inside the package."""
    text = resources.files("cellfluxrl.data").joinpath("bbbc021_compounds.csv").read_text()
    rows = csv.DictReader(text.splitlines())
    return tuple(Compound(r["compound"], r["moa"], r["ood"] == "1", r["smiles"]) for r in rows)


def moa_index(moa: str) -> int:
    """Class index of a MoA in :data:`MOAS` (ValueError for DMSO or an unknown name)."""
    return MOAS.index(moa)
