"""The synthetic BBBC021-like simulator: determinism, layout, splits, and documented morphology."""

from __future__ import annotations

import numpy as np
import pytest

from cellfluxrl.data import synthetic
from cellfluxrl.data.compounds import CONTROL, MOAS, OOD_COMPOUNDS, bbbc021_compounds
from cellfluxrl.data.fingerprints import compound_embedding
from cellfluxrl.data.layout import load_dataset
from cellfluxrl.data.synthetic import prepare_synthetic, synthetic_batch
from cellfluxrl.errors import CellfluxError

N = 160  # crops per MoA in the morphology tests


def _max_area(labels: np.ndarray) -> np.ndarray:
    """Largest object area (px) per crop of int32 (n, H, W) labels; 0 for an empty crop."""
    return np.array([np.bincount(lab.ravel())[1:].max() if lab.max() else 0 for lab in labels], dtype=float)


def _count(labels: np.ndarray) -> np.ndarray:
    return labels.reshape(len(labels), -1).max(axis=1).astype(float)


def _stats(moa: str, dose: float = 1.0, n: int = N, seed: int = 0) -> dict[str, float]:
    _, nuclei, cells = synthetic_batch(n, moa, seed=seed, dose=dose)
    return {"nuc_area": _max_area(nuclei).mean(), "cell_area": _max_area(cells).mean(),
            "nuc_count": _count(nuclei).mean(), "cell_count": _count(cells).mean()}


@pytest.fixture(scope="module")
def dmso() -> dict[str, float]:
    return _stats(CONTROL)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "ds"
    prepare_synthetic(out, n_images=420, seed=3, size=48, n_plates=3, progress=False)
    return load_dataset(out)


def _check_labels(nuclei: np.ndarray, cells: np.ndarray) -> None:
    for nuc, cel in zip(nuclei, cells):
        for lab in (nuc, cel):
            assert np.array_equal(np.unique(lab), np.arange(lab.max() + 1))  # contiguous 0..K
        assert np.all(cel[nuc > 0] > 0)  # every nucleus pixel lies in a cell


def test_batch_shapes_dtypes_and_determinism():
    a = synthetic_batch(12, "DNA damage", seed=5, size=64, dose=0.75, plate=2)
    b = synthetic_batch(12, "DNA damage", seed=5, size=64, dose=0.75, plate=2)
    c = synthetic_batch(12, "DNA damage", seed=6, size=64, dose=0.75, plate=2)
    assert a[0].shape == (12, 64, 64, 3) and a[0].dtype == np.uint8
    assert a[1].shape == a[2].shape == (12, 64, 64) and a[1].dtype == a[2].dtype == np.int32
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    # A crop depends on its index only, not on the batch size.
    np.testing.assert_array_equal(synthetic_batch(3, "DNA damage", seed=5, size=64, dose=0.75, plate=2)[0], a[0][:3])


@pytest.mark.parametrize("moa", [CONTROL, *MOAS])
def test_batch_masks_valid_and_centred(moa):
    images, nuclei, cells = synthetic_batch(40, moa, seed=1)
    _check_labels(nuclei, cells)
    assert np.all(nuclei[:, 48, 48] > 0)  # centred on a nucleus
    assert np.all(cells.reshape(40, -1).max(1) >= 1)
    # Realistic intensities: dark background, cells brighter, DNA bright in nuclei, not saturated.
    background = images[cells == 0]
    assert 3 <= np.median(background) <= 25
    assert 60 <= np.percentile(images[..., 2][nuclei > 0], 90) <= 254
    assert 40 <= np.percentile(images[..., 0][(cells > 0) & (nuclei == 0)], 90) <= 254
    assert (images == 255).mean() < 0.02


def test_documented_nucleus_size_shifts(dmso):
    mt = _stats("Microtubule destabilizers")
    dna = _stats("DNA damage")
    aurora = _stats("Aurora kinase inhibitors")
    assert mt["nuc_area"] < 0.5 * dmso["nuc_area"]  # fragmented nuclei
    assert dna["nuc_area"] > 1.6 * dmso["nuc_area"]  # enlarged nuclei
    assert aurora["nuc_area"] > 1.6 * dmso["nuc_area"]  # huge lobed nuclei
    assert mt["nuc_count"] > 1.8 * mt["cell_count"]  # fragments and micronuclei
    assert dmso["nuc_count"] <= 1.1 * dmso["cell_count"]


