"""Progress and messages (issue 13 item 7): plain progress lines in logs, what pretrain and
evaluate say before their slow part."""

from __future__ import annotations

import io

import pytest
from click.testing import CliRunner

from cellfluxrl.progress import LineProgress, format_duration, progress
from test_pretrain import MICRO, make_toy_dataset, quick_cfg  # shared toy data (tests/ is on sys.path)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    from cellfluxrl.model.pretrain import train

    root = tmp_path_factory.mktemp("progress")
    ds = make_toy_dataset(root / "ds", n_test=3)
    train(ds.root, root / "run", quick_cfg(steps=2, sample_steps=3, sample_cfg_scale=0.5), unet=MICRO)
    return ds, root / "run"


# ---------------------------------------------------------------------------------------------- bars

def test_redirected_progress_prints_a_plain_line_every_five_percent():
    clock, log = FakeClock(), io.StringIO()
    bar = LineProgress(1000, "pretrain", "step", file=log, clock=clock, every_seconds=1e9)
    for _ in range(1000):
        clock.now += 0.1
        bar.update(1)
        bar.set_postfix(loss="0.1234", refresh=False)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 20  # 5 %, 10 %, ..., 100 %
    assert lines[0].startswith("pretrain: 50/1000 steps (5%), 0:00:05 elapsed, about 0:01:35 left")
    assert lines[-1] == "pretrain: 1000/1000 steps (100%), 0:01:40 elapsed; loss=0.1234"


def test_slow_steps_and_unknown_totals_print_by_time():
    clock, log = FakeClock(), io.StringIO()
    bar = LineProgress(None, "evaluate", "pair", file=log, clock=clock, every_seconds=60)
    for _ in range(10):
        clock.now += 30
        bar.update(4)
    lines = log.getvalue().splitlines()
    assert len(lines) == 5 and lines[0] == "evaluate: 8 pairs, 0:01:00 elapsed"
    bar.reset(total=10)  # demo's evaluate bar restarts per split
    bar.n = 10
    bar.refresh()
    bar.close()
    assert log.getvalue().splitlines()[5:] == ["evaluate: 10/10 pairs (100%), 0:00:00 elapsed"]


def test_terminal_gets_a_tqdm_bar_a_log_gets_lines_and_env_overrides(monkeypatch):
    from tqdm import tqdm

    monkeypatch.delenv("CELLFLUXRL_PROGRESS", raising=False)
    bar = progress(total=3, desc="x", file=Terminal())
    assert isinstance(bar, tqdm)
    bar.close()
    assert isinstance(progress(total=3, desc="x", file=io.StringIO()), LineProgress)
    monkeypatch.setenv("CELLFLUXRL_PROGRESS", "lines")
    assert isinstance(progress(total=3, desc="x", file=Terminal()), LineProgress)
    log = io.StringIO()
    with progress(total=3, desc="x", file=log, disable=True) as quiet:
        quiet.update(3)
    assert log.getvalue() == ""


def test_progress_iter_yields_everything_and_reports_lines(monkeypatch, capsys):
    from cellfluxrl.progress import progress_iter

    monkeypatch.setenv("CELLFLUXRL_PROGRESS", "lines")
    assert list(progress_iter(range(40), desc="batches", unit="batch")) == list(range(40))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 20 and lines[-1].startswith("batches: 40/40 batches (100%)")


def test_format_duration():
    assert [format_duration(s) for s in (4.25, 42, 600, 3 * 3600, 47 * 86400)] == [
        "4.2 s", "42 s", "10 min", "3.0 h", "47 days"]


# ---------------------------------------------------------------------------------------------- pretrain

def test_pretrain_says_what_it_trains_and_times_the_first_step_on_cpu(toy_run, tmp_path):
    from cellfluxrl.cli import cli

    ds, _ = toy_run
    conf = tmp_path / "micro.toml"
    conf.write_text("batch_size = 4\n[unet]\nmodel_channels = 32\nchannel_mult = [1, 1]\nnum_res_blocks = 1\n"
                    "attention_resolutions = []\n")
    result = CliRunner().invoke(cli, ["pretrain", str(ds.root), "--out", str(tmp_path / "run"), "--preset", "tiny",
                                      "--config", str(conf), "--train-steps", "3", "--device", "cpu", "--no-compile"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    err = result.stderr.splitlines()
    assert err[0].startswith("pretrain: ") and "M-parameter UNet (custom) on a CPU, steps 1-3 of 4 images" in err[0]
    assert "slow on a CPU" not in err[0]  # a small model gets no warning
    assert err[1].startswith("pretrain: step 1 took ") and "the 2 remaining steps need about" in err[1]
    assert "\r" not in result.stderr and any(line.startswith("pretrain: 3/3 steps (100%)") for line in err)


def test_a_paper_sized_model_on_cpu_is_called_slow():
    from cellfluxrl.commands.pretrain import first_step_line, model_line
    from cellfluxrl.model.unet import PRESETS

    cfg = quick_cfg(preset="paper", steps=100_000, batch_size=32)
    line = model_line({"parameters": 56_201_219, "device": "cpu", "start": 0}, PRESETS["paper"], cfg)
    assert "56.2M-parameter UNet (paper) on a CPU" in line and "slow on a CPU" in line
    gpu = model_line({"parameters": 56_201_219, "device": "cuda:0", "start": 0}, PRESETS["paper"], cfg)
    assert "on cuda:0" in gpu and "slow" not in gpu
    step = first_step_line({"step": 1, "images_per_s": 0.8}, cfg)  # 40 s a step
    assert step == "pretrain: step 1 took 40 s; the 99999 remaining steps need about 46 days at this speed"


# ---------------------------------------------------------------------------------------------- evaluate

def test_evaluate_says_what_it_does_before_the_heavy_work(toy_run, tmp_path, capsys, monkeypatch):
    from cellfluxrl.errors import CellfluxError
    import cellfluxrl.evaluation.pipeline
    from test_cli import run_main

    ds, run = toy_run

    def heavy(*args, **kwargs):
        raise CellfluxError("heavy work reached")

    monkeypatch.setattr(cellfluxrl.evaluation.pipeline, "evaluate", heavy)
    code, _, err = run_main(capsys, "evaluate", str(run), "--data", str(ds.root), "--out", str(tmp_path / "e"),
                            "--n", "4", "--best-of", "1,2", "--device", "cpu")
    lines = err.splitlines()
    assert code == 1 and lines[-1] == "error: heavy work reached"
    assert lines[0] == (f"evaluate: 1 run(s) on {ds.root} (cpu): 4 id test pairs, best-of 1,2; "
                        f"columns run, run+best-of-2, real")
    # 4 pairs x 2 candidates, 3 Heun steps with CFG: 2 x 3 x 2 network evaluations per image
    assert lines[1] == "  sampling, every run: 3 Heun steps (edm grid), CFG 0.5, sigma 1 (recorded in the run)"
    assert lines[2] == "  run (pretrain): 8 images, about 96 network evaluations"


def test_an_error_inside_the_bar_prints_no_final_line():
    """A stage that fails leaves only its error message: no progress line on the way out."""
    import io

    from cellfluxrl.progress import LineProgress

    out = io.StringIO()
    with pytest.raises(RuntimeError):
        with LineProgress(total=48, desc="x", file=out) as bar:
            bar.update(2)  # 4 %: below the line interval, so only close() could print it
            raise RuntimeError("boom")
    assert out.getvalue() == ""
    ok = io.StringIO()
    with LineProgress(total=48, desc="x", file=ok) as bar:
        bar.update(2)
    assert ok.getvalue().startswith("x: 2/48")
