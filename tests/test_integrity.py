"""Run integrity (issue 22): one writer per folder, nothing of the user's written over, resumes and
evaluations that cannot silently switch their reference, an interrupt that keeps the work, and error
paths that name their cause. Concurrency is tested with two real processes."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cellfluxrl.checkpoint import load_checkpoint, save_checkpoint
from cellfluxrl.errors import CellfluxError
from cellfluxrl.model.pretrain import train
from cellfluxrl.rundir import FolderBusy, hold, lock_path
from test_cli import assert_one_line_error, run_main, visible_lines
from test_posttrain import ChannelSuite, base_run, small_cfg  # noqa: F401 (base_run is a fixture)
from test_pretrain import MICRO, make_toy_dataset, quick_cfg, state_equal

ROOT = Path(__file__).resolve().parents[1]
MICRO_TOML = ("batch_size = 4\nlog_every = 1\nckpt_every = 1000\n[unet]\nmodel_channels = 32\n"
              "channel_mult = [1, 1]\nnum_res_blocks = 1\nattention_resolutions = []\n")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("integrity") / "ds")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cellfluxrl.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())


def _holder(folder: Path, then: str = "time.sleep(60)") -> subprocess.Popen:
    """A real second process that takes ``folder``'s lock, prints 'held', then runs ``then``."""
    code = (f"import sys, time; from cellfluxrl.rundir import acquire; acquire({str(folder)!r}, 'pretrain'); "
            f"print('held', flush=True); {then}")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout.readline().strip() == "held"
    return proc


