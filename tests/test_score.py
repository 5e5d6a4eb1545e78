"""``cellfluxrl score``: evaluate's report for images from anywhere, reproduced exactly from
``evaluate --save-images``; explicit pixel mappings; paired and unpaired comparisons; refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bad_images import bad_image_sources
from cellfluxrl.cli import cli


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    from cellfluxrl.data.synthetic import prepare_synthetic
    from cellfluxrl.rewards.evaluators_fit import fit_evaluators

    root = tmp_path_factory.mktemp("score") / "data"
    prepare_synthetic(root, n_images=300, seed=0, size=48, n_plates=2, progress=False)
    fit_evaluators(root, seed=0, classifier_epochs=2, progress=False)
    return root


def make_run(dataset_dir, run_dir):
    """A run folder with a small randomly initialised velocity network (as tests/test_evaluate.py)."""
    from cellfluxrl.checkpoint import save_checkpoint
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.model.unet import UNetConfig, build_unet

    torch.manual_seed(0)
    unet = UNetConfig(model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(), dropout=0.0)
    dim = int(load_dataset(dataset_dir).embeddings.shape[1])
    net = build_unet(unet.to_dict(), dim)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    config = {"kind": "pretrain", "dataset": str(dataset_dir), "preset": "custom", "unet": unet.to_dict(),
              "condition_dim": dim, "sampling": {"steps": 1, "cfg_scale": 0.2}}
    state = net.state_dict()
    save_checkpoint(run_dir / "checkpoint.pt", {"kind": "pretrain", "step": 0, "config": config, "model": state,
                                                "ema": state})
    return run_dir


SMALL = ["--batch-size", "6", "--kid-subset-size", "3", "--kid-subsets", "4", "--device", "cpu"]


def invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def evaluated(dataset_dir, tmp_path_factory):
    """evaluate of one run on 6 pairs per section, best-of 1,2, with --save-images."""
    base = tmp_path_factory.mktemp("runs")
    run = make_run(dataset_dir, base / "base")
    result = invoke(["evaluate", "--data", dataset_dir, run, "--n", "6", "--best-of", "1,2", *SMALL,
                     "--out", base / "eval", "--save-images", base / "saved"])
    assert result.exit_code == 0, result.output
    return base, json.loads((base / "eval" / "report.json").read_text())


def printed_cells(report: dict, columns) -> dict:
    """Every cell of the given columns as the report prints it: ``{(section, column, row label): text}``."""
    from cellfluxrl.evaluation.report_text import markdown_table

    cells = {}
    for part, section in report["sections"].items():
        for c in columns:
            if c in section["table"]:
                for line in markdown_table(section, [c]).splitlines()[2:]:
                    label, value = line.strip("| ").split(" | ")
                    cells[(part, c, label)] = value
    return cells


def score(dataset_dir, out, *images, extra=()):
    result = invoke(["score", "--data", dataset_dir, *images, *SMALL, *extra, "--out", out])
    return result, (json.loads((out / "report.json").read_text()) if result.exit_code == 0 else None)


def test_saved_candidates_rescored_reproduce_evaluate_exactly(dataset_dir, evaluated, tmp_path):
    base, report = evaluated
    saved = base / "saved"
    assert sorted(p.name for p in saved.iterdir()) == [".cellfluxrl-candidates.json", "base", "base.npz"]
    columns = ["base", "base+best-of-2", "copy-control", "train-real", "real"]
    want = printed_cells(report, columns)
    for spec in (saved / "base.npz", saved / "base"):  # the npz and the OME-TIFF folder
        result, got = score(dataset_dir, tmp_path / spec.name, spec)
        assert result.exit_code == 0, result.output
        assert list(got["sections"]) == list(report["sections"]) == ["id", "ood"]
        for part, section in got["sections"].items():
            assert section["columns"] == report["sections"][part]["columns"]
        assert printed_cells(got, columns) == want
        assert got["settings"]["seed"] == 0 and got["settings"]["images"]["base"]["paired"]
        assert "paired (they name their pairs)" in result.output


def test_evaluate_images_columns_paired_like_a_run_and_by_compound_like_a_baseline(dataset_dir, evaluated, tmp_path):
    from cellfluxrl.data.layout import load_dataset

    base, _ = evaluated
    with np.load(base / "saved" / "base.npz") as f:  # the real targets of the id pairs, naming only compounds
        keep = (f["section"] == "id") & (f["candidate"] == 0)
        targets, compounds = f["target_index"][keep], f["compound"][keep]
    loose = tmp_path / "targets.npz"
    np.savez(loose, generated=np.asarray(load_dataset(dataset_dir).images[targets]), compound=compounds)
    result = invoke(["evaluate", "--data", dataset_dir, base / "base", "--n", "6", "--best-of", "1,2", *SMALL,
                     "--baselines", "none", "--split", "id", "--images", f"again={base / 'saved' / 'base.npz'}",
                     "--images", f"loose={loose}", "--out", tmp_path / "e"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    section = report["sections"]["id"]
    assert section["columns"] == ["base", "base+best-of-2", "again", "again+best-of-2", "loose", "real"]
    rewards = [r for r in section["rows"] if not r.endswith(("_o", "_c"))]
    assert {r: section["table"]["again"][r] for r in rewards} == {r: section["table"]["base"][r] for r in rewards}
    assert all(cell["mean"] == 0 for cell in section["paired"]["1"]["again"].values())
    assert {r: section["table"]["loose"][r] for r in rewards} == {r: section["table"]["real"][r] for r in rewards}
    result = invoke(["evaluate", "--data", dataset_dir, base / "base", "--images", "nameless", "--out", tmp_path / "f"])
    assert result.exit_code == 2 and "'nameless': give NAME=PATH" in result.output and not (tmp_path / "f").exists()


def test_sample_tiff_folder_and_its_npz_score_the_same(dataset_dir, evaluated, tmp_path):
    base, _ = evaluated
    folder = tmp_path / "samples"
    result = invoke(["sample", base / "base", "--data", dataset_dir, "--n", "5", "--device", "cpu", "--format", "tiff",
                     "--out", folder])
    assert result.exit_code == 0, result.output
    before = sorted(p.name for p in folder.iterdir())
    outs = {}
    for name, spec in (("folder", folder), ("npz", folder / "samples.npz")):
        result, outs[name] = score(dataset_dir, tmp_path / name, spec, extra=["--baselines", "none"])
        assert result.exit_code == 0, result.output
    column = {"folder": "samples", "npz": "samples"}
    a, b = (printed_cells(outs[k], [column[k], "real"]) for k in ("folder", "npz"))
    assert a == b and len(a) > 10
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written into what it read


def real_npz(dataset_dir, path, transform=lambda x: x, n=8):
    """Real treated test images of the in-distribution split as an npz naming their pairs."""
    from cellfluxrl.data.layout import load_dataset

    ds = load_dataset(dataset_dir)
    rows = ds.select(split="test", state="treated", include_ood=False)[:n]
    np.savez(path, generated=transform(np.asarray(ds.images[rows])), compound=ds.table["compound"][rows],
             target_index=rows)
    return path


def test_rescaled_real_crops_mapped_back_score_as_the_original(dataset_dir, tmp_path):
    original = real_npz(dataset_dir, tmp_path / "original.npz")
    sixteen = real_npz(dataset_dir, tmp_path / "sixteen.npz", lambda x: x[..., ::-1].astype(np.uint16) * 257)
    unit = real_npz(dataset_dir, tmp_path / "unit.npz", lambda x: x.astype(np.float32) / 127.5 - 1)
    args = ["--split", "id", "--baselines", "copy-control", "--seed", "3"]
    result, want = score(dataset_dir, tmp_path / "o", original, extra=args)
    assert result.exit_code == 0, result.output
    cells = lambda report, name: {k[2]: v for k, v in printed_cells(report, [name]).items()}  # noqa: E731
    for spec, mapping in ((sixteen, ["--intensity", "range:0:65535", "--channels", "dna,tubulin,actin"]),
                          (unit, ["--intensity", "range:-1:1"])):
        result, got = score(dataset_dir, tmp_path / spec.stem, spec, extra=[*args, *mapping])
        assert result.exit_code == 0, result.output
        assert cells(got, spec.stem) == cells(want, "original")
    result, _ = score(dataset_dir, tmp_path / "refused", sixteen, extra=args)  # 16-bit without saying how: refused
    assert result.exit_code == 2 and "uint16 pixels; say how they were scaled with --intensity" in result.output
    assert not (tmp_path / "refused").exists()


def test_same_pairs_are_compared_paired_and_other_images_unpaired(dataset_dir, tmp_path):
    from cellfluxrl.data.layout import load_dataset

    paired = real_npz(dataset_dir, tmp_path / "paired.npz")
    ds = load_dataset(dataset_dir)
    rows = ds.select(split="test", state="treated", include_ood=False)[:8]
    loose = tmp_path / "loose.npz"  # the same images naming only their compounds
    np.savez(loose, generated=np.asarray(ds.images[rows]), compound=ds.table["compound"][rows])
    result, report = score(dataset_dir, tmp_path / "o", paired, f"again={paired}", loose,
                           extra=["--split", "id", "--baselines", "none"])
    assert result.exit_code == 0, result.output
    section = report["sections"]["id"]
    assert section["columns"] == ["paired", "again", "real", "loose", "real [loose]"]
    assert section["comparison"]["kind"] == {"again": "paired", "loose": "unpaired"}
    assert all(c["mean"] == 0 and c["sem"] == 0 for c in section["comparison"]["versus"]["again"].values())
    welch = section["comparison"]["versus"]["loose"]["overall"]
    a, b = section["table"]["loose"]["overall"], section["table"]["paired"]["overall"]
    assert welch["mean"] == pytest.approx(a["mean"] - b["mean"]) and welch["sem"] == pytest.approx(np.hypot(a["sem"], b["sem"]))
    assert "unpaired: different pairs, Welch's difference of means" in result.output
    assert report["settings"]["images"]["loose"]["paired"] is False


def test_bad_inputs_are_one_line_exit_2_and_write_nothing(dataset_dir, tmp_path, capsys):
    from cellfluxrl.cli import main

    def one_line(*args):
        try:
            main(["score", "--data", str(dataset_dir), *map(str, args), "--out", str(tmp_path / "out")])
        except SystemExit as exc:
            return exc.code, capsys.readouterr().err
        return 0, capsys.readouterr().err

    cases = bad_image_sources(tmp_path, 48)
    gray = tmp_path / "gray.npz"
    other = tmp_path / "other.npz"
    np.savez(other, generated=np.zeros((2, 48, 48, 3), np.uint8), compound=np.array(["taxol", "taxol"]),
             cellfluxrl_samples=np.asarray(99))
    listed = tmp_path / "listed.csv"  # a CSV of paths naming a compound the dataset lacks
    listed.write_text("file,compound\nmixed/0.ome.tif,aspirin\n")
    cases.update({listed: "compound 'aspirin' is not in dataset", other: "written by another version of cellfluxrl"})
    options = {"--intensity range:3:1": "need LO < HI", "--channels dna,actin": "--channels names 2 channel(s)"}
    for args, message in [*(([spec], m) for spec, m in cases.items()),
                          *(([gray, *o.split()], m) for o, m in options.items())]:
        code, err = one_line(*args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
        assert err.startswith("error: ") and not (tmp_path / "out").exists()


def test_out_is_never_in_an_image_folder_and_foreign_folders_are_refused(dataset_dir, evaluated, tmp_path):
    base, _ = evaluated
    folder = base / "saved" / "base"
    before = sorted(p.name for p in folder.iterdir())
    result, _ = score(dataset_dir, folder / "report", folder)
    assert result.exit_code == 2 and "score never writes into what it reads" in result.output
    assert sorted(p.name for p in folder.iterdir()) == before
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    result, _ = score(dataset_dir, foreign, base / "saved" / "base.npz")
    assert result.exit_code == 2 and "notes.txt" in result.output
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_save_images_refuses_a_folder_it_did_not_write(dataset_dir, evaluated, tmp_path):
    base, _ = evaluated
    foreign = tmp_path / "keep"
    foreign.mkdir()
    (foreign / "x.txt").write_text("x")
    result = invoke(["evaluate", "--data", dataset_dir, base / "base", "--n", "6", *SMALL, "--out", tmp_path / "e",
                     "--save-images", foreign])
    assert result.exit_code == 2 and "holds x.txt, which evaluate did not write" in result.output
    assert not (tmp_path / "e").exists() and sorted(p.name for p in foreign.iterdir()) == ["x.txt"]


def test_image_mapping_parts():
    from cellfluxrl.errors import CellfluxError
    from cellfluxrl.evaluation.image_mapping import ImageMapping
    from cellfluxrl.evaluation.score_report import default_best_of

    class Tiny:
        channels = ("actin", "tubulin", "dna")
        images = np.zeros((1, 4, 4, 3), np.uint8)

    x = np.arange(2 * 8 * 8 * 3, dtype=np.uint8).reshape(2, 8, 8, 3)
    assert np.array_equal(ImageMapping.parse(size="crop").apply(x, Tiny, "x"), x[:, 2:6, 2:6])
    assert ImageMapping.parse(size="resize").apply(x, Tiny, "x").shape == (2, 4, 4, 3)
    with pytest.raises(CellfluxError, match="8x8 px, the dataset's are 4x4; give --size resize or --size crop"):
        ImageMapping().apply(x, Tiny, "x")
    assert [default_best_of(k) for k in (1, 2, 4, 6)] == [(1,), (1, 2), (1, 2, 4), (1, 2, 4, 6)]


def test_percentile_intensity_maps_each_images_own_percentiles_to_the_datasets():
    from cellfluxrl.evaluation.image_mapping import ImageMapping, reference_percentiles

    rng = np.random.default_rng(0)

    class Tiny:
        channels = ("actin", "tubulin", "dna")
        images = rng.integers(0, 200, size=(20, 64, 64, 3)).astype(np.uint8)

        @staticmethod
        def select(split=None):
            return np.arange(20)

    want = reference_percentiles(Tiny, 1, 99)  # (2, C), the dataset's order
    raw = rng.normal(1000, 300, size=(3, 64, 64, 3))  # a float source, channels dna,tubulin,actin
    got = ImageMapping.parse("dna,tubulin,actin", None, "percentile:1:99").apply(raw, Tiny, "x").astype(np.float64)
    own = np.percentile(got, (1, 99), axis=(1, 2))  # (2, N, C) after mapping, in the dataset's order
    assert np.abs(own - want[:, None, :]).max() <= 1.0  # up to rounding to uint8 (4,096 pixels: the tails'
    # clipping to 0 moves the interpolated percentile by less than a level)


def test_profile_row_for_every_column_and_the_real_targets_read_one(dataset_dir, evaluated, tmp_path):
    """evaluate and score both report the profile similarity for every column (the baselines and
    ``real`` included); a source made of the real targets themselves reads 1, as ``real`` does."""
    from cellfluxrl.data.layout import load_dataset

    _, evaluate_report = evaluated
    for section in evaluate_report["sections"].values():
        assert "profile_similarity" in section["rows"] and {"copy-control", "real"} <= set(section["columns"])
        assert "train-real" in section["columns"] or section["split"] == "ood"  # held-out compounds have none
        for column in section["columns"]:
            assert section["table"][column]["profile_similarity"]["sem_kind"] == "over compounds"
    dataset = load_dataset(dataset_dir)
    test = dataset.select(split="test", state="treated")
    targets = tmp_path / "targets.npz"
    np.savez(targets, generated=np.asarray(dataset.images[test]), compound=dataset.table["compound"][test],
             target_index=test)
    result, report = score(dataset_dir, tmp_path / "out", targets)
    assert result.exit_code == 0, result.output
    assert "Profile similarity (cosine)" in (tmp_path / "out" / "report.md").read_text()
    for section in report["sections"].values():
        table = section["table"]
        assert set(section["columns"]) == {"targets", "copy-control", "train-real", "real"} or section["split"] == "ood"
        for column in section["columns"]:
            assert "profile_similarity" in table[column], column
        assert section["profile"]["compounds"], section["profile"]["note"]  # some compound has 2 pairs or more
        for column in ("targets", "real"):
            assert abs(table[column]["profile_similarity"]["mean"] - 1.0) <= 1e-12
        assert table["copy-control"]["profile_similarity"]["mean"] < 1 - 1e-6  # controls are not the compound


def test_score_measurements_name_every_source_and_refuse_a_users_file(dataset_dir, evaluated, tmp_path):
    import csv

    from cellfluxrl.evaluation.measurement_tables import IMAGE_HEADER

    base, _ = evaluated
    saved = base / "saved" / "base.npz"
    with np.load(saved) as f:
        n_images = len(f["generated"])
    table = tmp_path / "m.csv"
    result, _ = score(dataset_dir, tmp_path / "out", saved, f"again={saved}",
                      extra=["--baselines", "none", "--measurements", table])
    assert result.exit_code == 0, result.output
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == IMAGE_HEADER and len(rows) == 2 * n_images
    assert [r["Metadata_Source"] for r in rows[:2]] == ["base=base.npz#0", "base=base.npz#1"]
    assert rows[n_images]["Metadata_Source"] == "again=base.npz#0"
    assert [r["ImageNumber"] for r in rows] == [str(i) for i in range(1, 2 * n_images + 1)]
    half = {k: v for k, v in rows[0].items() if k not in ("ImageNumber", "Metadata_Source")}
    assert half == {k: v for k, v in rows[n_images].items() if k not in ("ImageNumber", "Metadata_Source")}
    for part in ("Nuclei", "Cells", "Cytoplasm"):
        assert (tmp_path / f"m_{part}.csv").is_file()
    # a re-run replaces what it wrote; a file of the user's is refused before anything is scored
    result, _ = score(dataset_dir, tmp_path / "out", saved, extra=["--baselines", "none", "--measurements", table])
    assert result.exit_code == 0, result.output
    users = tmp_path / "mine.csv"
    users.write_text("my,own\n1,2\n")
    result, _ = score(dataset_dir, tmp_path / "new", saved, extra=["--measurements", users])
    assert result.exit_code == 2 and "--measurements" in result.output and "was not written by" in result.output
    assert users.read_text() == "my,own\n1,2\n" and not (tmp_path / "new").exists()
    assert not (tmp_path / "mine_Nuclei.csv").exists()
    result, _ = score(dataset_dir, tmp_path / "new", saved, extra=["--measurements", tmp_path / "new" / "m.csv"])
    assert result.exit_code == 2 and "collides with --out" in result.output and not (tmp_path / "new").exists()
    odd = tmp_path / "x=y.npz"  # named after its file, "x=y": Metadata_Source could not tell it apart
    odd.write_bytes(saved.read_bytes())
    result, _ = score(dataset_dir, tmp_path / "new", odd, extra=["--measurements", tmp_path / "n.csv"])
    assert result.exit_code == 2 and "'x=y' is empty or holds '='" in result.output
    assert not (tmp_path / "new").exists() and not (tmp_path / "n.csv").exists()
