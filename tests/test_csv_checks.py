"""The user's CSV files: UTF-8 and comma rules for every reader, and the row checks of `prepare images`
(issue 29 items 8 and 13)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cellfluxrl.data.bbbc021 import prepare_impa, prepare_raw
from cellfluxrl.data.fingerprints import read_embeddings_csv
from cellfluxrl.data.images_csv import prepare_images
from cellfluxrl.data.layout import load_dataset
from cellfluxrl.errors import CellfluxError
from test_bbbc021 import RAW_HEADER, impa_rows, write_impa  # tests/ is on sys.path

HEADER = ("actin", "tubulin", "dna", "compound", "dose", "plate", "well", "control", "smiles", "moa")
CROP = 32


def crop_rows(root: Path, seed: int = 0, compound: str = "taxol") -> list[dict]:
    """Ready-cut 32 px PNG crops: 2 plates x (2 DMSO wells + 2 treated wells), one crop per well."""
    rng = np.random.default_rng(seed)
    rows = []
    for plate in ("P1", "P2"):
        for i, (name, control) in enumerate((("DMSO", "1"), ("DMSO", "1"), (compound, "0"), (compound, "0"))):
            files = {}
            for ch in ("actin", "tubulin", "dna"):
                files[ch] = f"{plate}_{i}_{ch}.png"
                Image.fromarray(rng.integers(0, 256, (CROP, CROP), dtype=np.uint8)).save(root / files[ch])
            rows.append({**files, "compound": name, "dose": "1", "plate": plate, "well": f"A0{i}",
                         "control": control, "smiles": "", "moa": ""})
    return rows


def write_rows(path: Path, rows: list[dict], delimiter: str = ",", encoding: str = "utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(HEADER)
        writer.writerows([[r[c] for c in HEADER] for r in rows])
    return path


def refused(csv_path: Path, out: Path) -> str:
    """The one-line error of preparing ``csv_path``; nothing may be written."""
    with pytest.raises(CellfluxError) as exc:
        prepare_images(csv_path, out, crop_size=CROP, progress=False)
    assert "\n" not in str(exc.value) and not out.exists()
    return str(exc.value)


@pytest.fixture
def rows(tmp_path):
    return crop_rows(tmp_path)


# ---------------------------------------------------------------------------------------------
# Item 8: a Latin-1 file names the file, the line and UTF-8, in every reader of user CSVs.


def test_latin1_images_csv_names_file_line_and_utf8(tmp_path, rows):
    rows[4]["compound"], rows[4]["control"], rows[4]["moa"] = "café-1", "0", "DNA damage"
    path = write_rows(tmp_path / "latin1.csv", rows, encoding="latin-1")
    message = refused(path, tmp_path / "out")
    assert message.startswith(f"{path} line 6: not UTF-8 text (byte 0xe9 at character ")
    assert "save it as UTF-8" in message


def test_utf8_with_byte_order_mark_is_read(tmp_path, rows):
    path = write_rows(tmp_path / "bom.csv", rows, encoding="utf-8-sig")
    ds = load_dataset(prepare_images(path, tmp_path / "out", crop_size=CROP, progress=False))
    assert len(ds) == 8


def test_latin1_impa_and_raw_and_embeddings_csvs(tmp_path):
    impa_csv_rows, images = impa_rows(cells=1)
    impa_csv_rows[3]["CPD_NAME"] = "colchicine é"
    root = write_impa(tmp_path / "impa", impa_csv_rows, images)
    impa_csv = root / "metadata" / "bbbc021_df_all.csv"
    impa_csv.write_bytes(impa_csv.read_text(encoding="utf-8").encode("latin-1"))
    with pytest.raises(CellfluxError, match=r"bbbc021_df_all.csv line 5: not UTF-8 text \(byte 0xe9"):
        prepare_impa(root, tmp_path / "out", progress=False)

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "BBBC021_v1_image.csv").write_bytes((",".join(RAW_HEADER) + "\n").encode())
    (raw / "BBBC021_v1_compound.csv").write_bytes("compound,smiles\nDMSO,\ncolchicine,CCO\nmitomycin \xc7,\n"
                                                  .encode("latin-1"))
    (raw / "BBBC021_v1_moa.csv").write_text("compound,concentration,moa\n")
    with pytest.raises(CellfluxError, match=r"BBBC021_v1_compound.csv line 4: not UTF-8 text \(byte 0xc7 at "
                                            r"character 11\)"):
        prepare_raw(raw, tmp_path / "out", progress=False)

    emb = tmp_path / "emb.csv"
    emb.write_bytes(",0,1\nDMSO,0,1\ntaxol\xe9,1,2\n".encode("latin-1"))
    with pytest.raises(CellfluxError, match=r"emb.csv line 3: not UTF-8 text"):
        read_embeddings_csv(emb)


# ---------------------------------------------------------------------------------------------
# Item 13: bad values in rows, and a file that is not comma-separated.


@pytest.mark.parametrize("edit,needle", [
    (lambda r: r[2].update(dose="-1"), "line 4: dose '-1' is negative; a concentration is 0 or more"),
    (lambda r: r[6].update(well=""), "line 8: empty well; every row needs its well"),
    (lambda r: r[5].update(plate=""), "line 7: empty plate; every row needs its plate"),
    (lambda r: r[1].update(control="0"),
     "line 3: compound 'DMSO' is the vehicle control, but the row has control='0'; set control=1 on DMSO rows"),
    (lambda r: r[1].update(control="no", compound="dmso"), "line 3: compound 'dmso' is the vehicle control"),
])
def test_row_checks_name_the_line(tmp_path, rows, edit, needle):
    edit(rows)
    path = write_rows(tmp_path / "bad.csv", rows)
    message = refused(path, tmp_path / "out")
    assert message.startswith(f"{path} line ") and needle in message


@pytest.mark.parametrize("delimiter,name", [(";", "semicolon (;)"), ("\t", "tab")])
def test_semicolon_or_tab_file_is_named(tmp_path, rows, delimiter, name):
    path = write_rows(tmp_path / "semi.csv", rows, delimiter=delimiter)
    message = refused(path, tmp_path / "out")
    assert message.startswith(f"{path}: missing column(s) actin, tubulin, dna, compound")
    assert message.endswith(f"the file looks {name}-separated: save it comma-separated (the delimiter must be ',')")


def test_semicolon_impa_csv_is_named(tmp_path):
    impa_csv_rows, images = impa_rows(cells=1)
    root = write_impa(tmp_path / "impa", impa_csv_rows, images)
    path = root / "metadata" / "bbbc021_df_all.csv"
    path.write_text(path.read_text().replace(",", ";"))
    with pytest.raises(CellfluxError, match=r"missing column\(s\) SAMPLE_KEY.*looks semicolon \(;\)-separated"):
        prepare_impa(root, tmp_path / "out", progress=False)


def test_delimiter_hint_only_when_it_explains_the_header():
    from cellfluxrl.data.csv_input import delimiter_hint

    assert delimiter_hint("a;b;c\n", ("b",)) != ""
    assert delimiter_hint("a,b;c\n", ("x",)) == ""  # splitting on ';' gives none of the columns
    assert delimiter_hint("a,b,c\n", ("b",)) == ""


def test_csv_rows_skips_blank_rows_and_counts_physical_lines(tmp_path):
    from cellfluxrl.data.csv_input import csv_rows

    path = tmp_path / "t.csv"
    path.write_text('a,b\n1,"x\ny"\n,\n\n2,z\n')
    assert list(csv_rows(path, ("a", "b"))) == [(3, {"a": "1", "b": "x\ny"}), (6, {"a": "2", "b": "z"})]
    path.write_text("a,b\n1,2,3\n")
    with pytest.raises(CellfluxError, match=r"t.csv line 2: 3 fields, expected 2"):
        list(csv_rows(path, ("a",)))
    with pytest.raises(CellfluxError, match="a folder, not a CSV file"):
        list(csv_rows(tmp_path, ("a",)))
