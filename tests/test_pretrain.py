"""Pretraining: config overrides, checkpoints, exact resume, NaN handling, init-from, CLI, learning."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cellfluxrl.checkpoint import load_checkpoint, load_run, save_checkpoint
from cellfluxrl.config import PretrainConfig, load_toml_overrides, replace_validated
from cellfluxrl.data.layout import DatasetWriter, load_dataset
from cellfluxrl.errors import CellfluxError
from cellfluxrl.model import losses
from cellfluxrl.model.pretrain import fm_batch_loss, micro_batch, train
from cellfluxrl.model.unet import UNetConfig, VelocityUNet, ours_to_cellflux_key

# A very small network so that CPU tests take seconds.
MICRO = UNetConfig(model_channels=32, channel_mult=(1, 1), num_res_blocks=1, attention_resolutions=(),
                   dropout=0.1)
TOY_RADIUS = {"DMSO": 5.0, "taxol": 9.0, "AZ138": 3.0}  # nucleus radius (px) at size 32
TOY_MOA = {"DMSO": "DMSO", "taxol": "Microtubule stabilizers", "AZ138": "Eg5 inhibitors"}




def toy_images(n: int, radius: float, rng: np.random.Generator, size: int) -> np.ndarray:
    """uint8 (n, size, size, 3): a cell disk (actin, tubulin) with a bright DNA disk of ``radius`` px."""
    yy, xx = np.mgrid[:size, :size]
    out = np.empty((n, size, size, 3), np.uint8)
    for k in range(n):
        cy, cx = size / 2 + rng.uniform(-1.5, 1.5, 2)
        r = radius * size / 32 * rng.uniform(0.9, 1.1)
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        img = np.full((size, size, 3), 15.0)
        img[d2 <= (0.32 * size) ** 2, :2] = 90.0
        img[d2 <= r * r, 2] = 200.0
        img += rng.normal(0, 6, img.shape)
        out[k] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def make_toy_dataset(out, size: int = 16, n_train: int = 8, n_test: int = 4, plates: int = 2, seed: int = 0):
    """DMSO + two compounds (big / small nuclei) on ``plates`` plates; conditions taxol, AZ138 (D=8)."""
    rng = np.random.default_rng(seed)
    with DatasetWriter(out, size, ("actin", "tubulin", "dna"), "synthetic") as writer:
        k = 0
        for split, n in (("train", n_train), ("test", n_test)):
            for plate in range(plates):
                for comp, radius in TOY_RADIUS.items():
                    rows = [{"id": f"img{k + i}", "split": split, "batch": f"Week1_{plate}", "compound": comp,
                             "dose": 0.0 if comp == "DMSO" else 1.0, "moa": TOY_MOA[comp],
                             "state": "control" if comp == "DMSO" else "treated", "source": "toy"}
                            for i in range(n)]
                    writer.add(toy_images(n, radius, rng, size), rows)
                    k += n
        conditions = [{"compound": c, "moa": TOY_MOA[c], "smiles": "", "ood": False, "embedding": "user"}
                      for c in ("taxol", "AZ138")]
        emb = np.zeros((2, 8), np.float32)
        emb[0, 0] = emb[1, 1] = 3.0
        return load_dataset(writer.finish(conditions, emb))


def nucleus_area(images_uint8: np.ndarray, threshold: int = 110) -> np.ndarray:
    """Ground-truth-like nucleus size: pixels of the DNA channel above ``threshold``, per image."""
    return (images_uint8[..., 2] > threshold).sum(axis=(1, 2)).astype(np.float64)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("toy") / "ds")


def quick_cfg(**kw) -> PretrainConfig:
    base = dict(preset="tiny", steps=4, batch_size=4, ckpt_every=2, log_every=1, seed=3)
    base.update(kw)
    return PretrainConfig(**base)


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- config

def test_toml_overrides_and_unknown_key(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('steps = 7\nlr = 2e-4\n[unet]\nmodel_channels = 64\n')
    over = load_toml_overrides(good, PretrainConfig, tables={"unet": UNetConfig})
    assert over == {"steps": 7, "lr": 2e-4, "unet": {"model_channels": 64}}
    assert replace_validated(PretrainConfig(), **{k: v for k, v in over.items() if k != "unet"}).steps == 7
    bad = tmp_path / "bad.toml"
    bad.write_text("stepz = 7\n")
    with pytest.raises(CellfluxError, match="unknown key 'stepz'"):
        load_toml_overrides(bad, PretrainConfig)
    with pytest.raises(CellfluxError, match="steps"):
        replace_validated(PretrainConfig(), steps="many")
    with pytest.raises(CellfluxError, match="noise_prob"):
        PretrainConfig(noise_prob=1.5)


def test_micro_batches_cover_each_epoch_once_per_rank():
    seen = [np.concatenate([micro_batch(p, 23, 4, seed=1, rank=r, world_size=2)[1] for p in range(2)])
            for r in range(2)]
    assert all(len(s) == 8 for s in seen)
    assert len(np.intersect1d(seen[0], seen[1])) == 0  # ranks get disjoint items
    assert micro_batch(2, 23, 4, seed=1, rank=0, world_size=2)[0] == 1  # third micro-batch: next epoch


# ---------------------------------------------------------------------------------------------- checkpoints

class FlipRecorder(torch.nn.Module):
    """Stands in for the UNet: records, per call, whether source noise reached ``x_t`` (the batch is
    all zeros, so ``x_t != 0`` only with noise) and which samples kept their condition."""

    def __init__(self):
        super().__init__()
        self.noise, self.keep = [], []

    def forward(self, x_t, t, cond, cond_keep=None):
        self.noise.append((x_t.flatten(1) != 0).any(dim=1))
        self.keep.append(cond_keep.clone())
        return torch.zeros_like(x_t)


def draw_flips(n_batches: int, seed: int, batch_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``(noise, dropped)``: bool ``(n_batches, batch_size)`` of the coin flips of ``fm_batch_loss``."""
    net, cfg = FlipRecorder(), PretrainConfig()
    batch = {"x_0": torch.zeros(batch_size, 3, 2, 2), "x_1": torch.zeros(batch_size, 3, 2, 2),
             "cond": torch.zeros(batch_size, dtype=torch.long)}
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        fm_batch_loss(net, batch, torch.ones(1, 4), cfg, generator, torch.device("cpu"))
    return torch.stack(net.noise).numpy(), (torch.stack(net.keep) == 0).numpy()


