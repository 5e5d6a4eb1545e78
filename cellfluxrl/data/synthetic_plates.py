"""The plate map of the synthetic dataset: which compound, dose, plate, well and split each crop gets.

:func:`assign_rows` lays the crops of :func:`cellfluxrl.data.synthetic.prepare_synthetic` out on
plates and wells the way BBBC021 does (one well per compound and dose on each plate, DMSO wells on
every plate) and deals the train/test split by whole wells (:mod:`cellfluxrl.data.splits`);
:func:`metadata_row` writes a crop's ``metadata.csv`` row. The pixels are rendered elsewhere.
"""

from __future__ import annotations

import numpy as np

from cellfluxrl.data.compounds import CONTROL
from cellfluxrl.data.splits import group_ids, pick_groups
from cellfluxrl.errors import CellfluxError

DOSES_UM = (0.3, 1.0, 3.0)
CONTROL_FRACTION = 0.25
TEST_FRACTION = 0.2
CONTROL_WELLS = 8  # DMSO wells per plate


def _well_name(index: int) -> str:
    """Well ``index`` of a 384-well plate in row-major order: 0 -> ``A01``, 24 -> ``B01``."""
    return f"{'ABCDEFGHIJKLMNOP'[index // 24]}{index % 24 + 1:02d}"


def assign_rows(n_images: int, seed: int, n_plates: int, n_compounds: int,
                 ood: np.ndarray, moas: np.ndarray) -> dict[str, np.ndarray]:
    """Which compound, dose, plate, well and split each image gets (already in final dataset order).

    Wells, as on a BBBC021 plate: one well per (compound, dose) on each plate (well index
    ``3 (compound - 1) + dose``), and :data:`CONTROL_WELLS` DMSO wells per plate after them (fewer
    when a plate has fewer controls). The test split is dealt by whole wells
    (:func:`cellfluxrl.data.splits.pick_groups`): per MoA, 20 % of the in-distribution (plate, well)
    groups; per plate, 20 % of the control wells (at least one, at most all but one); every OOD
    compound is in test.

    Args:
        n_images: total number of crops.
        seed: dataset seed.
        n_plates: number of plates.
        n_compounds: number of condition rows (row 0 = DMSO).
        ood: bool ``(n_compounds,)``, the CellFlux held-out compounds.
        moas: str ``(n_compounds,)``, each condition row's MoA (the test split's strata).

    Returns:
        int64 arrays ``compound`` (condition row), ``dose`` (index into :data:`DOSES_UM`, -1 for
        controls), ``plate`` (0-based), ``well`` (index on its plate) and bool ``test``, each of
        length ``n_images``.

    Raises:
        CellfluxError: too few images for two controls per plate.
    """
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x5EED])
    n_ctrl = int(round(CONTROL_FRACTION * n_images))
    if n_ctrl < 2 * n_plates:
        raise CellfluxError(f"{n_images} images give {n_ctrl} controls, too few for {n_plates} plates "
                            f"(need 2 per plate); use more images or fewer plates")
    n_trt = n_images - n_ctrl
    n_combos = (n_compounds - 1) * len(DOSES_UM)
    # Controls: spread evenly over plates, dealt round-robin into the plate's control wells.
    ctrl_plate = rng.permutation(np.arange(n_ctrl) % n_plates)
    ctrl_well = np.zeros(n_ctrl, dtype=np.int64)
    for p in range(n_plates):
        idx = rng.permutation(np.flatnonzero(ctrl_plate == p))
        ctrl_well[idx] = n_combos + np.arange(idx.size) % min(CONTROL_WELLS, idx.size)
    # Treated: every (compound, dose) equally often, random plates.
    combos = rng.permutation(np.arange(n_trt) % n_combos)
    trt_compound = 1 + combos // len(DOSES_UM)
    trt_dose = combos % len(DOSES_UM)
    trt_plate = rng.integers(0, n_plates, size=n_trt)
    rng.random(n_trt)  # simulator version 1 drew a per-image split here; kept so a seed's images stay the same
    order = rng.permutation(n_images)
    compound = np.concatenate([np.zeros(n_ctrl, dtype=np.int64), trt_compound])[order]
    plate = np.concatenate([ctrl_plate, trt_plate]).astype(np.int64)[order]
    well = np.concatenate([ctrl_well, combos]).astype(np.int64)[order]
    groups = group_ids(plate.astype(str), well.astype(str))
    control, held_out = compound == 0, ood[compound]
    strata = np.where(control, plate.astype(str), moas[compound].astype(str))  # controls per plate, treated per MoA
    split_rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x7E57])
    test = held_out.copy()
    for part in (control, ~control & ~held_out):
        test[part] = pick_groups(groups[part], strata[part], TEST_FRACTION, split_rng)
    return {"compound": compound, "dose": np.concatenate([np.full(n_ctrl, -1, dtype=np.int64), trt_dose])[order],
            "plate": plate, "well": well, "test": test}


def metadata_row(i: int, seed: int, rows: dict[str, np.ndarray], compounds) -> dict[str, object]:
    """The metadata.csv row of image ``i`` (see ``data/README.md`` for the columns)."""
    c, d, p = compounds[rows["compound"][i]], int(rows["dose"][i]), int(rows["plate"][i])
    return {
        "id": f"syn{seed}-{i:06d}", "split": "test" if rows["test"][i] else "train",
        "batch": f"Plate{p + 1}", "compound": c.name, "dose": DOSES_UM[d] if d >= 0 else 0.0,
        "moa": c.moa, "state": "control" if c.moa == CONTROL else "treated",
        "source": f"synthetic:seed={seed}:plate={p + 1}:idx={i}", "well": _well_name(int(rows["well"][i])),
    }
