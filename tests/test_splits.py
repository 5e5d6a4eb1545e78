"""Splits dealt by (plate, well): the classifier halves and the validation split (cellfluxrl.data.splits).

The IMPA-layout fixture here holds several crops per field of view (IMPA records no well: the
field is the group), so a deal image by image would put crops of one field on both sides.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

from cellfluxrl.data.layout import load_dataset
from cellfluxrl.data.splits import disjoint_halves, group_ids, pick_groups, validation_split
from test_bbbc021 import BATCHES, DOSE, MOA, SMILES, write_impa  # noqa: E402 (tests/ is on sys.path)

COMPOUNDS = ("DMSO", "colchicine", "cisplatin", "simvastatin")  # simvastatin is a CellFlux OOD compound


def impa_field_rows(fields: int = 6, cells: int = 4, seed: int = 0) -> tuple[list[dict], dict[str, np.ndarray]]:
    """IMPA CSV rows: 2 plates x 2 splits x 4 compounds x ``fields`` fields of ``cells`` crops each."""
    rng = np.random.default_rng(seed)
    rows, images, image_number = [], {}, 10
    for week, plate in BATCHES:
        for split in ("train", "test"):
            for compound in COMPOUNDS:
                for _ in range(fields):
                    image_number += 1
                    for obj in range(1, cells + 1):
                        key = f"{week}_{plate}_1_{image_number}_{float(obj)}"
                        dmso = compound == "DMSO"
                        rows.append({"SAMPLE_KEY": key, "BATCH": f"{week}_{plate}", "CPD_NAME": compound,
                                     "SMILES": "" if dmso else SMILES[compound], "DOSE": "0.0" if dmso else str(DOSE[compound]),
                                     "ANNOT": "DMSO" if dmso else MOA[compound], "STATE": "0" if dmso else "1",
                                     "SPLIT": split})
                        images[key] = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    return rows, images


@pytest.fixture(scope="module")
def impa_fields(tmp_path_factory):
    from cellfluxrl.data.bbbc021 import prepare_impa

    tmp = tmp_path_factory.mktemp("impa_fields")
    rows, images = impa_field_rows()
    return load_dataset(prepare_impa(write_impa(tmp / "impa", rows, images), tmp / "out", progress=False))


def _pairs_of(ds, idx) -> set[tuple[str, str]]:
    return set(zip(ds.table["batch"][idx].tolist(), ds.table["well"][idx].tolist()))


def test_impa_classifier_halves_share_no_plate_and_well(impa_fields):
    """No (plate, well) -- here the field -- has crops in both halves; an image-by-image deal does."""
    from cellfluxrl.rewards.evaluators_fit import classifier_halves

    ds = impa_fields
    assert set(np.unique(ds.table["well"][ds.table["state"] == "treated"]).tolist()) and (ds.table["well"] != "").all()
    for seed in range(3):
        idx, labels, first, second = classifier_halves(ds, seed)
        assert not _pairs_of(ds, idx[first]) & _pairs_of(ds, idx[second])
        assert np.union1d(first, second).size == idx.size and np.intersect1d(first, second).size == 0
        for c in np.unique(labels):  # both halves learn every class
            assert (labels[first] == c).any() and (labels[second] == c).any()
    # the old deal, image by image, splits fields (the leak the groups remove)
    first, second = disjoint_halves(labels, 0)
    assert _pairs_of(ds, idx[first]) & _pairs_of(ds, idx[second])


def test_impa_validation_is_disjoint_from_test_and_pairs_within_itself(impa_fields):
    from cellfluxrl.model.generate import test_pairs

    ds = impa_fields
    val, test = ds.select("val"), ds.select("test")
    assert val.size and np.intersect1d(val, test).size == 0
    assert not _pairs_of(ds, val) & _pairs_of(ds, test)  # disjoint by plate and well (field), not only by image
    assert not (ds.condition[ds.select("val", "treated")] < 0).any()
    assert not ds.conditions["ood"][ds.condition[ds.select("val", "treated")]].any()  # in-distribution only
    assert ds.meta["counts"]["val"]["treated"] == ds.select("val", "treated").size
    assert "plate + well" in ds.meta["validation"]["groups"] and ds.meta["validation"]["fraction"] == 0.1
    target, control = test_pairs(ds, 100, seed=0, images="val")
    assert set(target.tolist()) == set(ds.select("val", "treated").tolist())
    assert (ds.table["split"][control] == "val").all() and (ds.table["state"][control] == "control").all()
    assert (ds.table["batch"][control] == ds.table["batch"][target]).all()
    test_target, _ = test_pairs(ds, 100, seed=0)  # the final evaluation still reads test
    assert (ds.table["split"][test_target] == "test").all()


def test_group_ids():
    groups = group_ids(np.array(["P1", "P1", "P2", "P1", "P1"]), np.array(["A01", "A01", "A01", "", ""]))
    assert groups.tolist() == [0, 0, 1, 2, 3]  # an empty well: the image is its own group


def test_disjoint_halves_without_groups_is_the_old_alternate_deal():
    labels = np.random.default_rng(3).integers(0, 4, 57)
    rng = np.random.default_rng([5, 0x7A1F])
    first = np.zeros(labels.size, dtype=bool)
    for c in np.unique(labels):  # the deal before groups existed
        first[rng.permutation(np.flatnonzero(labels == c))[0::2]] = True
    a, b = disjoint_halves(labels, 5)
    assert a.tolist() == np.flatnonzero(first).tolist() and b.tolist() == np.flatnonzero(~first).tolist()


def test_pick_groups_takes_whole_groups_per_stratum():
    groups = np.repeat(np.arange(20), 3)
    strata = np.repeat(np.arange(20) % 2, 3)
    chosen = pick_groups(groups, strata, 0.2, np.random.default_rng(0))
    assert all(chosen[groups == g].all() or not chosen[groups == g].any() for g in range(20))
    assert [np.unique(groups[chosen & (strata == s)]).size for s in (0, 1)] == [2, 2]  # round(0.2 * 10)
    assert not pick_groups(np.zeros(4, int), np.zeros(4, int), 0.5, np.random.default_rng(0)).any()  # lone group


def test_validation_split_rule():
    """Targets from all-train in-distribution groups only; controls from the same plates; a plate
    without a spare control well keeps its targets in train."""
    split = np.array(["train"] * 12 + ["test", "train"] + ["train"] * 4)
    state = np.array(["treated"] * 14 + ["control"] * 4)
    moa = np.array(["A"] * 14 + ["DMSO"] * 4)
    batch = np.array(["P1"] * 6 + ["P2"] * 8 + ["P1", "P1", "P1", "P2"])
    well = np.array(["a", "a", "b", "b", "c", "c", "d", "d", "e", "e", "f", "f", "g", "g", "x", "y", "z", "w"])
    ood = np.zeros(18, dtype=bool)
    out = validation_split(split, state, moa, batch, group_ids(batch, well), ood, seed=0, fraction=0.5)
    assert out[12] == "test" and out[13] == "train"  # group g straddles train/test: never validation
    val = out == "val"
    assert val.any() and set(batch[val]) == {"P1"}  # P2 has one control well: its targets stay in train
    assert (state[val] == "control").any() and ((state[val] == "treated") & (batch[val] == "P1")).any()
    assert (out[~val] == split[~val]).all()
    ood[:12] = True
    assert (validation_split(split, state, moa, batch, group_ids(batch, well), ood, 0, 0.5) != "val").all()


def test_a_dataset_without_the_well_column_still_loads(tmp_path):
    from test_layout import write_toy

    root = write_toy(tmp_path / "ds")
    path = root / "metadata.csv"
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    keep = [i for i, name in enumerate(rows[0]) if name != "well"]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([[r[i] for i in keep] for r in rows])
    ds = load_dataset(root)
    assert (ds.table["well"] == "").all() and ds.groups.tolist() == list(range(len(ds)))


def test_synthetic_has_plates_and_wells_and_splits_whole_wells(tmp_path):
    from cellfluxrl.data.synthetic import prepare_synthetic

    ds = load_dataset(prepare_synthetic(tmp_path / "ds", n_images=600, seed=1, size=32, n_plates=3, progress=False))
    assert len(ds) == 600 and (ds.table["well"] != "").all()
    for name in ("train", "val", "test"):
        assert ds.select(name, "treated").size and ds.select(name, "control").size
    split_of = {}
    for key, split in zip(zip(ds.table["batch"].tolist(), ds.table["well"].tolist()), ds.table["split"].tolist()):
        assert split_of.setdefault(key, split) == split  # every well lies in one split
    assert ds.meta["generator"]["split_by"] == "plate+well"


def test_validation_subsets_rule():
    """Target groups dealt alternately to val-tune and val-select (the alternation running on across
    MoAs), disjoint by (plate, well); a plate's single control well is shared; nothing outside val."""
    from cellfluxrl.data.splits import VAL_SUBSETS, validation_subsets

    split = np.array(["val"] * 10 + ["train", "test"] + ["val"] * 3)
    state = np.array(["treated"] * 12 + ["control"] * 3)
    moa = np.array(["A"] * 6 + ["B"] * 2 + ["C"] * 4 + ["DMSO"] * 3)
    batch = np.array(["P1"] * 4 + ["P2"] * 8 + ["P1", "P2", "P2"])
    well = np.array(["a", "a", "b", "b", "c", "c", "d", "d", "e", "e", "f", "g", "x", "y", "z"])
    groups = group_ids(batch, well)
    subsets = validation_subsets(split, state, moa, batch, groups)
    select, tune = subsets["val-select"], subsets["val-tune"]
    treated = state == "treated"
    assert not (select & tune & treated).any() and ((select | tune) & treated).sum() == 10
    assert not (select | tune)[10:12].any()  # train and test images are in neither
    for g in np.unique(groups[treated & (split == "val")]):  # whole groups
        assert select[groups == g].all() or tune[groups == g].all()
    counts = [np.unique(groups[subsets[name] & treated]).size for name in VAL_SUBSETS]
    assert sorted(counts) == [2, 3]  # 5 validation target groups (A: 3, B: 1, C: 1), dealt alternately
    assert select[12] and tune[12]  # P1's only validation control well: shared
    assert select[13] != select[14] and tune[13] != tune[14] and select[13] == tune[14]  # P2's two: one each
    again = validation_subsets(split, state, moa, batch, groups)
    assert all(np.array_equal(again[name], subsets[name]) for name in VAL_SUBSETS)


def test_validation_subsets_of_a_synthetic_dataset_pair_within_themselves(tmp_path):
    """On a synthetic dataset both halves have pairs, their targets share no (plate, well), every
    control comes from the same half and plate, and together they are the validation targets."""
    from cellfluxrl.data.synthetic import prepare_synthetic
    from cellfluxrl.model.generate import test_pairs

    ds = load_dataset(prepare_synthetic(tmp_path / "ds", n_images=600, seed=1, size=32, n_plates=3, progress=False))
    pairs = {name: test_pairs(ds, 10_000, 0, images=name) for name in ("val-select", "val-tune", "val")}
    assert _pairs_of(ds, pairs["val-select"][0]).isdisjoint(_pairs_of(ds, pairs["val-tune"][0]))
    assert sorted([*pairs["val-select"][0], *pairs["val-tune"][0]]) == sorted(pairs["val"][0])
    for name in ("val-select", "val-tune"):
        target, control = pairs[name]
        assert target.size > 0 and ds.val_subsets[name][control].all()
        assert (ds.table["batch"][control] == ds.table["batch"][target]).all()
        assert (ds.table["state"][control] == "control").all()