def test_pretraining_coin_flips_have_cellflux_rates_per_batch_and_are_independent():
    """Source noise with probability 0.5 and condition dropout with probability 0.2 (CellFlux's
    settings), each flipped once per micro-batch (every sample of a batch shares it), independently
    of each other, from the step's generator only: checked against binomial error bars."""
    cfg, n = PretrainConfig(), 3000
    assert (cfg.noise_prob, cfg.cond_drop_prob) == (0.5, 0.2)
    noise, dropped = draw_flips(n, seed=0)
    assert (noise == noise[:, :1]).all() and (dropped == dropped[:, :1]).all()  # one flip per batch
    noise, dropped = noise[:, 0], dropped[:, 0]

    def within(observed: float, p: float, count: int, z: float = 4.5) -> bool:
        return abs(observed - p) < z * np.sqrt(p * (1 - p) / count)

    assert within(noise.mean(), 0.5, n), noise.mean()
    assert within(dropped.mean(), 0.2, n), dropped.mean()
    assert within((noise & dropped).mean(), 0.1, n), (noise & dropped).mean()  # independent: 0.5 x 0.2
    for given in (noise, ~noise):  # the dropout rate does not depend on the noise flip
        assert within(dropped[given].mean(), 0.2, int(given.sum())), dropped[given].mean()
    # The flips come from the generator alone: the global RNG does not change them, the seed does.
    torch.manual_seed(123)
    again = draw_flips(200, seed=0)
    torch.manual_seed(456)
    assert all((a == b).all() for a, b in zip(again, draw_flips(200, seed=0)))
    assert not (draw_flips(200, seed=1)[0] == again[0]).all()


