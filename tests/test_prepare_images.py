"""`prepare images`: a user's own plates from a CSV of per-channel files (generated plates and a real field)."""

from __future__ import annotations

import csv
import os
import re
from collections import Counter

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image

from cellfluxrl.data.images_csv import prepare_images
from cellfluxrl.data.layout import load_dataset
from cellfluxrl.errors import CellfluxError
from test_bbbc021 import REAL, _random_centres, synthetic_field, write_raw_csvs  # tests/ is on sys.path

HEADER = ("actin", "tubulin", "dna", "compound", "dose", "plate", "well", "control", "smiles", "moa")
WELLS = {"B02": ("DMSO", "", "1", "", ""), "B03": ("DMSO", "", "1", "", ""),
         "C02": ("taxol", "0.3", "0", "", ""), "C03": ("mydrug", "2.5", "0", "CCO", "DNA damage")}
SHAPE = (200, 240)


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        writer.writerows([[r[c] for c in HEADER] for r in rows])


def write_plane(path, plane):
    if path.suffix == ".png":
        Image.fromarray(plane).save(path)  # uint16 -> a 16-bit grayscale PNG
    else:
        tifffile.imwrite(path, plane)


def make_plates(root, seed=0):
    """2 plates (P1 16-bit TIFF, P2 16-bit PNG) x 4 wells x 2 sites; returns (csv path, rows, truth)."""
    rng = np.random.default_rng(seed)
    rows, truth = [], {}
    for plate, ext in (("P1", ".tif"), ("P2", ".png")):
        (root / plate).mkdir(parents=True)
        for well, (compound, dose, control, smiles, moa) in WELLS.items():
            for site in (1, 2):
                centres = _random_centres(rng, SHAPE, 4)
                planes = synthetic_field(rng, SHAPE, centres, 1.0)
                names = {}
                for ch, plane in zip(("actin", "tubulin", "dna"), planes):
                    names[ch] = f"{plate}/{well}_s{site}_{ch}{ext}"
                    write_plane(root / names[ch], plane)
                truth[f"{plate}/{well}/{names['dna']}"] = centres
                rows.append({**names, "compound": compound, "dose": dose, "plate": plate, "well": well,
                             "control": control, "smiles": smiles, "moa": moa})
    write_csv(root / "images.csv", rows)
    return root / "images.csv", rows, truth


@pytest.fixture(scope="module")
def plates(tmp_path_factory):
    root = tmp_path_factory.mktemp("plates")
    path, rows, truth = make_plates(root / "in")
    ds = load_dataset(prepare_images(path, root / "out", seed=0, progress=False))
    return path, rows, truth, ds


def test_generated_plates_crops_centred_on_nuclei_split_by_well(plates):
    _, rows, truth, ds = plates
    assert ds.meta["source"] == "images" and ds.images.shape[1:] == (96, 96, 3)
    centres = Counter()
    for source in ds.table["source"]:
        key, rc = source.split("@")
        r, c = map(int, rc.split(","))
        assert np.min(np.hypot(*(truth[key] - [r, c]).T)) <= 1.5  # every crop sits on a true nucleus
        centres[key] += 1
    assert len(centres) == len(rows) and all(1 <= n <= 4 for n in centres.values())
    wells = [re.match(r"(P\d)_(\w\d\d)_l\d+_\d+$", i).groups() for i in ds.table["id"]]
    by_well = {}
    for well, split in zip(wells, ds.table["split"]):
        assert by_well.setdefault(well, split) == split  # all crops of a well on one side
    assert set(by_well.values()) == {"train", "test"}
    treated = ds.table["state"] == "treated"
    assert set(ds.table["compound"][~treated]) == {"DMSO"} and set(ds.table["moa"][~treated]) == {"DMSO"}
    conditions = dict(zip(ds.conditions["compound"], ds.conditions["moa"]))
    assert conditions == {"DMSO": "DMSO", "mydrug": "DNA damage", "taxol": "Microtubule stabilizers"}
    assert set(ds.table["dose"][ds.table["compound"] == "mydrug"]) == {2.5}
    kinds = dict(zip(ds.conditions["compound"], ds.conditions["embedding"]))
    assert kinds["mydrug"] == "morgan"