def test_documented_cell_size_and_density_shifts(dmso):
    epithelial = _stats("Epithelial")
    dna = _stats("DNA damage")
    synthesis = _stats("Protein synthesis")
    eg5 = _stats("Eg5 inhibitors")
    assert epithelial["cell_count"] > 1.6 * dmso["cell_count"]  # packed clusters
    assert dna["cell_count"] < 0.8 * dmso["cell_count"]  # lower density
    assert dna["cell_area"] > 1.4 * dmso["cell_area"]
    assert synthesis["cell_area"] < 0.7 * dmso["cell_area"]
    assert eg5["cell_area"] < 0.5 * dmso["cell_area"]  # rounded, shrunken


@pytest.mark.parametrize("moa", MOAS)
def test_every_moa_differs_from_dmso_on_two_axes(moa, dmso):
    """Nucleus size, cell size, nucleus or cell count, or nuclei per cell moves by >= 12 %."""
    stats = _stats(moa)
    ratios = [stats[k] / dmso[k] for k in ("nuc_area", "cell_area", "nuc_count", "cell_count")]
    ratios.append((stats["nuc_count"] / stats["cell_count"]) / (dmso["nuc_count"] / dmso["cell_count"]))
    moved = sum(abs(np.log(r)) > np.log(1.12) for r in ratios)
    assert moved >= 2, f"{moa}: ratios to DMSO {np.round(ratios, 2)}"


def test_dose_scales_effect(dmso):
    for moa, key in (("DNA damage", "nuc_area"), ("Microtubule destabilizers", "nuc_area"),
                     ("Eg5 inhibitors", "cell_area")):
        half = _stats(moa, dose=0.5)[key] - dmso[key]
        full = _stats(moa, dose=1.0)[key] - dmso[key]
        assert abs(full) > 1.4 * abs(half) > 0.1 * dmso[key], (moa, half, full)


def test_plates_differ():
    means = [synthetic_batch(30, CONTROL, seed=2, plate=p)[0].reshape(-1, 3).mean(0) for p in range(4)]
    ratios = np.array(means) / np.mean(means, axis=0)
    assert np.abs(ratios - 1).max() > 0.1  # channel gain / background / gradient per plate


def test_bad_arguments():
    with pytest.raises(CellfluxError, match="unknown MoA"):
        synthetic_batch(2, "Not a MoA")
    with pytest.raises(CellfluxError, match="outside"):
        synthetic_batch(2, "DNA damage", dose=1.5)


def test_dataset_layout(dataset):
    compounds = bbbc021_compounds()
    assert len(dataset) == 420 and dataset.images.shape == (420, 48, 48, 3)
    assert list(dataset.conditions["compound"]) == [c.name for c in compounds]
    for i, c in enumerate(compounds):
        vector, kind = compound_embedding(c.name, c.smiles)
        assert dataset.conditions["embedding"][i] == kind
        np.testing.assert_array_equal(dataset.embeddings[i], vector)
    assert len(set(dataset.table["id"])) == len(dataset)
    assert dataset.meta["generator"]["seed"] == 3 and dataset.meta["generator"]["n_plates"] == 3
    nuclei, cells = np.asarray(dataset.nuclei), np.asarray(dataset.cells)
    _check_labels(nuclei, cells)
    assert np.all(nuclei[:, 24, 24] > 0)


