"""Speed of the CellFlux model on CPU (``tiny`` preset, 96x96): training and sampling images/s,
and the torch.compile speed-up (compile time reported separately in ``extra_info``).

Run: python -m pytest benchmarks/bench_model.py --benchmark-enable -p no:cacheprovider
"""

from __future__ import annotations

import time

import pytest
import torch

from cellfluxrl.model.generate import generate
from cellfluxrl.model.losses import fm_loss
from cellfluxrl.model.path import interpolate, sample_t_skewed
from cellfluxrl.model.unet import build_unet

SIZE, TRAIN_BATCH, SAMPLE_BATCH, COND_DIM = 96, 8, 4, 1024


def _train_step_fn(compiled: bool):
    torch.manual_seed(0)
    net = build_unet("tiny", COND_DIM)
    model = torch.compile(net) if compiled else net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    x_0, x_1 = torch.randn(TRAIN_BATCH, 3, SIZE, SIZE, generator=g), torch.randn(TRAIN_BATCH, 3, SIZE, SIZE, generator=g)
    cond = torch.randn(TRAIN_BATCH, COND_DIM, generator=g)

    def step():
        t = sample_t_skewed(TRAIN_BATCH, g)
        loss = fm_loss(model(interpolate(x_0, x_1, t), t, cond), x_0, x_1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_train_images_per_s_tiny(benchmark, compiled):
    step = _train_step_fn(compiled)
    t0 = time.perf_counter()
    step()  # warm-up (includes compilation when compiled)
    step()
    benchmark.extra_info["first_two_steps_s"] = time.perf_counter() - t0
    benchmark.pedantic(step, rounds=5, iterations=1)
    benchmark.extra_info["images_per_s"] = TRAIN_BATCH / benchmark.stats.stats.mean


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_sample_images_per_s_tiny_heun50_cfg(benchmark, compiled):
    torch.manual_seed(0)
    net = build_unet("tiny", COND_DIM).eval()
    model = torch.compile(net) if compiled else net
    x_0 = torch.rand(SAMPLE_BATCH, 3, SIZE, SIZE) * 2 - 1
    cond = torch.randn(SAMPLE_BATCH, COND_DIM)

    def run():
        return generate(model, x_0, cond, generator=torch.Generator().manual_seed(0), num_steps=50, cfg_scale=0.2)

    t0 = time.perf_counter()
    generate(model, x_0, cond, generator=torch.Generator().manual_seed(0), num_steps=1, cfg_scale=0.2)
    benchmark.extra_info["warmup_s"] = time.perf_counter() - t0
    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info["images_per_s"] = SAMPLE_BATCH / benchmark.stats.stats.mean
    benchmark.extra_info["unet_passes"] = 200