def _wait_for_steps(stats: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if stats.is_file() and len(stats.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the run did not log its steps in time")


# ---------------------------------------------------------------------------------------------- 1 + 5

@pytest.mark.parametrize("sig, code, second_writer", [(signal.SIGINT, 130, True), (signal.SIGTERM, 143, False)])
def test_interrupted_pretrain_saves_refuses_a_second_writer_and_resumes_exactly(toy, tmp_path, capsys, sig, code,
                                                                                 second_writer):
    """A real pretrain process: a second one into its folder is refused naming its PID; SIGINT/SIGTERM
    mid-run finishes the step, writes a checkpoint and exits 130/143; the resumed run's final weights
    equal an uninterrupted run's, bit for bit."""
    from cellfluxrl.commands.pretrain import resolve_config

    conf = tmp_path / "micro.toml"
    conf.write_text(MICRO_TOML)
    run = tmp_path / "run"
    args = ["pretrain", str(toy.root), str(run), "--preset", "tiny", "--config", str(conf), "--device", "cpu",
            "--no-compile", "--seed", "3"]
    first = _spawn(*args, "--steps", "100000")
    try:
        _wait_for_steps(run / "stats.jsonl", 3, first)
        if second_writer:
            second = subprocess.run([sys.executable, "-m", "cellfluxrl.cli", *args, "--steps", "5"],
                                    capture_output=True, text=True, env=_env(), timeout=120)
            assert_one_line_error(second.returncode, second.stderr, str(run), f"PID {first.pid}", "in use")
        first.send_signal(sig)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == code, err
    step = load_checkpoint(run / "checkpoint.pt")["step"]
    assert 3 <= step < 100000 and f"stopped by {sig.name} at step {step} of 100000" in err and "resume" in err
    assert [json.loads(line)["step"] for line in (run / "stats.jsonl").read_text().splitlines()] == \
        list(range(1, step + 1))
    assert not lock_path(run).exists()

    rc, out, err = run_main(capsys, *args, "--steps", str(step + 2))
    assert rc in (0, None) and f"resumed from step {step}" in out, err
    cfg, unet = resolve_config(conf, preset="tiny", steps=step + 2, seed=3)
    straight = train(toy.root, tmp_path / "straight", cfg, unet=unet)
    resumed = load_checkpoint(run / "checkpoint.pt")
    assert resumed["step"] == step + 2
    assert state_equal(resumed["model"], straight.net.state_dict()) and state_equal(resumed["ema"], straight.ema.state_dict())


def test_a_live_lock_refuses_and_a_dead_ones_is_taken_over(toy, tmp_path, caplog, capsys):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        with pytest.raises(FolderBusy, match=f"PID {holder.pid}"):
            train(toy.root, run, quick_cfg(steps=1), unet=MICRO)
        code, _, err = run_main(capsys, "prepare", "synthetic", str(run), "--n-images", "100")
        assert_one_line_error(code, err, str(run), f"PID {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    assert lock_path(run).exists()  # a killed holder leaves its lock file; the kernel dropped the lock
    with caplog.at_level(logging.WARNING, logger="cellfluxrl.rundir"):
        train(toy.root, run, quick_cfg(steps=1), unet=MICRO)
    assert f"took over the lock of {run.resolve()} left by pretrain (PID {holder.pid})" in caplog.text
    assert not lock_path(run).exists() and load_checkpoint(run / "checkpoint.pt")["step"] == 1
    with hold(run, "a") as outer, hold(run, "b") as inner:  # nested holds in one process share the lock
        assert outer is inner
    assert not lock_path(run).exists()


# ---------------------------------------------------------------------------------------------- 2

def test_pretrain_refuses_folders_holding_files_it_did_not_write(toy, tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "config.json").write_text('{"lr": 0.1}\n')
    (proj / "stats.jsonl").write_text('{"mine": 1}\n')
    with pytest.raises(CellfluxError, match=r"proj holds a config.json that is not a run's"):
        train(toy.root, proj, quick_cfg(steps=1), unet=MICRO)
    assert (proj / "config.json").read_text() == '{"lr": 0.1}\n' and (proj / "stats.jsonl").read_text() == '{"mine": 1}\n'
    with pytest.raises(CellfluxError, match="is a dataset folder"):
        train(toy.root, toy.root, quick_cfg(steps=1), unet=MICRO)
    assert not (toy.root / "checkpoint.pt").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    with pytest.raises(CellfluxError, match="holds todo.txt, which pretrain did not write"):
        train(toy.root, tmp_path / "notes", quick_cfg(steps=1), unet=MICRO)


def _report(folder: Path, splits=("id", "ood")) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps({"settings": {}, "sections": {s: {} for s in splits}}))
    for split in splits:
        suffix = "" if split == "id" else f"_{split}"
        (folder / f"fig4_grid{suffix}.png").write_bytes(b"png")


def test_evaluate_out_is_checked_before_sampling_and_replaced_whole(toy, tmp_path, capsys):
    from cellfluxrl.commands import report_folder as folder

    train(toy.root, tmp_path / "run", quick_cfg(steps=1), unet=MICRO)
    base = ["evaluate", "--data", str(toy.root), str(tmp_path / "run"), "--n", "2", "--device", "cpu"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    code, _, err = run_main(capsys, *base, "--out", str(tmp_path / "mine"))
    assert_one_line_error(code, err, "--out", "thesis.tex", "evaluate did not write")
    (tmp_path / "plain").write_text("a file")
    code, _, err = run_main(capsys, *base, "--out", str(tmp_path / "plain" / "eval"))
    assert_one_line_error(code, err, "--out", "cannot write", "not a folder")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "report.json").write_text("{ not json")
    code, _, err = run_main(capsys, *base, "--out", str(tmp_path / "bad"))
    assert_one_line_error(code, err, "report.json", "not a readable report")

    old = tmp_path / "eval"
    _report(old)
    assert folder.check_report_folder(old)
    staged = folder.staged_folder(old)
    _report(staged, splits=("id",))
    folder.replace_folder(staged, old)
    assert sorted(p.name for p in old.iterdir()) == ["fig4_grid.png", "report.json"]  # no stale *_ood.png
    assert not staged.exists() and not list(tmp_path.glob(".eval.*"))


# ---------------------------------------------------------------------------------------------- 6

def test_plugin_calling_sys_exit_is_reported_and_the_check_goes_on(tmp_path, monkeypatch, capsys):
    from importlib.metadata import EntryPoint

    from cellfluxrl.rewards import registry

    (tmp_path / "quitter_plugin.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real = list(registry.iter_entry_points())
    fake = (EntryPoint("quitter", "quitter_plugin:make", registry.GROUP), "cellfluxrl-reward-quitter", "0.1")
    monkeypatch.setattr(registry, "iter_entry_points", lambda: [fake, *real])
    code, out, err = run_main(capsys, "rewards", "--check")
    assert code == 1 and "FAIL reward 'quitter'" in out and "called sys.exit(3)" in out
    assert f"checked {len(real) + 1} rewards" in out and "1 fail" in out  # went on to the others


def test_corrupt_demo_files_name_the_file(tmp_path):
    from cellfluxrl.commands.demo import DEMO_PRESETS, _settings_file, stage_evaluate

    (tmp_path / "demo.json").write_text('{"n_images": 30')
    with pytest.raises(CellfluxError, match=r"demo\.json: not readable"):
        _settings_file(tmp_path, DEMO_PRESETS["quick"])
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "report.json").write_text('{"settings": {}}')
    with pytest.raises(CellfluxError, match=r"eval/report\.json: not a cellfluxrl report"):
        stage_evaluate(tmp_path / "data", tmp_path / "base", tmp_path / "rl", tmp_path, DEMO_PRESETS["quick"], "cpu")


def test_ranges_are_checked_up_front(tmp_path, capsys):
    from cellfluxrl.config import PretrainConfig

    for args in (["pretrain", "d", "r", "--seed", "-1"], ["evaluate", "--data", "d", "r", "--out", "o", "--seed",
                                                         str(2**32)], ["prepare", "synthetic", "o", "--seed", "-5"]):
        code, _, err = run_main(capsys, *args)
        assert code == 2 and "--seed" in err and "0<=x<=4294967295" in err, err
    with pytest.raises(CellfluxError, match="seed must be an integer from 0 to 4294967295"):
        PretrainConfig(seed=-1)
    code, _, err = run_main(capsys, "prepare", "synthetic", str(tmp_path / "d"), "--size", "33")
    lines = visible_lines(err)  # a usage error: exit 2, one line
    assert code == 2 and len(lines) == 1 and all(n in lines[0] for n in ("--size 33", "multiple of 4", "32, 36")), err
    assert not (tmp_path / "d").exists()


def test_debug_after_the_subcommand_is_the_global_flag(tmp_path, capsys):
    from cellfluxrl.cli import hoist_debug

    assert hoist_debug(["rewards", "--debug"]) == ["--debug", "rewards"]
    assert hoist_debug(["sample", "--", "--debug"]) == ["sample", "--", "--debug"]
    code, out, err = run_main(capsys, "rewards", "--debug")
    assert code in (0, None) and "moa" in out and "No such option" not in err
    with pytest.raises(CellfluxError):  # --debug shows the real exception instead of one line
        run_main(capsys, "pretrain", "--debug", str(tmp_path / "no-such-dataset"), str(tmp_path / "run"), "--steps", "1")


# ---------------------------------------------------------------------------------------------- posttrain

class ConstantSuite(ChannelSuite):
    """Every reward at its floor for every sample: zero spread in every group."""

    def score(self, images, moa):
        result = super().score(images, moa)
        result.total[:] = 0.0
        return result


def test_posttrain_stop_request_checkpoints_and_resumes_exactly(base_run, tmp_path):
    cfg = small_cfg(steps=3, grid_every=0, save_every=10)
    from cellfluxrl.rl.loop import posttrain

    posttrain(base_run, tmp_path / "straight", cfg, device="cpu", suite=ChannelSuite())
    posttrain(base_run, tmp_path / "split", cfg, device="cpu", suite=ChannelSuite(), should_stop=lambda: True)
    assert load_checkpoint(tmp_path / "split" / "checkpoint.pt")["step"] == 1  # saved although save_every is 10
    posttrain(base_run, tmp_path / "split", cfg, device="cpu", suite=ChannelSuite())
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("straight", "split"))
    assert a["step"] == b["step"] == 3
    for key in ("model", "ema", "old_policy"):
        assert state_equal(a[key], b[key]), key


def test_posttrain_resume_against_a_changed_base_or_evaluator_is_refused(base_run, tmp_path):
    from cellfluxrl.provenance import weights_digest
    from cellfluxrl.rl.loop import posttrain

    import shutil

    base = tmp_path / "base"
    shutil.copytree(base_run, base)
    dataset = Path(json.loads((base / "config.json").read_text())["dataset"])
    out = tmp_path / "rl"
    cfg = small_cfg(steps=1, grid_every=0)
    posttrain(base, out, cfg, device="cpu", suite=ChannelSuite())
    state = load_checkpoint(out / "checkpoint.pt")
    base_state = load_checkpoint(base / "checkpoint.pt")
    fp = state["fingerprints"]
    assert fp["base_weights"] == weights_digest(base_state["ema"]) and fp["base_run"] == str(base.resolve())
    assert json.loads((out / "config.json").read_text())["fingerprints"] == fp

    base_state["ema"]["head_conv.weight"] += 1e-3  # re-pretrained between two sessions
    save_checkpoint(base / "checkpoint.pt", base_state)
    with pytest.raises(CellfluxError, match=r"reference changed .* base run .* other weights .*--allow-changed-reference"):
        posttrain(base, out, small_cfg(steps=2, grid_every=0), device="cpu", suite=ChannelSuite())
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 1
    posttrain(base, out, small_cfg(steps=2, grid_every=0), device="cpu", suite=ChannelSuite(),
              allow_changed_reference=True)
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 2 and state["reference_changes"][0]["step"] == 1
    assert "other weights" in state["reference_changes"][0]["changes"][0]
    assert state["fingerprints"]["base_weights"] == weights_digest(base_state["ema"])

    if fp["evaluators"] == {}:  # the toy dataset has no evaluators: one appears (a `rewards fit` later)
        (dataset / "evaluators").mkdir(exist_ok=True)
    (dataset / "evaluators" / "moa_classifier.pt").write_bytes(b"v1")
    try:
        posttrain(base, out, small_cfg(steps=3, grid_every=0), device="cpu", suite=ChannelSuite())
        (dataset / "evaluators" / "moa_classifier.pt").write_bytes(b"v2")  # refitted with another seed
        with pytest.raises(CellfluxError, match=r"evaluators/moa_classifier.pt changed"):
            posttrain(base, out, small_cfg(steps=4, grid_every=0), device="cpu", suite=ChannelSuite())
    finally:
        shutil.rmtree(dataset / "evaluators")


def test_posttrain_warns_once_and_stops_without_signal(base_run, tmp_path, caplog):
    from cellfluxrl.rl.loop import posttrain

    seen = []
    with caplog.at_level(logging.WARNING, logger="cellfluxrl.rl.loop"):
        with pytest.raises(CellfluxError, match=r"no learning signal for 3 steps in a row \(to step 3"):
            posttrain(base_run, tmp_path / "rl", small_cfg(steps=10, grid_every=0, save_every=10, no_signal_stop=3),
                      device="cpu", suite=ConstantSuite(), on_step=seen.append)
    assert [s["no_signal"] for s in seen] == [True] * 3 and all(s["zero_std_groups"] == 1.0 for s in seen)
    assert caplog.text.count("had no learning signal") == 1
    assert load_checkpoint(tmp_path / "rl" / "checkpoint.pt")["step"] == 3
    seen.clear()
    posttrain(base_run, tmp_path / "signal", small_cfg(steps=2, grid_every=0, no_signal_stop=1), device="cpu",
              suite=ChannelSuite(), on_step=seen.append)
    assert [s["no_signal"] for s in seen] == [False, False]


def test_posttrain_into_a_folder_another_process_holds(base_run, tmp_path):
    from cellfluxrl.rl.loop import posttrain

    holder = _holder(tmp_path / "rl")
    try:
        with pytest.raises(FolderBusy, match=f"in use by pretrain \\(PID {holder.pid}"):
            posttrain(base_run, tmp_path / "rl", small_cfg(steps=1), device="cpu", suite=ChannelSuite())
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "rl").exists()


