"""Errors that help: file vs folder, --device checked on this machine before any work, "did you mean",
exit 2 for every invalid value, a short line for a bad Inception file, and `posttrain --dry-run` checking its base run."""

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
    assert usage_error(capsys, "sample", made / "run", "--out", made / "s.npz", "--device", "gpu") == (
        "error: --device gpu: this machine has no CUDA device (see 'cellfluxrl sample --help')")
    assert not (made / "s.npz").exists()


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def test_device_problem_names_the_device_asked_for():
    from cellfluxrl.distributed import device_problem

    assert device_problem("cuda:3", 0, False) == "this machine has no CUDA device 3 (it has none)"
    assert device_problem("cuda:3", 1, False) == "this machine has no CUDA device 3 (it has 1: cuda:0)"
    assert device_problem("cuda:3", 2, False) == "this machine has no CUDA device 3 (it has 2: cuda:0 to cuda:1)"
    assert device_problem("cuda", 0, False) == "this machine has no CUDA device"
    assert device_problem("cuda", 2, False, local_rank=3) == (
        "this machine has no CUDA device 3 for local rank 3 (it has 2: cuda:0 to cuda:1)")
    assert device_problem("mps", 0, False) == "this machine has no MPS (Apple GPU) device"
    assert [device_problem(d, 2, True, local_rank=1) for d in ("cpu", "cuda", "cuda:1", "mps")] == [None] * 4


def test_resolve_device_reports_the_index_asked_for():
    from cellfluxrl.distributed import pick_device, resolve_device

    n = _cuda_count()
    with pytest.raises(CellfluxError) as exc:
        resolve_device(f"cuda:{n + 3}")
    have = "none" if n == 0 else f"{n}: cuda:0" + (f" to cuda:{n - 1}" if n > 1 else "")
    assert str(exc.value) == f"device cuda:{n + 3}: this machine has no CUDA device {n + 3} (it has {have})"
    assert pick_device("auto") == pick_device(None) == ("cuda" if n else "cpu") and pick_device("CPU") == "cpu"
    if n:
        assert pick_device(" GPU ") == "cuda" and pick_device(f"gpu:{n - 1}") == f"cuda:{n - 1}"
    assert resolve_device("cpu") == torch.device("cpu")


def test_the_device_type_resolves_auto_and_checks_the_machine_when_parsing():
    import click

    from cellfluxrl.commands.params import DEVICE

    n = _cuda_count()
    assert DEVICE.convert("auto", None, None) == ("cuda" if n else "cpu") and DEVICE.convert("CPU", None, None) == "cpu"
    if n:
        assert DEVICE.convert("Gpu:0", None, None) == "cuda:0"
    with pytest.raises(click.UsageError, match=rf"^--device cuda:{n}: this machine has no CUDA device {n} "):
        DEVICE.convert(f"cuda:{n}", None, None)


def _device_commands():
    """(path, command) for every command and subcommand of the CLI."""
    import importlib

    import click

    from cellfluxrl.cli import COMMANDS

    for name, (module, attr, _) in COMMANDS.items():
        command = getattr(importlib.import_module(module), attr)
        subs = command.commands.items() if isinstance(command, click.Group) else [(None, command)]
        for sub_name, sub in subs:
            yield [name] + ([sub_name] if sub_name else []), sub


def test_every_device_option_is_the_one_device_type():
    from cellfluxrl.commands.params import Device

    found = {" ".join(path) for path, command in _device_commands()
             for param in command.params if param.name == "device" and isinstance(param.type, Device)}
    every = {" ".join(path) for path, command in _device_commands() for param in command.params
             if "--device" in getattr(param, "opts", [])}
    assert found == every and {"sample", "evaluate", "pretrain", "posttrain", "demo", "rewards fit",
                               "prepare cellpose-model"} <= found


@pytest.mark.parametrize("device", ["cuda:{n3}", "gpu:{n3}", "cuda"])
@pytest.mark.parametrize("command", [
    ["sample", "{run}", "--out", "{tmp}/s.npz"],
    ["evaluate", "{run}", "--data", "{ds}", "--out", "{tmp}/ev"],
    ["pretrain", "{ds}", "--out", "{tmp}/r"],
    ["posttrain", "{run}", "--out", "{tmp}/rl"],
    ["rewards", "fit", "{ds}"],
    ["demo", "--quick", "--out", "{tmp}/demo"],
    ["prepare", "cellpose-model", "{ds}", "--out", "{tmp}/models"],
])
def test_every_command_refuses_a_missing_device_before_any_work(made, tmp_path, capsys, command, device):
    n = _cuda_count()
    if device == "cuda" and n:
        pytest.skip("this machine has a CUDA device")
    device = device.format(n3=n + 3)
    args = [a.format(run=made / "run", ds=made / "ds", tmp=tmp_path) for a in command]
    before = sorted(p.name for p in made.iterdir())
    line = usage_error(capsys, *args, "--device", device)
    have = "none" if n == 0 else f"{n}: cuda:0" + (f" to cuda:{n - 1}" if n > 1 else "")
    problem = "this machine has no CUDA device" + (f" {n + 3} (it has {have})" if ":" in device else "")
    assert line.startswith(f"error: --device {device}: {problem} (see 'cellfluxrl "), line
    assert list(tmp_path.iterdir()) == [] and sorted(p.name for p in made.iterdir()) == before


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

