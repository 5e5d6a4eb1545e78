"""Frozen compound embeddings, as CellFlux uses them.

CellFlux conditions on RDKit's hashed Morgan *count* fingerprint (radius 2, 1024 bits,
``GetHashedMorganFingerprint``), unnormalised, stored as float. Where a compound's SMILES is not
known, :func:`name_seeded_embedding` gives a fixed vector seeded by the compound's name with the same
kind of statistics (a few dozen small non-negative counts); the dataset's conditions table records
which of the two each compound got.
"""

from __future__ import annotations

import hashlib

import numpy as np

from cellfluxrl.errors import CellfluxError

FINGERPRINT_BITS = 1024
FINGERPRINT_RADIUS = 2


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


def compound_embedding(name: str, smiles: str) -> tuple[np.ndarray, str]:
    """Embedding of one compound and its kind: ``("morgan" | "name-seeded")``."""
    if smiles:
        return morgan_count_fingerprint(smiles), "morgan"
    return name_seeded_embedding(name), "name-seeded"
