"""Evaluation pairs, best-of-K selection, batch-independent sampling and the `sample` command."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cellfluxrl.checkpoint import load_run
from cellfluxrl.errors import CellfluxError
from cellfluxrl.model.generate import best_of, sample_pairs, test_pairs
from cellfluxrl.model.pretrain import train
from test_pretrain import MICRO, make_toy_dataset, quick_cfg  # shared toy data (tests/ is on sys.path)




@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    ds = make_toy_dataset(root / "ds", n_test=3)
    train(ds.root, root / "run", quick_cfg(steps=2, lr=1e-2, sample_steps=3, sample_cfg_scale=0.5), unet=MICRO)
    return ds, root / "run"


class FakeSuite:
    """Scores an image by its mean DNA intensity (a stand-in for cellfluxrl.rewards.RewardSuite)."""

    def __init__(self):
        self.calls = []

    def score(self, images, moa):
        self.calls.append((tuple(images.shape), list(moa)))
        dna = np.asarray(images[:, 2].mean(dim=(1, 2)), dtype=np.float64)
        return SimpleNamespace(total=dna, components={"dna": dna * 2})


def test_test_pairs_first_rows_in_csv_order_same_plate(trained):
    ds, _ = trained
    treated = ds.select(split="test", state="treated")
    targets, controls = test_pairs(ds, 5, seed=0)
    assert np.array_equal(targets, treated[:5]) and targets.dtype == np.int64 and controls.dtype == np.int64
    assert np.all(ds.table["batch"][controls] == ds.table["batch"][targets])
    assert np.all(ds.table["state"][controls] == "control") and np.all(ds.table["split"][controls] == "test")
    assert np.array_equal(test_pairs(ds, 5, seed=0)[1], controls)
    only, _ = test_pairs(ds, 100, seed=0, conditions=["AZ138"])
    assert len(only) == 6 and set(ds.table["compound"][only]) == {"AZ138"}
    with pytest.raises(CellfluxError, match="unknown condition 'aspirin'"):
        test_pairs(ds, 5, seed=0, conditions=["aspirin"])


def test_best_of_picks_the_highest_total():
    totals = np.array([[0.1, 0.9, 0.3], [2.0, -1.0, 2.0], [-5.0, -4.0, -6.0]])
    assert np.array_equal(best_of(totals), [1, 0, 1])
    with pytest.raises(ValueError):
        best_of(np.zeros(3))


def test_sampling_is_batch_independent_and_best_of_selects(trained):
    ds, run = trained
    net = load_run(run).net
    targets, controls = test_pairs(ds, 5, seed=0)
    kw = dict(seed=7, num_steps=3)
    a = sample_pairs(net, ds, targets, controls, batch_size=2, **kw)
    b = sample_pairs(net, ds, targets, controls, batch_size=5, **kw)
    assert np.array_equal(a.generated, b.generated) and np.array_equal(a.seeds, b.seeds)
    assert a.generated.shape == (5, 16, 16, 3) and a.generated.dtype == np.uint8 and a.rewards is None
    suite = FakeSuite()
    best = sample_pairs(net, ds, targets, controls, batch_size=6, best_of_k=3, suite=suite, **kw)
    assert suite.calls[0][0] == (6, 3, 16, 16) and suite.calls[0][1][:3] == [ds.table["moa"][targets[0]]] * 3
    assert best.candidate_rewards.shape == (5, 3)
    assert np.array_equal(best.rewards, best.candidate_rewards.max(axis=1))
    assert np.allclose(best.components["dna"], 2 * best.rewards)
    # Candidate 0 of every request is the K = 1 sample (same seed), so best-of never does worse.
    assert np.all(best.rewards >= best.candidate_rewards[:, 0])
    assert best.generated[:, :, :, 2].mean() > a.generated[:, :, :, 2].mean()
    with pytest.raises(CellfluxError, match="best-of-K needs a reward suite"):
        sample_pairs(net, ds, targets, controls, best_of_k=2, **kw)


def test_sample_command_writes_npz_and_png(trained, tmp_path):
    from cellfluxrl.cli import cli

    _, run = trained
    out = tmp_path / "s.npz"
    result = CliRunner().invoke(cli, ["sample", str(run), "--n", "4", "--conditions", "taxol,AZ138", "--steps", "2",
                                      "--device", "cpu", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = np.load(out)
    assert data["generated"].shape == (4, 16, 16, 3) and data["generated"].dtype == np.uint8
    assert data["controls"].shape == data["targets"].shape == (4, 16, 16, 3)
    assert list(data["compound"]) == ["taxol", "taxol", "taxol", "AZ138"]  # plate 0: 3 taxol rows, then AZ138
    assert data["meta_num_steps"] == 2 and str(data["meta_kind"]) == "pretrain"
    assert out.with_suffix(".png").stat().st_size > 1000
    missing = CliRunner().invoke(cli, ["sample", str(tmp_path / "none"), "--out", str(out)])
    assert missing.exit_code != 0 and "does not exist" in str(missing.exception)


def test_sample_uses_the_runs_recorded_sampling_and_says_so(trained, tmp_path):
    from cellfluxrl.cli import cli

    _, run = trained
    assert load_run(run).recorded.steps == 3 and load_run(run).recorded.cfg_scale == 0.5
    out = tmp_path / "s.npz"
    result = CliRunner().invoke(cli, ["sample", str(run), "--n", "2", "--device", "cpu",
                                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = np.load(out)
    assert data["meta_num_steps"] == 3 and data["meta_cfg_scale"] == 0.5 and str(data["meta_split"]) == "id"
    assert "3 Heun steps (edm grid), CFG 0.5" in result.stderr and "recorded in the run" in result.stderr
    override = CliRunner().invoke(cli, ["sample", str(run), "--n", "2", "--cfg-scale", "0",
                                                        "--device", "cpu", "--out", str(out)])
    assert override.exit_code == 0 and np.load(out)["meta_cfg_scale"] == 0.0
    assert "overridden on the command line" in override.stderr
    nan = CliRunner().invoke(cli, ["sample", str(run), "--n", "2", "--cfg-scale", "nan",
                                                   "--device", "cpu", "--out", str(out)])
    assert nan.exit_code != 0 and "cfg_scale" in str(nan.exception)


def test_test_pairs_keep_in_distribution_and_held_out_compounds_apart(tmp_path):
    from cellfluxrl.data.compounds import OOD_COMPOUNDS
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.data.synthetic import prepare_synthetic

    ds = load_dataset(prepare_synthetic(tmp_path / "ds", n_images=600, seed=1, size=32, n_plates=2, progress=False))
    ids, _ = test_pairs(ds, 10_000, seed=0)  # the default split: in-distribution
    oods, _ = test_pairs(ds, 10_000, seed=0, split="ood")
    everything, _ = test_pairs(ds, 10_000, seed=0, split="all")
    assert ids.size and oods.size
    assert set(ds.table["compound"][ids]).isdisjoint(OOD_COMPOUNDS)
    assert set(ds.table["compound"][oods]) <= set(OOD_COMPOUNDS)
    assert np.array_equal(np.sort(np.concatenate([ids, oods])), everything)
    assert np.array_equal(test_pairs(ds, 3, seed=0, split="ood")[0], oods[:3])  # first rows in CSV order
    with pytest.raises(CellfluxError, match="unknown split"):
        test_pairs(ds, 3, seed=0, split="mixed")


def test_sample_out_must_be_an_npz_so_the_png_cannot_overwrite_it(trained, tmp_path, capsys):
    from test_cli import run_main, visible_lines

    _, run = trained
    code, _, err = run_main(capsys, "sample", str(run), "--n", "2", "--device", "cpu", "--out", str(tmp_path / "s.png"))
    assert code == 2 and len(visible_lines(err)) == 1 and ".npz" in err
    assert not (tmp_path / "s.png").exists()


def test_sample_format_tiff_reads_back_with_channel_names_and_csv_matches_npz(trained, tmp_path):
    import csv

    import tifffile

    from cellfluxrl.cli import cli

    ds, run = trained
    out = tmp_path / "s"  # --format tiff: --out is the folder the images go into
    result = CliRunner().invoke(cli, ["sample", str(run), "--n", "3", "--steps", "2", "--device", "cpu",
                                      "--format", "tiff", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"wrote 3 images (OME-TIFF), samples.csv, samples.npz and grid.png to {out}" in result.output
    data = np.load(out / "samples.npz")
    rows = list(csv.DictReader(open(out / "samples.csv")))
    assert [r["pair"] for r in rows] == ["0", "1", "2"]
    assert [r["compound"] for r in rows] == list(data["compound"])
    assert [r["moa"] for r in rows] == list(data["moa"])
    assert [int(r["control_index"]) for r in rows] == list(data["control_index"])
    assert [int(r["target_index"]) for r in rows] == list(data["target_index"])
    t = data["target_index"]
    assert [r["plate"] for r in rows] == list(ds.table["batch"][t])
    assert [float(r["dose"]) for r in rows] == list(ds.table["dose"][t])
    assert [r["well"] for r in rows] == list(ds.table["well"][t])
    assert [r["control_well"] for r in rows] == list(ds.table["well"][data["control_index"]])
    assert "target_source" not in rows[0] and "control_source" not in rows[0]  # plate and well are columns
    for i, row in enumerate(rows):
        with tifffile.TiffFile(out / row["file"]) as tif:
            assert tif.is_ome and tif.series[0].axes == "CYX"
            image = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
            assert image["Name"] == row["file"][:-len(".ome.tif")] == f"{i:05d}_{row['compound']}"
            names = [c.get("Name") for c in image["Pixels"]["Channel"]]
            assert names == list(ds.channels) == ["actin", "tubulin", "dna"]
            assert np.array_equal(tif.asarray(), np.moveaxis(data["generated"][i], 2, 0))
    assert (out / "grid.png").stat().st_size > 1000 and not (tmp_path / "s.npz").exists()


def test_sample_format_png_writes_rgb_previews(trained, tmp_path):
    from PIL import Image

    from cellfluxrl.cli import cli

    _, run = trained
    out = tmp_path / "s"
    result = CliRunner().invoke(cli, ["sample", str(run), "--n", "2", "--steps", "2", "--device", "cpu",
                                      "--format", "png", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    compounds = np.load(out / "samples.npz")["compound"]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([f"00000_{compounds[0]}.png", f"00001_{compounds[1]}.png", "samples.csv", "samples.npz",
                            "grid.png", ".cellfluxrl-sample.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no staging folder or lock left beside it
    png = Image.open(out / files[1])
    assert png.mode == "RGB" and np.array_equal(np.asarray(png), np.load(out / "samples.npz")["generated"][0])
    (tmp_path / "f").write_text("")
    clash = CliRunner().invoke(cli, ["sample", str(run), "--n", "2", "--format", "png", "--out", str(tmp_path / "f")])
    assert clash.exit_code == 2 and "is a file" in clash.output
    named = CliRunner().invoke(cli, ["sample", str(run), "--n", "2", "--format", "png",
                                     "--out", str(tmp_path / "g.npz")])
    assert named.exit_code == 2 and "give a folder name, not FILE.npz" in named.output


def test_samples_csv_records_the_kept_candidate_and_every_reward(trained, tmp_path):
    import csv

    from cellfluxrl.export import export_samples

    ds, run = trained
    targets, controls = test_pairs(ds, 3, seed=0)
    best = sample_pairs(load_run(run).net, ds, targets, controls, seed=7, num_steps=2, best_of_k=3, suite=FakeSuite())
    path = export_samples(tmp_path / "x", best, ds.table, ds.channels, "tiff")
    rows = list(csv.DictReader(open(path)))
    assert [int(r["candidate"]) for r in rows] == list(np.argmax(best.candidate_rewards, axis=1))
    assert np.allclose([float(r["reward"]) for r in rows], best.rewards, rtol=0, atol=1e-12)
    assert np.allclose([float(r["reward_dna"]) for r in rows], best.components["dna"], rtol=0, atol=1e-12)
