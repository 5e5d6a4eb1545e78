"""The same image twice (issue 29 item 5): a field listed twice is refused, and in every layout no image
content (crop hash) reaches two splits or both classifier halves."""

from __future__ import annotations

import hashlib
import shutil
from collections import defaultdict

import numpy as np
import pytest

from cellfluxrl.data import synthetic
from cellfluxrl.data.bbbc021 import prepare_impa, prepare_raw
from cellfluxrl.data.images_csv import prepare_images
from cellfluxrl.data.layout import DatasetWriter, load_dataset
from cellfluxrl.data.synthetic import prepare_synthetic
from cellfluxrl.errors import CellfluxError
from cellfluxrl.rewards.evaluators_fit import classifier_halves
from test_bbbc021 import impa_rows, npy_path, write_impa, write_raw, write_raw_csvs  # tests/ is on sys.path
from test_csv_checks import CROP, crop_rows, refused, write_rows


def assert_no_content_crosses(ds, seed: int = 0) -> None:
    """No crop hash in two splits, nor in both classifier halves (dealt with ``seed``)."""
    digests = [hashlib.blake2b(np.ascontiguousarray(x).tobytes(), digest_size=16).digest() for x in ds.images]
    splits = defaultdict(set)
    for d, s in zip(digests, ds.table["split"]):
        splits[d].add(str(s))
    assert all(len(s) == 1 for s in splits.values())
    idx, _, first, second = classifier_halves(ds, seed)
    assert idx.size and first.size + second.size == idx.size
    assert not {digests[i] for i in idx[first]} & {digests[i] for i in idx[second]}


def _refused_by_writer(call) -> str:
    with pytest.raises(CellfluxError) as exc:
        call()
    assert "\n" not in str(exc.value)
    return str(exc.value)


# ---------------------------------------------------------------------------------------------
# Images CSV: a field listed twice is refused before cropping, naming both lines.


def test_images_csv_field_listed_again_under_another_well(tmp_path):
    rows = crop_rows(tmp_path)
    rows.append({**rows[2], "well": "A09"})  # P1's first taxol field, pasted again as another well
    path = write_rows(tmp_path / "dup.csv", rows)
    message = refused(path, tmp_path / "out")
    assert message.startswith(f"{path} line 10: the same images as line 4 (identical actin, tubulin and dna file "
                              f"contents)") and "remove one of the two rows" in message


def test_images_csv_exact_duplicate_row_and_copied_files(tmp_path):
    rows = crop_rows(tmp_path)
    path = write_rows(tmp_path / "dup.csv", [*rows, rows[6]])
    assert refused(path, tmp_path / "out").startswith(f"{path} line 10: the same images as line 8")
    for ch in ("actin", "tubulin", "dna"):  # other names, same bytes: content, not path, decides
        shutil.copy(tmp_path / rows[1][ch], tmp_path / f"copy_{ch}.png")
    copied = {**rows[1], **{ch: f"copy_{ch}.png" for ch in ("actin", "tubulin", "dna")}, "well": "A07"}
    path = write_rows(tmp_path / "copied.csv", [*rows, copied])
    assert refused(path, tmp_path / "out").startswith(f"{path} line 10: the same images as line 3")


def test_images_csv_dataset_keeps_content_on_one_side(tmp_path):
    (tmp_path / "more").mkdir()
    rows = crop_rows(tmp_path) + crop_rows(tmp_path / "more", seed=1)
    for r in rows[8:]:
        r.update({ch: f"more/{r[ch]}" for ch in ("actin", "tubulin", "dna")}, well=r["well"].replace("A", "B"))
    ds = load_dataset(prepare_images(write_rows(tmp_path / "ok.csv", rows), tmp_path / "out", crop_size=CROP,
                                     progress=False))
    assert len(ds) == 16
    assert_no_content_crosses(ds)


# ---------------------------------------------------------------------------------------------
# The writer: identical crops in two wells or splits are refused, for every source.