def test_evaluate_refuses_a_posttrain_run_whose_base_changed(toy, tmp_path, capsys):
    """Evaluated beside its base, a post-trained run must find the base weights it started from."""
    from cellfluxrl.config import dump_json

    base = tmp_path / "base"
    train(toy.root, base, quick_cfg(steps=1), unet=MICRO)
    state = load_checkpoint(base / "checkpoint.pt")
    fingerprints = {"base_run": str(base.resolve()), "base_weights": "sha256:" + "0" * 64, "evaluators": {}}
    config = {**state["config"], "kind": "posttrain", "fingerprints": fingerprints}
    save_checkpoint(tmp_path / "rl" / "checkpoint.pt", {**state, "kind": "posttrain", "config": config,
                                                        "fingerprints": fingerprints})
    dump_json(config, tmp_path / "rl" / "config.json")
    code, _, err = run_main(capsys, "evaluate", "--data", str(toy.root), str(base), str(tmp_path / "rl"), "--n", "2",
                            "--device", "cpu", "--out", str(tmp_path / "eval"))
    assert_one_line_error(code, err, "reference changed", f"run {tmp_path / 'rl'}", "other weights",
                          "--allow-changed-reference")
    assert not (tmp_path / "eval").exists() and not list(tmp_path.glob(".eval*"))


