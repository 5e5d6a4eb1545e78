"""Compound names: the one normalisation every lookup by name goes through.

Users spell compounds their own way: ``Taxol`` for the table's ``taxol``, ``Mitomycin  C`` with a
double space, ``dmso`` for the control. Two names are the same compound when their
:func:`compound_key` is equal: surrounding spaces dropped, inner runs of white space made one space,
case folded. A dataset stores a compound under its :func:`canonical_compound` spelling: the shipped
BBBC021 table's (the same 35 names as CellFlux's embeddings CSV) when the compound is there,
otherwise the user's own spelling with its white space tidied.

Every lookup by compound name uses these two functions: the MoA and SMILES of the shipped table
(:func:`known_compound`), the rows of CellFlux's and a user's embeddings CSV
(:mod:`cellfluxrl.data.fingerprints`), the held-out (OOD) list, and the compounds of one dataset
(:class:`cellfluxrl.data.bbbc021.tables._CompoundTable`).
"""

from __future__ import annotations

from functools import lru_cache

from cellfluxrl.data.compounds import CONTROL, OOD_COMPOUNDS, Compound, bbbc021_compounds


def tidy_name(name: str) -> str:
    """``name`` without surrounding white space and with inner runs of white space as one space."""
    return " ".join(str(name).split())


def compound_key(name: str) -> str:
    """The key two spellings of one compound share: :func:`tidy_name`, case-folded (``"Taxol"`` ->
    ``"taxol"``)."""
    return tidy_name(name).casefold()


@lru_cache(maxsize=1)
def _shipped() -> dict[str, Compound]:
    return {compound_key(c.name): c for c in bbbc021_compounds()}


def known_compound(name: str) -> Compound | None:
    """The shipped BBBC021 table's row of ``name`` (any spelling, :func:`compound_key`), or None."""
    return _shipped().get(compound_key(name))


def canonical_compound(name: str) -> str:
    """The spelling a dataset stores: the shipped table's (``"Taxol"`` -> ``"taxol"``, ``"dmso"`` ->
    ``"DMSO"``), else :func:`tidy_name` of ``name``."""
    known = known_compound(name)
    return known.name if known is not None else tidy_name(name)


def is_control_name(name: str) -> bool:
    """Whether ``name`` is the vehicle control (``DMSO`` in any spelling)."""
    return compound_key(name) == compound_key(CONTROL)


def is_ood(name: str) -> bool:
    """Whether ``name`` is one of CellFlux's held-out (OOD) BBBC021 compounds, in any spelling."""
    return compound_key(name) in {compound_key(c) for c in OOD_COMPOUNDS}