def _toy_rows(wells, splits):
    return [{"id": f"i{k}", "split": s, "batch": "P1", "compound": "DMSO", "dose": 0.0, "moa": "DMSO",
             "state": "control", "source": f"src{k}", "well": w} for k, (w, s) in enumerate(zip(wells, splits))]


def test_writer_refuses_identical_crops_in_two_wells(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    images[2] = images[0]

    def write(wells, splits, out):
        with DatasetWriter(tmp_path / out, 8, ("a", "b", "c"), "synthetic") as writer:
            writer.add(images, _toy_rows(wells, splits))
            return writer.finish([], np.zeros((0, 4), np.float32))

    message = _refused_by_writer(lambda: write(("A1", "A2", "A3"), ("train", "train", "test"), "ds1"))
    assert message == (f"{tmp_path / 'ds1'}: images i0 (src0; plate P1, well A1, train) and i2 (src2; plate P1, "
                       f"well A3, test) are identical (same pixels), so one image would sit in two wells or splits; "
                       f"the same image is listed twice in the input: remove the repeat")
    assert not (tmp_path / "ds1").exists()
    message = _refused_by_writer(lambda: write(("A1", "A2", "A3"), ("train",) * 3, "ds2"))  # both halves possible
    assert "i0 (src0; plate P1, well A1, train) and i2 (src2; plate P1, well A3, train)" in message
    message = _refused_by_writer(lambda: write(("", "", ""), ("train",) * 3, "ds3"))  # no well: each its own
    assert "well none recorded" in message
    assert load_dataset(write(("A1", "A2", "A1"), ("train",) * 3, "ds4")).images.shape[0] == 3  # same well: kept


def test_synthetic_dataset_keeps_content_on_one_side(tmp_path, monkeypatch):
    small = dict(n_images=240, seed=0, size=32, n_plates=2, progress=False)
    assert_no_content_crosses(load_dataset(prepare_synthetic(tmp_path / "ok", **small)))
    render = synthetic.render

    def repeating(*args, **kwargs):  # a renderer that returns one crop for every image of a chunk
        images, nuclei, cells = render(*args, **kwargs)
        images[:] = images[0]
        return images, nuclei, cells

    monkeypatch.setattr(synthetic, "render", repeating)
    message = _refused_by_writer(lambda: prepare_synthetic(tmp_path / "bad", **small))
    assert "are identical (same pixels)" in message and not (tmp_path / "bad").exists()


def test_impa_crop_repeated_in_another_field_is_refused(tmp_path):
    rows, images = impa_rows(cells=3)
    clean = load_dataset(prepare_impa(write_impa(tmp_path / "ok", rows, images), tmp_path / "ok_out", progress=False))
    assert_no_content_crosses(clean)
    keys = [r["SAMPLE_KEY"] for r in rows]
    images[keys[-1]] = images[keys[1]]  # a test-split crop is a copy of a train one (another field)
    root = write_impa(tmp_path / "dup", rows, images)
    assert np.array_equal(np.load(npy_path(root, keys[-1])), images[keys[1]])
    message = _refused_by_writer(lambda: prepare_impa(root, tmp_path / "out", progress=False))
    assert f"images {keys[1]} (" in message and f"{keys[-1]} (" in message and "are identical" in message


def test_raw_field_listed_under_another_well_is_refused(tmp_path):
    _, rows = write_raw(tmp_path / "raw", n_interior=3)
    ds = load_dataset(prepare_raw(tmp_path / "raw", tmp_path / "ok", seed=0, progress=False))
    assert_no_content_crosses(ds)
    copy = {**rows[2], "Image_Metadata_Well_DAPI": "B09"}  # the same TIFFs again under another well
    write_raw_csvs(tmp_path / "raw", [*rows, copy])
    message = _refused_by_writer(lambda: prepare_raw(tmp_path / "raw", tmp_path / "out", seed=0, progress=False))
    assert "are identical (same pixels)" in message and "well B09" in message