def test_real_field_gives_the_raw_pipelines_crops(tmp_path):
    """ExampleHuman (d0 DNA, d2 cytoplasm) as 4 fields: identical crops to `prepare bbbc021 --raw`."""
    from cellfluxrl.data.bbbc021 import prepare_raw

    files = {k: REAL / f"AS_09125_050116030001_D03f00d{k}.tif" for k in (0, 2)}
    if not all(p.is_file() for p in files.values()):
        pytest.skip("ExampleHuman images not available")
    folder = tmp_path / "raw" / "Week1" / "Week1_22123"
    folder.mkdir(parents=True)
    raw_rows, csv_rows = [], []
    for k, well in enumerate(("B02", "B03", "B04", "B05")):  # the real field and its rotations
        names = {}
        for ch, d in (("DAPI", 0), ("Tubulin", 2), ("Actin", 2)):
            names[ch] = f"{well}_s1_w{ch}.tif"
            if k == 0:
                os.symlink(files[d], folder / names[ch])
            else:
                tifffile.imwrite(folder / names[ch], np.rot90(tifffile.imread(files[d]), k))
        compound, conc = ("DMSO", 0.0) if k < 2 else ("colchicine", 0.03)
        raw_rows.append({**{f"Image_{kind}Name_{ch}": (names[ch] if kind == "File" else "Week1/Week1_22123")
                            for ch in ("DAPI", "Tubulin", "Actin") for kind in ("File", "Path")},
                         "Image_Metadata_Plate_DAPI": "Week1_22123", "Image_Metadata_Well_DAPI": well,
                         "Image_Metadata_Compound": compound, "Image_Metadata_Concentration": str(conc)})
        csv_rows.append({"actin": f"Week1/Week1_22123/{names['Actin']}", "tubulin": f"Week1/Week1_22123/{names['Tubulin']}",
                         "dna": f"Week1/Week1_22123/{names['DAPI']}", "compound": compound, "dose": str(conc),
                         "plate": "Week1_22123", "well": well, "control": str(int(k < 2)), "smiles": "", "moa": ""})
    write_raw_csvs(tmp_path / "raw", raw_rows)
    write_csv(tmp_path / "raw" / "images.csv", csv_rows)
    ours = load_dataset(prepare_images(tmp_path / "raw" / "images.csv", tmp_path / "ours", seed=0, progress=False))
    raw = load_dataset(prepare_raw(tmp_path / "raw", tmp_path / "theirs", seed=0, progress=False))
    assert 100 <= len(ours) <= 2000
    assert np.array_equal(np.asarray(ours.images), np.asarray(raw.images))
    assert list(ours.table["split"]) == list(raw.table["split"])
    assert [s.split("@")[1] for s in ours.table["source"]] == [s.split("@")[1] for s in raw.table["source"]]
    assert set(ours.table["moa"][ours.table["state"] == "treated"]) == {"Microtubule destabilizers"}


def ready_cut_crops(folder) -> list[dict]:
    """Eight ready-cut 32 px crops on two plates (DMSO and taxol) and ``folder/crops.csv`` naming
    them, as `prepare images` takes them; returns the CSV's rows."""
    rng = np.random.default_rng(1)
    rows = []
    for plate in ("P1", "P2"):
        for i, (compound, control) in enumerate((("DMSO", "1"), ("DMSO", "1"), ("taxol", "0"), ("taxol", "0"))):
            names = {}
            for ch in ("actin", "tubulin", "dna"):
                names[ch] = f"{plate}_{i}_{ch}.png"
                Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(folder / names[ch])
            rows.append({**names, "compound": compound, "dose": "1", "plate": plate, "well": f"A0{i}",
                         "control": control, "smiles": "", "moa": ""})
    write_csv(folder / "crops.csv", rows)
    return rows


def test_ready_cut_crops_are_taken_whole(tmp_path):
    rows = ready_cut_crops(tmp_path)
    ds = load_dataset(prepare_images(tmp_path / "crops.csv", tmp_path / "out", crop_size=32, progress=False))
    assert len(ds) == 8 and ds.images.shape[1:] == (32, 32, 3)
    assert list(ds.table["source"]) == [f"{r['plate']}/{r['well']}/{r['dna']}" for r in rows]


