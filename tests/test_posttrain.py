"""The post-training loop (cellfluxrl.rl) and command on a tiny hand-built base run.

The base run is built here (a 32x32 dataset of 2 plates and a small UNet saved in the checkpoint
format) and the rewards are a fake suite with a known answer, so these tests depend only on the
loop's contracts and finish in seconds on 2 cores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cellfluxrl.checkpoint import load_checkpoint, load_run, save_checkpoint
from cellfluxrl.cli import cli
from cellfluxrl.config import dump_json, tomllib
from cellfluxrl.data.layout import DatasetWriter
from cellfluxrl.errors import CellfluxError
from cellfluxrl.model.unet import UNetConfig, build_unet
from cellfluxrl.rewards.weights import DEFAULT_WEIGHTS
from cellfluxrl.rl.config import STANDARDISED_WEIGHTS, PosttrainConfig
from cellfluxrl.rl.loop import posttrain
from cellfluxrl.rl.rollouts import Rollouts, forward_draws, train_times
from cellfluxrl.rl.step import Policies, nft_backward

SIZE, COND_DIM = 16, 16
COMPOUNDS = (("taxol", "Microtubule stabilizers"), ("AZ138", "Eg5 inhibitors"))
UNET = UNetConfig(model_channels=32, channel_mult=(1, 1), num_res_blocks=1, attention_resolutions=(),
                  dropout=0.1, mid_attention=False)


def _make_dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    with DatasetWriter(root, SIZE, ("actin", "tubulin", "dna"), "synthetic") as writer:
        for split in ("train", "test"):
            for plate in ("P1", "P2"):
                rows, images = [], []
                for k in range(6):
                    state = "control" if k < 2 else "treated"
                    compound, moa = ("DMSO", "DMSO") if state == "control" else COMPOUNDS[k % 2]
                    rows.append({"id": f"{split}-{plate}-{k}", "split": split, "batch": plate, "compound": compound,
                                 "dose": 0.0 if state == "control" else 1.0, "moa": moa, "state": state,
                                 "source": "test"})
                    images.append(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
                writer.add(np.stack(images), rows)
        conditions = [{"compound": c, "moa": m, "smiles": "", "ood": False, "embedding": "user"} for c, m in COMPOUNDS]
        writer.finish(conditions, rng.normal(size=(2, COND_DIM)).astype(np.float32))
    return root


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("posttrain")
    dataset = _make_dataset(root / "data")
    torch.manual_seed(0)
    net = build_unet(UNET, COND_DIM)
    torch.nn.init.normal_(net.head_conv.weight, std=0.02)  # a non-zero velocity field
    config = {"kind": "pretrain", "dataset": str(dataset.resolve()), "preset": "custom", "unet": UNET.to_dict(),
              "condition_dim": COND_DIM}
    run = root / "base"
    run.mkdir()
    dump_json(config, run / "config.json")
    save_checkpoint(run / "checkpoint.pt", {"kind": "pretrain", "step": 20, "config": config,
                                            "model": net.state_dict(), "ema": net.state_dict()})
    return run


@dataclass
class FakeResult:
    total: np.ndarray
    components: dict


class ChannelSuite:
    """Fake rewards with a known optimum: every component is the mean of channel 0 (actin)."""

    def __init__(self, weights=DEFAULT_WEIGHTS, nan: bool = False):
        self.weights, self.nan, self.calls = dict(weights), nan, 0

    def score(self, images: torch.Tensor, moa: list[str]) -> FakeResult:
        assert images.ndim == 4 and images.device.type == "cpu" and len(moa) == images.shape[0]
        self.calls += 1
        value = images[:, 0].clamp(-1, 1).mean(dim=(1, 2)).double().numpy()
        if self.nan:
            value = np.full_like(value, np.nan)
        comps = {name: value for name in self.weights}
        return FakeResult(sum(w * comps[k] for k, w in self.weights.items()), comps)


def small_cfg(**overrides) -> PosttrainConfig:
    base = dict(steps=2, group_size=4, groups_per_step=2, rollout_steps=3, rollout_batch=4, train_timesteps=2,
                train_batch=8, save_every=1, grid_every=2, grid_pairs=2, lr=1e-4)
    return PosttrainConfig(**{**base, **overrides})


def test_posttrain_writes_a_loadable_run(base_run, tmp_path):
    out = tmp_path / "rl"
    suite = ChannelSuite()
    seen = []
    posttrain(base_run, out, small_cfg(), device="cpu", suite=suite, on_step=seen.append)
    assert [s["step"] for s in seen] == [1, 2] and suite.calls == 4  # 2 steps x 2 chunks of 4 rollouts

    config = json.loads((out / "config.json").read_text())
    base_config = json.loads((base_run / "config.json").read_text())
    assert config["kind"] == "posttrain" and config["unet"] == base_config["unet"]
    assert config["dataset"] == base_config["dataset"] and config["condition_dim"] == COND_DIM
    assert config["posttrain"]["group_size"] == 4 and config["reward_weights"] == STANDARDISED_WEIGHTS

    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["kind"] == "posttrain" and state["step"] == 2
    assert {"model", "ema", "old_policy", "optimizer", "reference_run", "reward_weights"} <= set(state)
    assert Path(state["reference_run"]) == base_run.resolve()
    run = load_run(out)
    assert run.kind == "posttrain" and run.step == 2 and run.dataset_dir == Path(base_config["dataset"])
    ref = load_run(base_run)
    changed = [k for k, v in run.net.state_dict().items() if not torch.equal(v, ref.net.state_dict()[k])]
    assert changed, "the evaluation EMA moved away from the base weights"

    lines = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    for key in ("reward", "reward/moa", "reward/cyto_count", "adv_abs_mean", "kl", "loss", "policy_loss",
                "images_per_s", "t_rollout", "t_reward_wait", "t_train", "reward_wait_share", "eta"):
        assert np.isfinite(lines[-1][key]), key
    assert lines[0]["images"] == 8 and lines[0]["eta"] == pytest.approx(0.001)
    assert lines[0]["kl"] == 0.0  # theta = ref during the first step
    assert lines[1]["kl"] > 0.0
    assert (out / "samples" / "step_000002.png").stat().st_size > 1000


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(base_run, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    posttrain(base_run, full, small_cfg(steps=3, grid_every=0), device="cpu", suite=ChannelSuite())
    posttrain(base_run, split, small_cfg(steps=1, grid_every=0), device="cpu", suite=ChannelSuite())
    with open(split / "stats.jsonl", "a") as f:  # a step logged after the last save, then killed
        f.write(json.dumps({"step": 2, "reward": 0.0}) + "\n")
    posttrain(base_run, split, small_cfg(steps=3, grid_every=0, lr=1.0), device="cpu", suite=ChannelSuite())
    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(split / "checkpoint.pt")
    assert b["step"] == 3 and b["posttrain"]["lr"] == 1e-4  # stored settings win, except steps
    for key in ("model", "ema", "old_policy"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    stats = [json.loads(line) for line in (split / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [1, 2, 3]
    full_stats = [json.loads(line) for line in (full / "stats.jsonl").read_text().splitlines()]
    assert [s["reward"] for s in stats] == [s["reward"] for s in full_stats]


def test_rl_raises_a_known_reward_over_the_base(base_run, tmp_path):
    """The fake reward (actin brightness) must rise clearly on held-out pairs and seeds with the
    default forward-process source ("fresh" noise on the control)."""
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.images import to_model
    from cellfluxrl.model.generate import generate, test_pairs

    out = tmp_path / "rl"
    cfg = small_cfg(steps=12, groups_per_step=4, lr=3e-3, kl_weight=0.0, grid_every=0, save_every=12)
    posttrain(base_run, out, cfg, device="cpu", suite=ChannelSuite({"moa": 1.0}))
    rl, base = load_run(out), load_run(base_run)
    dataset = load_dataset(rl.dataset_dir)
    target, control = test_pairs(dataset, 8, seed=1)
    x_0 = to_model(dataset.images[control], dequantize=False)
    cond = torch.as_tensor(dataset.embeddings[dataset.condition[target]])
    scores = []
    for net in (base.net, rl.net):
        x_1, _ = generate(net, x_0, cond, generator=torch.Generator().manual_seed(5), num_steps=3, cfg_scale=0.0)
        scores.append(x_1[:, 0].clamp(-1, 1).mean(dim=(1, 2)))
    gain = scores[1] - scores[0]
    assert gain.mean() > 0.2 and (gain > 0).all(), gain


@pytest.mark.parametrize("train_source", ["fresh", "rollout"])
def test_train_source_picks_the_forward_process_start(train_source, monkeypatch):
    """What ``train_source`` does: "rollout" trains every item on the exact noisy source its rollout
    started from; "fresh" on the rollout's clean control plus new sigma noise (never the rollout's
    own source). Whether either raises a reward is the demo's and the benchmarks' question, not a
    unit test's (docs/posttrain.md)."""
    import cellfluxrl.rl.step as step

    g, m, shape = torch.Generator().manual_seed(0), 4, (2, 4, 4)
    x_ctrl = torch.rand((2, *shape), generator=g).repeat_interleave(m, dim=0)
    x_0 = x_ctrl + torch.randn(x_ctrl.shape, generator=g)  # the rollouts' own noisy sources
    ro = Rollouts(x_0, x_ctrl, torch.randn(x_ctrl.shape, generator=g), torch.zeros(2 * m, 1), ["m"] * (2 * m), [])
    seen = []
    interpolate = step.interpolate
    monkeypatch.setattr(step, "interpolate", lambda a, b, t: seen.append(a.detach().clone()) or interpolate(a, b, t))
    theta = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    nets = [_ConstantField(theta) for _ in range(3)]
    policies = Policies(theta=nets[0], train=nets[0], old=nets[1], ref=nets[2], ema=nets[1])
    cfg = PosttrainConfig(group_size=m, rollout_steps=4, train_timesteps=2, train_batch=5, train_source=train_source)
    nft_backward(policies, ro, torch.full((2 * m,), 0.7), cfg, np.random.default_rng(0), torch.device("cpu"))
    used = torch.cat(seen)
    assert used.shape[0] == 2 * m * cfg.train_timesteps
    own = [(row == x_0).flatten(1).all(1).any().item() for row in used]  # is it one of the rollout sources?
    assert all(own) if train_source == "rollout" else not any(own)
    if train_source == "fresh":  # a control plus noise: never a bare control either
        assert not any((row == x_ctrl).flatten(1).all(1).any().item() for row in used)


