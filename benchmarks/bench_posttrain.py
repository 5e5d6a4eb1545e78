"""Speed of the CellFluxRL post-training loop (one RL iteration end to end) on CPU, ``tiny`` preset.

Run: ``python -m pytest benchmarks/bench_posttrain.py --benchmark-enable -p no:cacheprovider -s``

Builds a small synthetic dataset (96x96, its evaluators) and a ``tiny`` base run (random weights:
the cost of a step does not depend on what the network has learnt), then times
:func:`cellfluxrl.rl.step.run_iteration` with the evidence script's CPU settings: 4 groups of 8
rollouts (32 images) per step, 10 Heun steps, 2 training times per rollout, real reward suite (the
paper's 7 rewards). Reported (``extra_info`` and printed): iterations/s, images/s, and the step
time split into rollout / reward wait / train, with the share of the step spent waiting on rewards
(goal: under 10 %) and the fraction of the scoring time hidden behind the rollouts.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cellfluxrl.rl.config import PosttrainConfig

BENCH_CFG = dict(group_size=8, groups_per_step=4, rollout_steps=10, rollout_batch=8, train_timesteps=2,
                 train_batch=32, grid_every=0)
SIZE = int(os.environ.get("CELLFLUXRL_BENCH_SIZE", "96"))


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    from cellfluxrl.checkpoint import load_run, save_checkpoint
    from cellfluxrl.config import dump_json
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.data.pairing import PairedDataset
    from cellfluxrl.data.synthetic import prepare_synthetic
    from cellfluxrl.model.unet import PRESETS, build_unet
    from cellfluxrl.rewards import DEFAULT_WEIGHTS, RewardSuite
    from cellfluxrl.rewards.evaluators_fit import fit_evaluators
    from cellfluxrl.rl.reward_worker import RewardWorker
    from cellfluxrl.rl.step import build_policies

    root = tmp_path_factory.mktemp("bench_posttrain")
    data = prepare_synthetic(root / "data", n_images=400, seed=0, size=SIZE, n_plates=2, progress=False)
    fit_evaluators(data, progress=False, classifier_epochs=1)
    dataset = load_dataset(data)
    torch.manual_seed(0)
    net = build_unet("tiny", dataset.embeddings.shape[1])
    torch.nn.init.normal_(net.head_conv.weight, std=0.02)
    config = {"kind": "pretrain", "dataset": str(Path(data).resolve()), "preset": "tiny",
              "unet": PRESETS["tiny"].to_dict(), "condition_dim": int(dataset.embeddings.shape[1])}
    run = root / "base"
    run.mkdir()
    dump_json(config, run / "config.json")
    save_checkpoint(run / "checkpoint.pt", {"kind": "pretrain", "step": 0, "config": config,
                                            "model": net.state_dict(), "ema": net.state_dict()})
    cfg = PosttrainConfig(**BENCH_CFG)
    policies = build_policies(load_run(run).net, torch.device("cpu"), 1)
    optimizer = torch.optim.AdamW(policies.theta.parameters(), lr=cfg.lr)
    pairs = PairedDataset(dataset, "train", flip_p=0.0, seed=0)
    worker = RewardWorker(RewardSuite.from_dataset(str(data), DEFAULT_WEIGHTS))
    embeddings = torch.as_tensor(np.array(dataset.embeddings))
    yield policies, optimizer, pairs, embeddings, worker, cfg
    worker.close()


def test_rl_iteration_cpu_tiny(benchmark, loop):
    from cellfluxrl.rl.step import run_iteration

    policies, optimizer, pairs, embeddings, worker, cfg = loop
    records, step = [], iter(range(1000))

    def one_iteration():
        records.append(run_iteration(policies, optimizer, pairs, embeddings, worker, cfg, next(step), 0, 1,
                                     torch.device("cpu")))

    one_iteration()  # warm-up (numba compilation, allocator)
    records.clear()
    benchmark.pedantic(one_iteration, rounds=3, iterations=1)
    keys = ("it_per_s", "images_per_s", "t_step", "t_rollout", "t_reward_wait", "t_train", "t_reward_busy",
            "reward_wait_share", "reward_hidden")
    summary = {k: float(np.mean([r[k] for r in records])) for k in keys}
    summary.update(images_per_step=records[0]["images"], threads=torch.get_num_threads(), size=SIZE)
    benchmark.extra_info.update(summary)
    print("\nposttrain CPU tiny:", ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in summary.items()))
    assert all(np.isfinite(r["loss"]) for r in records)
