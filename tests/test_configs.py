"""The shipped example configs (configs/*.toml) and the `--dry-run` TOML round trip."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cellfluxrl.cli import cli
from cellfluxrl.commands.demo import DemoConfig, posttrain_config, pretrain_config
from cellfluxrl.config import PretrainConfig, config_to_dict, tomllib
from cellfluxrl.config_toml import dump_toml
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


# ------------------------------------------------------------------------------------------ TOML keys and files

def _error(path, cls=PretrainConfig, **kw) -> str:
    from cellfluxrl.config import load_toml_overrides
    from cellfluxrl.errors import CellfluxError

    with pytest.raises(CellfluxError) as info:
        load_toml_overrides(path, cls, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_latin1_toml_names_the_file_the_line_and_utf8(made, tmp_path):
    data, _ = made
    bad = tmp_path / "latin1.toml"
    bad.write_bytes("steps = 7\n# réglages du café\n".encode("latin-1"))
    assert _error(bad) == (f"{bad} line 2, column 4: byte 0xe9 is not UTF-8; a TOML file must be saved as UTF-8 "
                           f"(e.g. iconv -f latin1 -t utf-8)")
    result = CliRunner().invoke(cli, ["pretrain", str(data), "--out", str(tmp_path / "r"), "--config", str(bad), "--dry-run"])
    assert result.exit_code == 1 and f"{bad} line 2, column 4" in str(result.exception)
    bom = tmp_path / "bom.toml"
    bom.write_bytes("\ufeffsteps = 7\n".encode("utf-8"))  # a byte-order mark (Windows editors) is fine
    from cellfluxrl.config import load_toml_overrides

    assert load_toml_overrides(bom, PretrainConfig) == {"steps": 7}


@pytest.mark.parametrize("key, cls, hint", [
    ("iterations", PosttrainConfig, "the key is 'steps' (--iterations on the command line)"),
    ("stop-after-no-signal", PosttrainConfig, "the key is 'no_signal_stop' (--stop-after-no-signal on the command line)"),
    ("train_steps", PretrainConfig, "the key is 'steps' (--train-steps on the command line)"),
    ("save-every", PosttrainConfig, "the key is spelled 'save_every' (with underscores)"),
    ("device", PosttrainConfig, "--device is a command-line option, not a setting of this file"),
    ("grid_evry", PosttrainConfig, "did you mean 'grid_every'? available: adaptive, "),
    ("ckpt_every", PosttrainConfig, "did you mean 'save_every'? available: "),
])
def test_an_unknown_toml_key_names_the_key_it_means(tmp_path, key, cls, hint):
    path = tmp_path / "s.toml"
    path.write_text(f'"{key}" = 5\n')
    assert _error(path, cls).startswith(f"{path}: unknown key {key!r}; {hint}")


def test_a_table_is_named_with_what_the_file_takes(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text("[steps]\nx = 1\n")
    assert _error(path, tables={"unet": object}) == f"{path}: unknown table [steps]; 'steps' is a setting: write steps = VALUE"
    path.write_text("[unet2]\nx = 1\n")
    assert _error(path, PosttrainConfig) == f"{path}: unknown table [unet2]; tables here: none"


@pytest.mark.parametrize("command, cls", [("pretrain", PretrainConfig), ("posttrain", PosttrainConfig)])
def test_every_option_spelling_in_a_toml_names_its_key(command, cls):
    """The synonym tables agree with the commands' options: each option's spelling, written as a TOML
    key, is a key, or is named as the key its option sets, or as no setting."""
    import importlib

    from cellfluxrl.config import field_types

    click_command = getattr(importlib.import_module(f"cellfluxrl.commands.{command}"), command)
    keys, renamed, synonyms = set(field_types(cls)), getattr(cls, "RENAMED_KEYS", {}), cls.KEY_SYNONYMS
    for param in click_command.params:
        if not isinstance(param, click.Option) or param.name == "help":
            continue
        setting = renamed.get(param.name, param.name) if renamed.get(param.name, param.name) in keys else None
        for opt in (*param.opts, *param.secondary_opts):
            spelled = opt.lstrip("-").replace("-", "_")
            meant = spelled if spelled in keys else renamed.get(spelled, synonyms.get(spelled, "MISSING"))
            assert meant == setting, f"{command} {opt}: a TOML key {spelled!r} is read as {meant!r}, the option sets {setting!r}"


def test_a_bad_weights_value_in_a_toml_names_the_file_and_key(made, tmp_path):
    _, run = made
    conf = tmp_path / "rl.toml"
    conf.write_text('weights = "moa=x"\n')
    result = CliRunner().invoke(cli, ["posttrain", str(run), "--out", str(tmp_path / "rl"), "--config", str(conf),
                                      "--dry-run"])
    assert result.exit_code == 1
    assert str(result.exception) == f"{conf}: weights = 'moa=x': weight of 'moa' is not a number ('x')"
    conf.write_text("steps = 0\n")
    result = CliRunner().invoke(cli, ["posttrain", str(run), "--out", str(tmp_path / "rl"), "--config", str(conf),
                                      "--dry-run"])
    assert result.exit_code == 1 and str(result.exception) == f"{conf}: posttrain: steps must be > 0, got 0"
    assert not (tmp_path / "rl").exists()


def test_save_every_is_one_key_and_the_old_ckpt_every_still_reads(made, tmp_path, caplog):
    from cellfluxrl.config import load_toml_overrides

    data, _ = made
    old = tmp_path / "old.toml"
    old.write_text("ckpt_every = 5\n")
    with caplog.at_level("WARNING", logger="cellfluxrl.config"):
        assert load_toml_overrides(old, PretrainConfig) == {"save_every": 5}
    assert f"{old}: key 'ckpt_every' is deprecated, read as 'save_every'" in caplog.text
    resolved = tomllib.loads(dry_run("pretrain", data, "--out", tmp_path / "r", "--config", old))
    assert resolved["save_every"] == 5 and "ckpt_every" not in resolved
    old.write_text("ckpt_every = 5\nsave_every = 5\n")  # the same value twice: fine
    assert load_toml_overrides(old, PretrainConfig) == {"save_every": 5}
    old.write_text("ckpt_every = 5\nsave_every = 6\n")
    assert _error(old) == (f"{old}: both 'ckpt_every' (the old name of 'save_every') and 'save_every' are set, to 5 "
                           f"and 6; keep only 'save_every'")
    assert "save_every" in config_to_dict(PosttrainConfig()) and "save_every" in config_to_dict(PretrainConfig())
    assert PretrainConfig(ckpt_every=7) == PretrainConfig(save_every=7)  # a program's old keyword still works


def test_a_run_stored_with_ckpt_every_resumes(made, tmp_path):
    """A run pretrained before the rename stored `ckpt_every` in its config: resuming it must work."""
    import json

    import torch

    from cellfluxrl.checkpoint import load_checkpoint, save_checkpoint

    data, _ = made
    run = tmp_path / "old-run"
    train(data, run, quick_cfg(steps=1), unet=MICRO)
    state = load_checkpoint(run / "checkpoint.pt")
    state["config"]["train"] = {("ckpt_every" if k == "save_every" else k): v for k, v in state["config"]["train"].items()}
    save_checkpoint(run / "checkpoint.pt", state)
    (run / "config.json").write_text(json.dumps(state["config"]))
    result = train(data, run, quick_cfg(steps=2), unet=MICRO)
    assert result.resumed_from == 1 and result.step == 2
    assert "save_every" in torch.load(run / "checkpoint.pt", weights_only=True)["config"]["train"]