def test_kl_weight_holds_the_policy_near_the_base(base_run, tmp_path):
    """The KL term is the guard against drifting: a large kl_weight keeps ||v_theta - v_ref||^2 small."""
    kls = []
    for kl_weight in (0.0, 50.0):
        out = tmp_path / f"kl{kl_weight}"
        cfg = small_cfg(steps=6, lr=3e-3, kl_weight=kl_weight, grid_every=0, save_every=6)
        posttrain(base_run, out, cfg, device="cpu", suite=ChannelSuite({"moa": 1.0}))
        kls.append(json.loads((out / "stats.jsonl").read_text().splitlines()[-1])["kl"])
    assert kls[1] < 0.5 * kls[0], kls


def test_nan_loss_is_a_one_line_error_and_keeps_the_checkpoint(base_run, tmp_path):
    out = tmp_path / "rl"
    posttrain(base_run, out, small_cfg(steps=1, grid_every=0), device="cpu", suite=ChannelSuite())
    with pytest.raises(CellfluxError, match="non-finite loss .* step 2"):
        posttrain(base_run, out, small_cfg(steps=2, grid_every=0), device="cpu", suite=ChannelSuite(nan=True))
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 1


def test_out_run_must_not_be_another_run(base_run, tmp_path):
    with pytest.raises(CellfluxError, match="holds a pretrain run"):
        posttrain(base_run, base_run, small_cfg(), device="cpu", suite=ChannelSuite())
    other = tmp_path / "other"
    posttrain(base_run, other, small_cfg(steps=1, grid_every=0), device="cpu", suite=ChannelSuite())
    with pytest.raises(CellfluxError, match="post-trained from"):
        posttrain(other, other, small_cfg(steps=1, grid_every=0), device="cpu", suite=ChannelSuite())


