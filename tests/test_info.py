"""`cellfluxrl info PATH [--json]` on a dataset, a run and a sample file; `sample --data DIR` for a moved dataset."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from cellfluxrl.cli import cli
from cellfluxrl.model.pretrain import train
from test_pretrain import MICRO, make_toy_dataset, quick_cfg  # shared toy data (tests/ is on sys.path)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("info")
    ds = make_toy_dataset(root / "ds", n_test=3)
    train(ds.root, root / "run", quick_cfg(steps=2, lr=1e-2, sample_steps=3, sample_cfg_scale=0.5), unet=MICRO)
    out = root / "s.npz"
    result = CliRunner().invoke(cli, ["sample", str(root / "run"), "--n", "3", "--steps", "2", "--device", "cpu",
                                      "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return ds, root / "run", out


def _info(*args):
    result = CliRunner().invoke(cli, ["info", *map(str, args)])
    return result


def test_info_dataset_text_and_json(made):
    ds, _, _ = made
    text = _info(ds.root)
    assert text.exit_code == 0, text.output
    assert text.output.splitlines()[0] == f"{ds.root}: dataset"
    assert "images: 66 of 16x16x3 (actin, tubulin, dna)" in text.output
    data = json.loads(_info(ds.root, "--json").output)
    assert data["what"] == "dataset" and data["images"] == len(ds) == 66
    assert data["counts"] == ds.meta["counts"] and data["plates"] == len(set(ds.table["batch"]))
    treated = ds.table["state"] == "treated"
    assert data["compounds"] == {c: int(np.sum(ds.table["compound"][treated] == c))
                                 for c in sorted(set(ds.table["compound"][treated]))}


def test_info_run_reports_command_steps_seed_and_sampling(made):
    _, run, _ = made
    data = json.loads(_info(run, "--json").output)
    assert data["what"] == "run" and data["command"] == "cellfluxrl pretrain"
    assert data["steps_done"] == 2 and data["steps_planned"] == 2 and data["seed"] == 3
    assert data["sampling"]["steps"] == 3 and data["sampling"]["cfg_scale"] == 0.5
    assert data["parameters"] > 0 and data["dataset_exists"] is True
    import cellfluxrl

    assert data["cellfluxrl_version"] == cellfluxrl.__version__
    text = _info(run).output
    assert "steps done: 2 of 2" in text and "made by: cellfluxrl pretrain" in text


def test_info_samples_reads_the_npz(made):
    _, _, out = made
    data = json.loads(_info(out, "--json").output)
    npz = np.load(out)
    assert data["what"] == "samples" and data["images"] == 3 and data["image_shape"] == [16, 16, 3]
    assert sum(data["compounds"].values()) == 3
    assert data["recorded"]["num_steps"] == 2 and data["recorded"]["kind"] == "pretrain"
    assert set(data["compounds"]) == set(npz["compound"])


def test_info_refuses_what_it_cannot_describe_in_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    for path, words in ((tmp_path / "notes.txt", "is a file but not a sample file"),
                        (tmp_path / "empty", "is a folder but neither a dataset"),
                        (tmp_path / "none", "does not exist")):
        result = _info(path)
        assert result.exit_code != 0 and words in str(result.exception)
        assert "\n" not in str(result.exception)


def test_sample_data_dir_for_a_run_whose_dataset_moved(made, tmp_path):
    ds, run, _ = made
    moved = tmp_path / "moved"
    shutil.copytree(run, tmp_path / "run")
    shutil.move(str(ds.root), moved)
    try:
        gone = CliRunner().invoke(cli, ["sample", str(tmp_path / "run"), "--n", "2", "--steps", "2",
                                        "--device", "cpu", "--out", str(tmp_path / "a.npz")])
        assert gone.exit_code == 1 and "give its new place with --data DIR" in str(gone.exception)
        ok = CliRunner().invoke(cli, ["sample", str(tmp_path / "run"), "--n", "2", "--steps", "2", "--device", "cpu",
                                      "--data", str(moved), "--out", str(tmp_path / "a.npz")])
        assert ok.exit_code == 0, ok.output
        assert str(np.load(tmp_path / "a.npz")["meta_dataset"]) == str(moved)
        assert "(gone); sampling" in ok.stderr
        wrong = CliRunner().invoke(cli, ["sample", str(tmp_path / "run"), "--n", "2", "--device", "cpu",
                                         "--data", str(tmp_path / "a.npz"), "--out", str(tmp_path / "b.npz")])
        assert wrong.exit_code == 2 and "is a file; give a dataset folder" in wrong.output
    finally:
        shutil.move(str(moved), ds.root)