def test_checkpoint_round_trip_weights_only(toy, tmp_path):
    result = train(toy.root, tmp_path / "run", quick_cfg(steps=2), unet=MICRO)
    raw = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert raw["kind"] == "pretrain" and raw["step"] == 2
    assert raw["config"]["unet"] == MICRO.to_dict() and raw["config"]["condition_dim"] == 8
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dataset"] == str(toy.root.resolve())
    lines = [json.loads(x) for x in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and all(np.isfinite(x["loss"]) for x in lines)
    loaded = load_run(tmp_path / "run")
    assert not loaded.net.training and loaded.kind == "pretrain" and loaded.step == 2
    assert state_equal(loaded.net.state_dict(), result.ema.state_dict())
    assert not state_equal(loaded.net.state_dict(), result.net.state_dict())  # EMA differs from raw
    assert state_equal(load_run(tmp_path / "run", weights="model").net.state_dict(), result.net.state_dict())
    # A posttrain-kind checkpoint in the same format loads too.
    raw["kind"] = "posttrain"
    save_checkpoint(tmp_path / "post" / "checkpoint.pt", raw)
    assert load_run(tmp_path / "post").kind == "posttrain"


def test_kill_and_resume_is_bitwise_identical(toy, tmp_path):
    straight = train(toy.root, tmp_path / "a", quick_cfg(), unet=MICRO)

    def kill(stats):
        if stats["step"] == 3:
            raise KeyboardInterrupt  # killed after the step-2 checkpoint, before the step-4 one

    with pytest.raises(KeyboardInterrupt):
        train(toy.root, tmp_path / "b", quick_cfg(), unet=MICRO, on_step=kill)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 2
    resumed = train(toy.root, tmp_path / "b", quick_cfg(), unet=MICRO)
    assert resumed.resumed_from == 2 and resumed.step == 4
    a, b = (load_checkpoint(p / "checkpoint.pt") for p in (tmp_path / "a", tmp_path / "b"))
    assert state_equal(a["model"], b["model"]) and state_equal(a["ema"], b["ema"])
    assert state_equal(straight.net.state_dict(), resumed.net.state_dict())
    # Changing a trajectory-changing setting on resume is refused.
    with pytest.raises(CellfluxError, match="lr="):
        train(toy.root, tmp_path / "b", quick_cfg(steps=6, lr=1e-3), unet=MICRO)


def test_nan_loss_stops_and_keeps_last_checkpoint(toy, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = losses.fm_loss

    def flaky(v, x_0, x_1):
        calls["n"] += 1
        out = real(v, x_0, x_1)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(losses, "fm_loss", flaky)
    with pytest.raises(CellfluxError, match=r"non-finite loss at step 3; last good checkpoint kept at .*step 2"):
        train(toy.root, tmp_path / "run", quick_cfg(), unet=MICRO)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_missing_foreign_and_incompatible_checkpoints(toy, tmp_path):
    with pytest.raises(CellfluxError, match="does not exist"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CellfluxError, match="checkpoint.pt does not exist"):
        load_run(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CellfluxError, match="not a readable cellfluxrl checkpoint"):
        load_run(tmp_path / "junk")
    torch.save({"weights": 1}, tmp_path / "junk" / "checkpoint.pt")
    with pytest.raises(CellfluxError, match="not a cellfluxrl checkpoint"):
        load_run(tmp_path / "junk")
    train(toy.root, tmp_path / "run", quick_cfg(steps=1), unet=MICRO)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    state["ema"]["stem.weight"] = torch.zeros(5, 3, 3, 3)
    save_checkpoint(tmp_path / "bad" / "checkpoint.pt", state)
    with pytest.raises(CellfluxError, match=r"bad/checkpoint.pt: incompatible ema weights: 'stem.weight' has shape"):
        load_run(tmp_path / "bad")
    del state["ema"]["stem.weight"]
    save_checkpoint(tmp_path / "bad" / "checkpoint.pt", state)
    with pytest.raises(CellfluxError, match="missing key 'stem.weight'"):
        load_run(tmp_path / "bad")
    state["kind"] = "other"
    save_checkpoint(tmp_path / "bad" / "checkpoint.pt", state)
    with pytest.raises(CellfluxError, match="kind 'other'"):
        load_run(tmp_path / "bad")


def test_init_from_cellflux_named_state_dict(toy, tmp_path):
    source = VelocityUNet(MICRO, 8)
    with torch.no_grad():
        for p in source.parameters():
            p.copy_(torch.randn_like(p))
    theirs = {"module." + ours_to_cellflux_key(k): v for k, v in source.state_dict().items()}
    assert "module.input_blocks.1.0.in_layers.0.weight" in theirs and "module.out.2.weight" in theirs
    assert "module.mol_embed_transform.weight" in theirs and "module.middle_block.1.proj_out.weight" in theirs
    torch.save({"model": theirs, "epoch": 99, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "cf.pth")
    result = train(toy.root, tmp_path / "run", quick_cfg(steps=1, lr=1e-12, weight_decay=0.0), unet=MICRO,
                   init_from=tmp_path / "cf.pth")
    for k, v in source.state_dict().items():
        torch.testing.assert_close(result.net.state_dict()[k], v, atol=1e-6, rtol=0)
    theirs.pop("module.out.2.weight")
    torch.save({"model": theirs}, tmp_path / "cf_bad.pth")
    with pytest.raises(CellfluxError, match="missing key 'head_conv.weight'"):
        train(toy.root, tmp_path / "run2", quick_cfg(steps=1), unet=MICRO, init_from=tmp_path / "cf_bad.pth")


def test_cli_pretrain_then_resume(toy, tmp_path):
    from cellfluxrl.cli import cli

    conf = tmp_path / "micro.toml"
    conf.write_text("batch_size = 4\nckpt_every = 2\n[unet]\nmodel_channels = 32\nchannel_mult = [1, 1]\n"
                    "num_res_blocks = 1\nattention_resolutions = []\n")
    args = ["pretrain", str(toy.root), str(tmp_path / "run"), "--preset", "tiny", "--config", str(conf),
            "--device", "cpu", "--no-compile"]
    first = CliRunner().invoke(cli, args + ["--steps", "2"], catch_exceptions=False)
    assert first.exit_code == 0 and "trained to step 2" in first.output
    second = CliRunner().invoke(cli, args + ["--steps", "3"], catch_exceptions=False)
    assert second.exit_code == 0 and "resumed from step 2" in second.output
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 3
    bad = CliRunner().invoke(cli, args + ["--config", str(tmp_path / "none.toml")])
    assert bad.exit_code != 0 and "none.toml does not exist" in str(bad.exception)


# ---------------------------------------------------------------------------------------------- learning

def test_learned_model_moves_nucleus_size_towards_the_moa(tmp_path):
    """A small model trained a few hundred CPU steps enlarges nuclei for taxol and shrinks them for AZ138.

    About 20 s on a quiet 2-core CPU (one thread).
    """
    from cellfluxrl.model.generate import sample_pairs, test_pairs

    ds = make_toy_dataset(tmp_path / "ds", size=16, n_train=48, n_test=16)
    cfg = quick_cfg(steps=300, batch_size=16, ckpt_every=300, log_every=50, lr=1e-3, flip_p=0.0)
    result = train(ds.root, tmp_path / "run", cfg, unet=MICRO)
    for compound, sign in (("taxol", 1.0), ("AZ138", -1.0)):
        target_idx, control_idx = test_pairs(ds, 16, seed=0, conditions=[compound])
        samples = sample_pairs(result.ema.eval(), ds, target_idx, control_idx, seed=0, num_steps=10, cfg_scale=0.2)
        dmso, real, gen = (nucleus_area(a).mean() for a in (samples.controls, samples.targets, samples.generated))
        assert sign * (real - dmso) > 0
        # At least half of the DMSO -> MoA gap is closed, without overshooting by more than the gap.
        assert sign * (gen - dmso) > 0.5 * sign * (real - dmso), (compound, dmso, real, gen)
        assert abs(gen - real) < abs(real - dmso), (compound, dmso, real, gen)


def test_lr_schedule_warm_up_then_cosine_to_the_final_rate():
    """lr_at: linear warm-up to lr, then a half cosine from lr to lr * lr_final at the last step;
    'constant' keeps lr after the warm-up; a run stored before the schedule existed still resumes."""
    import math
    from pathlib import Path

    from cellfluxrl.config import PretrainConfig
    from cellfluxrl.model.pretrain import check_resume_compatible, lr_at

    cfg = PretrainConfig(steps=101, lr=1e-3, lr_schedule="cosine", warmup_steps=10, lr_final=0.1)
    assert [lr_at(i, cfg) for i in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    assert lr_at(10, cfg) == pytest.approx(1e-3) and lr_at(100, cfg) == pytest.approx(1e-4)
    middle = 10 + 45  # halfway through the 90 decaying steps
    assert lr_at(middle, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    lrs = [lr_at(i, cfg) for i in range(10, 101)]
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))
    flat = PretrainConfig(steps=50, lr=2e-4, warmup_steps=5)
    assert lr_at(2, flat) == pytest.approx(1.2e-4) and {lr_at(i, flat) for i in range(5, 50)} == {2e-4}
    assert lr_at(7, PretrainConfig(steps=50, lr=2e-4)) == 2e-4  # CellFlux: constant, no warm-up
    with pytest.raises(CellfluxError, match="lr_schedule must be constant or cosine"):
        PretrainConfig(lr_schedule="step")
    old = {"dataset": "d", "unet": {}, "condition_dim": 3, "train": {"steps": 5, "lr": 1e-3}}
    new = {"dataset": "d", "unet": {}, "condition_dim": 3,
           "train": {"steps": 5, "lr": 1e-3, "lr_schedule": "constant", "warmup_steps": 0, "lr_final": 0.0}}
    check_resume_compatible(old, new, Path("run"))  # stored without the keys: the old behaviour, accepted
    with pytest.raises(CellfluxError, match="lr_schedule"):
        check_resume_compatible(old, {**new, "train": {**new["train"], "lr_schedule": "cosine"}}, Path("run"))