def test_config_validation_and_train_times():
    with pytest.raises(CellfluxError, match="group_size"):
        PosttrainConfig(group_size=1)
    with pytest.raises(CellfluxError, match="train_timesteps 12 > the 10 times of the 10-step edm grid"):
        PosttrainConfig(train_timesteps=12)
    assert PosttrainConfig().n_train_timesteps == 9 and PosttrainConfig(rollout_steps=4).n_train_timesteps == 3
    from cellfluxrl.model.sampler import time_grid

    grid = time_grid(5, "edm").numpy()[:-1]
    t = train_times(PosttrainConfig(rollout_steps=5, train_timesteps=5), 3, np.random.default_rng(0))
    assert t.shape == (3, 5) and all(sorted(row) == sorted(grid) for row in t)  # each row: the grid's step times
    u = train_times(PosttrainConfig(t_sampling="uniform", train_timesteps=4), 100, np.random.default_rng(0))
    assert u.shape == (100, 4) and 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.05


def test_forward_draws_share_noise_and_times_within_a_group():
    n, m, T = 12, 4, 3
    for mode, n_keys in (("group", n // m), ("independent", n)):
        cfg = PosttrainConfig(group_size=m, rollout_steps=5, train_timesteps=T, forward_noise=mode)
        sample, draw, t, n_draws = forward_draws(cfg, n, np.random.default_rng(0))
        assert n_draws == n_keys * T and sorted(sample) == sorted(np.repeat(np.arange(n), T))
        for i in range(n):  # each rollout: T items with T distinct draws (distinct grid times)
            assert len(set(draw[sample == i])) == T and len(set(t[sample == i])) == T
        for d in np.unique(draw):  # one draw: one time, and only the rollouts of one key
            assert len(set(t[draw == d])) == 1
            owners = sample[draw == d]
            assert len(set(owners // m if mode == "group" else owners)) == 1
            assert owners.size == (m if mode == "group" else 1)


class _ConstantField(torch.nn.Module):
    """``v(x_t, t, c) = theta``: the iteration gradient is then a closed form of the draws."""

    def __init__(self, theta: torch.Tensor):
        super().__init__()
        self.theta = torch.nn.Parameter(theta.clone())

    def forward(self, x_t, t, cond):
        return self.theta.expand_as(x_t)


def test_group_forward_noise_cancels_the_source_noise_from_the_gradient():
    """With group-shared draws the centred advantages cancel sum_i A_i x_0: the gradient no longer
    depends on the forward noise; with independent draws it does (that noise is what sharing removes)."""
    g, n_groups, shape = torch.Generator().manual_seed(0), 3, (2, 4, 4)
    m = 4
    x_ctrl = torch.rand((n_groups, *shape), generator=g).repeat_interleave(m, dim=0)
    x_1 = torch.randn((n_groups * m, *shape), generator=g)
    reward = torch.randn(n_groups, m, generator=g, dtype=torch.float64)
    A = (reward - reward.mean(dim=1, keepdim=True)).reshape(-1) / reward.std()
    r = (0.5 + A.clamp(-5, 5) / 10).float()
    ro = Rollouts(x_ctrl, x_ctrl, x_1, torch.zeros(n_groups * m, 1), ["m"] * (n_groups * m), [])

    def gradient(mode: str, seed: int) -> torch.Tensor:
        theta = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        nets = [_ConstantField(theta) for _ in range(3)]
        policies = Policies(theta=nets[0], train=nets[0], old=nets[1], ref=nets[2], ema=nets[1])
        cfg = PosttrainConfig(group_size=m, rollout_steps=4, train_timesteps=2, train_batch=5, forward_noise=mode)
        nft_backward(policies, ro, r, cfg, np.random.default_rng(seed), torch.device("cpu"))
        return nets[0].theta.grad.clone()

    shared = [gradient("group", seed) for seed in range(3)]
    independent = [gradient("independent", seed) for seed in range(3)]
    assert shared[0].abs().max() > 1e-3
    for other in shared[1:]:
        torch.testing.assert_close(other, shared[0], rtol=1e-5, atol=1e-6)
    assert (independent[1] - independent[0]).abs().max() > 1e-2


class _TwoBranchField(torch.nn.Module):
    """``v(x_t, t, c) = a`` with a condition, ``b`` without: the guided velocity is ``(1 + w) a - w b``."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())

    def forward(self, x_t, t, cond):
        return (self.a if cond is not None else self.b).expand_as(x_t)


@pytest.mark.parametrize("w", [0.0, 0.2, 1.5])
def test_rl_trains_the_guided_velocity_it_rolls_out_with(w):
    """Every velocity of the loss is the CFG-guided one at the run's scale w: the gradient reaches the
    unconditional branch exactly as -w / (1 + w) times the conditional one (0 without guidance)."""
    g, m, shape = torch.Generator().manual_seed(0), 4, (2, 4, 4)
    x_ctrl = torch.rand((2, *shape), generator=g).repeat_interleave(m, dim=0)
    x_1 = torch.randn((2 * m, *shape), generator=g)
    r = (0.5 + torch.randn(2 * m, generator=g).clamp(-5, 5) / 10).float()
    ro = Rollouts(x_ctrl, x_ctrl, x_1, torch.zeros(2 * m, 1), ["m"] * (2 * m), [])
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    nets = [_TwoBranchField(a, b) for _ in range(3)]
    with torch.no_grad():
        nets[0].a.add_(0.1)  # theta off the old policy and the reference: non-zero gradient
    policies = Policies(theta=nets[0], train=nets[0], old=nets[1], ref=nets[2], ema=nets[1])
    cfg = PosttrainConfig(group_size=m, rollout_steps=4, train_timesteps=2, train_batch=5, cfg_scale=w)
    nft_backward(policies, ro, r, cfg, np.random.default_rng(0), torch.device("cpu"))
    grad_a, grad_b = nets[0].a.grad, nets[0].b.grad
    assert grad_a.abs().max() > 1e-4
    if w == 0.0:
        assert grad_b is None or float(grad_b.abs().max()) == 0.0
    else:
        torch.testing.assert_close(grad_b, -w / (1 + w) * grad_a, rtol=1e-4, atol=1e-7)


def test_rl_run_records_its_sampling_and_evaluate_uses_it(base_run, tmp_path):
    """A posttrain run records the rollout sampler and the guidance it trained (the base's CFG by
    default); evaluate and sample take them unless told otherwise."""
    from cellfluxrl.checkpoint import LEGACY_SAMPLING, Sampling
    from cellfluxrl.evaluation.pipeline import _load_runs

    out = tmp_path / "rl"
    posttrain(base_run, out, small_cfg(steps=1, rollout_steps=3), device="cpu", suite=ChannelSuite())
    run = load_run(out)
    # The hand-built base predates recorded settings: its CFG is CellFlux's 0.2, which RL inherits.
    assert load_run(base_run).recorded is None and load_run(base_run).sampling == LEGACY_SAMPLING
    assert run.recorded == Sampling(steps=3, cfg_scale=LEGACY_SAMPLING.cfg_scale, solver="heun", grid="edm", sigma=1.0)
    assert json.loads((out / "config.json").read_text())["posttrain"]["cfg_scale"] == LEGACY_SAMPLING.cfg_scale
    [loaded] = _load_runs([out], ["rl"], "cpu", None, None, None)
    assert loaded["sampling"] == run.recorded and loaded["info"]["sampling_source"] == "recorded in the run"
    [forced] = _load_runs([out], ["rl"], "cpu", 7, 0.0, None)
    assert (forced["sampling"].steps, forced["sampling"].cfg_scale) == (7, 0.0)
    explicit = tmp_path / "rl0"
    posttrain(base_run, explicit, small_cfg(steps=1, rollout_steps=2, cfg_scale=0.0), device="cpu", suite=ChannelSuite())
    assert load_run(explicit).sampling.cfg_scale == 0.0 and load_run(explicit).sampling.steps == 2


def test_cli_dry_run_resolves_options_and_toml(base_run, tmp_path):
    toml = tmp_path / "rl.toml"
    toml.write_text("nft_beta = 0.1\nkl_weight = 0.5\ngroup_size = 4\n")
    result = CliRunner().invoke(cli, ["posttrain", str(base_run), "--out", str(tmp_path / "rl"), "--config", str(toml),
                                      "--kl-weight", "2", "--weights", "moa=5,nuc_size=0", "--adaptive", "--dry-run"])
    assert result.exit_code == 0, result.output
    resolved = tomllib.loads(result.output)
    assert resolved["nft_beta"] == 0.1 and resolved["kl_weight"] == 2.0 and resolved["group_size"] == 4
    assert resolved["adaptive"] is True and resolved["weights"] == "moa=5,nuc_size=0"
    bad = CliRunner().invoke(cli, ["posttrain", str(base_run), "--out", str(tmp_path / "rl"), "--group-size", "1"])
    assert bad.exit_code == 2 and "group-size" in bad.output


@pytest.mark.slow
def test_cli_end_to_end_with_real_rewards(tmp_path):
    """prepare synthetic -> pretrain (tiny, 2 steps) -> posttrain (1 step, real reward suite) -> sample."""
    from cellfluxrl.cli import main

    data, base, rl = tmp_path / "data", tmp_path / "base", tmp_path / "rl"
    for argv in (["prepare", "synthetic", str(data), "--n-images", "300", "--size", "32", "--plates", "2"],
                 ["pretrain", str(data), str(base), "--preset", "tiny", "--steps", "2", "--batch-size", "4",
                  "--device", "cpu", "--no-compile"],
                 ["posttrain", str(base), str(rl), "--steps", "1", "--group-size", "2", "--groups-per-step", "2",
                  "--rollout-steps", "2", "--train-timesteps", "1", "--grid-every", "1", "--device", "cpu"],
                 ["sample", str(rl), "--n", "2", "--steps", "2", "--out", str(tmp_path / "s.npz")]):
        try:
            main(argv)
        except SystemExit as exc:  # main() exits only on errors
            pytest.fail(f"{argv[0]} exited with {exc.code}")
    records = [json.loads(line) for line in (rl / "stats.jsonl").read_text().splitlines()]
    assert len(records) == 1 and set(DEFAULT_WEIGHTS) <= {k.split("/")[1] for k in records[0] if k.startswith("reward/")}
    assert (rl / "samples" / "step_000001.png").is_file() and (tmp_path / "s.npz").is_file()


def test_bad_or_empty_weights_are_refused_before_anything_runs(base_run, tmp_path, capsys):
    """`--dry-run` validates the weights like the real run; an explicitly empty --weights is an error."""
    from test_cli import run_main, visible_lines

    out = tmp_path / "rl"
    code, _, err = run_main(capsys, "posttrain", str(base_run), str(out), "--weights", "moa=inf", "--dry-run")
    assert code == 2 and visible_lines(err) == [l for l in visible_lines(err) if l.startswith("error: ")]
    assert "moa" in err and "finite" in err and not out.exists()
    code, _, err = run_main(capsys, "posttrain", str(base_run), str(out), "--weights", "", "--dry-run")
    assert code == 2 and len(visible_lines(err)) == 1 and "--weights" in err and "empty" in err


@pytest.mark.parametrize("k_chunks", [2, 3])
def test_grad_step_chunks_partition_the_iteration_items(k_chunks):
    """With ``grad_steps = K`` the K chunks of one iteration are a partition of its items: their
    size-weighted gradients and losses add up to the single-step ones (same draws, same noise)."""
    g, m, shape = torch.Generator().manual_seed(0), 4, (2, 4, 4)
    x_ctrl = torch.rand((3, *shape), generator=g).repeat_interleave(m, dim=0)
    x_1 = torch.randn((3 * m, *shape), generator=g)
    r = (0.5 + torch.randn(3 * m, generator=g).clamp(-5, 5) / 10).float()
    ro = Rollouts(x_ctrl, x_ctrl, x_1, torch.zeros(3 * m, 1), ["m"] * (3 * m), [])
    theta = torch.randn(shape, generator=g)
    cfg = PosttrainConfig(group_size=m, rollout_steps=4, train_timesteps=3, train_batch=5, grad_steps=k_chunks)
    n_items = 3 * m * 3

    def run(chunk):
        nets = [_ConstantField(theta) for _ in range(3)]
        with torch.no_grad():
            nets[1].theta.add_(0.05)  # old != theta: the proximal part of the loss is active
        policies = Policies(theta=nets[0], train=nets[0], old=nets[1], ref=nets[2], ema=nets[1])
        out = nft_backward(policies, ro, r, cfg, np.random.default_rng(7), torch.device("cpu"), chunk=chunk)
        return out, nets[0].theta.grad.clone()

    whole, grad = run((0, 1))
    bounds = np.linspace(0, n_items, k_chunks + 1).round().astype(int)
    parts = [run((k, k_chunks)) for k in range(k_chunks)]
    sizes = np.diff(bounds)
    assert sizes.min() > 0
    torch.testing.assert_close(sum(s * gr for s, (_, gr) in zip(sizes, parts)) / n_items, grad, rtol=1e-5, atol=1e-7)
    assert abs(sum(s * out["loss"] for s, (out, _) in zip(sizes, parts)) / n_items - whole["loss"]) < 1e-5
    assert not torch.allclose(parts[0][1], parts[1][1])  # the chunks hold different items


def test_grad_steps_must_be_positive():
    with pytest.raises(CellfluxError, match="grad_steps"):
        PosttrainConfig(grad_steps=0)
