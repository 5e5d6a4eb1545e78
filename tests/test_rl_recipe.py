"""The RL recipe options (issue 23): the training-time window, the KL target, the trainable subset,
and the one owner of the advantages (``cellfluxrl.rl.step.advantages``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellfluxrl.errors import CellfluxError
from cellfluxrl.model.unet import build_unet
from cellfluxrl.rl import nft
from cellfluxrl.rl.config import PosttrainConfig
from cellfluxrl.rl.loop import posttrain
from cellfluxrl.rl.rollouts import train_times
from cellfluxrl.rl.step import advantages, build_policies, trainable_parameters
from cellfluxrl.checkpoint import load_checkpoint
from test_posttrain import ChannelSuite, base_run, small_cfg  # noqa: F401  (base_run is a fixture)


def test_train_t_max_drops_the_late_grid_times():
    cfg = PosttrainConfig(rollout_steps=5, train_timesteps=4, train_t_max=0.99)
    assert cfg.train_grid == pytest.approx((0.0123, 0.054, 0.2845, 0.8549), abs=1e-4)  # 0.998 dropped
    t = train_times(cfg, 50, np.random.default_rng(0))
    assert t.shape == (50, 4) and all(sorted(row) == sorted(cfg.train_grid) for row in t)
    u = train_times(PosttrainConfig(t_sampling="uniform", train_timesteps=3, train_t_max=0.5), 200,
                    np.random.default_rng(0))
    assert 0 <= u.min() and u.max() < 0.5 and abs(u.mean() - 0.25) < 0.03
    full = PosttrainConfig(rollout_steps=5, train_timesteps=2)  # t_max 1: the old draws, bit for bit
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    grid = np.asarray(full.train_grid)
    expected = np.stack([grid[rng_b.permutation(grid.size)[:2]] for _ in range(7)])
    assert np.array_equal(train_times(full, 7, rng_a), expected)
    with pytest.raises(CellfluxError, match="train_timesteps 5 > the 4 times"):
        PosttrainConfig(rollout_steps=5, train_timesteps=5, train_t_max=0.99)
    with pytest.raises(CellfluxError, match="train_t_max"):
        PosttrainConfig(train_t_max=0.0)
    with pytest.raises(CellfluxError, match="kl_target"):
        PosttrainConfig(kl_target="base")
    with pytest.raises(CellfluxError, match="trainable"):
        PosttrainConfig(trainable="lora")


def test_conditioning_subset_is_the_condition_and_embedding_projections():
    net = build_unet("micro", 16)
    params = trainable_parameters(net, "conditioning")
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    assert len(params) == len(names) and names[:2] == ["cond_proj.weight", "cond_proj.bias"]
    assert all(n.startswith("cond_proj.") or ".emb_proj." in n for n in names)
    assert sum(p.numel() for p in params) == 16 * 128 + 128 + sum(
        p.numel() for n, p in net.named_parameters() if ".emb_proj." in n)
    assert len(trainable_parameters(net, "all")) == len(list(net.parameters()))
    assert all(p.requires_grad for p in net.parameters())


def test_conditioning_run_changes_only_the_conditioning_weights(base_run, tmp_path):
    out = tmp_path / "rl"
    posttrain(base_run, out, small_cfg(steps=2, trainable="conditioning", lr=1e-3, grid_every=0), device="cpu",
              suite=ChannelSuite())
    trained = load_checkpoint(out / "checkpoint.pt")["model"]
    base = load_checkpoint(base_run / "checkpoint.pt")["ema"]
    moved = {k for k in base if not torch.equal(base[k], trained[k])}
    assert moved and all(k.startswith("cond_proj.") or ".emb_proj." in k for k in moved)
    assert any(".emb_proj." in k for k in moved)


def test_kl_to_old_pulls_toward_the_sampler_not_the_base(base_run, tmp_path):
    """The logged KL is the term's own gap: to v_old it stays 0 on an always-on-policy run (old_rate 0
    copies theta into old after every step), while the gap to the frozen base grows from step 2."""
    out_old, out_ref = tmp_path / "old", tmp_path / "ref"
    seen_old, seen_ref = [], []
    cfg = dict(steps=2, old_rate=0.0, grid_every=0, kl_weight=1.0, lr=1e-3)
    posttrain(base_run, out_old, small_cfg(kl_target="old", **cfg), device="cpu", suite=ChannelSuite(),
              on_step=seen_old.append)
    posttrain(base_run, out_ref, small_cfg(kl_target="ref", **cfg), device="cpu", suite=ChannelSuite(),
              on_step=seen_ref.append)
    # step 1: theta = old = ref, so both KLs are 0; step 2: old was copied from theta (eta 0), so the KL to
    # old is 0 again while the KL to the base has grown.
    assert seen_old[0]["kl"] == 0.0 and seen_ref[0]["kl"] == 0.0
    assert seen_old[1]["kl"] == 0.0 and seen_ref[1]["kl"] > 0.0


def test_advantages_owner_matches_both_normalisations():
    rng = np.random.default_rng(0)
    comps = torch.as_tensor(rng.normal(size=(12, 3)))
    weights = [5.0, 2.0, 1.0]
    total = comps @ torch.tensor(weights, dtype=torch.float64)
    everything = torch.cat([total[:, None], comps], dim=1)
    raw = advantages(PosttrainConfig(group_size=4, reward_norm="none"), everything, weights)
    assert torch.equal(raw, nft.group_advantages(total.reshape(3, 4), 5.0, std=total.std(correction=0)))
    per = advantages(PosttrainConfig(group_size=4, reward_norm="per_reward"), everything, weights)
    assert torch.equal(per, nft.per_reward_advantages(comps, torch.tensor(weights, dtype=torch.float64), 4, 5.0))
    # rank 1 of 2 keeps its rows of the gathered advantages, normalised over both ranks
    half = advantages(PosttrainConfig(group_size=4, reward_norm="per_reward"), everything, weights, rank=1, n_local=4)
    assert torch.equal(half, per.reshape(-1)[4:8].reshape(1, 4))
    half_raw = advantages(PosttrainConfig(group_size=4, reward_norm="none"), everything, weights, rank=2, n_local=4)
    assert torch.equal(half_raw, raw[2:3])


def test_build_policies_freezes_all_but_the_trainable_subset():
    net = build_unet("micro", 16)
    pol = build_policies(net, torch.device("cpu"), 1, "conditioning")
    assert not any(p.requires_grad for p in pol.ref.parameters())
    trained = {n for n, p in pol.theta.named_parameters() if p.requires_grad}
    assert trained == {n for n in trained if n.startswith("cond_proj.") or ".emb_proj." in n}


AVAILABLE = ("moa", "nuc_in_cyto", "roundness", "nuc_size", "cyto_size", "nuc_count", "cyto_count", "moa_capped")


def test_training_weights_default_to_the_standardised_shares_and_overrides_merge_into_them():
    from cellfluxrl.rewards.weights import DEFAULT_WEIGHTS
    from cellfluxrl.rl.config import STANDARDISED_WEIGHTS

    assert PosttrainConfig().reward_norm == "per_reward"
    assert PosttrainConfig().train_weights(AVAILABLE) == STANDARDISED_WEIGHTS
    assert STANDARDISED_WEIGHTS == {**DEFAULT_WEIGHTS, "moa": 2.0, "nuc_in_cyto": 1.0}
    assert PosttrainConfig(weights="nuc_size=3").train_weights(AVAILABLE) == {**STANDARDISED_WEIGHTS, "nuc_size": 3.0}
    assert PosttrainConfig(reward_norm="none").train_weights(AVAILABLE) == DEFAULT_WEIGHTS  # the paper's raw sum
    assert PosttrainConfig(reward_norm="none", weights="moa=1").train_weights(AVAILABLE) == {**DEFAULT_WEIGHTS, "moa": 1.0}
    capped = PosttrainConfig(weights="moa=0,moa_capped=2").train_weights(AVAILABLE)
    assert "moa" not in capped and capped["moa_capped"] == 2.0 and capped["nuc_in_cyto"] == 1.0
    with pytest.raises(CellfluxError, match="unknown reward 'mao'"):
        PosttrainConfig(weights="mao=1").train_weights(AVAILABLE)