def test_prepare_and_evaluate_interrupted_say_what_was_kept(toy, tmp_path, capsys, monkeypatch):
    """prepare/evaluate have no step to finish: an interrupt stops at once, keeps what resumes, exits 130."""
    import shutil

    import cellfluxrl.evaluation.pipeline as pipeline
    from cellfluxrl.commands.prepare import _held

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as info:
        _held(tmp_path / "new", interrupted)
    assert info.value.code == 130 and "while writing" in capsys.readouterr().err
    data = tmp_path / "data"
    shutil.copytree(toy.root, data)
    (data / "evaluators").mkdir()
    (data / "evaluators" / "reference_stats.json").write_text("{}")
    with pytest.raises(SystemExit) as info:
        _held(data, interrupted)
    err = capsys.readouterr().err
    assert info.value.code == 130 and f"the dataset {data} is kept, with reference_stats.json" in err

    train(toy.root, tmp_path / "run", quick_cfg(steps=1), unet=MICRO)
    out = tmp_path / "eval"
    _report(out)
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(pipeline, "evaluate", lambda *a, **k: interrupted())
    code, _, err = run_main(capsys, "evaluate", "--data", str(toy.root), str(tmp_path / "run"), "--n", "2",
                            "--device", "cpu", "--out", str(out))
    assert code == 130 and "evaluate stopped by SIGINT" in err and "is as it was" in err
    assert sorted(p.name for p in out.iterdir()) == before and not list(tmp_path.glob(".eval*"))
