"""Checkpoint selection on validation pairs (cellfluxrl.rl.selection; issue 31 item 1): the rule and its
s.e., the loop keeping the selected EMA across a resume, load_run/sample choosing it by default,
info and the plot showing the curve, and the run folder recognising the plot.

The base run and the fake rewards are test_posttrain's (a 16x16 dataset, here with a validation
split, and a small UNet), so these tests finish in seconds on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cellfluxrl.checkpoint import load_checkpoint, load_run, save_checkpoint
from cellfluxrl.cli import cli
from cellfluxrl.config import dump_json
from cellfluxrl.data.layout import DatasetWriter
from cellfluxrl.errors import CellfluxError
from cellfluxrl.model.unet import build_unet
from cellfluxrl.rl import selection
from cellfluxrl.rl.config import PosttrainConfig
from cellfluxrl.rl.loop import posttrain
from cellfluxrl.rl.selection import PAPER_WEIGHTS, clustered_se, decide

from test_posttrain import COMPOUNDS, COND_DIM, SIZE, UNET, ChannelSuite, small_cfg


def _make_dataset(root: Path, with_val: bool = True) -> Path:
    """Two plates of train and test rows; the writer deals validation rows out of train (``with_val``:
    4 controls and 40 treated train rows per plate give both compounds val-select pairs; without,
    one control per plate leaves train whole: a dataset with no validation pairs)."""
    rng = np.random.default_rng(1)
    with DatasetWriter(root, SIZE, ("actin", "tubulin", "dna"), "synthetic") as writer:
        for split in ("train", "test"):
            for plate in ("P1", "P2"):
                n, controls = (44, 4) if split == "train" and with_val else (6, 1 if split == "train" else 2)
                rows, images = [], []
                for k in range(n):
                    state = "control" if k < controls else "treated"
                    compound, moa = ("DMSO", "DMSO") if state == "control" else COMPOUNDS[k % 2]
                    rows.append({"id": f"{split}-{plate}-{k}", "split": split, "batch": plate, "compound": compound,
                                 "dose": 0.0 if state == "control" else 1.0, "moa": moa, "state": state,
                                 "source": "test"})
                    images.append(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
                writer.add(np.stack(images), rows)
        conditions = [{"compound": c, "moa": m, "smiles": "", "ood": False, "embedding": "user"} for c, m in COMPOUNDS]
        writer.finish(conditions, rng.normal(size=(2, COND_DIM)).astype(np.float32))
    return root


def _base(root: Path, with_val: bool = True) -> Path:
    dataset = _make_dataset(root / "data", with_val)
    torch.manual_seed(0)
    net = build_unet(UNET, COND_DIM)
    torch.nn.init.normal_(net.head_conv.weight, std=0.02)
    config = {"kind": "pretrain", "dataset": str(dataset.resolve()), "preset": "custom", "unet": UNET.to_dict(),
              "condition_dim": COND_DIM}
    run = root / "base"
    run.mkdir()
    dump_json(config, run / "config.json")
    save_checkpoint(run / "checkpoint.pt", {"kind": "pretrain", "step": 20, "config": config,
                                            "model": net.state_dict(), "ema": net.state_dict()})
    return run


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    return _base(tmp_path_factory.mktemp("selection"))


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ the rule

def test_clustered_se_is_the_cr1_formula_by_hand():
    values, clusters = np.array([1.0, 3.0, 2.0, 6.0]), np.array(["a", "a", "b", "b"])
    # mean 3; centred -2, 0, -1, 3; cluster sums -2 and 2; sqrt(2/1 * (4 + 4)) / 4 = 1.
    assert clustered_se(values, clusters) == pytest.approx(1.0)
    assert clustered_se(values, np.array(["a"] * 4)) == pytest.approx(np.std(values, ddof=1) / 2)  # one cluster
    assert clustered_se(np.array([5.0]), np.array(["a"])) == 0.0


def test_a_checkpoint_replaces_the_selected_one_only_beyond_its_margin_of_standard_errors():
    clusters = np.array(["a", "a", "b", "b"])
    best = np.zeros(4)
    assert decide(best, None, clusters, 1.0) == selection.Decision(True)  # the first validation is selected
    noisy = np.array([1.2, 1.2, -0.8, -0.8])  # gain 0.2, clustered s.e. sqrt(2 * 8) / 4 = 1.0
    verdict = decide(noisy, best, clusters, 1.0)
    assert (verdict.replace, verdict.gain, verdict.gain_se) == (False, pytest.approx(0.2), pytest.approx(1.0))
    assert decide(noisy, best, clusters, 0.1).replace is True  # 0.2 > 0.1 x 1.0
    assert decide(noisy + 0.81, best, clusters, 1.0).replace is True  # 1.01 > 1.0
    assert decide(best + 0.01, best, clusters, 1.0).replace is True  # a sure gain (s.e. 0) however small
    assert decide(best, best, clusters, 0.0).replace is False  # no gain never replaces


def test_the_settings_are_checked():
    for bad in (dict(validate_draws=0), dict(validate_pairs=0), dict(validate_every=-1), dict(select_margin=-0.5),
                dict(select_margin=float("inf"))):
        with pytest.raises(CellfluxError, match="validate_|select_"):
            PosttrainConfig(**bad)
    assert PosttrainConfig().validate_every > 0  # on by default


# ------------------------------------------------------------------------------------------ the loop

def _scripted(monkeypatch, gains):
    """Replace the scoring with per-pair scores ``base + gains[call]`` (a list per call, or a float)."""
    calls = []

    def score(net, dataset, pairs, scorer, sampling, k, seed, device, batch_size=64):
        n = len(pairs)
        gain = gains[len(calls)]
        calls.append(n)
        scores = np.linspace(0.0, 1.0, n) + (np.asarray(gain(pairs)) if callable(gain) else gain)
        return scores, {name: float(scores.mean()) / 12 for name in PAPER_WEIGHTS}

    monkeypatch.setattr(selection, "score_policy", score)
    return calls


def _noise(pairs):
    """A gain of 0.05 on average, +-1 by compound: well inside its clustered s.e."""
    sign = np.where(pairs.clusters == pairs.clusters[0], 1.0, -1.0)
    return 1.0 + 0.05 + sign - sign.mean()


def test_the_loop_keeps_the_selected_ema_and_resume_continues_the_comparison(base_run, tmp_path, monkeypatch):
    """Step 1 is selected; step 2 is 1.0 better on every pair (replaces it); step 3 is better than
    step 2 by less than one s.e. (kept out). The selected EMA is step 2's, and a run killed after
    step 2 and resumed ends with the same checkpoint, selection included."""
    gains = [0.0, 1.0, _noise]
    cfg = small_cfg(steps=3, grid_every=0, validate_every=1, validate_pairs=8)
    calls = _scripted(monkeypatch, gains)
    full = posttrain(base_run, tmp_path / "full", cfg, device="cpu", suite=ChannelSuite(), select_suite=ChannelSuite())
    assert len(calls) == 3 and calls[0] >= 4  # every step validated, on the val-select pairs there are
    records = _records(full)
    assert [r["val_best_step"] for r in records] == [1, 2, 2]
    assert [r["val_selected"] for r in records] == [True, True, False]
    assert "val_gain" not in records[0] and records[1]["val_gain"] == pytest.approx(1.0)
    assert 0 < records[2]["val_gain"] < records[2]["val_gain_se"]  # a gain within the noise is not taken
    state = load_checkpoint(full / "checkpoint.pt")
    assert state["selection"]["best_step"] == 2 and state["selection"]["status"] == "on"

    _scripted(monkeypatch, gains)
    split = tmp_path / "split"
    posttrain(base_run, split, small_cfg(steps=2, grid_every=0, validate_every=1, validate_pairs=8), device="cpu",
              suite=ChannelSuite(), select_suite=ChannelSuite())
    at_two = load_checkpoint(split / "checkpoint.pt")
    for name, tensor in state["best_ema"].items():  # the selected weights are the EMA of step 2
        assert torch.equal(tensor, at_two["ema"][name]), name
    _scripted(monkeypatch, gains[2:])  # the resumed run validates step 3 only
    posttrain(base_run, split, cfg, device="cpu", suite=ChannelSuite(), select_suite=ChannelSuite())
    resumed = load_checkpoint(split / "checkpoint.pt")
    assert resumed["selection"] == state["selection"]
    for key in ("best_ema", "ema", "model"):
        for name, tensor in state[key].items():
            assert torch.equal(tensor, resumed[key][name]), (key, name)

    best, last = load_run(full), load_run(full, checkpoint="last")
    assert (best.checkpoint, best.step, best.last_step, last.checkpoint, last.step) == ("best", 2, 3, "last", 3)
    for name, tensor in best.net.state_dict().items():
        assert torch.equal(tensor, state["best_ema"][name]) and torch.equal(last.net.state_dict()[name], state["ema"][name])
    with pytest.raises(CellfluxError, match=r"selected checkpoint \(step 2\) keeps only its EMA weights"):
        load_run(full, weights="model")
    assert load_run(full, weights="model", checkpoint="last").step == 3


def test_validation_scores_the_paper_weighted_overall_on_fixed_noise(base_run, tmp_path):
    """With the real scoring: every fake reward is the actin mean, so the paper's overall is 12 x it,
    and the same policy scores the same at every validation (common random numbers)."""
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.rl.loop import rollout_sampling

    run = posttrain(base_run, tmp_path / "rl", small_cfg(steps=1, grid_every=0, validate_pairs=3, validate_draws=2),
                    device="cpu", suite=ChannelSuite(), select_suite=ChannelSuite())
    [record] = _records(run)
    assert record["val_overall"] == pytest.approx(sum(PAPER_WEIGHTS.values()) * record["val/moa"])
    assert record["val_selected"] is True and record["val_best_step"] == 1  # the last step is always validated
    dataset = load_dataset(load_run(run).dataset_dir)
    cfg = PosttrainConfig(**json.loads((run / "config.json").read_text())["posttrain"])
    pairs = selection.validation_set(dataset, 3, cfg.seed)
    assert len(pairs) == 3 and set(dataset.table["split"][pairs.target_idx]) == {"val"}
    assert dataset.val_subsets["val-select"][pairs.target_idx].all()
    args = (load_run(run).net, dataset, pairs, ChannelSuite(), rollout_sampling(cfg), 2, cfg.seed, torch.device("cpu"))
    first, again = selection.score_policy(*args), selection.score_policy(*args)
    assert np.array_equal(first[0], again[0]) and first[0].shape == (3,)
    assert first[0].mean() == pytest.approx(record["val_overall"])


def test_the_step_where_max_minutes_ends_the_run_is_validated(base_run, tmp_path):
    run = posttrain(base_run, tmp_path / "rl", small_cfg(steps=5, grid_every=0, validate_every=5, max_minutes=1e-9),
                    device="cpu", suite=ChannelSuite(), select_suite=ChannelSuite())
    assert [(r["step"], r.get("val_best_step")) for r in _records(run)] == [(1, 1)]
    assert load_run(run).checkpoint == "best" and load_run(run).step == 1


def test_a_dataset_without_val_validate_pairs_turns_selection_off_and_says_so(tmp_path, caplog):
    base = _base(tmp_path, with_val=False)
    run = posttrain(base, tmp_path / "rl", small_cfg(steps=1, grid_every=0), device="cpu", suite=ChannelSuite(), select_suite=ChannelSuite())
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["selection"]["status"] == "off" and "no val-select pairs" in state["selection"]["reason"]
    assert "best_ema" not in state and "val_overall" not in _records(run)[0]
    assert "checkpoint selection is off: no val-select pairs" in caplog.text

    loaded = load_run(run)
    from cellfluxrl.commands.selection_view import checkpoint_line

    assert (loaded.checkpoint, loaded.step) == ("last", 1)
    assert checkpoint_line(loaded).startswith("the last checkpoint (step 1; checkpoint selection off: no val-select")
    assert checkpoint_line(load_run(base)) == "the last checkpoint (step 20; a pretrain run selects none)"


def test_without_a_reward_suite_to_score_with_selection_is_off(base_run, tmp_path):
    """The hand-built dataset has no evaluators: the default scorer cannot be built (say so, train on)."""
    run = posttrain(base_run, tmp_path / "rl", small_cfg(steps=1, grid_every=0), device="cpu", suite=ChannelSuite())
    assert load_checkpoint(run / "checkpoint.pt")["selection"]["reason"].startswith("off: no reward suite to score")


# ------------------------------------------------------------------------------------------ what users see

@pytest.fixture(scope="module")
def selected_run(base_run, tmp_path_factory) -> Path:
    """A 3-step run that validated every step and selected step 2 (scripted scores)."""
    mp = pytest.MonkeyPatch()
    try:
        _scripted(mp, [0.0, 1.0, _noise])
        return posttrain(base_run, tmp_path_factory.mktemp("selected") / "rl",
                         small_cfg(steps=3, grid_every=0, validate_every=1, validate_pairs=8), device="cpu",
                         suite=ChannelSuite(), select_suite=ChannelSuite())
    finally:
        mp.undo()


def test_sample_uses_the_selected_checkpoint_and_says_which(selected_run, tmp_path):
    out = tmp_path / "s.npz"
    result = CliRunner().invoke(cli, ["sample", str(selected_run), "--n", "2", "--steps", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "sampling the selected checkpoint (step 2 of 3: validation overall " in result.output
    assert np.load(out)["meta_checkpoint"].item() == "best" and np.load(out)["meta_step"].item() == 2
    last = CliRunner().invoke(cli, ["sample", str(selected_run), "--n", "2", "--steps", "2", "--checkpoint", "last",
                                    "--out", str(tmp_path / "l.npz")])
    assert last.exit_code == 0, last.output
    assert "sampling the last checkpoint (step 3; asked for; the selected one is step 2)" in last.output
    raw = CliRunner().invoke(cli, ["sample", str(selected_run), "--n", "2", "--steps", "2", "--network", "model",
                                   "--out", str(tmp_path / "m.npz")])
    assert raw.exit_code == 0 and "sampling the last checkpoint (step 3;" in raw.output  # raw weights: the last


def test_the_plot_and_info_show_the_curve_and_the_selected_step(selected_run, tmp_path):
    from cellfluxrl.commands.posttrain import selection_report
    from cellfluxrl.commands.selection_view import validation_plot
    from cellfluxrl.rundir import check_run_folder
    from cellfluxrl.rundir.owned import validation_plot_problem

    figure = validation_plot(_records(selected_run), 2)
    [axes] = figure.axes
    assert [round(x) for x in axes.lines[-1].get_xdata()] == [2, 2]  # the selected step's marker
    assert {t.get_text() for t in axes.get_legend().get_texts()} >= {"selected: step 2"}
    selection_report(selected_run)
    plot = selected_run / "validation.png"
    assert plot.stat().st_size > 1000 and validation_plot_problem(plot) is None
    assert check_run_folder(selected_run, "posttrain", ("checkpoint.pt", "config.json", "stats.jsonl", "validation.png"))
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    assert validation_plot_problem(mine) == "not a cellfluxrl validation plot"

    result = CliRunner().invoke(cli, ["info", str(selected_run)])
    assert result.exit_code == 0, result.output
    assert "  checkpoint selection: every 1 iteration on " in result.output
    assert "  selected: step 2 (validation overall " in result.output
    rows = [line for line in result.output.splitlines() if line.startswith("    ") and line.strip()[0].isdigit()]
    assert [int(line.split()[0]) for line in rows] == [1, 2, 3] and rows[1].endswith("<- selected")
    as_json = json.loads(CliRunner().invoke(cli, ["info", str(selected_run), "--json"]).output)
    assert as_json["selection"]["best_step"] == 2 and len(as_json["selection"]["curve"]) == 3
    assert "best_scores" not in as_json["selection"]
    assert CliRunner().invoke(cli, ["info", str(plot)]).exit_code == 0


def test_a_users_validation_png_in_the_run_folder_is_refused(base_run, tmp_path):
    out = tmp_path / "rl"
    out.mkdir()
    (out / "validation.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(CellfluxError, match="holds validation.png, which posttrain did not write"):
        posttrain(base_run, out, small_cfg(steps=1, grid_every=0), device="cpu", suite=ChannelSuite(), select_suite=ChannelSuite())
