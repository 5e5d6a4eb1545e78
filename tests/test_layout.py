"""The dataset layout (DatasetWriter / load_dataset) and CellFlux's same-plate pairing."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from cellfluxrl.data.layout import DatasetWriter, load_dataset
from cellfluxrl.data.pairing import PairedDataset, check_controls, draw_controls
from cellfluxrl.errors import CellfluxError
from cellfluxrl.images import to_model

SIZE = 8
PLATES = ("Week1_1", "Week1_2", "Week2_3")
COMPOUNDS = (("taxol", "Microtubule stabilizers", "CCO", False), ("docetaxel", "Microtubule stabilizers", "CCN", True),
             ("cisplatin", "DNA damage", "N.N.Cl[Pt]Cl", False))


def toy_rows(seed: int = 0, per_group: int = 3) -> tuple[np.ndarray, list[dict]]:
    """Images and rows: 3 plates x 2 splits x (DMSO + 3 compounds) x per_group, in a fixed order."""
    rng = np.random.default_rng(seed)
    rows = []
    for plate in PLATES:
        for split in ("train", "test"):
            for compound, moa, _, _ in (("DMSO", "DMSO", "", False), *COMPOUNDS):
                for k in range(per_group):
                    control = compound == "DMSO"
                    rows.append({"id": f"{plate}_{split}_{compound}_{k}", "split": split, "batch": plate,
                                 "compound": compound, "dose": 0.0 if control else 0.5 + k,
                                 "moa": moa, "state": "control" if control else "treated", "source": "toy"})
    images = rng.integers(0, 256, (len(rows), SIZE, SIZE, 3), dtype=np.uint8)
    return images, rows


def toy_conditions() -> tuple[list[dict], np.ndarray]:
    rows = [{"compound": c, "moa": m, "smiles": s, "ood": o, "embedding": "morgan"} for c, m, s, o in COMPOUNDS]
    return rows, np.arange(len(rows) * 4, dtype=np.float32).reshape(len(rows), 4)


def write_toy(out: Path, images=None, rows=None, masks: bool = False, chunk: int = 7) -> Path:
    if images is None:
        images, rows = toy_rows()
    conditions, embeddings = toy_conditions()
    with DatasetWriter(out, SIZE, ("actin", "tubulin", "dna"), "synthetic", with_masks=masks) as writer:
        for start in range(0, len(rows), chunk):
            part = slice(start, start + chunk)
            labels = None
            if masks:
                labels = np.arange(start, start + len(rows[part]), dtype=np.int32)[:, None, None] * np.ones((1, SIZE, SIZE), np.int32)
            writer.add(images[part], rows[part], nuclei=labels, cells=None if labels is None else labels + 1)
        return writer.finish(conditions, embeddings, extra_meta={"note": "toy"})


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return load_dataset(write_toy(tmp_path_factory.mktemp("toy") / "ds"))


def test_round_trip_is_exact(tmp_path):
    images, rows = toy_rows()
    ds = load_dataset(write_toy(tmp_path / "ds", images, rows, masks=True))
    np.testing.assert_array_equal(np.asarray(ds.images), images)
    for column in ("id", "batch", "compound", "moa", "state", "source"):
        assert list(ds.table[column]) == [r[column] for r in rows]
    # the writer deals "val" out of train (cellfluxrl.data.splits.validation_split); nothing else moves
    assert [("train" if s == "val" else s) for s in ds.table["split"]] == [r["split"] for r in rows]
    assert (ds.table["split"] == "val").any() and list(ds.table["well"]) == [""] * len(rows)
    np.testing.assert_array_equal(ds.table["dose"], [r["dose"] for r in rows])
    assert ds.table["dose"].dtype == np.float64
    assert list(ds.conditions["compound"]) == ["taxol", "docetaxel", "cisplatin"]
    assert list(ds.conditions["ood"]) == [False, True, False]
    np.testing.assert_array_equal(ds.embeddings, np.arange(12, dtype=np.float32).reshape(3, 4))
    expected = [-1 if r["compound"] == "DMSO" else ["taxol", "docetaxel", "cisplatin"].index(r["compound"]) for r in rows]
    np.testing.assert_array_equal(ds.condition, expected)
    np.testing.assert_array_equal(ds.nuclei[:, 0, 0], np.arange(len(rows)))
    np.testing.assert_array_equal(ds.cells[:, 3, 5], np.arange(len(rows)) + 1)
    n_train_treated = sum(r["split"] == "train" and r["state"] == "treated" for r in rows)
    counts = ds.meta["counts"]
    assert counts["train"]["treated"] + counts["val"]["treated"] == n_train_treated and ds.meta["note"] == "toy"
    assert ds.meta["n_images"] == len(rows) and ds.meta["has_masks"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary folder left behind


def test_select_and_controls_by_batch(toy):
    train_controls = toy.controls_by_batch("train")
    assert sorted(train_controls) == list(PLATES)
    for plate, idx in train_controls.items():
        assert (toy.table["batch"][idx] == plate).all() and (toy.table["state"][idx] == "control").all()
        n_val = ((toy.table["split"] == "val") & (toy.table["batch"] == plate) & (toy.table["state"] == "control")).sum()
        assert (toy.table["split"][idx] == "train").all() and idx.size == 3 - n_val
    without_ood = toy.select("test", "treated", include_ood=False)
    assert "docetaxel" not in set(toy.table["compound"][without_ood]) and without_ood.size == 3 * 2 * 3


def test_exception_and_abort_leave_no_folder(tmp_path):
    images, rows = toy_rows()
    with pytest.raises(RuntimeError):
        with DatasetWriter(tmp_path / "ds", SIZE, ("a", "b", "c"), "synthetic") as writer:
            writer.add(images[:5], rows[:5])
            raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []
    writer = DatasetWriter(tmp_path / "ds", SIZE, ("a", "b", "c"), "synthetic")
    writer.add(images[:5], rows[:5])
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    # finish() refuses to publish a dataset the loader would reject (treated compound without a condition).
    bad_rows = [dict(r) for r in rows]
    bad_rows[4]["compound"] = "mystery"
    with pytest.raises(CellfluxError, match="mystery"):
        write_toy(tmp_path / "ds", images, bad_rows)
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_non_empty_output(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "old.txt").write_text("x")
    with pytest.raises(CellfluxError, match="already exists and is not empty"):
        DatasetWriter(tmp_path / "ds", SIZE, ("a", "b", "c"), "synthetic")
    (tmp_path / "empty").mkdir()
    assert load_dataset(write_toy(tmp_path / "empty")).root == tmp_path / "empty"  # an empty folder is fine


def _rewrite_csv(path: Path, edit) -> None:
    with open(path, newline="") as f:
        table = list(csv.reader(f))
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(edit(table))


def _drop_column(name):
    def edit(table):
        j = table[0].index(name)
        return [row[:j] + row[j + 1:] for row in table]
    return edit


def _set_cell(line, column, value):
    def edit(table):
        table[line - 1][table[0].index(column)] = value
        return table
    return edit


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def _missing(path: Path) -> None:
    path.unlink()


LOAD_ERRORS = [
    ("meta.json", _missing, "meta.json: missing file"),
    ("meta.json", lambda p: p.write_text("{not json"), "meta.json: not valid JSON"),
    ("images.npy", _truncate, "images.npy: corrupt or truncated .npy"),
    ("images.npy", _missing, "images.npy: missing file"),
    ("metadata.csv", lambda p: _rewrite_csv(p, _drop_column("batch")), "metadata.csv: missing column(s) batch"),
    ("metadata.csv", lambda p: _rewrite_csv(p, _set_cell(5, "split", "validation")),
     "metadata.csv: row 5: split 'validation' is not one of"),
    ("metadata.csv", lambda p: _rewrite_csv(p, _set_cell(6, "compound", "mystery")),
     "metadata.csv: row 6: compound 'mystery' has no row in conditions.csv"),
    ("metadata.csv", lambda p: _rewrite_csv(p, _set_cell(7, "dose", "high")), "metadata.csv: column dose holds a non-number"),
    ("metadata.csv", lambda p: _rewrite_csv(p, lambda t: t[:-1]), "metadata.csv: 71 rows for 72 images"),
    ("conditions.csv", _missing, "conditions.csv: missing file"),
    ("embeddings.npy", lambda p: np.save(p, np.zeros((2, 4), np.float32)), "embeddings.npy: 2 rows for 3 conditions"),
    ("masks/nuclei.npy", lambda p: np.save(p, np.zeros((72, SIZE, SIZE + 1), np.int32)), "nuclei.npy: shape (72, 8, 9)"),
    ("masks/cells.npy", lambda p: np.save(p, np.zeros((72, SIZE, SIZE), np.float32)), "cells.npy: expected int32"),
]


@pytest.mark.parametrize("name,damage,message", LOAD_ERRORS, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(LOAD_ERRORS)])
def test_load_errors_are_one_line_naming_the_file(tmp_path, name, damage, message):
    root = write_toy(tmp_path / "ds", masks=True)
    damage(root / name)
    with pytest.raises(CellfluxError) as info:
        load_dataset(root)
    text = str(info.value)
    assert "\n" not in text and str(root / name.split(":")[0]) in text
    assert message in text, text


def test_load_missing_folder_and_wrong_version(tmp_path):
    with pytest.raises(CellfluxError, match="does not exist"):
        load_dataset(tmp_path / "nothing")
    root = write_toy(tmp_path / "ds")
    meta = json.loads((root / "meta.json").read_text())
    (root / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CellfluxError, match="format_version 99"):
        load_dataset(root)


# ---------------------------------------------------------------------------------------------
# Pairing.


def test_pairs_come_from_the_same_plate_and_split(toy):
    for split in ("train", "val", "test"):
        paired = PairedDataset(toy, split, flip_p=0.0, include_ood=True, dequantize=False, seed=1)
        assert len(paired) == ((toy.table["split"] == split) & (toy.table["state"] == "treated")).sum() > 0
        used = Counter()
        for epoch in range(8):
            paired.set_epoch(epoch)
            for i in range(len(paired)):
                item = paired[i]
                t, c = item["index"], item["control_index"]
                assert toy.table["batch"][c] == toy.table["batch"][t]
                assert toy.table["split"][c] == split and toy.table["state"][c] == "control"
                assert item["cond"] == toy.condition[t] and item["moa"] == toy.table["moa"][t]
                torch.testing.assert_close(item["x_0"], to_model(np.array(toy.images[c]), dequantize=False)[0], rtol=0, atol=0)
                torch.testing.assert_close(item["x_1"], to_model(np.array(toy.images[t]), dequantize=False)[0], rtol=0, atol=0)
                used[c] += 1
        wanted = {c for c in toy.select(split, "control") if toy.table["batch"][c] in set(toy.table["batch"][paired.targets])}
        assert set(used) == wanted  # every control of the split on a plate with targets is drawn at some point


def test_pairing_is_deterministic_in_seed_epoch_and_index(toy):
    a, b = (PairedDataset(toy, "train", flip_p=0.5, seed=7) for _ in range(2))
    c = PairedDataset(toy, "train", flip_p=0.5, seed=8)
    b.set_epoch(0)
    for i in (0, 5, 11):
        x, y = a[i], b[i]
        assert x["control_index"] == y["control_index"]
        torch.testing.assert_close(x["x_0"], y["x_0"], rtol=0, atol=0)
        torch.testing.assert_close(x["x_1"], y["x_1"], rtol=0, atol=0)
    draws = lambda ds: [ds[i]["control_index"] for i in range(len(ds))]  # noqa: E731
    first = draws(a)
    a.set_epoch(1)
    assert draws(a) != first and draws(c) != first
    a.set_epoch(0)
    assert draws(a) == first
    assert not torch.equal(a[0]["x_1"], PairedDataset(toy, "train", flip_p=0.0, dequantize=False)[0]["x_1"])


def test_flips_only_with_positive_flip_p(toy):
    plain = PairedDataset(toy, "train", flip_p=0.0, dequantize=False)
    always = PairedDataset(toy, "train", flip_p=1.0, dequantize=False)
    half = PairedDataset(toy, "train", flip_p=0.5, dequantize=False)
    flipped = 0
    for i in range(len(plain)):
        target = to_model(np.array(toy.images[plain[i]["index"]]), dequantize=False)[0]
        torch.testing.assert_close(plain[i]["x_1"], target, rtol=0, atol=0)
        torch.testing.assert_close(always[i]["x_1"], torch.flip(target, (1, 2)), rtol=0, atol=0)
        flipped += not torch.equal(half[i]["x_1"], target)
    assert 0 < flipped < len(plain)  # P(no flip) = 0.25 per item; 27 items


def test_draw_controls_same_plate_and_deterministic(toy):
    targets = toy.select("test", "treated")
    controls = draw_controls(toy, "test", targets, seed=3)
    assert controls.dtype == np.int64 and controls.shape == targets.shape
    assert (toy.table["batch"][controls] == toy.table["batch"][targets]).all()
    assert (toy.table["state"][controls] == "control").all() and (toy.table["split"][controls] == "test").all()
    np.testing.assert_array_equal(controls, draw_controls(toy, "test", targets, seed=3))


def test_check_controls_errors(tmp_path):
    images, rows = toy_rows()
    keep = [i for i, r in enumerate(rows) if not (r["batch"] == "Week1_2" and r["split"] == "test" and r["state"] == "control")]
    ds = load_dataset(write_toy(tmp_path / "noctl", images[keep], [rows[i] for i in keep]))
    with pytest.raises(CellfluxError, match="plate 'Week1_2' has no DMSO controls in split 'test'"):
        PairedDataset(ds, "test")
    PairedDataset(ds, "train")  # the train split is fine
    keep = [i for i, r in enumerate(rows) if not (r["split"] == "test" and r["state"] == "treated")]
    ds = load_dataset(write_toy(tmp_path / "notest", images[keep], [rows[i] for i in keep]))
    with pytest.raises(CellfluxError, match="split 'test' has no treated images"):
        check_controls(ds, "test", ds.select("test", "treated"))


def test_resume_dataset_compares_the_recorded_settings(tmp_path):
    from cellfluxrl.data.resume import resume_dataset

    assert resume_dataset(tmp_path / "absent", "synthetic", "note", {}) is False
    (tmp_path / "empty").mkdir()
    assert resume_dataset(tmp_path / "empty", "synthetic", "note", {}) is False
    conditions, embeddings = toy_conditions()
    images, rows = toy_rows()
    with DatasetWriter(tmp_path / "ds", SIZE, ("actin", "tubulin", "dna"), "synthetic") as writer:
        writer.add(images, rows)
        writer.finish(conditions, embeddings, extra_meta={"generator": {"seed": 3, "size": SIZE, "csv": None}})
    assert resume_dataset(tmp_path / "ds", "synthetic", "generator", {"seed": 3, "size": SIZE, "csv": None}) is True
    assert resume_dataset(tmp_path / "ds", "synthetic", "generator", {"seed": 3}) is True  # only the given keys
    for settings, needle in (({"seed": 4}, "already prepared with seed 3, not 4"),
                             ({"csv": "/a.csv"}, 'csv null, not "/a.csv"'),
                             ({"pixel_size": 0.5}, "pixel_size null, not 0.5")):  # a setting it did not record
        with pytest.raises(CellfluxError, match=needle):
            resume_dataset(tmp_path / "ds", "synthetic", "generator", settings)
    with pytest.raises(CellfluxError, match='source "synthetic", not "bbbc021-raw"'):
        resume_dataset(tmp_path / "ds", "bbbc021-raw", "generator", {"seed": 3})
    (tmp_path / "ds" / "images.npy").write_bytes(b"\x93NUMPY")  # a damaged dataset is named, not resumed
    with pytest.raises(CellfluxError, match="images.npy: corrupt or truncated"):
        resume_dataset(tmp_path / "ds", "synthetic", "generator", {"seed": 3})
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("")
    with pytest.raises(CellfluxError, match="already exists and is not empty"):
        resume_dataset(tmp_path / "junk", "synthetic", "generator", {})


def test_writer_removes_the_build_folders_of_killed_runs(tmp_path):
    """A kill while the images are written leaves .OUT.partial-HOST-PID-*; the next build removes it
    when PID is gone, never one of a running process."""
    import os
    import subprocess
    import sys

    from cellfluxrl.data.partials import partial_prefix

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{partial_prefix(tmp_path / 'ds')}{int(dead.stdout)}-abc"
    running = tmp_path / f"{partial_prefix(tmp_path / 'ds')}{os.getpid()}-def"
    other = tmp_path / ".other.partial-x-1-ghi"
    for folder in (stale, running, other):
        folder.mkdir()
        (folder / "images.npy").write_bytes(b"half")
    write_toy(tmp_path / "ds")
    assert not stale.exists() and running.is_dir() and other.is_dir()
