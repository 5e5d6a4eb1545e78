"""The shipped example configs (configs/*.toml) and the `--dry-run` TOML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from cellfluxrl.cli import cli
from cellfluxrl.commands.demo import DemoConfig, posttrain_config, pretrain_config
from cellfluxrl.config import PretrainConfig, config_to_dict, dump_toml, tomllib
from cellfluxrl.model.pretrain import train
from cellfluxrl.model.unet import PRESETS
from cellfluxrl.rl.config import PosttrainConfig
from test_pretrain import MICRO, make_toy_dataset, quick_cfg  # shared toy data (tests/ is on sys.path)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    ds = make_toy_dataset(root / "ds", n_test=3)
    train(ds.root, root / "run", quick_cfg(steps=1), unet=MICRO)
    return ds.root, root / "run"


def dry_run(*args):
    result = CliRunner().invoke(cli, [*map(str, args), "--dry-run"])
    assert result.exit_code == 0, result.output
    return result.output


def test_dump_toml_reads_back_every_type():
    settings = {"a": 1, "b": 2.5, "c": 1e-05, "d": True, "e": "x \"y\"", "f": [2, 2], "g": None, "h": 100.0,
                "i": float("inf")}
    back = tomllib.loads(dump_toml(settings, {"t": {"k": [1.0, 3e20]}}, header="two\nlines"))
    assert back == {k: v for k, v in settings.items() if v is not None} | {"t": {"k": [1.0, 3e20]}}


def test_pretrain_dry_run_round_trips_through_config(made, tmp_path):
    data, _ = made
    first = dry_run("pretrain", data, "--out", tmp_path / "r", "--preset", "tiny", "--train-steps", "7", "--lr", "3e-4")
    resolved = tomllib.loads(first)
    assert resolved["steps"] == 7 and resolved["lr"] == 3e-4 and resolved["unet"] == config_to_dict(PRESETS["tiny"])
    (tmp_path / "p.toml").write_text(first)
    assert dry_run("pretrain", data, "--out", tmp_path / "r", "--config", tmp_path / "p.toml") == first
    assert not (tmp_path / "r").exists()


def test_posttrain_dry_run_round_trips_through_config(made, tmp_path):
    _, run = made
    first = dry_run("posttrain", run, "--out", tmp_path / "rl", "--weights", "moa=5,nuc_in_cyto=2", "--kl-weight", "0.5")
    assert tomllib.loads(first)["weights"] == "moa=5,nuc_in_cyto=2"
    assert "# cfg_scale = (not set: the default)" in first
    (tmp_path / "p.toml").write_text(first)
    assert dry_run("posttrain", run, "--out", tmp_path / "rl", "--config", tmp_path / "p.toml") == first


def test_demo_configs_are_the_demos_settings(made, tmp_path):
    data, run = made
    pre = tomllib.loads(dry_run("pretrain", data, "--out", tmp_path / "r", "--config", CONFIGS / "demo-pretrain.toml"))
    assert pre == {**config_to_dict(pretrain_config(DemoConfig())), "unet": config_to_dict(PRESETS["micro"])}
    post = tomllib.loads(dry_run("posttrain", run, "--out", tmp_path / "rl", "--config", CONFIGS / "demo-posttrain.toml"))
    assert post == {k: v for k, v in config_to_dict(posttrain_config(DemoConfig())).items() if v is not None}


def test_paper_gpu_configs_load_with_the_papers_settings(made, tmp_path):
    data, run = made
    pre = tomllib.loads(dry_run("pretrain", data, "--out", tmp_path / "r", "--config", CONFIGS / "paper-gpu-pretrain.toml"))
    expected = {**config_to_dict(PretrainConfig()), "num_workers": 8, "channels_last": True}
    assert pre == {**expected, "unet": config_to_dict(PRESETS["paper"])}
    post = tomllib.loads(dry_run("posttrain", run, "--out", tmp_path / "rl", "--config", CONFIGS / "paper-gpu-posttrain.toml"))
    assert post == {k: v for k, v in config_to_dict(PosttrainConfig()).items() if v is not None}
