"""One compound-name normalisation for every lookup (issue 29 item 11): ``Taxol`` is the table's ``taxol``
for its MoA, its SMILES, its CellFlux embedding row and a user's embeddings row; the dataset stores one
spelling."""

from __future__ import annotations

import numpy as np
import pytest

from cellfluxrl.data.bbbc021 import prepare_impa, prepare_raw
from cellfluxrl.data.fingerprints import cellflux_embeddings, parse_embeddings_csv, resolve_embedding
from cellfluxrl.data.images_csv import prepare_images
from cellfluxrl.data.layout import load_dataset
from cellfluxrl.errors import CellfluxError
from test_bbbc021 import impa_rows, write_impa, write_raw, write_raw_csvs  # tests/ is on sys.path
from test_csv_checks import CROP, crop_rows, write_rows


def test_one_key_and_one_canonical_spelling():
    from cellfluxrl.data.compound_names import canonical_compound, compound_key, is_control_name

    assert compound_key("  Mitomycin   C ") == compound_key("mitomycin C") == "mitomycin c"
    assert canonical_compound("Taxol") == "taxol" and canonical_compound(" MITOMYCIN  c") == "mitomycin C"
    assert canonical_compound("dmso") == "DMSO" and is_control_name(" Dmso ")
    assert canonical_compound("  My   Drug ") == "My Drug"  # unknown: the user's spelling, tidied


def test_taxol_in_any_case_finds_moa_and_cellflux_row(tmp_path):
    rows = crop_rows(tmp_path, compound="Taxol")
    rows[7]["compound"] = "  TAXOL "
    ds = load_dataset(prepare_images(write_rows(tmp_path / "in.csv", rows), tmp_path / "out", crop_size=CROP,
                                     progress=False))
    assert list(ds.conditions["compound"]) == ["DMSO", "taxol"]
    assert list(ds.conditions["moa"]) == ["DMSO", "Microtubule stabilizers"]
    assert list(ds.conditions["embedding"]) == ["morgan", "cellflux"]
    np.testing.assert_array_equal(ds.embeddings[1], cellflux_embeddings().vectors["taxol"])
    assert set(ds.table["compound"][ds.table["state"] == "treated"]) == {"taxol"}


def test_unknown_compound_keeps_its_first_spelling(tmp_path):
    rows = crop_rows(tmp_path, compound="MyDrug")
    for r in rows:
        if r["control"] == "0":
            r.update(smiles="CCO", moa="DNA damage")
    rows[3]["compound"] = "mydrug"
    ds = load_dataset(prepare_images(write_rows(tmp_path / "in.csv", rows), tmp_path / "out", crop_size=CROP,
                                     progress=False))
    assert list(ds.conditions["compound"]) == ["DMSO", "MyDrug"]
    assert set(ds.table["compound"][ds.table["state"] == "treated"]) == {"MyDrug"}


def test_user_embeddings_row_found_in_any_spelling(tmp_path):
    table = parse_embeddings_csv([",0,1", "dmso,0,1", "TAXOL,2,3"], "user.csv")
    vector, kind = resolve_embedding("taxol", "", table)
    assert kind == "user" and vector.tolist() == [2.0, 3.0]
    assert resolve_embedding("DMSO", "CS(C)=O", table)[0].tolist() == [0.0, 1.0]
    with pytest.raises(CellfluxError, match=r"user.csv line 3: compound 'Taxol' repeats line 2 \('taxol': names "
                                            r"differing only in case or spacing are one compound\)"):
        parse_embeddings_csv([",0", "taxol,1", "Taxol,2"], "user.csv")


def test_impa_names_in_other_case(tmp_path):
    rows, images = impa_rows(cells=1)
    for r in rows:
        r["CPD_NAME"] = {"DMSO": "dmso", "colchicine": "Colchicine"}.get(r["CPD_NAME"], r["CPD_NAME"])
    ds = load_dataset(prepare_impa(write_impa(tmp_path / "impa", rows, images), tmp_path / "out", progress=False))
    assert list(ds.conditions["compound"]) == ["DMSO", "cisplatin", "colchicine", "simvastatin"]
    assert set(ds.table["compound"]) == {"DMSO", "cisplatin", "colchicine", "simvastatin"}


def test_raw_image_csv_spelling_matches_the_moa_and_compound_csvs(tmp_path):
    _, rows = write_raw(tmp_path / "raw", n_interior=3)
    for r in rows:
        if r["Image_Metadata_Compound"] == "colchicine":
            r["Image_Metadata_Compound"] = "COLCHICINE"
    write_raw_csvs(tmp_path / "raw", rows)
    ds = load_dataset(prepare_raw(tmp_path / "raw", tmp_path / "out", seed=0, progress=False))
    assert "colchicine" in set(ds.conditions["compound"])  # was skipped as "not MoA-annotated"
    assert ds.meta["skipped"].get("fields_not_moa_annotated") == 4  # only colchicine at 1.0, as before