def test_dataset_splits_controls_and_ood(dataset):
    table = dataset.table
    control = table["state"] == "control"
    assert np.all((table["compound"] == CONTROL) == control)
    assert np.all(table["dose"][control] == 0) and set(table["dose"][~control]) == set(synthetic.DOSES_UM)
    assert abs(control.mean() - 0.25) < 0.01
    assert set(table["batch"]) == {"Plate1", "Plate2", "Plate3"}
    for plate in ("Plate1", "Plate2", "Plate3"):
        for split in ("train", "test"):
            assert np.any(control & (table["batch"] == plate) & (table["split"] == split))
    ood = np.isin(table["compound"], OOD_COMPOUNDS)
    assert ood.any() and np.all(table["split"][ood] == "test")
    in_dist = ~ood
    assert 0.12 < (table["split"][in_dist] == "test").mean() < 0.28
    assert len(set(table["compound"][~control])) == 34
    # Treated crops of one compound share its MoA's look: MT destabilizers have small nuclei.
    mt = np.flatnonzero(table["moa"] == "Microtubule destabilizers")
    ctrl = np.flatnonzero(control)
    assert _max_area(np.asarray(dataset.nuclei[mt])).mean() < 0.6 * _max_area(np.asarray(dataset.nuclei[ctrl])).mean()


def test_dataset_deterministic_and_chunk_independent(tmp_path, monkeypatch, dataset):
    monkeypatch.setattr(synthetic, "CHUNK", 50)
    again = load_dataset(prepare_synthetic(tmp_path / "again", n_images=420, seed=3, size=48, n_plates=3,
                                           progress=False))
    np.testing.assert_array_equal(again.images, dataset.images)
    np.testing.assert_array_equal(again.nuclei, dataset.nuclei)
    for column in dataset.table:
        np.testing.assert_array_equal(again.table[column], dataset.table[column])
    other = load_dataset(prepare_synthetic(tmp_path / "other", n_images=420, seed=4, size=48, n_plates=3,
                                           progress=False))
    assert not np.array_equal(other.images, dataset.images)


def test_too_few_images_for_plates(tmp_path):
    with pytest.raises(CellfluxError, match="too few"):
        prepare_synthetic(tmp_path / "x", n_images=20, n_plates=6, progress=False)
    assert not (tmp_path / "x").exists()


def test_nucleus_k_lies_in_cell_k():
    """Nucleus label k sits in cell label k for the cells with a visible nucleus (listed first)."""
    _, nuclei, cells = synthetic_batch(60, CONTROL, seed=4)
    paired, with_nucleus = 0, 0
    for nuc, cel in zip(nuclei, cells):
        assert nuc[48, 48] == 1 and cel[48, 48] == 1
        k = 0
        while k < nuc.max() and np.all(cel[nuc == k + 1] == k + 1):
            k += 1
        paired += k
        with_nucleus += np.unique(cel[nuc > 0]).size
    assert paired >= 0.9 * with_nucleus  # the rest: cells showing only a micronucleus or second nucleus


def test_every_compound_gets_a_real_embedding(dataset):
    """No name-seeded vectors: SMILES -> RDKit Morgan counts, the 13 others -> CellFlux's shipped row."""
    from cellfluxrl.data.fingerprints import cellflux_embeddings

    shipped = cellflux_embeddings().vectors
    compounds = bbbc021_compounds()
    kinds = list(dataset.conditions["embedding"])
    assert kinds == ["morgan" if c.smiles else "cellflux" for c in compounds]
    assert kinds.count("morgan") == 22 and kinds.count("cellflux") == 13
    assert dataset.meta["embedding_dim"] == 1024 and dataset.meta["generator"]["embeddings_csv"] is None
    for c, vector in zip(compounds, dataset.embeddings):
        np.testing.assert_array_equal(vector, shipped[c.name], err_msg=c.name)


def test_recorded_settings_are_what_a_rerun_compares(dataset):
    """meta.json["generator"] is exactly synthetic_settings(...), so `prepare synthetic` run again with the
    same options resumes the folder and with another option is refused."""
    from pathlib import Path

    from cellfluxrl.data.resume import resume_dataset
    from cellfluxrl.data.synthetic import synthetic_settings

    settings = synthetic_settings(420, 3, 48, 3)
    assert dataset.meta["generator"] == settings
    assert resume_dataset(dataset.root, "synthetic", "generator", settings) is True
    with pytest.raises(CellfluxError, match="already prepared with n_plates 3, not 4"):
        resume_dataset(dataset.root, "synthetic", "generator", synthetic_settings(420, 3, 48, 4))
    relative = synthetic_settings(420, 3, 48, 3, embeddings="emb.csv")["embeddings_csv"]
    assert relative == str((Path.cwd() / "emb.csv").resolve())