def _broken(tmp_path, plates, change):
    """A copy of the generated plates' CSV with one change; returns the error of preparing it."""
    path, rows, _, _ = plates
    rows = [dict(r) for r in rows]
    for r in rows:
        r.update({c: str(path.parent / r[c]) for c in ("actin", "tubulin", "dna")})
    change(rows, tmp_path)
    write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(CellfluxError) as exc:
        prepare_images(tmp_path / "bad.csv", tmp_path / "out", progress=False)
    assert "\n" not in str(exc.value) and not (tmp_path / "out").exists()
    return str(exc.value)


def test_one_line_errors_name_the_row(tmp_path, plates):
    def missing(rows, tmp):
        rows[2]["dna"] = str(tmp / "nowhere.tif")

    def rgb(rows, tmp):
        Image.fromarray(np.zeros((200, 240, 3), np.uint8)).save(tmp / "rgb.png")
        rows[3]["actin"] = str(tmp / "rgb.png")

    def float_tiff(rows, tmp):
        tifffile.imwrite(tmp / "f.tif", np.zeros(SHAPE, np.float32))
        rows[4]["tubulin"] = str(tmp / "f.tif")

    def eight_bit(rows, tmp):
        for ch in ("actin", "tubulin", "dna"):
            tifffile.imwrite(tmp / f"{ch}8.tif", np.zeros(SHAPE, np.uint8))
            rows[5][ch] = str(tmp / f"{ch}8.tif")

    def unknown(rows, tmp):
        rows[6]["compound"], rows[6]["smiles"], rows[6]["moa"] = "XY-123", "", "DNA damage"

    def no_moa(rows, tmp):
        rows[6]["compound"], rows[6]["smiles"], rows[6]["moa"] = "XY-123", "CCN", ""

    def no_controls(rows, tmp):
        for r in rows:
            if r["plate"] == "P2" and r["control"] == "1":
                r["compound"], r["control"], r["dose"], r["smiles"], r["moa"] = "taxol", "0", "1", "", ""

    def bad_flag(rows, tmp):
        rows[1]["control"] = "maybe"

    cases = [(missing, "line 4, dna: " + str(tmp_path / "nowhere.tif") + " is missing"),
             (rgb, "line 5, actin: " + str(tmp_path / "rgb.png") + " is a RGB PNG"),
             (float_tiff, "line 6, tubulin: " + str(tmp_path / "f.tif") + " is float32 data"),
             (eight_bit, "line 7: 200x240 px 8-bit images, but plate 'P1' has 200x240 px 16-bit ones"),
             (unknown, "line 8: compound 'XY-123' has no SMILES and no row in the CellFlux embeddings"),
             (no_moa, "line 8: compound 'XY-123' has no MoA"),
             (no_controls, "line 10: plate 'P2' has no control rows"),
             (bad_flag, "line 3: control 'maybe' is not one of")]
    for change, words in cases:
        assert words in _broken(tmp_path, plates, change)


def test_cli_resumes_and_refuses_an_edited_csv(tmp_path, plates):
    from cellfluxrl.cli import cli

    path, _, _, ds = plates
    out = tmp_path / "out"
    args = ["prepare", "images", "--out", str(out), "--csv", str(path), "--no-evaluators"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert np.array_equal(np.asarray(load_dataset(out).images), np.asarray(ds.images))
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "resuming" in again.stderr
    edited = tmp_path / "edited.csv"
    edited.write_text(path.read_text().replace("2.5", "5.0"))
    os.replace(edited, path.with_name("images.csv.new"))
    other = CliRunner().invoke(cli, ["prepare", "images", "--out", str(out), "--csv", str(path.with_name("images.csv.new")),
                                     "--no-evaluators"])
    assert other.exit_code == 1 and "already prepared with" in str(other.exception)
    folder = CliRunner().invoke(cli, ["prepare", "images", "--out", str(tmp_path / "o2"), "--csv", str(path.parent)])
    assert folder.exit_code == 2 and f"{path.parent} is a folder; give an images CSV file" in folder.output
