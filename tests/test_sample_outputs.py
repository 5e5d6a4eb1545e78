"""What `cellfluxrl sample` writes: only its own files, never into a dataset, a run only as a new
subfolder, a re-run swaps the export folder whole; the OME metadata and the npz's recorded names."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

from test_cli import assert_one_line_error, run_main
from test_sample import trained  # noqa: F401  (the module's tiny run and dataset)

from cellfluxrl.commands import sample_outputs


def _no_model(monkeypatch):
    """Fail the test if the run is loaded: every --out check comes before that."""
    import cellfluxrl.checkpoint

    def fail(*args, **kwargs):
        raise AssertionError("loaded the run before checking --out")

    monkeypatch.setattr(cellfluxrl.checkpoint, "load_run", fail)


def _sample(capsys, run, out, *extra):
    return run_main(capsys, "sample", str(run), "--n", "2", "--steps", "1", "--device", "cpu", "--out", str(out),
                    *map(str, extra))


def _tree(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_users_files_at_the_npz_and_png_paths_are_refused_and_kept(trained, tmp_path, capsys, monkeypatch):
    _no_model(monkeypatch)
    _, run = trained
    (tmp_path / "s").mkdir()
    user = tmp_path / "s" / "y.npz"
    user.write_text("my notes")
    code, _, err = _sample(capsys, run, user)
    assert_one_line_error(code, err, f"--out {user} exists and `cellfluxrl sample` did not write it")
    (tmp_path / "s" / "z.png").write_bytes(b"\x89PNG\r\n\x1a\nmine")
    code, _, err = _sample(capsys, run, tmp_path / "s" / "z.npz")
    assert_one_line_error(code, err, f"{tmp_path / 's' / 'z.png'} exists and `cellfluxrl sample` did not write it")
    assert user.read_text() == "my notes" and sorted(p.name for p in (tmp_path / "s").iterdir()) == ["y.npz", "z.png"]


def test_export_folder_holding_a_users_file_is_refused_and_kept(trained, tmp_path, capsys, monkeypatch):
    _no_model(monkeypatch)
    _, run = trained
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "samples.csv").write_text("plate,count\nA,1\n")  # a user's table, not sample's header
    code, _, err = _sample(capsys, run, tmp_path / "y", "--format", "tiff")
    assert_one_line_error(code, err, f"--out {tmp_path / 'y'} holds samples.csv, which `cellfluxrl sample` did not")
    assert (tmp_path / "y" / "samples.csv").read_text() == "plate,count\nA,1\n"


def test_nothing_is_written_into_a_dataset(trained, capsys, monkeypatch):
    _no_model(monkeypatch)
    ds, run = trained
    before = _tree(ds.root)
    code, _, err = _sample(capsys, run, ds.root / "images.npz")
    assert_one_line_error(code, err, f"is inside the dataset folder {ds.root}", "never writes into a dataset")
    code, _, err = _sample(capsys, run, ds.root, "--format", "tiff")
    assert_one_line_error(code, err, f"--out {ds.root} is a dataset folder")
    code, _, err = _sample(capsys, run, ds.root / "new" / "deeper", "--format", "png")
    assert_one_line_error(code, err, "is inside the dataset folder")
    assert _tree(ds.root) == before and not (ds.root / "new").exists()


def test_a_run_folder_takes_only_a_new_subfolder(trained, tmp_path, capsys):
    _, trained_run = trained
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    code, _, err = _sample(capsys, run, run / "s.npz")
    assert_one_line_error(code, err, f"would write into the run folder {run.resolve()}",
                          f"--out {run.resolve() / 'NAME' / 's.npz'}")
    code, _, err = _sample(capsys, run, run, "--format", "tiff")
    assert_one_line_error(code, err, f"--out {run} is a run folder")
    (run / "notes").mkdir()
    (run / "notes" / "todo.txt").write_text("mine")
    code, _, err = _sample(capsys, run, run / "notes" / "s.npz")
    assert_one_line_error(code, err, f"{run.resolve() / 'notes' / 'todo.txt'} is in the run folder")
    for args in ([run / "tiffs", "--format", "tiff"], [run / "more" / "s.npz"]):
        for _ in range(2):  # a new subfolder, then the same one again: sample wrote it
            code, out, err = _sample(capsys, run, *args)
            assert code == 0, err
    assert sorted(p.name for p in (run / "more").iterdir()) == ["s.npz", "s.png"]


def test_a_rerun_swaps_the_folder_whole_and_leaves_no_stale_image(trained, tmp_path, capsys):
    _, run = trained
    out = tmp_path / "y"
    code, _, err = run_main(capsys, "sample", str(run), "--n", "4", "--steps", "1", "--device", "cpu",
                            "--format", "tiff", "--out", str(out))
    assert code == 0, err
    assert len(list(out.glob("*.ome.tif"))) == 4
    code, stdout, err = run_main(capsys, "sample", str(run), "--n", "1", "--steps", "1", "--device", "cpu",
                                 "--format", "tiff", "--out", str(out))
    assert code == 0, err
    assert "wrote 1 image (OME-TIFF)" in stdout
    rows = list(csv.DictReader(open(out / "samples.csv")))
    assert sorted(p.name for p in out.iterdir()) == sorted([rows[0]["file"], "samples.csv", "samples.npz", "grid.png",
                                                            ".cellfluxrl-sample.json"])
    assert len(rows) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["y"]


def test_files_of_earlier_versions_count_as_samples_own(trained, tmp_path, capsys):
    _, run = trained
    keys = {k: np.zeros(1) for k in sample_outputs.LEGACY_KEYS | {"meta_weights_from"}}
    np.savez(tmp_path / "old.npz", **keys)
    (tmp_path / "old.png").write_bytes(b"\x89PNG\r\n\x1a\nold grid")
    old_folder = tmp_path / "old"
    old_folder.mkdir()
    (old_folder / "00000_taxol.ome.tif").write_bytes(b"II*\0")
    (old_folder / "samples.csv").write_text("pair,file,compound,dose\n0,00000_taxol.ome.tif,taxol,1.0\n")
    assert sample_outputs.is_sample_npz(tmp_path / "old.npz") and sample_outputs.is_sample_png(tmp_path / "old.png")
    assert sample_outputs.foreign_in_folder(old_folder) is None
    code, stdout, err = _sample(capsys, run, tmp_path / "old.npz")
    assert code == 0, err
    assert stdout.startswith(f"wrote 2 images to {tmp_path / 'old.npz'} and {tmp_path / 'old.png'}")
    code, _, err = _sample(capsys, run, old_folder, "--format", "tiff")
    assert code == 0, err
    files = [r["file"] for r in csv.DictReader(open(old_folder / "samples.csv"))]
    assert len(files) == 2 and sorted(p.name for p in old_folder.iterdir()) == sorted(
        [*files, "samples.csv", "samples.npz", "grid.png", ".cellfluxrl-sample.json"])
    assert (old_folder / files[0]).read_bytes() != b"II*\0"


def test_the_npz_records_the_network_under_its_current_name(trained, tmp_path, capsys):
    _, run = trained
    code, stdout, err = run_main(capsys, "sample", str(run), "--n", "1", "--steps", "1", "--device", "cpu",
                                 "--network", "model", "--out", str(tmp_path / "s.npz"))
    assert code == 0, err
    assert stdout.startswith("wrote 1 image to ")
    data = np.load(tmp_path / "s.npz")
    assert str(data["meta_network"]) == "model" and "meta_weights_from" not in data.files
    assert int(data[sample_outputs.NPZ_MARKER]) == sample_outputs.NPZ_VERSION
    assert sample_outputs.recorded_meta(data)["network"] == "model"
    old = {"meta_weights_from": np.asarray("ema"), "meta_seed": np.asarray(3)}
    assert sample_outputs.recorded_meta(old) == {"network": "ema", "seed": 3}


def test_sample_help_describes_out(capsys):
    code, stdout, _ = run_main(capsys, "sample", "--help")
    assert code == 0
    text = " ".join(stdout.split())
    assert "--out FILE.npz|DIR" in text and "--format tiff|png: the folder DIR" in text


def test_ome_metadata_holds_the_image_name_channels_and_the_plates_intensity_range(trained, tmp_path):
    import tifffile

    from cellfluxrl.export import export_samples
    from cellfluxrl.model.generate import sample_pairs, test_pairs
    from cellfluxrl.checkpoint import load_run

    ds, run = trained
    targets, controls = test_pairs(ds, 2, seed=0)
    samples = sample_pairs(load_run(run).net, ds, targets, controls, seed=0, num_steps=1)
    plate = str(ds.table["batch"][targets[0]])
    meta = {"source": "images", "preparation": {"percentiles": [0.1, 99.9], "intensity_ranges": {
        plate: {"lo": [12.5, 30.0, 101.0], "hi": [812.0, 1900.5, 4000.0]}}}}
    table = export_samples(tmp_path / "x", samples, ds.table, ds.channels, "tiff", meta=meta)
    row = next(csv.DictReader(open(table)))
    assert (row["intensity"], row["lo_dna"], row["hi_dna"]) == ("plate percentiles 0.1/99.9", "101", "4000")
    with tifffile.TiffFile(table.parent / row["file"]) as tif:
        image = tifffile.xml2dict(tif.ome_metadata)["OME"]
    assert image["Image"]["Name"] == f"00000_{row['compound']}"
    assert [c["Name"] for c in image["Image"]["Pixels"]["Channel"]] == ["actin", "tubulin", "dna"]
    pairs = {m["K"]: str(m.get("value", "")) for m in image["StructuredAnnotations"]["MapAnnotation"]["Value"]["M"]}
    assert pairs["plate"] == plate and pairs["lo_actin"] == "12.5" and pairs["hi_tubulin"] == "1900.5"
    assert pairs["intensity"] == "plate percentiles 0.1/99.9" and pairs["compound"] == row["compound"]
    assert "raw = lo + value * (hi - lo) / 255" in image["Image"]["Description"]
    assert "dna 101-4000" in image["Image"]["Description"]


@pytest.mark.parametrize("meta, kind, says", [
    ({"source": "synthetic"}, "synthetic: no raw counts", "no raw counts to map them back to"),
    ({"source": "bbbc021-impa"}, "not recorded", "not recorded in the dataset"),
])
def test_a_dataset_without_raw_counts_says_so_instead_of_numbers(meta, kind, says):
    from cellfluxrl.export import describe_intensity, intensity_fields

    fields = intensity_fields(meta, "Plate1", ("actin", "tubulin", "dna"))
    assert fields == {"intensity": kind, "lo_actin": "", "hi_actin": "", "lo_tubulin": "", "hi_tubulin": "",
                      "lo_dna": "", "hi_dna": ""}
    assert says in describe_intensity(fields, "Plate1", ("actin", "tubulin", "dna"))


def test_a_folder_with_someone_elses_config_or_meta_json_is_neither_run_nor_dataset(tmp_path):
    (tmp_path / "config.json").write_text('{"name": "my project"}')
    (tmp_path / "meta.json").write_text("{}")
    sample_outputs.check_out(tmp_path / "s.npz", folder_out=False)  # no error: not a run, not a dataset
    sample_outputs.check_out(tmp_path / "tiffs", folder_out=True)
    (tmp_path / "config.json").write_text('{"kind": "pretrain"}')
    with pytest.raises(sample_outputs.CellfluxError, match="would write into the run folder"):
        sample_outputs.check_out(tmp_path / "s.npz", folder_out=False)
    (tmp_path / "images.npy").write_bytes(b"")
    with pytest.raises(sample_outputs.CellfluxError, match="is inside the dataset folder"):
        sample_outputs.check_out(tmp_path / "s.npz", folder_out=False)


def test_sample_measurements_writes_cellprofiler_tables_and_refuses_a_users_csv(trained, tmp_path, capsys,
                                                                                monkeypatch):
    """`sample --measurements FILE.csv` writes measure's four tables for the generated cells (one
    image row per pair, their compounds); a user's CSV at that path is refused before any model is
    loaded (exit 2), and kept."""
    from cellfluxrl.evaluation.measurement_tables import IMAGE_HEADER

    _, run = trained
    table = tmp_path / "m" / "gen.csv"
    code, _, err = run_main(capsys, "sample", str(run), "--n", "3", "--steps", "1", "--device", "cpu",
                            "--out", str(tmp_path / "s.npz"), "--measurements", str(table))
    assert code == 0, err
    rows = list(csv.DictReader(open(table)))
    assert tuple(next(csv.reader(open(table)))) == IMAGE_HEADER and len(rows) == 3
    with np.load(tmp_path / "s.npz") as data:
        assert [r["Metadata_Compound"] for r in rows] == [str(c) for c in data["compound"]]
    assert {r["Metadata_Kind"] for r in rows} == {"generated"}
    assert all((tmp_path / "m" / f"gen_{c}.csv").is_file() for c in ("Nuclei", "Cells", "Cytoplasm"))
    users = tmp_path / "users.csv"
    users.write_text("my,own\n1,2\n")
    _no_model(monkeypatch)
    code, _, err = run_main(capsys, "sample", str(run), "--n", "1", "--device", "cpu", "--out",
                            str(tmp_path / "t.npz"), "--measurements", str(users))
    assert code == 2 and "was not written by `cellfluxrl measure`" in err and users.read_text() == "my,own\n1,2\n"
    assert not (tmp_path / "t.npz").exists()
