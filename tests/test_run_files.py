"""Files that lose or hide data, and nonsense accepted (issue 13 items 5 and 6): sample to an
unwritable folder, stale checkpoint temp files, stats.jsonl after a resume, file modes and the
umask, runs evaluated on another dataset, reward factories that raise, RL on top of RL."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
from click.testing import CliRunner

from cellfluxrl.config import tomllib
from cellfluxrl.checkpoint import read_run_config, save_checkpoint, trained_on_problem, truncate_stats
from cellfluxrl.errors import CellfluxError
from cellfluxrl.model.pretrain import train
from test_cli import assert_one_line_error, run_main
from test_pretrain import MICRO, make_toy_dataset, quick_cfg  # shared toy data (tests/ is on sys.path)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runfiles")
    ds = make_toy_dataset(root / "ds", n_test=3)
    train(ds.root, root / "run", quick_cfg(steps=2), unet=MICRO)
    return ds, root / "run"


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ---------------------------------------------------------------------------------------------- 5a

def _never_sample(monkeypatch):
    import cellfluxrl.model.generate

    def fail(*args, **kwargs):
        raise AssertionError("sampled before checking --out")

    monkeypatch.setattr(cellfluxrl.model.generate, "sample_pairs", fail)


def test_sample_into_a_path_under_a_file_fails_before_generating(toy_run, tmp_path, capsys, monkeypatch):
    _never_sample(monkeypatch)
    _, run = toy_run
    (tmp_path / "plain.txt").write_text("not a folder")
    out = tmp_path / "plain.txt" / "s.npz"
    code, _, err = run_main(capsys, "sample", str(run), "--n", "2", "--device", "cpu", "--out", str(out))
    assert_one_line_error(code, err, "--out", str(out), "cannot write")
    nested = tmp_path / "new" / "deeper" / "s.npz"  # the check creates nothing: a failed run leaves no folder
    code, _, err = run_main(capsys, "sample", str(tmp_path / "no-run"), "--out", str(nested))
    assert_one_line_error(code, err, "no-run")
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_sample_into_a_read_only_folder_fails_before_generating(toy_run, tmp_path, capsys, monkeypatch):
    _never_sample(monkeypatch)
    _, run = toy_run
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        code, _, err = run_main(capsys, "sample", str(run), "--n", "2", "--device", "cpu", "--out", str(folder / "s.npz"))
    finally:
        folder.chmod(0o755)
    assert_one_line_error(code, err, "--out", "cannot write", "Permission denied")
    assert list(folder.iterdir()) == []


# ---------------------------------------------------------------------------------------------- 5b

def test_a_killed_writes_temp_files_are_removed_by_the_next_save(tmp_path):
    """Only temp files of dead writers go: a live process's (a concurrent writer's) is left alone."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = [tmp_path / f".checkpoint.pt.tmp-{dead.stdout.strip()}", tmp_path / ".stats.jsonl.tmp-4194305"]
    for path in stale:
        path.write_bytes(b"partial")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        writing = tmp_path / f".config.json.tmp-{live.pid}"
        writing.write_text("a live writer's")
        other = tmp_path / ".notes.tmp-1"
        other.write_text("not a run file")
        save_checkpoint(tmp_path / "checkpoint.pt", {"kind": "pretrain", "model": {}})
        assert not any(p.exists() for p in stale)
        assert writing.exists() and other.exists() and (tmp_path / "checkpoint.pt").is_file()
        assert sorted(p.name for p in tmp_path.iterdir()) == [".config.json.tmp-" + str(live.pid), ".notes.tmp-1",
                                                              "checkpoint.pt"]
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------------------------------------- 5c

def test_pretrain_resumed_after_a_kill_logs_each_step_once(toy_run, tmp_path):
    ds, _ = toy_run

    def kill(stats):
        if stats["step"] == 3:
            raise KeyboardInterrupt  # after the step-2 checkpoint and the step-3 stats line

    with pytest.raises(KeyboardInterrupt):
        train(ds.root, tmp_path / "run", quick_cfg(), unet=MICRO, on_step=kill)
    stats = tmp_path / "run" / "stats.jsonl"
    with open(stats, "a") as f:
        f.write('{"step": 4, "lo')  # a line cut short by the kill
    assert [json.loads(line)["step"] for line in stats.read_text().splitlines()[:3]] == [1, 2, 3]
    train(ds.root, tmp_path / "run", quick_cfg(), unet=MICRO)
    assert [json.loads(line)["step"] for line in stats.read_text().splitlines()] == [1, 2, 3, 4]


def test_truncate_stats_keeps_records_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "stats.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)) + "garbage\n")
    assert truncate_stats(path, 2) == 3
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert truncate_stats(path, 2) == 0 and truncate_stats(tmp_path / "none.jsonl", 2) == 0


# ---------------------------------------------------------------------------------------------- 5d

