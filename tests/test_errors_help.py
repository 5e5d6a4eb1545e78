"""Errors that help: file vs folder, --device gpu, "did you mean", exit 2 for every invalid value,
a short line for a bad Inception file, and `posttrain --dry-run` checking its base run."""

from __future__ import annotations

import shutil

import pytest
import torch

from cellfluxrl.errors import CellfluxError, did_you_mean
from cellfluxrl.model.pretrain import train
from test_cli import run_main, visible_lines  # tests/ is on sys.path
from test_pretrain import MICRO, make_toy_dataset, quick_cfg


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    ds = make_toy_dataset(root / "ds", n_test=3)
    train(ds.root, root / "run", quick_cfg(steps=1), unet=MICRO)
    (root / "afile").write_text("x")
    return root


def usage_error(capsys, *args: str) -> str:
    """Run the CLI; assert exit 2 with one `error:` line; return it."""
    code, _, err = run_main(capsys, *map(str, args))
    lines = visible_lines(err)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_did_you_mean():
    assert did_you_mean("taxo", ["taxol", "AZ138"]) == "did you mean 'taxol'? available: AZ138, taxol"
    assert did_you_mean("zzz", ["moa"]) == "available: moa"


def test_a_file_for_a_folder_and_the_reverse_is_named_as_such(made, capsys):
    assert f"{made / 'afile'} is a file; give a dataset folder" in usage_error(
        capsys, "pretrain", made / "afile", "--out", made / "r", "--dry-run")
    assert f"{made / 'afile'} is a file; give a run folder" in usage_error(capsys, "sample", made / "afile", "--out", made / "s.npz")
    assert f"{made / 'ds'} is a folder; give a FILE.npz file" in usage_error(capsys, "sample", made / "run", "--out", made / "ds")
    assert "is a folder; give a TOML settings file" in usage_error(capsys, "pretrain", made / "ds", "--out", made / "r", "--config", made / "ds")
    assert "is a folder; give an Inception weights file" in usage_error(
        capsys, "evaluate", made / "run", "--data", made / "ds", "--out", made / "ev", "--inception", made / "ds")
    assert "is a file; give a raw BBBC021 folder" in usage_error(capsys, "prepare", "bbbc021", "--out", made / "o", "--raw", made / "afile")


def test_device_gpu_means_cuda_or_one_line(made, capsys):
    from cellfluxrl.distributed import resolve_device

    assert "'tpu' is not a device" in usage_error(capsys, "sample", made / "run", "--out", made / "s.npz", "--device", "tpu")
    with pytest.raises(CellfluxError, match="use auto, cpu, cuda"):
        resolve_device("tpu")
    if torch.cuda.is_available():
        assert resolve_device("gpu").type == "cuda"
        return
    code, _, err = run_main(capsys, "sample", str(made / "run"), "--out", str(made / "s.npz"), "--device", "gpu")
    assert code == 1 and visible_lines(err) == ["error: device cuda requested but CUDA is not available"]


def test_unknown_reward_and_compound_get_did_you_mean(made, capsys):
    line = usage_error(capsys, "sample", made / "run", "--out", made / "s.npz", "--weights", "mao=1")
    assert "unknown reward 'mao'; did you mean 'moa'? available:" in line
    code, _, err = run_main(capsys, "sample", str(made / "run"), "--out", str(made / "s.npz"), "--conditions", "taxo",
                            "--device", "cpu")
    assert code == 1 and "unknown condition 'taxo'" in err and "did you mean 'taxol'? available: AZ138, taxol" in err


def test_every_invalid_value_exits_2(made, capsys):
    assert "weight of 'moa' is not a number" in usage_error(capsys, "sample", made / "run", "--out", made / "s.npz",
                                                            "--weights", "moa=x")
    assert "values must be >= 1, got 0" in usage_error(capsys, "evaluate", made / "run", "--data", made / "ds",
                                                       "--out", made / "ev", "--best-of", "0,4")
    assert "--pixel-size" in usage_error(capsys, "prepare", "bbbc021", "--out", made / "o", "--raw", made / "ds",
                                         "--pixel-size", "-0.3")
    assert "--scale" in usage_error(capsys, "prepare", "images", "--out", made / "o", "--csv", made / "afile", "--scale", "0")


def test_bad_inception_file_is_one_short_line(tmp_path):
    from cellfluxrl.evaluation.inception import load_inception

    (tmp_path / "bad.pth").write_text("garbage")
    with pytest.raises(CellfluxError) as exc:
        load_inception(tmp_path / "bad.pth")
    assert str(exc.value) == (f"Inception weights {tmp_path / 'bad.pth'}: not a PyTorch state dict or TorchScript "
                              f"file (UnpicklingError)")


def test_posttrain_dry_run_checks_the_base_run(made, tmp_path, capsys):
    code, out, _ = run_main(capsys, "posttrain", str(made / "run"), "--out", str(tmp_path / "rl"), "--dry-run")
    assert code == 0 and "steps = 1200" in out
    broken = tmp_path / "broken"
    shutil.copytree(made / "run", broken)
    (broken / "checkpoint.pt").write_text("not a checkpoint")
    code, _, err = run_main(capsys, "posttrain", str(broken), "--out", str(tmp_path / "rl"), "--dry-run")
    assert code == 1 and visible_lines(err) == [f"error: {broken / 'checkpoint.pt'}: not a readable cellfluxrl "
                                                f"checkpoint (UnpicklingError)"]
    shutil.move(str(made / "ds"), tmp_path / "moved")
    try:
        code, _, err = run_main(capsys, "posttrain", str(made / "run"), "--out", str(tmp_path / "rl"), "--dry-run")
    finally:
        shutil.move(str(tmp_path / "moved"), made / "ds")
    assert code == 1 and f"its dataset {made / 'ds'} is gone" in err and not (tmp_path / "rl").exists()


def test_posttrain_says_what_the_remaining_iterations_need():
    from cellfluxrl.commands.posttrain import first_iteration_line

    assert first_iteration_line(1, 31, 16.0) == ("posttrain: iteration 1 took 16 s (start-up included); the 30 "
                                                 "remaining iterations need at most about 8 min at this speed")


def test_evaluate_first_batch_line_scales_to_every_section():
    from cellfluxrl.commands.evaluate import first_batch_line

    assert first_batch_line("id", 16, 64, 30.0, n_splits=2) == (
        "evaluate: the first 16 of 64 id pairs took 30 s (start-up included); both sections (128 pairs) need at "
        "most about 4 min at this speed")
    assert "the evaluation (64 pairs)" in first_batch_line("id", 16, 64, 30.0)

