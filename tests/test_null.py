"""The shuffled-reward null (cellfluxrl.rl.null, issue 31 item 6): one within-group permutation of
``(seed, iteration, group)``, used by ``posttrain --reward-null`` and every experiments script, the same
after a resume."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import cellfluxrl.rl.loop as loop
import cellfluxrl.rl.step as rl_step
from cellfluxrl.rl import nft
from cellfluxrl.config import config_from_dict
from cellfluxrl.rl.config import PosttrainConfig
from cellfluxrl.checkpoint import load_checkpoint
from cellfluxrl.rl.null import within_group_permutation
from test_posttrain import ChannelSuite, base_run, small_cfg  # noqa: F401 (base_run is a fixture)

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
M = 4  # rollouts per group


def _rows(n: int, k: int, seed: int) -> torch.Tensor:
    """float64 ``(n, 1 + k)`` reward rows: the weighted total, then ``k`` rewards (all distinct)."""
    comps = np.random.default_rng(seed).normal(size=(n, k))
    return torch.as_tensor(np.concatenate([comps.sum(axis=1, keepdims=True), comps], axis=1))


def test_each_iteration_and_each_group_keeps_its_rewards_as_a_multiset():
    rows = _rows(32, 3, 0)
    for iteration in range(5):
        perm = within_group_permutation(32, M, seed=3, iteration=iteration)
        assert perm.dtype == np.int64 and sorted(perm.tolist()) == list(range(32))
        shuffled = rows[torch.as_tensor(perm)]
        assert torch.equal(shuffled[:, 0].sort().values, rows[:, 0].sort().values)  # the iteration's multiset
        for g in range(32 // M):
            part = slice(g * M, (g + 1) * M)
            assert sorted(perm[part].tolist()) == list(range(g * M, (g + 1) * M))  # no row leaves its group
            assert torch.equal(shuffled[part].sort(dim=0).values, rows[part].sort(dim=0).values)


@pytest.mark.parametrize("reward_norm", ["per_reward", "none"])
def test_each_group_keeps_exactly_its_advantages_reassigned(reward_norm):
    """The advantage is group-centred with an iteration-wide scale, so the null's advantages are the
    real ones, each moved to another rollout of its group."""
    cfg = PosttrainConfig(group_size=M, reward_norm=reward_norm)
    rows, w = _rows(32, 3, 1), [2.0, 1.0, 0.5]
    perm = within_group_permutation(32, M, seed=0, iteration=7)
    real = rl_step.advantages(cfg, rows, w).reshape(-1)
    null = rl_step.advantages(cfg, rows[torch.as_tensor(perm)], w).reshape(-1)
    assert torch.allclose(null, real[torch.as_tensor(perm)], rtol=0, atol=1e-12)
    assert not torch.equal(null, real)


def test_the_permutation_breaks_the_reward_rollout_pairing():
    """Over 4,000 groups the reward a rollout is given is uncorrelated with its own (uniform orders:
    expectation 0, where a derangement would give -1/(m-1) = -0.33) and stays its own in 1/m of cases."""
    n_iter, n_groups = 500, 8
    rows = _rows(n_iter * n_groups * M, 1, 2)[:, 0].numpy().reshape(n_iter, n_groups, M)
    corr, kept = [], []
    for i in range(n_iter):
        perm = within_group_permutation(n_groups * M, M, seed=11, iteration=i).reshape(n_groups, M) % M
        centred = rows[i] - rows[i].mean(axis=1, keepdims=True)
        given = np.take_along_axis(centred, perm, axis=1)
        corr.extend((centred * given).sum(axis=1) / (centred ** 2).sum(axis=1))
        kept.extend((perm == np.arange(M)).mean(axis=1))
    corr, kept = np.array(corr), np.array(kept)
    se = corr.std(ddof=1) / np.sqrt(corr.size)
    assert se < 0.012 and abs(corr.mean()) < 4 * se  # 0 within 4 s.e. (about +-0.04); the real pairing is 1
    assert abs(kept.mean() - 1 / M) < 4 * kept.std(ddof=1) / np.sqrt(kept.size)


def test_the_permutation_is_a_pure_function_of_seed_iteration_and_group():
    first = within_group_permutation(64, M, seed=5, iteration=30)
    assert np.array_equal(first, within_group_permutation(64, M, seed=5, iteration=30))
    assert np.array_equal(first[:32], within_group_permutation(32, M, seed=5, iteration=30))  # group g's own draw
    assert not np.array_equal(first, within_group_permutation(64, M, seed=5, iteration=0))
    assert not np.array_equal(first, within_group_permutation(64, M, seed=6, iteration=30))
    with pytest.raises(ValueError, match="groups of 4"):
        within_group_permutation(30, M, seed=0, iteration=0)
    with pytest.raises(ValueError, match="must be >= 0"):
        within_group_permutation(32, M, seed=-1, iteration=0)


def test_the_null_run_gives_each_iteration_its_rewards_permuted_within_groups(base_run, tmp_path, monkeypatch):
    """``posttrain --reward-null`` (``PosttrainConfig.reward_null``): at iteration 0 the null and the real run
    roll out the same images, and the null's advantages see the real run's reward rows reordered by
    ``within_group_permutation(seed, 0)``: the same multiset, the pairing with the rollouts broken."""
    seen = {}

    def spy(name):
        def advantages(cfg, everything, *args, **kwargs):
            seen.setdefault(name, []).append(everything.clone())
            return original(cfg, everything, *args, **kwargs)
        return advantages

    original = rl_step.advantages
    for name, null in (("real", False), ("null", True)):
        monkeypatch.setattr(rl_step, "advantages", spy(name))
        loop.posttrain(base_run, tmp_path / name, small_cfg(steps=1, grid_every=0, reward_null=null), device="cpu",
                       suite=ChannelSuite())
    real, null = seen["real"][0], seen["null"][0]
    cfg = small_cfg(steps=1)
    perm = torch.as_tensor(within_group_permutation(real.shape[0], cfg.group_size, cfg.seed, 0))
    assert torch.equal(null, real[perm])
    assert not torch.equal(null, real)
    stored = json.loads((tmp_path / "null" / "config.json").read_text())
    assert config_from_dict(PosttrainConfig, stored["posttrain"]).reward_null  # recorded: the run says it is a null


def test_a_null_run_resumed_after_a_kill_equals_the_unbroken_null_run(base_run, tmp_path):
    """The null's permutations are functions of (seed, iteration, group): 1 step, then resumed to 2 in a
    new call, equals 2 steps at once, and differs from the real run."""
    def posttrain(out, steps, null=True):
        loop.posttrain(base_run, out, small_cfg(steps=steps, grid_every=0, reward_null=null), device="cpu",
                       suite=ChannelSuite())

    posttrain(tmp_path / "unbroken", 2)
    posttrain(tmp_path / "resumed", 1)
    posttrain(tmp_path / "resumed", 2)
    posttrain(tmp_path / "real", 2, null=False)
    a, b, real = (load_checkpoint(tmp_path / name / "checkpoint.pt")["model"]
                  for name in ("unbroken", "resumed", "real"))
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not all(torch.equal(a[name], real[name]) for name in a)  # the null did change the updates


def _calls(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            f = node.func
            names.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    return names


def test_every_script_that_shuffles_rewards_calls_the_one_function():
    for path in (ROOT / "cellfluxrl" / "rl" / "step.py", EXPERIMENTS / "gradient_snr.py"):
        assert "from cellfluxrl.rl.null import within_group_permutation" in path.read_text(), path.name
        assert "within_group_permutation" in _calls(path), path.name
    assert "reward_null=args.null" in (EXPERIMENTS / "rl_experiment.py").read_text()  # the config field, no hook
    own_shuffles = {path.name for path in EXPERIMENTS.glob("*.py")
                    if _calls(path) & {"permutation", "permuted", "shuffle"}}
    # classifier_robustness.py draws a half of the training images, no rewards; a new script that
    # shuffles anything else goes here with its reason, one that shuffles rewards calls the function.
    assert own_shuffles == {"classifier_robustness.py"}, "rewards are shuffled by within_group_permutation only"
