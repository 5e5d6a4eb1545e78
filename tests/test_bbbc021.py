"""Real BBBC021 preparation: IMPA crops and raw Broad images, on fixtures written in those layouts."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellfluxrl.data import bbbc021
from cellfluxrl.data.bbbc021 import impa as impa_reader
from cellfluxrl.data.bbbc021 import tables
from cellfluxrl.data.bbbc021 import (crop_windows, detect_nuclei, illumination_function, prepare_impa,
                                     prepare_raw, scale_to_uint8, split_fields)
from cellfluxrl.data.fingerprints import morgan_count_fingerprint
from cellfluxrl.data.layout import DatasetWriter, load_dataset
from cellfluxrl.errors import CellfluxError

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "ExampleHuman"
if not REAL.is_dir():
    REAL = Path("/work/shared/data/real/ExampleHuman")

SMILES = {
    "colchicine": "COc1cc2c(c(OC)c1OC)-c1ccc(OC)c(=O)cc1C(NC(C)=O)CC2",
    "cisplatin": "N.N.Cl[Pt]Cl",
    "simvastatin": "CCC(C)(C)C(=O)OC1CC(C)C=C2C=CC(C)C(CCC3CC(O)CC(=O)O3)C12",
}
MOA = {"colchicine": "Microtubule destabilizers", "cisplatin": "DNA damage",
       "simvastatin": "Cholesterol-lowering"}
DOSE = {"colchicine": 0.03, "cisplatin": 10.0, "simvastatin": 2.0}
BATCHES = (("Week1", "22123"), ("Week2", "24121"))
IMPA_HEADER = ("Unnamed: 0.1", "Unnamed: 0", "SAMPLE_KEY", "BATCH", "TABLE_NUMBER", "IMAGE_NUMBER",
               "OBJECT_NUMBER", "CPD_NAME", "SMILES", "DOSE", "ANNOT", "STATE", "PLATE", "SPLIT")


# ---------------------------------------------------------------------------------------------
# IMPA fixture: metadata/bbbc021_df_all.csv + <Week>/<Plate>/<Table>_<Image>_<Object>.npy


def impa_rows(cells: int = 3, encoding: str = "10", seed: int = 0) -> tuple[list[dict], dict[str, np.ndarray]]:
    """CSV rows (all IMPA columns) and crops by SAMPLE_KEY: 2 plates x 2 splits x (DMSO + 3 compounds)."""
    rng = np.random.default_rng(seed)
    treated, control = ("1", "0") if encoding == "10" else ("trt", "control")
    rows, images, i = [], {}, 0
    for week, plate in BATCHES:
        for split in ("train", "test"):
            for compound in ("DMSO", "colchicine", "cisplatin", "simvastatin"):
                for _ in range(cells):
                    table, image, obj = 1 + i % 3, 10 + i, 1 + i % 7
                    key = f"{week}_{plate}_{table}_{image}_{float(obj)}"
                    is_dmso = compound == "DMSO"
                    rows.append({"Unnamed: 0.1": str(i), "Unnamed: 0": str(i), "SAMPLE_KEY": key,
                                 "BATCH": f"{week}_{plate}", "TABLE_NUMBER": str(table),
                                 "IMAGE_NUMBER": str(image), "OBJECT_NUMBER": str(float(obj)),
                                 "CPD_NAME": compound, "SMILES": "" if is_dmso and encoding == "10" else
                                 ("CS(=O)C" if is_dmso else SMILES[compound]),
                                 "DOSE": "0.0" if is_dmso else str(DOSE[compound]),
                                 "ANNOT": "DMSO" if is_dmso else MOA[compound],
                                 "STATE": control if is_dmso else treated, "PLATE": plate, "SPLIT": split})
                    images[key] = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
                    i += 1
    return rows, images


def npy_path(root: Path, key: str) -> Path:
    parts = key.split("_")
    return root.joinpath(parts[0], parts[1], "_".join(parts[2:]) + ".npy")


def write_impa(root: Path, rows: list[dict], images: dict[str, np.ndarray], blank_index: bool = False) -> Path:
    """Write the IMPA layout; ``blank_index`` adds pandas' unnamed leading index column."""
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    header = list(rows[0]) if rows else list(IMPA_HEADER)
    with open(root / "metadata" / "bbbc021_df_all.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(([""] if blank_index else []) + header)
        for n, row in enumerate(rows):
            writer.writerow(([str(n)] if blank_index else []) + [row[c] for c in header])
    for key, image in images.items():
        path = npy_path(root, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, image)
    return root


@pytest.fixture
def impa(tmp_path):
    rows, images = impa_rows()
    return write_impa(tmp_path / "impa", rows, images), rows, images


@pytest.mark.parametrize("encoding,blank_index", [("10", False), ("trt", True)])
def test_impa_round_trip_is_exact(tmp_path, encoding, blank_index):
    rows, images = impa_rows(encoding=encoding)
    root = write_impa(tmp_path / "bbbc021_all", rows, images, blank_index=blank_index)
    source_dir = tmp_path if blank_index else root  # the parent of bbbc021_all is accepted too
    out = prepare_impa(source_dir, tmp_path / "out", progress=False)
    ds = load_dataset(out)

    assert ds.meta["source"] == "bbbc021-impa" and ds.meta["skipped"] == {}
    assert ds.channels == ("actin", "tubulin", "dna")
    np.testing.assert_array_equal(np.asarray(ds.images), np.stack([images[r["SAMPLE_KEY"]] for r in rows]))
    assert list(ds.table["id"]) == [r["SAMPLE_KEY"] for r in rows]
    assert list(ds.table["batch"]) == [r["BATCH"] for r in rows]
    assert [("train" if s == "val" else s) for s in ds.table["split"]] == [r["SPLIT"] for r in rows]
    assert list(ds.table["well"]) == ["_".join(r["SAMPLE_KEY"].split("_")[2:4]) for r in rows]  # the field
    assert list(ds.table["compound"]) == [r["CPD_NAME"] for r in rows]
    assert list(ds.table["moa"]) == [r["ANNOT"] for r in rows]
    assert list(ds.table["state"]) == ["control" if r["CPD_NAME"] == "DMSO" else "treated" for r in rows]
    np.testing.assert_array_equal(ds.table["dose"], [float(r["DOSE"]) for r in rows])
    assert ds.table["source"][0] == "Week1/22123/1_10_1.0.npy"

    assert list(ds.conditions["compound"]) == ["DMSO", "cisplatin", "colchicine", "simvastatin"]
    assert list(ds.conditions["ood"]) == [False, False, False, True]  # simvastatin is a CellFlux OOD compound
    assert list(ds.conditions["moa"]) == ["DMSO", "DNA damage", "Microtubule destabilizers", "Cholesterol-lowering"]
    expected_dmso = "CS(C)=O" if encoding == "10" else "CS(=O)C"
    assert list(ds.conditions["smiles"]) == [expected_dmso] + [SMILES[c] for c in ("cisplatin", "colchicine", "simvastatin")]
    for smiles, embedding in zip(ds.conditions["smiles"], ds.embeddings):
        np.testing.assert_array_equal(embedding, morgan_count_fingerprint(smiles))
    assert set(ds.conditions["embedding"]) == {"morgan"}
    treated = ds.table["state"] == "treated"
    assert (ds.conditions["compound"][ds.condition[treated]] == ds.table["compound"][treated]).all()
    assert (ds.condition[~treated] == -1).all()


def test_impa_skips_one_corrupt_crop_in_more_than_a_hundred(tmp_path):
    rows, images = impa_rows(cells=8)  # 128 rows: one bad crop is under 1%
    root = write_impa(tmp_path / "impa", rows, images)
    bad = npy_path(root, rows[5]["SAMPLE_KEY"])
    bad.write_bytes(bad.read_bytes()[:300])  # truncated
    ds = load_dataset(prepare_impa(root, tmp_path / "out", progress=False))
    assert len(ds) == 127 and ds.meta["skipped"] == {"corrupt_npy": 1}
    assert rows[5]["SAMPLE_KEY"] not in set(ds.table["id"])
    kept = [r["SAMPLE_KEY"] for i, r in enumerate(rows) if i != 5]
    np.testing.assert_array_equal(np.asarray(ds.images), np.stack([images[k] for k in kept]))


def _one_line_error(call, *needles: str) -> str:
    with pytest.raises(CellfluxError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def test_impa_bad_inputs(tmp_path):
    rows, images = impa_rows()
    out = tmp_path / "out"

    def run(name, rows_, images_=images, drop_column=None, before=None):
        root = tmp_path / name
        if drop_column:
            rows_ = [{k: v for k, v in r.items() if k != drop_column} for r in rows_]
        write_impa(root, rows_, images_)
        if before:
            before(root)
        return lambda: prepare_impa(root, out, progress=False)

    _one_line_error(lambda: prepare_impa(tmp_path / "nowhere", out, progress=False), "nowhere", "does not exist")
    (tmp_path / "empty").mkdir()
    _one_line_error(lambda: prepare_impa(tmp_path / "empty", out, progress=False), "bbbc021_df_all.csv", "missing file")
    _one_line_error(run("nocol", rows, drop_column="SPLIT"), "bbbc021_df_all.csv", "missing column(s) SPLIT")
    # A corrupt crop among few rows is more than 1%: the error names the first bad file.
    _one_line_error(run("corrupt", rows, before=lambda r: npy_path(r, rows[3]["SAMPLE_KEY"]).write_bytes(b"junk")),
                    "Week1/22123/1_13_4.0.npy", "corrupt", "more than 1%")
    _one_line_error(run("missing", rows, before=lambda r: npy_path(r, rows[4]["SAMPLE_KEY"]).unlink()),
                    "Week1/22123/2_14_5.0.npy", "missing")
    no_smiles = [dict(r) for r in rows]
    no_smiles[7]["SMILES"] = ""
    _one_line_error(run("nosmiles", no_smiles), "line 9", "'cisplatin' has no SMILES")
    bad_smiles = [dict(r) for r in rows]
    bad_smiles[3]["SMILES"] = "not a molecule"
    _one_line_error(run("badsmiles", bad_smiles), "line 5", "invalid SMILES")
    all_train = [{**r, "SPLIT": "train"} for r in rows]
    _one_line_error(run("onesplit", all_train), "split 'test' has no treated images")
    no_dmso = [r for r in rows if not (r["BATCH"] == "Week2_24121" and r["SPLIT"] == "test" and r["CPD_NAME"] == "DMSO")]
    _one_line_error(run("nodmso", no_dmso), "plate 'Week2_24121'", "no DMSO controls in split 'test'")
    bad_state = [dict(r) for r in rows]
    bad_state[2]["STATE"] = "maybe"
    _one_line_error(run("badstate", bad_state), "line 4", "STATE 'maybe'")
    bad_split = [dict(r) for r in rows]
    bad_split[2]["SPLIT"] = "validation"
    _one_line_error(run("badsplit", bad_split), "line 4", "SPLIT 'validation'")
    bad_moa = [dict(r) for r in rows]
    bad_moa[5]["ANNOT"] = "Magic"
    _one_line_error(run("badmoa", bad_moa), "line 7", "MoA 'Magic'")
    bad_key = [dict(r) for r in rows]
    bad_key[1]["SAMPLE_KEY"] = "Week1"
    _one_line_error(run("badkey", bad_key), "line 3", "SAMPLE_KEY 'Week1'")
    _one_line_error(run("norows", []), "no rows")
    assert not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("x")
    good = run("good", rows)
    _one_line_error(good, str(out), "not empty")
    assert os.listdir(out) == ["keep.txt"]


def test_impa_interrupted_prepare_leaves_nothing(tmp_path, monkeypatch):
    rows, images = impa_rows()
    root = write_impa(tmp_path / "impa", rows, images)
    calls = Counter()
    real_read = impa_reader._read_crop

    def interrupted(path, size):
        calls["n"] += 1
        if calls["n"] > 20:
            raise KeyboardInterrupt
        return real_read(path, size)

    monkeypatch.setattr(impa_reader, "_read_crop", interrupted)
    monkeypatch.setattr(tables, "CHUNK_IMAGES", 4)  # some chunks are already on disk when it stops
    with pytest.raises(KeyboardInterrupt):
        prepare_impa(root, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["impa"]


def test_impa_peak_chunk_is_bounded(tmp_path, monkeypatch):
    """Images reach the writer in chunks of at most CHUNK_IMAGES (the streaming contract)."""
    rows, images = impa_rows(cells=4)
    root = write_impa(tmp_path / "impa", rows, images)
    sizes = []
    real_add = DatasetWriter.add

    def spy(self, chunk, chunk_rows, *args, **kwargs):
        sizes.append(len(chunk))
        return real_add(self, chunk, chunk_rows, *args, **kwargs)

    monkeypatch.setattr(tables, "CHUNK_IMAGES", 5)
    monkeypatch.setattr(DatasetWriter, "add", spy)
    prepare_impa(root, tmp_path / "out", progress=False)
    assert max(sizes) == 5 and sum(sizes) == len(rows)


# ---------------------------------------------------------------------------------------------
# Raw Broad layout: BBBC021_v1_{image,compound,moa}.csv + one 16-bit TIFF per channel per field.

RAW_HEADER = ("TableNumber", "ImageNumber", "Image_FileName_DAPI", "Image_PathName_DAPI",
              "Image_FileName_Tubulin", "Image_PathName_Tubulin", "Image_FileName_Actin",
              "Image_PathName_Actin", "Image_Metadata_Plate_DAPI", "Image_Metadata_Well_DAPI",
              "Replicate", "Image_Metadata_Compound", "Image_Metadata_Concentration")
# well -> (compound, concentration); AZ-J has no SMILES, colchicine 1.0 is not MoA-annotated.
WELLS = {"B02": ("DMSO", 0.0), "B03": ("colchicine", 0.03), "B04": ("cisplatin", 10.0),
         "B05": ("AZ-J", 1.0), "B06": ("colchicine", 1.0)}
NUC_R, CELL_R, RING_IN = 7, 18, 13


def _random_centres(rng, shape, n, margin=48, min_dist=42.0):
    centres = []
    while len(centres) < n:
        c = rng.uniform([margin, margin], [shape[0] - margin, shape[1] - margin])
        if all(np.hypot(*(c - d)) >= min_dist for d in centres):
            centres.append(c)
    return np.rint(np.array(centres))


def synthetic_field(rng, shape, centres, gain):
    """Three uint16 planes (actin, tubulin, dna): ring actin, cell-wide tubulin, disk nuclei."""
    rr, cc = np.indices(shape)
    dist = np.min([np.hypot(rr - r, cc - c) for r, c in centres], axis=0)
    dna = 800 + 20000 * (dist <= NUC_R)
    tubulin = 600 + 6000 * (dist <= CELL_R)
    actin = 500 + 9000 * ((dist >= RING_IN) & (dist <= CELL_R))
    planes = [np.clip(p * gain + rng.normal(0, 80, shape), 0, 65535).astype(np.uint16) for p in (actin, tubulin, dna)]
    return planes


def write_raw(root: Path, shape=(256, 320), n_interior=8, seed=0, plate_formats=("week", "bare")):
    """2 plates x 5 wells x 2 sites; returns {DAPI relative path: interior centres (K, 2)}."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    truth, rows, number = {}, [], 1
    for p, ((week, plate), fmt) in enumerate(zip(BATCHES, plate_formats)):
        folder = f"{week}/{week}_{plate}"
        (root / folder).mkdir(parents=True, exist_ok=True)
        rr, cc = np.indices(shape)
        gain = 0.5 + (cc / shape[1] if p == 0 else rr / shape[0])  # a different vignetting per plate
        for well, (compound, conc) in WELLS.items():
            for site in (1, 2):
                interior = _random_centres(rng, shape, n_interior)
                border = np.array([[14, rng.integers(60, shape[1] - 60)], [rng.integers(60, shape[0] - 60), shape[1] - 10]])
                planes = synthetic_field(rng, shape, np.concatenate([interior, border]), gain)
                names = {}
                for w, ch, plane in zip((4, 2, 1), ("Actin", "Tubulin", "DAPI"), planes):
                    names[ch] = f"{week}_{plate}_{well}_s{site}_w{w}{number:04X}.tif"
                    tifffile.imwrite(root / folder / names[ch], plane)
                truth[f"{folder}/{names['DAPI']}"] = interior
                rows.append({"TableNumber": str(p + 1), "ImageNumber": str(number),
                             "Image_FileName_DAPI": names["DAPI"], "Image_PathName_DAPI": folder,
                             "Image_FileName_Tubulin": names["Tubulin"], "Image_PathName_Tubulin": folder,
                             "Image_FileName_Actin": names["Actin"], "Image_PathName_Actin": folder,
                             "Image_Metadata_Plate_DAPI": f"{week}_{plate}" if fmt == "week" else plate,
                             "Image_Metadata_Well_DAPI": well, "Replicate": str(p + 1),
                             "Image_Metadata_Compound": compound, "Image_Metadata_Concentration": str(conc)})
                number += 1
    write_raw_csvs(root, rows)
    return truth, rows


def write_raw_csvs(root: Path, rows: list[dict], compounds=None, moas=None) -> None:
    compounds = compounds if compounds is not None else [
        ("DMSO", ""), ("colchicine", SMILES["colchicine"]), ("cisplatin", SMILES["cisplatin"]), ("AZ-J", "")]
    moas = moas if moas is not None else [
        ("DMSO", "0.0", "DMSO"), ("colchicine", "0.03", "Microtubule destabilizers"),
        ("cisplatin", "10.0", "DNA damage"), ("AZ-J", "1.0", "Eg5 inhibitors")]
    header = list(rows[0]) if rows else list(RAW_HEADER)
    with open(root / "BBBC021_v1_image.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([[r[c] for c in header] for r in rows])
    with open(root / "BBBC021_v1_compound.csv", "w", newline="") as f:
        csv.writer(f).writerows([("compound", "smiles"), *compounds])
    with open(root / "BBBC021_v1_moa.csv", "w", newline="") as f:
        csv.writer(f).writerows([("compound", "concentration", "moa"), *moas])


@pytest.fixture(scope="module")
def raw_prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("raw")
    truth, rows = write_raw(tmp / "raw")
    out = prepare_raw(tmp / "raw", tmp / "out", seed=0, progress=False)
    return truth, rows, load_dataset(out)


def test_raw_crops_are_centred_on_nuclei(raw_prepared):
    truth, _, ds = raw_prepared
    found = Counter()
    for source in ds.table["source"]:
        path, centre = source.split("@")
        centre = np.array([float(v) for v in centre.split(",")])
        distances = np.hypot(*(truth[path] - centre).T)
        assert distances.min() <= 1.0, (source, distances.min())  # the crop centre is a true nucleus centre
        found[(path, int(distances.argmin()))] += 1
    n_fields = 2 * 3 * 2  # the annotated wells with SMILES: DMSO, colchicine 0.03, cisplatin 10
    assert len(ds) == n_fields * 8 and set(found.values()) == {1}  # every interior nucleus exactly once
    assert ds.meta["skipped"] == {"fields_not_moa_annotated": 4, "fields_without_smiles": 4,
                                  "crops_leaving_field": 2 * n_fields}
    images = np.asarray(ds.images)
    centre, ring = images[:, 47:50, 47:50], images[:, 47:50, 47 + 16:50 + 16]
    assert (centre[..., 2] > 170).all()  # DNA is bright on every nucleus (3x vignetting corrected)...
    assert (ring[..., 2] < 60).all()  # ...and is dark 16 px away, on the actin ring
    assert (centre[..., 1] > 60).all() and (ring[..., 1] > 60).all()  # tubulin fills the cell
    assert (ring[..., 0] > 3 * centre[..., 0].astype(float) + 30).all()  # actin is on the ring only


def test_raw_metadata_split_and_batches(raw_prepared):
    _, _, ds = raw_prepared
    assert ds.meta["source"] == "bbbc021-raw" and ds.images.shape[1:] == (96, 96, 3)
    assert set(ds.table["batch"]) == {"Week1_22123", "Week2_24121"}  # "22123" + Week2 path -> Week2_24121
    assert list(ds.conditions["compound"]) == ["DMSO", "cisplatin", "colchicine"]
    assert list(ds.conditions["smiles"]) == ["CS(C)=O", SMILES["cisplatin"], SMILES["colchicine"]]
    assert list(ds.conditions["moa"]) == ["DMSO", "DNA damage", "Microtubule destabilizers"]
    # Crops of one field are all in one split; every plate has controls and treated cells in both.
    field_split = {}
    for source, split in zip(ds.table["source"], ds.table["split"]):
        assert field_split.setdefault(source.split("@")[0], split) == split
    for split in ("train", "test"):
        for batch in ("Week1_22123", "Week2_24121"):
            states = set(ds.table["state"][(ds.table["split"] == split) & (ds.table["batch"] == batch)])
            assert states == {"control", "treated"}
    assert set(ds.table["dose"][ds.table["compound"] == "cisplatin"]) == {10.0}


def test_raw_split_depends_on_seed_only(tmp_path):
    write_raw(tmp_path / "raw", n_interior=2)
    a = load_dataset(prepare_raw(tmp_path / "raw", tmp_path / "a", seed=3, progress=False))
    b = load_dataset(prepare_raw(tmp_path / "raw", tmp_path / "b", seed=3, progress=False))
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
    assert list(a.table["split"]) == list(b.table["split"])
    splits = {s: tuple(load_dataset(prepare_raw(tmp_path / "raw", tmp_path / f"s{s}", seed=s, progress=False))
                       .table["split"]) for s in range(4)}
    assert len(set(splits.values())) > 1


def test_split_fields_is_stratified():
    keys = [("p1", "control")] * 10 + [("p1", "treated")] * 20 + [("p2", "control")] * 2 + [("p2", "treated")]
    splits = split_fields(keys, 0.2, seed=0)
    count = Counter(zip(keys, splits))
    assert count[(("p1", "control"), "test")] == 2 and count[(("p1", "treated"), "test")] == 4
    assert count[(("p2", "control"), "test")] == 1 and count[(("p2", "treated"), "train")] == 1


def test_illumination_correction_flattens_a_gradient():
    rng = np.random.default_rng(0)
    rr, cc = np.indices((128, 160))
    gain = 0.4 + 1.2 * cc / 160
    fields = [(1000 + rng.normal(0, 10, gain.shape)) * gain for _ in range(6)]
    illumination = illumination_function(np.mean(fields, axis=0), 160 / 20)
    assert illumination.dtype == np.float32 and abs(illumination.mean() - 1) < 1e-5
    corrected = fields[0] / illumination
    assert fields[0][:, -20:].mean() / fields[0][:, :20].mean() > 3
    assert abs(corrected[:, -20:].mean() / corrected[:, :20].mean() - 1) < 0.05


def test_detect_nuclei_and_windows():
    image = np.zeros((100, 120), np.float32)
    rr, cc = np.indices(image.shape)
    for r, c in ((30, 40), (70, 90), (50, 112)):
        image[np.hypot(rr - r, cc - c) <= 6] = 1.0
    image[5, 5] = 1.0  # debris: one pixel
    centroids = detect_nuclei(image)
    np.testing.assert_allclose(centroids, [[30, 40], [50, 112], [70, 90]], atol=0.2)
    corners = crop_windows(centroids, image.shape, 40)
    np.testing.assert_array_equal(corners, [[10, 20], [50, 70]])  # (50, 112) would leave the field
    assert detect_nuclei(np.zeros((10, 10))).shape == (0, 2)


def test_channel_order_matches_the_image_convention():
    from cellfluxrl.images import CHANNELS_BBBC021

    assert bbbc021.CHANNELS_BBBC021 == CHANNELS_BBBC021 == ("actin", "tubulin", "dna")


def test_scale_to_uint8():
    x = np.array([[[0.0, 10.0], [5.0, 20.0], [10.0, 30.0], [11.0, 0.0]]], np.float32)  # (1, 4, 2)
    out = scale_to_uint8(x, lo=np.array([0.0, 10.0]), hi=np.array([10.0, 30.0]))
    np.testing.assert_array_equal(out, [[[0, 0], [128, 128], [255, 255], [255, 0]]])
    assert out.dtype == np.uint8


def test_real_cells_crops_centred_on_real_nuclei(tmp_path):
    """ExampleHuman (real HT29 cells, d0 = DNA, d2 = cytoplasm) through the raw pipeline."""
    from skimage.filters import threshold_otsu

    files = {k: REAL / f"AS_09125_050116030001_D03f00d{k}.tif" for k in (0, 2)}
    if not all(p.is_file() for p in files.values()):
        pytest.skip("ExampleHuman images not available")
    raw = tmp_path / "raw"
    folder = raw / "Week1" / "Week1_22123"
    folder.mkdir(parents=True)
    rows = []
    wells = ("B02", "B03", "B04", "B05")  # fields: the real image and its 90/180/270 degree rotations
    for k, well in enumerate(wells):
        names = {}
        for ch, d in (("DAPI", 0), ("Tubulin", 2), ("Actin", 2)):
            names[ch] = f"{well}_s1_w{ch}.tif"
            if k == 0:
                os.symlink(files[d], folder / names[ch])
            else:
                tifffile.imwrite(folder / names[ch], np.rot90(tifffile.imread(files[d]), k))
        compound, conc = ("DMSO", 0.0) if k < 2 else ("colchicine", 0.03)
        rows.append({"TableNumber": "1", "ImageNumber": str(k + 1),
                     **{f"Image_{kind}Name_{ch}": (names[ch] if kind == "File" else "Week1/Week1_22123")
                        for ch in ("DAPI", "Tubulin", "Actin") for kind in ("File", "Path")},
                     "Image_Metadata_Plate_DAPI": "Week1_22123", "Image_Metadata_Well_DAPI": well,
                     "Replicate": "1", "Image_Metadata_Compound": compound,
                     "Image_Metadata_Concentration": str(conc)})
    write_raw_csvs(raw, rows)
    ds = load_dataset(prepare_raw(raw, tmp_path / "out", seed=0, progress=False, crop_size=96))
    assert 100 <= len(ds) <= 2000
    images = np.asarray(ds.images)
    on_nucleus = [images[i, 46:51, 46:51, 2].mean() > threshold_otsu(images[i, :, :, 2]) for i in range(len(ds))]
    assert np.mean(on_nucleus) >= 0.95
    assert ds.meta["skipped"]["crops_leaving_field"] > 0


def test_raw_bad_inputs(tmp_path):
    _, rows = write_raw(tmp_path / "raw", n_interior=2)
    raw, out = tmp_path / "raw", tmp_path / "out"

    def run():
        return prepare_raw(raw, out, seed=0, progress=False)

    _one_line_error(lambda: prepare_raw(tmp_path / "nowhere", out, progress=False), "nowhere", "does not exist")
    dapi = raw / rows[0]["Image_PathName_DAPI"] / rows[0]["Image_FileName_DAPI"]
    good = dapi.read_bytes()
    dapi.write_bytes(good[: len(good) // 2])
    _one_line_error(run, dapi.name, "corrupt or truncated TIFF")
    dapi.write_bytes(b"not a tiff at all")
    _one_line_error(run, dapi.name, "corrupt or truncated TIFF")
    dapi.unlink()
    _one_line_error(run, dapi.name, "missing TIFF", "line 2")
    dapi.write_bytes(good)

    write_raw_csvs(raw, [{k: v for k, v in r.items() if k != "Image_Metadata_Compound"} for r in rows])
    _one_line_error(run, "BBBC021_v1_image.csv", "missing column(s) Image_Metadata_Compound")
    no_dmso = [r for r in rows if not (r["Image_Metadata_Compound"] == "DMSO" and r["TableNumber"] == "2")]
    write_raw_csvs(raw, no_dmso)
    _one_line_error(run, "plate 'Week2_24121'", "no DMSO controls")
    one_treated = [r for r in rows if r["Image_Metadata_Compound"] == "DMSO" or r["Image_Metadata_Well_DAPI"] == "B03"
                   and r["Image_FileName_DAPI"].split("_")[3] == "s1"]
    write_raw_csvs(raw, one_treated)
    _one_line_error(run, "split 'test' has no treated images")
    write_raw_csvs(raw, rows, compounds=[("DMSO", ""), ("colchicine", "C1CC(("), ("cisplatin", SMILES["cisplatin"])])
    _one_line_error(run, "BBBC021_v1_compound.csv line 3", "invalid SMILES")
    write_raw_csvs(raw, rows, moas=[("DMSO", "0.0", "DMSO"), ("colchicine", "0.03", "Telepathy")])
    _one_line_error(run, "BBBC021_v1_moa.csv line 3", "MoA 'Telepathy'")
    bad_conc = [dict(r) for r in rows]
    bad_conc[4]["Image_Metadata_Concentration"] = "lots"
    write_raw_csvs(raw, bad_conc)
    _one_line_error(run, "BBBC021_v1_image.csv line 6", "'lots' is not a number")
    (raw / "BBBC021_v1_moa.csv").unlink()
    _one_line_error(run, "BBBC021_v1_moa.csv", "missing file")
    assert not out.exists()

    write_raw_csvs(raw, rows)
    out.mkdir()
    (out / "x").write_text("")
    _one_line_error(run, "not empty")
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_raw_meta_records_preparation(raw_prepared):
    _, _, ds = raw_prepared
    prep = ds.meta["preparation"]
    assert prep["seed"] == 0 and prep["crop_size"] == 96 and prep["n_fields"] == 12
    lo, hi = np.array(prep["intensity_ranges"]["Week1_22123"]["lo"]), np.array(prep["intensity_ranges"]["Week1_22123"]["hi"])
    assert lo.shape == (3,) and (hi > lo).all()
    json.dumps(ds.meta)  # plain JSON types only


# ---------------------------------------------------------------------------------------------
# Raw images at another magnification (--pixel-size / --scale) and touching nuclei.


def test_field_scale_validation():
    from cellfluxrl.data.bbbc021.fields import BBBC021_PIXEL_SIZE_UM, field_scale

    assert field_scale() == 1.0 and field_scale(scale=0.5) == 0.5
    assert field_scale(pixel_size_um=2 * BBBC021_PIXEL_SIZE_UM) == pytest.approx(2.0)
    for bad in (float("nan"), float("inf"), 0.0, -0.3):
        _one_line_error(lambda: field_scale(pixel_size_um=bad), "--pixel-size", "positive finite")
        _one_line_error(lambda: field_scale(scale=bad), "--scale", "positive finite")
    _one_line_error(lambda: field_scale(scale="big"), "--scale", "not a number")
    _one_line_error(lambda: field_scale(pixel_size_um=325.0), "--pixel-size 325", "outside", "microns per pixel")
    _one_line_error(lambda: field_scale(pixel_size_um=0.3, scale=1.0), "not both")


def test_detect_nuclei_splits_touching_nuclei():
    image = np.zeros((80, 100), np.float32)
    rr, cc = np.indices(image.shape)
    for r, c in ((40, 40), (40, 53), (20, 85)):  # two overlapping discs (r = 7, 13 px apart) + one apart
        image[np.hypot(rr - r, cc - c) <= 7] = 1.0
    np.testing.assert_allclose(detect_nuclei(image), [[20, 85], [40, 40], [40, 53]], atol=1.0)
    assert len(detect_nuclei(image, declump_h_px=0)) == 2  # without splitting: one blob, one crop


def _sources(ds) -> list[tuple[str, np.ndarray]]:
    """(DAPI path, crop centre (row, col) in the field's px) of every crop, in dataset order."""
    out = []
    for source in ds.table["source"]:
        path, centre = source.split("@")
        out.append((path, np.array([float(v) for v in centre.split(",")])))
    return out


def _zoom_raw(src: Path, dst: Path, factor: int) -> None:
    """Copy a raw folder with every TIFF enlarged ``factor`` times (pixel replication)."""
    for path in src.rglob("*"):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.suffix == ".tif":
            tifffile.imwrite(target, np.kron(tifffile.imread(path), np.ones((factor, factor), np.uint16)))
        else:
            target.write_bytes(path.read_bytes())


def test_raw_at_twice_the_magnification_gives_bbbc021_crops(tmp_path):
    from cellfluxrl.data.bbbc021.fields import BBBC021_PIXEL_SIZE_UM

    write_raw(tmp_path / "raw", n_interior=2)
    _zoom_raw(tmp_path / "raw", tmp_path / "zoom", 2)
    ref = load_dataset(prepare_raw(tmp_path / "raw", tmp_path / "ref", seed=0, progress=False))
    big = load_dataset(prepare_raw(tmp_path / "zoom", tmp_path / "big", seed=0, progress=False))
    fixed = load_dataset(prepare_raw(tmp_path / "zoom", tmp_path / "fixed", seed=0, progress=False,
                                     pixel_size_um=BBBC021_PIXEL_SIZE_UM / 2))
    assert fixed.meta["preparation"]["scale"] == pytest.approx(0.5)
    assert fixed.meta["preparation"]["pixel_size_um"] == pytest.approx(BBBC021_PIXEL_SIZE_UM / 2)

    def dna_area(ds):  # mean nucleus pixels per crop (DNA above mid-grey)
        return float((np.asarray(ds.images)[..., 2] > 128).sum(axis=(1, 2)).mean())

    assert dna_area(big) > 3 * dna_area(ref)  # unscaled: a crop sees a quarter of the field of view
    assert len(fixed) == len(ref) and abs(dna_area(fixed) / dna_area(ref) - 1) < 0.15
    # Same nuclei, the crop centre given in the pixels of the zoomed field.
    for (path, centre), (ref_path, ref_centre) in zip(_sources(fixed), _sources(ref)):
        assert path == ref_path and np.abs(centre - 2 * ref_centre).max() <= 2, (path, centre, ref_centre)
    diff = np.abs(np.asarray(fixed.images, np.float32) - np.asarray(ref.images, np.float32)).mean()
    assert diff < 10, diff  # grey levels: the same crops, up to resampling


def test_raw_touching_nuclei_get_their_own_crops(tmp_path):
    truth, rows = write_raw(tmp_path / "raw", n_interior=2)
    rr, cc = np.indices((256, 320))
    for rel, centres in truth.items():  # a touching neighbour 14 px to the right of each nucleus
        path = tmp_path / "raw" / rel
        dna = tifffile.imread(path)
        for r, c in centres:
            dna[np.hypot(rr - r, cc - c - 14) <= 7] = dna[np.hypot(rr - r, cc - c) <= 5].mean()
        tifffile.imwrite(path, dna)
    ds = load_dataset(prepare_raw(tmp_path / "raw", tmp_path / "out", seed=0, progress=False))
    sources = _sources(ds)
    for rel, centres in truth.items():
        if rel not in {p for p, _ in sources}:
            continue  # a field that is not kept (not annotated or no SMILES)
        found = np.array([c for p, c in sources if p == rel])
        for centre in centres:  # unsplit, the crop would sit on the pair's centroid, 7 px off
            assert np.hypot(*(found - centre).T).min() <= 1.5, (rel, centre, found)


def test_prepare_command_pixel_size_and_scale(tmp_path, capsys):
    from cellfluxrl.cli import main

    def run(*args):
        try:
            main(["prepare", "bbbc021", "--out", *args, "--no-evaluators"])
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        return code, capsys.readouterr().err

    write_raw(tmp_path / "raw", n_interior=1)
    _zoom_raw(tmp_path / "raw", tmp_path / "zoom", 2)
    for args, needle, status in ((["--pixel-size", "nan"], "'--pixel-size': must be a positive finite number", 2),
                                 (["--scale", "-2"], "'--scale': must be a positive finite number", 2),
                                 (["--scale", "0.5", "--pixel-size", "0.3"], "not both", 2)):
        code, err = run(str(tmp_path / "bad"), "--raw", str(tmp_path / "zoom"), *args)
        assert code == status and needle in err and len(err.strip().splitlines()) == 1, (args, err)
    code, err = run(str(tmp_path / "bad"), "--impa", str(tmp_path), "--scale", "0.5")
    assert code == 1 and "apply to --raw only" in err
    assert not (tmp_path / "bad").exists()
    code, err = run(str(tmp_path / "out"), "--raw", str(tmp_path / "zoom"), "--pixel-size", "0.1625")
    assert code == 0, err
    prep = load_dataset(tmp_path / "out").meta["preparation"]
    assert prep["scale"] == pytest.approx(0.1625 / 0.325) and prep["pixel_size_um"] == 0.1625


# ---------------------------------------------------------------------------------------------
# Compounds without SMILES: embedded from CellFlux's shipped table when it has them.


def test_impa_compound_without_smiles_uses_the_cellflux_row(tmp_path):
    from cellfluxrl.data.fingerprints import cellflux_embeddings

    rows, images = impa_rows()
    rows = [{**r, "SMILES": ""} if r["CPD_NAME"] == "cisplatin" else r for r in rows]
    ds = load_dataset(prepare_impa(write_impa(tmp_path / "impa", rows, images), tmp_path / "out", progress=False))
    i = list(ds.conditions["compound"]).index("cisplatin")
    assert ds.conditions["smiles"][i] == "" and ds.conditions["embedding"][i] == "cellflux"
    np.testing.assert_array_equal(ds.embeddings[i], cellflux_embeddings().vectors["cisplatin"])
    assert [k for n, k in zip(ds.conditions["compound"], ds.conditions["embedding"]) if n != "cisplatin"] == ["morgan"] * 3
    assert ds.meta["preparation"]["embeddings_csv"] is None

    # A compound in neither the SMILES column nor the table is still refused, naming its line.
    unknown = [{**r, "CPD_NAME": "AZ-J"} if r["CPD_NAME"] == "cisplatin" else r for r in rows]
    root = write_impa(tmp_path / "unknown", unknown, images)
    _one_line_error(lambda: prepare_impa(root, tmp_path / "out2", progress=False),
                    "bbbc021_df_all.csv line 8", "'AZ-J' has no SMILES")
    # A compound keeps one SMILES: a blank on one row and a SMILES on another is an error.
    mixed = [dict(r) for r in rows]
    mixed[7]["SMILES"] = SMILES["cisplatin"]
    root = write_impa(tmp_path / "mixed", mixed, images)
    _one_line_error(lambda: prepare_impa(root, tmp_path / "out3", progress=False),
                    "line 9", "'cisplatin' has SMILES", "but no SMILES at")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


def test_raw_compound_without_smiles_uses_the_cellflux_row(tmp_path):
    from cellfluxrl.data.fingerprints import cellflux_embeddings

    _, rows = write_raw(tmp_path / "raw", n_interior=2)
    write_raw_csvs(tmp_path / "raw", rows, compounds=[("DMSO", ""), ("colchicine", SMILES["colchicine"]),
                                                      ("cisplatin", ""), ("AZ-J", "")])
    ds = load_dataset(prepare_raw(tmp_path / "raw", tmp_path / "out", seed=0, progress=False))
    assert list(ds.conditions["compound"]) == ["DMSO", "cisplatin", "colchicine"]  # AZ-J: no SMILES, no row
    assert list(ds.conditions["embedding"]) == ["morgan", "cellflux", "morgan"]
    np.testing.assert_array_equal(ds.embeddings[1], cellflux_embeddings().vectors["cisplatin"])
    assert ds.meta["skipped"]["fields_without_smiles"] == 4
