"""A procedural BBBC021-like cell-painting simulator: the embedded default dataset.

Crops of ``size x size`` px (default 96), channels (actin, tubulin, DNA), centred on a nucleus,
showing 1 to about 8 cells (cells continue past the crop border: a crop is a window on a field).
Every crop comes with ground-truth int32 nucleus and cell labels; nucleus fragments and micronuclei
are separate nucleus objects; every nucleus lies inside its cell.

Signatures. A crop's look is set by the signature parameters below (DMSO values in
:data:`DMSO_SIGNATURE`). Each MoA overrides some of them at the strongest dose
(:data:`MOA_SIGNATURES`); a treated crop at relative strength ``s`` (dose, in [0, 1]) uses
``p = p_DMSO + g(s) (p_MoA - p_DMSO)`` with ``g(s) = s`` for morphology parameters and
``g(s) = 0.4 + 0.6 s`` for texture parameters (so the weakest dose still shows the MoA's texture).
Each compound modulates its MoA's effect size by a fixed factor in [0.85, 1.15] seeded by its name.

======================== ========================================================================
MoA                      change from DMSO at dose 1 (s = 1)
======================== ========================================================================
DMSO                     cell R 17 px, nucleus R 8 px, ~3.5 neighbours, cortical actin rim, fine
                         radial tubulin filaments, smooth oval nuclei
Actin disruptors         no actin rim/fibres, punctate actin aggregates; arborised outline
                         (irregularity 0.12 -> 0.38); 30 % binucleated; cell R 15
Aurora kinase inh.       nucleus R 13.5 (area x2.8), lobed nuclei (lobe amp 0.22), 35 % binucleated;
                         cell R 27, no actin fibres; density 3.5 -> 1.5 neighbours
Cholesterol-lowering     smaller rounder cells (R 13.5, irregularity 0.04); no actin fibres; dark
                         vesicles in the cytoplasm; diffuse tubulin with few filaments
DNA damage               nucleus R 11.5 (area x2.1), speckled chromatin; cell R 23, rounder;
                         density 3.5 -> 2 neighbours
DNA replication          nucleus R 11 (area x1.9), dim DNA (x0.75); flat irregular cells R 25 with
                         dim diffuse cytoplasm; density 3.5 -> 2 neighbours
Eg5 inhibitors           round shrunken cells R 10.5; compact bright chromatin ring (DNA x1.4);
                         monopolar tubulin aster; nucleus R 6.5
Epithelial               tightly packed (9 neighbours, spacing 0.75); small cells R 13; strong
                         cortical actin rim (x2)
Kinase inhibitors        spread irregular cells R 20 (irregularity 0.25), nucleus R 9.8; strong actin
                         stress fibres (x3.6); brighter filaments
Microtubule destab.      85 % fragmented nuclei (2-4 fragments), 2 micronuclei/cell; bright
                         condensed DNA (x1.35); round small cells R 12; diffuse tubulin, no filaments
Microtubule stab.        thick bundled tubulin (7 wavy bundles); 1.5 micronuclei/cell, 40 %
                         fragmented; size variability 0.12 -> 0.28 (some large flat cells)
Protein degradation      bright perinuclear aggregate (tubulin and actin) in every cell; rounder
                         cells R 15; density 3.5 -> 2 neighbours
Protein synthesis        small dim cells (R 12, cytoplasm x0.5, DNA x0.8); nucleus R 6.8 with
                         prominent dark nucleoli; density 3.5 -> 2.5 neighbours
======================== ========================================================================

Doses: every compound has three concentrations, :data:`DOSES_UM` = (0.3, 1.0, 3.0) uM, with relative
strengths :data:`DOSE_STRENGTHS` = (0.5, 0.75, 1.0).

Plates (batches ``Plate1..PlateK``) hold wells (``A01``.., one per compound and dose, then eight
DMSO wells); the splits are dealt by whole (plate, well) groups. Plates: per plate and channel a gain
in [0.7, 1.3] and a background of
4-16 grey levels; a linear illumination gradient of amplitude 0.15-0.35 in a random direction;
per-image gain jitter (4 %) and pixel noise (sd 2-4 grey levels, plus 1 % of the signal).

Randomness: crop ``i`` of a dataset depends only on ``(seed, i)`` (a counter-based hash, see
:mod:`cellfluxrl.data.simulator`), so the output is identical whatever the chunking or thread count.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from cellfluxrl.data.simulator import columns as R
from cellfluxrl.data.simulator.paint import crop_seeds_for, render_crops
from cellfluxrl.data.compounds import CONTROL, MOAS, bbbc021_compounds
from cellfluxrl.data.synthetic_plates import (CONTROL_FRACTION, CONTROL_WELLS, DOSES_UM, TEST_FRACTION,
                                              assign_rows, metadata_row)
from cellfluxrl.errors import CellfluxError
from cellfluxrl.images import CHANNELS_BBBC021

log = logging.getLogger(__name__)

SIMULATOR_VERSION = 1
DOSE_STRENGTHS = (0.5, 0.75, 1.0)
CHUNK = 2048

# Signature parameters: name -> (column, DMSO value, is_texture). Sizes in px at size 96.
PARAMS = {
    "cell_r": (R.P_CELL_R, 17.0, False),          # mean cell radius
    "cell_irreg": (R.P_CELL_IRREG, 0.12, False),  # Fourier amplitude of the cell outline
    "nuc_r": (R.P_NUC_R, 8.0, False),             # mean nucleus radius
    "nuc_irreg": (R.P_NUC_IRREG, 0.06, False),    # Fourier amplitude of the nucleus outline
    "nuc_lobes": (R.P_NUC_LOBES, 0.0, False),     # amplitude of a 3-5 lobe mode
    "neighbors": (R.P_NEIGHBORS, 3.5, False),     # mean number of other cells around the crop
    "spacing": (R.P_SPACING, 1.0, False),         # minimum centre distance / (0.85 (r_i + r_j))
    "binuc": (R.P_BINUC, 0.02, False),            # probability of a binucleated cell
    "frag": (R.P_FRAG, 0.0, False),               # probability of a fragmented nucleus (2-4 pieces)
    "micro": (R.P_MICRO, 0.05, False),            # mean micronuclei per cell
    "size_cv": (R.P_SIZE_CV, 0.12, False),        # log-sd of cell radius (cell-to-cell variability)
    "dna_gain": (R.P_DNA_GAIN, 1.0, True),        # nuclear brightness
    "dna_ring": (R.P_DNA_RING, 0.0, True),        # condensed ring-like chromatin
    "dna_speckle": (R.P_DNA_SPECKLE, 0.0, True),  # bright nuclear foci
    "actin_rim": (R.P_ACTIN_RIM, 1.0, True),      # cortical actin rim
    "actin_fiber": (R.P_ACTIN_FIBER, 0.5, True),  # parallel stress fibres
    "actin_puncta": (R.P_ACTIN_PUNCTA, 0.0, True),  # punctate actin aggregates
    "tub_fil": (R.P_TUB_FIL, 1.0, True),          # fine radial microtubule filaments
    "tub_diffuse": (R.P_TUB_DIFFUSE, 0.25, True),  # diffuse cytoplasmic tubulin
    "tub_bundle": (R.P_TUB_BUNDLE, 0.0, True),    # thick wavy microtubule bundles
    "tub_aster": (R.P_TUB_ASTER, 0.0, True),      # monopolar aster around the chromatin
    "aggregate": (R.P_AGGREGATE, 0.0, True),      # perinuclear aggregate
    "cyto_gain": (R.P_CYTO_GAIN, 1.0, True),      # cytoplasm brightness
    "vacuoles": (R.P_VACUOLES, 0.0, True),        # dark cytoplasmic vesicles
    "nucleoli": (R.P_NUCLEOLI, 0.0, True),        # prominent dark nucleoli in the DNA stain
}
assert len(PARAMS) == R.N_PARAMS

DMSO_SIGNATURE = {name: default for name, (_, default, _) in PARAMS.items()}

# Overrides at the strongest dose (s = 1); everything else keeps its DMSO value.
MOA_SIGNATURES: dict[str, dict[str, float]] = {
    "Actin disruptors": dict(actin_rim=0.0, actin_fiber=0.0, actin_puncta=1.0, cell_irreg=0.38,
                             binuc=0.3, cell_r=15.0),
    "Aurora kinase inhibitors": dict(nuc_r=13.5, nuc_lobes=0.22, nuc_irreg=0.1, binuc=0.35, cell_r=27.0,
                                     neighbors=1.5, dna_gain=0.9, actin_fiber=0.0),
    "Cholesterol-lowering": dict(cell_r=13.5, cell_irreg=0.04, actin_fiber=0.0, vacuoles=1.0, tub_fil=0.3,
                                 tub_diffuse=0.6, nuc_r=7.5),
    "DNA damage": dict(nuc_r=11.5, cell_r=23.0, neighbors=2.0, dna_speckle=1.0, cell_irreg=0.06,
                       dna_gain=1.1),
    "DNA replication": dict(nuc_r=11.0, cell_r=25.0, neighbors=2.0, cell_irreg=0.25, dna_gain=0.75,
                            cyto_gain=0.75, tub_diffuse=0.6, tub_fil=0.5),
    "Eg5 inhibitors": dict(cell_r=10.5, cell_irreg=0.02, nuc_r=6.5, dna_ring=1.0, dna_gain=1.4,
                           tub_aster=1.0, tub_fil=0.2, actin_fiber=0.0),
    "Epithelial": dict(neighbors=9.0, spacing=0.75, cell_r=13.0, actin_rim=2.0, actin_fiber=0.1,
                       cell_irreg=0.08),
    "Kinase inhibitors": dict(cell_r=20.0, cell_irreg=0.25, nuc_r=9.8, actin_fiber=1.8, tub_fil=1.3),
    "Microtubule destabilizers": dict(frag=0.85, micro=2.0, nuc_r=6.0, cell_r=12.0, cell_irreg=0.03,
                                      tub_fil=0.0, tub_diffuse=1.0, dna_gain=1.35),
    "Microtubule stabilizers": dict(tub_bundle=1.0, tub_fil=0.2, micro=1.5, frag=0.4, size_cv=0.28,
                                    nuc_r=7.5),
    "Protein degradation": dict(aggregate=1.0, cell_r=15.0, cell_irreg=0.06, neighbors=2.0),
    "Protein synthesis": dict(cell_r=12.0, cyto_gain=0.5, dna_gain=0.8, neighbors=2.5, nuc_r=6.8,
                              tub_fil=0.6, nucleoli=1.0),
}
assert set(MOA_SIGNATURES) == set(MOAS)


def _name_uniform(name: str, salt: str) -> float:
    """A fixed uniform in [0, 1) derived from a name (SHA-256), for per-compound modulation."""
    digest = hashlib.sha256(f"{salt}:{name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def signature_vector(moa: str, strength: float = 1.0, effect_scale: float = 1.0) -> np.ndarray:
    """Signature row for one MoA at a relative strength -> float64 ``(N_PARAMS,)``.

    Args:
        moa: one of :data:`~cellfluxrl.data.compounds.MOAS` or ``"DMSO"``.
        strength: relative dose strength ``s`` in [0, 1] (1 = strongest dataset dose).
        effect_scale: per-compound multiplier of the MoA's effect (1 = the MoA's own signature).

    Raises:
        CellfluxError: unknown MoA name or strength outside [0, 1].
    """
    if moa != CONTROL and moa not in MOA_SIGNATURES:
        raise CellfluxError(f"unknown MoA {moa!r}; expected DMSO or one of: {', '.join(MOAS)}")
    if not 0.0 <= strength <= 1.0:
        raise CellfluxError(f"dose strength {strength} outside [0, 1]")
    row = np.zeros(R.N_PARAMS, dtype=np.float64)
    overrides = MOA_SIGNATURES.get(moa, {}) if moa != CONTROL else {}
    for name, (col, base, is_texture) in PARAMS.items():
        target = overrides.get(name, base)
        g = (0.4 + 0.6 * strength) if is_texture else strength
        if moa == CONTROL:
            g = 0.0
        row[col] = base + min(g * effect_scale, 1.15) * (target - base)
    return row


def compound_effect_scale(compound: str) -> float:
    """Fixed per-compound multiplier of its MoA's effect size, in [0.85, 1.15]."""
    return 0.85 + 0.3 * _name_uniform(compound, "effect")