@pytest.mark.parametrize("umask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_datasets_and_runs_follow_the_umask(tmp_path, umask, folder_mode, file_mode):
    old = os.umask(umask)
    try:
        ds = make_toy_dataset(tmp_path / "ds", n_train=4, n_test=1)
        train(ds.root, tmp_path / "run", quick_cfg(steps=1, batch_size=2), unet=MICRO)
    finally:
        os.umask(old)
    for folder in (ds.root, tmp_path / "run"):
        assert _mode(folder) == folder_mode, folder
    files = [*(p for p in ds.root.rglob("*") if p.is_file()), *(tmp_path / "run").iterdir()]
    assert {p.name for p in files} >= {"images.npy", "meta.json", "checkpoint.pt", "config.json", "stats.jsonl"}
    assert {p.name: _mode(p) for p in files} == {p.name: file_mode for p in files}


# ---------------------------------------------------------------------------------------------- 6a

def test_a_run_from_another_dataset_is_named_and_another_image_size_refused(toy_run, tmp_path, capsys):
    ds, run = toy_run
    config = read_run_config(run)
    assert config["dataset"] == str(ds.root.resolve()) and config["image_size"] == 16
    assert trained_on_problem(config, "base", ds.root) is None
    same_size = make_toy_dataset(tmp_path / "other16", n_train=4, n_test=3, seed=1)
    level, line = trained_on_problem(config, "base", same_size.root)
    assert level == "warning" and "base" in line and str(ds.root.resolve()) in line and str(same_size.root) in line
    bigger = make_toy_dataset(tmp_path / "other32", size=32, n_train=4, n_test=1)
    level, line = trained_on_problem(config, "base", bigger.root)
    assert level == "error" and "16 px" in line and "32 px" in line
    # An older run without image_size: read from the dataset it was trained on.
    legacy = {k: v for k, v in config.items() if k != "image_size"}
    assert trained_on_problem(legacy, "base", bigger.root)[0] == "error"

    from cellfluxrl.commands.evaluate import preflight

    lines = preflight([run], same_size.root, n=4, split="id", best_of=(1,), steps=None, cfg_scale=None, sigma=None,
                      seed=0, device="cpu")
    assert lines[0].startswith("warning: run ") and "not on --data" in lines[0]
    code, _, err = run_main(capsys, "evaluate", str(run), "--data", str(bigger.root), "--out", str(tmp_path / "e"),
                            "--device", "cpu")
    assert_one_line_error(code, err, str(run), "16 px", "32 px")


# ---------------------------------------------------------------------------------------------- 6b

def test_rewards_check_reports_a_factory_that_raises(monkeypatch):
    from cellfluxrl.commands.rewards import rewards
    from test_registry import _fake_module, _install

    module = _fake_module(monkeypatch)
    _install(monkeypatch, [("boom", f"{module}:make_raises", "pkg-boom", "1"),
                           ("good", f"{module}:make_good", "pkg-good", "2")])
    result = CliRunner().invoke(rewards, ["--check"])
    assert result.exit_code == 1
    fails = [line for line in result.output.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and "'boom' from pkg-boom==1" in fails[0] and "RuntimeError: no GPU today" in fails[0]
    summary = next(line for line in result.output.splitlines() if line.startswith("checked "))
    # the eight built-ins and the two fakes: good and nuc_in_cyto build; seven read the dataset's evaluators
    assert summary == "checked 10 rewards: 2 build, 7 import but need a dataset to build (give --data), 1 fail"
    bad = CliRunner().invoke(rewards, ["--data", "."])
    assert bad.exit_code == 2 and "--data goes with --check" in bad.output


# ---------------------------------------------------------------------------------------------- 6c

def test_posttrain_on_a_posttrain_run_says_so(toy_run, tmp_path, capsys):
    from cellfluxrl.commands.posttrain import base_notice

    _, run = toy_run
    assert base_notice(run) is None
    rl = tmp_path / "rl"
    rl.mkdir()
    (rl / "config.json").write_text(json.dumps({**read_run_config(run), "kind": "posttrain", "base_run": str(run)}))
    (rl / "checkpoint.pt").symlink_to(run / "checkpoint.pt")  # posttrain --dry-run checks the base run's checkpoint
    code, out, err = run_main(capsys, "posttrain", str(rl), "--out", str(tmp_path / "rl2"), "--dry-run")
    assert code == 0 and tomllib.loads(out)["steps"] == 1200
    assert err.splitlines() == [f"note: BASE_RUN {rl} is itself a posttrain run (from {run}): RL continues from its "
                                f"EMA weights, which are also the KL reference"]
    assert base_notice(tmp_path / "missing") is None


def test_read_run_config_needs_a_run(tmp_path):
    with pytest.raises(CellfluxError, match="does not exist"):
        read_run_config(tmp_path / "none")
