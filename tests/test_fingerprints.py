"""Compound embeddings: the shipped CellFlux table, RDKit fingerprints, user CSVs and their errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from cellfluxrl.data import fingerprints
from cellfluxrl.data.compounds import bbbc021_compounds
from cellfluxrl.data.fingerprints import (cellflux_embeddings, compound_embedding, has_embedding_row,
                                          morgan_count_fingerprint, name_seeded_embedding, read_embeddings_csv,
                                          resolve_embedding)
from cellfluxrl.data.layout import load_dataset
from cellfluxrl.data.synthetic import prepare_synthetic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bbbc021 import _one_line_error, impa_rows, write_impa  # noqa: E402
from test_cli import assert_one_line_error, run_main  # noqa: E402

PACKAGE_CSV = Path(fingerprints.__file__).with_name("bbbc021_emb_fp.csv")
REFERENCE_CSV = Path(__file__).resolve().parents[2] / "shared" / "reference" / "bbbc021-emb_fp.csv"
if not REFERENCE_CSV.is_file():
    REFERENCE_CSV = Path("/work/shared/reference/bbbc021-emb_fp.csv")
SMALL = {"n_images": 100, "size": 32, "n_plates": 2, "progress": False}  # a ~1 s synthetic dataset


def write_embeddings(path: Path, rows: dict[str, list], header: list[str] | None = None) -> Path:
    """An embeddings CSV: a header ``,0,1,...`` (or ``header``), then ``name,v1,...,vD`` per row."""
    width = len(next(iter(rows.values()))) if rows else 1
    lines = [",".join(header if header is not None else [""] + [str(i) for i in range(width)])]
    lines += [",".join([name] + [str(v) for v in values]) for name, values in rows.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def user_rows(width: int = 8, seed: int = 0) -> dict[str, list[float]]:
    """One random row of ``width`` values for each of the 35 BBBC021 compounds."""
    rng = np.random.default_rng(seed)
    return {c.name: [float(v) for v in rng.normal(size=width).astype(np.float32)] for c in bbbc021_compounds()}




# ---------------------------------------------------------------------------------------------
# The shipped table and the package's RDKit fingerprints.


def test_shipped_table_is_cellflux_file():
    table = cellflux_embeddings()
    assert table.width == 1024 and len(table.vectors) == 35
    assert set(table.vectors) == {c.name for c in bbbc021_compounds()}
    for vector in table.vectors.values():
        assert vector.dtype == np.float32 and vector.shape == (1024,)
        assert (vector >= 0).all() and (vector == np.round(vector)).all()  # integer counts
    cisplatin = table.vectors["cisplatin"]
    assert np.count_nonzero(cisplatin) == 6 and cisplatin.sum() == 10
    if REFERENCE_CSV.is_file():
        assert PACKAGE_CSV.read_bytes() == REFERENCE_CSV.read_bytes()


def test_every_smiles_fingerprint_equals_the_cellflux_row():
    shipped = cellflux_embeddings().vectors
    with_smiles = [c for c in bbbc021_compounds() if c.smiles]
    assert len(with_smiles) == 22  # DMSO and 21 compounds
    for c in with_smiles:
        np.testing.assert_array_equal(morgan_count_fingerprint(c.smiles), shipped[c.name], err_msg=c.name)


def test_cisplatin_smiles_is_the_one_cellflux_used():
    cisplatin = next(c for c in bbbc021_compounds() if c.name == "cisplatin")
    assert cisplatin.smiles == "N[Pt](N)(Cl)Cl"
    # The disconnected spelling hashes different atom environments: it is not CellFlux's vector.
    assert not np.array_equal(morgan_count_fingerprint("N.N.Cl[Pt]Cl"), cellflux_embeddings().vectors["cisplatin"])


def test_precedence_without_a_user_table():
    shipped = cellflux_embeddings().vectors
    vector, kind = compound_embedding("taxol", "")
    assert kind == "cellflux"
    np.testing.assert_array_equal(vector, shipped["taxol"])
    vector[0] = 99  # a copy: the cached table is untouched
    assert shipped["taxol"][0] != 99
    vector, kind = compound_embedding("my compound", "CCO")
    assert kind == "morgan"
    np.testing.assert_array_equal(vector, morgan_count_fingerprint("CCO"))
    vector, kind = compound_embedding("my compound", "")
    assert kind == "name-seeded"
    np.testing.assert_array_equal(vector, name_seeded_embedding("my compound"))
    assert has_embedding_row("taxol") and not has_embedding_row("my compound")
    _one_line_error(lambda: resolve_embedding("x", "", where="data.csv line 4", allow_name_seeded=False),
                    "data.csv line 4", "'x' has no SMILES")
    _one_line_error(lambda: resolve_embedding("x", "C1CC((", where="data.csv line 5"),
                    "data.csv line 5", "'x' has an invalid SMILES")


# ---------------------------------------------------------------------------------------------
# User CSVs.


def test_user_table_wins(tmp_path):
    rows = user_rows(width=8)
    user = read_embeddings_csv(write_embeddings(tmp_path / "mine.csv", rows))
    assert user.width == 8 and list(user.vectors) == list(rows)
    vector, kind = resolve_embedding("colchicine", "COc1cc2c(c(OC)c1OC)-c1ccc(OC)c(=O)cc1C(CC2)NC(C)=O", user)
    assert kind == "user"
    np.testing.assert_array_equal(vector, np.float32(rows["colchicine"]))
    assert has_embedding_row("taxol", user) and not has_embedding_row("AZ-J", user)


def test_user_table_wins_in_prepare_synthetic(tmp_path):
    rows = user_rows(width=8)
    csv_path = write_embeddings(tmp_path / "mine.csv", rows)
    ds = load_dataset(prepare_synthetic(tmp_path / "ds", embeddings=csv_path, **SMALL))
    assert set(ds.conditions["embedding"]) == {"user"}
    assert ds.meta["embedding_dim"] == 8 and ds.embeddings.shape == (35, 8)
    for name, vector in zip(ds.conditions["compound"], ds.embeddings):
        np.testing.assert_array_equal(vector, np.float32(rows[name]))
    assert ds.meta["generator"]["embeddings_csv"] == str(csv_path.resolve())


def test_shipped_file_as_user_csv_gives_the_default_vectors(tmp_path):
    ds = load_dataset(prepare_synthetic(tmp_path / "ds", embeddings=PACKAGE_CSV, **SMALL))
    assert set(ds.conditions["embedding"]) == {"user"}
    default = load_dataset(prepare_synthetic(tmp_path / "default", **SMALL))
    np.testing.assert_array_equal(ds.embeddings, default.embeddings)
    assert default.meta["generator"]["embeddings_csv"] is None


def _bad_csvs(tmp_path: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """name -> (a bad user CSV, words its error must contain)."""
    cases = {}

    def case(name, rows, needles, header=None, text=None):
        path = tmp_path / f"{name}.csv"
        if text is not None:
            path.write_text(text)
        else:
            write_embeddings(path, rows, header)
        cases[name] = (path, (str(path), *needles))

    good = user_rows(width=4)
    case("wrong-width", {**good, "taxol": [1.0, 2.0, 3.0]}, ("'taxol'", "has 3 values, expected 4"))
    case("not-a-number", {**good, "AZ138": [1.0, "abc", 3.0, 4.0]}, ("'AZ138'", "'abc'", "column 3", "not a number"))
    case("not-finite", {**good, "AZ138": [1.0, "nan", 3.0, 4.0]}, ("'AZ138'", "not finite"))
    case("missing-compound", {k: v for k, v in good.items() if k != "etoposide"}, ("no row for compound 'etoposide'",))
    dup = "\n".join([",0,1", "DMSO,1,2", "taxol,1,2", "DMSO,3,4"]) + "\n"
    case("duplicate", None, ("line 4", "'DMSO' repeats line 2"), text=dup)
    case("no-header", None, ("line 1", "'DMSO'", "header"), text="DMSO,1,2\ntaxol,3,4\n")
    case("empty", None, ("empty file",), text="")
    case("header-only", None, ("no compound rows",), text=",0,1\n")
    case("empty-name", None, ("line 3", "empty compound name"), text=",0,1\nDMSO,1,2\n,3,4\n")
    cases["missing-file"] = (tmp_path / "nowhere.csv", (str(tmp_path / "nowhere.csv"), "missing"))
    return cases


BAD_CASES = ("wrong-width", "not-a-number", "not-finite", "missing-compound", "duplicate", "no-header", "empty",
             "header-only", "empty-name", "missing-file")


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_user_csv_is_one_line_error(tmp_path, case):
    path, needles = _bad_csvs(tmp_path)[case]
    _one_line_error(lambda: prepare_synthetic(tmp_path / "out", embeddings=path, **SMALL), *needles)
    assert not (tmp_path / "out").exists()


def test_bad_user_csv_through_the_cli(tmp_path, capsys):
    path, needles = _bad_csvs(tmp_path)["wrong-width"]
    code, out, err = run_main(capsys, "prepare", "synthetic", str(tmp_path / "out"), "--n-images", "100",
                              "--size", "32", "--plates", "2", "--embeddings", str(path), "--no-evaluators")
    assert_one_line_error(code, err, *needles)
    assert out == "" and not (tmp_path / "out").exists()


def test_user_csv_through_the_cli_for_impa(tmp_path, capsys):
    rows, images = impa_rows(cells=1)
    impa = write_impa(tmp_path / "impa", rows, images)
    table = user_rows(width=5)
    partial = write_embeddings(tmp_path / "partial.csv", {k: v for k, v in table.items() if k != "simvastatin"})
    args = ["prepare", "bbbc021", "--impa", str(impa), "--no-evaluators", "--embeddings"]
    code, _, err = run_main(capsys, *args, str(partial), str(tmp_path / "bad"))
    assert_one_line_error(code, err, str(partial), "no row for compound 'simvastatin'", "bbbc021_df_all.csv line")
    code, out, _ = run_main(capsys, *args, str(write_embeddings(tmp_path / "all.csv", table)), str(tmp_path / "ok"))
    assert code == 0 and "embedding dim 5" in out
    ds = load_dataset(tmp_path / "ok")
    assert set(ds.conditions["embedding"]) == {"user"}
    for name, vector in zip(ds.conditions["compound"], ds.embeddings):
        np.testing.assert_array_equal(vector, np.float32(table[name]))