def plate_vector(seed: int, plate: int) -> np.ndarray:
    """Batch-effect parameters of one plate -> float64 ``(N_PLATE,)`` (``L_*`` columns).

    Args:
        seed: dataset seed.
        plate: plate index (0-based); plate ``k`` is batch ``f"Plate{k + 1}"``.
    """
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(plate), 0x9A7E])
    row = np.zeros(R.N_PLATE, dtype=np.float64)
    row[R.L_GAIN:R.L_GAIN + 3] = rng.uniform(0.7, 1.3, size=3)
    row[R.L_BG:R.L_BG + 3] = rng.uniform(4.0, 16.0, size=3)
    row[R.L_GRAD_AMP] = rng.uniform(0.15, 0.35)
    row[R.L_GRAD_ANGLE] = rng.uniform(0.0, 2.0 * np.pi)
    row[R.L_NOISE] = rng.uniform(2.0, 4.0)
    return row


def render(crop_seeds: np.ndarray, sigs: np.ndarray, plates: np.ndarray,
           size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render crops from explicit per-crop seeds, signature rows and plate rows.

    Args:
        crop_seeds: uint64 ``(n,)``.
        sigs: float64 ``(n, N_PARAMS)``.
        plates: float64 ``(n, N_PLATE)``.
        size: crop side (px).

    Returns:
        images uint8 ``(n, size, size, 3)`` (actin, tubulin, DNA), nuclei int32 ``(n, size, size)``,
        cells int32 ``(n, size, size)``; labels 0 = background, 1..K contiguous per crop.
    """
    n = crop_seeds.shape[0]
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    nuclei = np.empty((n, size, size), dtype=np.int32)
    cells = np.empty((n, size, size), dtype=np.int32)
    if n:
        render_crops(np.ascontiguousarray(crop_seeds, dtype=np.uint64),
                       np.ascontiguousarray(sigs, dtype=np.float64),
                       np.ascontiguousarray(plates, dtype=np.float64), int(size), images, nuclei, cells)
    return images, nuclei, cells


def _scaled_signature(sig: np.ndarray, size: int) -> np.ndarray:
    """Scale the pixel-size parameters from the 96-px reference to ``size``."""
    sig = sig.copy()
    factor = size / 96.0
    sig[..., R.P_CELL_R] *= factor
    sig[..., R.P_NUC_R] *= factor
    return sig


def synthetic_batch(n: int, moa: str = "DMSO", seed: int = 0, size: int = 96, dose: float = 1.0,
                    plate: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` crops of one MoA (or ``"DMSO"``) on one plate, with ground-truth masks.

    Args:
        n: number of crops.
        moa: ``"DMSO"`` or one of the 12 MoAs of :data:`~cellfluxrl.data.compounds.MOAS`.
        seed: seed; crop ``i`` depends only on ``(seed, moa, dose, plate, i)``.
        size: crop side (px); cell and nucleus sizes scale with ``size / 96``.
        dose: relative strength in [0, 1] (1 = the strongest dose used in datasets; ignored for DMSO).
        plate: plate index (0-based) whose batch effects to apply (plate params seeded by ``seed``).

    Returns:
        images uint8 ``(n, size, size, 3)`` (actin, tubulin, DNA); nuclei int32 ``(n, size, size)``
        and cells int32 ``(n, size, size)`` labels, 0 = background, 1..K contiguous per crop.

    Raises:
        CellfluxError: unknown MoA, dose outside [0, 1], or a bad ``n``/``size``.
    """
    if n < 0 or size < 16:
        raise CellfluxError(f"synthetic_batch needs n >= 0 and size >= 16, got n={n}, size={size}")
    sig = _scaled_signature(signature_vector(moa, dose), size)
    stream = int.from_bytes(hashlib.sha256(f"{seed}:{moa}:{dose}:{plate}".encode()).digest()[:8], "little")
    seeds = crop_seeds_for(np.uint64(stream), 0, n)
    sigs = np.broadcast_to(sig, (n, R.N_PARAMS))
    plates = np.broadcast_to(plate_vector(seed, plate), (n, R.N_PLATE))
    return render(seeds, sigs, plates, size)


def synthetic_settings(n_images: int, seed: int, size: int, n_plates: int,
                       embeddings: str | os.PathLike | None = None) -> dict[str, object]:
    """The JSON settings recorded in ``meta.json["generator"]``: the arguments of :func:`prepare_synthetic`
    (``embeddings`` as an absolute path), the simulator version and its constants. The dataset is a
    pure function of them; ``prepare`` run again compares them (:func:`cellfluxrl.data.resume.resume_dataset`).
    """
    return {"seed": int(seed), "n_images": int(n_images), "n_plates": int(n_plates), "size": int(size),
            "simulator_version": SIMULATOR_VERSION, "doses_uM": list(DOSES_UM),
            "dose_strengths": list(DOSE_STRENGTHS), "control_fraction": CONTROL_FRACTION,
            "test_fraction": TEST_FRACTION, "control_wells": CONTROL_WELLS, "split_by": "plate+well",
            "embeddings_csv": str(Path(embeddings).resolve()) if embeddings is not None else None}


def prepare_synthetic(out: str | os.PathLike, n_images: int = 20000, seed: int = 0, size: int = 96,
                      n_plates: int = 6, progress: bool = True,
                      embeddings: str | os.PathLike | None = None) -> Path:
    """Write a synthetic BBBC021-like dataset (with ground-truth masks) in the cellfluxrl layout.

    About 25 % of the crops are DMSO controls, spread over every plate and split; the rest
    cycle through the 34 compounds x 3 doses on random plates. Every crop has a plate and a well
    (one per compound and dose, eight DMSO wells per plate); in-distribution wells and control
    wells are split 80/20 by whole wells (per MoA, per plate); the 8 OOD compounds are all in
    ``test``; the writer then deals a validation split out of the train wells
    (:func:`cellfluxrl.data.splits.validation_split`). Crops are rendered and
    written in chunks of :data:`CHUNK`.

    Args:
        out: dataset folder to create (must not exist or be empty).
        n_images: number of crops (treated + controls).
        seed: dataset seed; the output is a pure function of ``(seed, n_images, size, n_plates)``
            (and of the embeddings CSV, if given).
        size: crop side (px); cell sizes scale with ``size / 96``.
        n_plates: number of plates (batches ``Plate1..PlateK``).
        progress: draw a tqdm bar.
        embeddings: a user's embeddings CSV (see :mod:`cellfluxrl.data.fingerprints`) with a row for
            each of the 35 compounds; None: Morgan counts from SMILES, else CellFlux's shipped row.

    Returns:
        The dataset folder.

    Raises:
        CellfluxError: bad arguments, ``out`` exists and is not empty, or a bad embeddings CSV (or
            one without a row for some compound).
    """
    from cellfluxrl.data.fingerprints import load_user_embeddings, resolve_embedding
    from cellfluxrl.data.layout import DatasetWriter

    if n_images < 1 or size < 16 or n_plates < 1:
        raise CellfluxError(f"prepare synthetic needs n_images >= 1, size >= 16 and plates >= 1 "
                            f"(got {n_images}, {size}, {n_plates})")
    user = load_user_embeddings(embeddings)
    compounds = bbbc021_compounds()
    conditions, vectors = [], []
    for c in compounds:
        vector, kind = resolve_embedding(c.name, c.smiles, user, where="cellfluxrl/data/bbbc021_compounds.csv")
        conditions.append({"compound": c.name, "moa": c.moa, "smiles": c.smiles, "ood": c.ood, "embedding": kind})
        vectors.append(vector)
    ood = np.array([c.ood for c in compounds])
    rows = assign_rows(n_images, seed, n_plates, len(compounds), ood, np.array([c.moa for c in compounds]))

    # Signature rows per (compound, dose) and plate rows, looked up per image.
    sig_table = np.zeros((len(compounds), len(DOSES_UM), R.N_PARAMS))
    for j, c in enumerate(compounds):
        scale = 1.0 if c.moa == CONTROL else compound_effect_scale(c.name)
        for k, strength in enumerate(DOSE_STRENGTHS):
            sig_table[j, k] = _scaled_signature(signature_vector(c.moa, strength, scale), size)
    plate_table = np.stack([plate_vector(seed, p) for p in range(n_plates)])
    dose_col = np.maximum(rows["dose"], 0)
    seeds = crop_seeds_for(np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF), 0, n_images)

    from cellfluxrl.progress import progress as progress_bar

    with DatasetWriter(out, size, CHANNELS_BBBC021, "synthetic", with_masks=True) as writer, \
            progress_bar(total=n_images, desc="synthetic", unit="crop", disable=not progress) as bar:
        for start in range(0, n_images, CHUNK):
            sl = slice(start, min(start + CHUNK, n_images))
            images, nuclei, cells = render(seeds[sl], sig_table[rows["compound"][sl], dose_col[sl]],
                                           plate_table[rows["plate"][sl]], size)
            writer.add(images, [metadata_row(i, seed, rows, compounds) for i in range(sl.start, sl.stop)],
                       nuclei, cells)
            bar.update(sl.stop - sl.start)
        settings = synthetic_settings(n_images, seed, size, n_plates, user.path if user else None)
        path = writer.finish(conditions, np.stack(vectors), extra_meta={"generator": settings}, val_seed=seed)
    log.info("wrote %d synthetic crops to %s", n_images, path)
    return path
