"""How much of a post-training gradient is reward signal: agreement of independent iterations.

    python experiments/gradient_snr.py DATA BASE_RUN --iters 6 --set group_size=4,train_timesteps=2 \
        --set group_size=4,train_timesteps=4 --set train_source=rollout

For each setting, ``--iters`` independent RL iterations (different pairs and source noise, the same
base weights ``theta = old = ref``) each give the policy gradient ``g_k`` of the NFT loss (the KL
term is zero at the base). With ``g_k = s + n_k`` (a common reward direction ``s`` plus zero-mean
noise), the mean cosine between two independent gradients estimates ``|s|^2 / E|g|^2``, the share
of a gradient's energy that is signal; the same with the rewards shuffled inside each group
(rewards carry no information) is the floor. Everything else is the demo's setting (the base's
recorded sampler steps and CFG, per-reward normalised advantages, paper weights unless
``--weights``). Rollouts come from the training split, as RL's own do: no evaluation pair is read.
The KL target and the old-policy schedule do not enter a gradient taken at ``theta = old = ref``;
they are compared by RL runs (``rl_experiment.py``).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time
from pathlib import Path

import numpy as np
import torch


def parse_set(text: str) -> dict:
    """``"group_size=8,train_timesteps=4"`` -> PosttrainConfig overrides (ints, floats or words)."""
    out = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        for kind in (int, float):
            try:
                out[key] = kind(value)
                break
            except ValueError:
                continue
        else:
            out[key] = value
    return out


ROLLOUT_KEYS = ("group_size", "groups_per_step", "rollout_steps", "rollout_grid", "rollout_batch", "sigma",
                "cfg_scale", "seed", "weights")  # the settings that change the rollouts or their rewards


def gradients(data: Path, base: Path, settings: list[dict], iters: int, weights: str | None, seed: int) -> list[dict]:
    """Per setting ``{"real": (iters, P), "shuffled": (iters, P), "seconds": s}`` flattened policy gradients.

    The advantages are the run's own (``cellfluxrl.rl.step.advantages``: ``reward_norm`` honoured);
    the null is the project's one shuffled-reward null
    (:func:`cellfluxrl.rl.null.within_group_permutation` of ``(seed, iteration, group)``, the same as
    ``rl_experiment.py --null``): the reward rows (every reward of a rollout together) are permuted
    inside each group, so it keeps each group's reward set and loses which rollout earned it. ``P``
    counts only the weights the setting trains (``trainable``): the gradient of a subset is the
    same whichever other weights train, so settings that differ only there share one backward
    pass, and settings with equal :data:`ROLLOUT_KEYS` share their rollouts (the same pairs, noise
    and rewards: a paired comparison).
    """
    from dataclasses import asdict, replace

    from cellfluxrl.checkpoint import load_run
    from cellfluxrl.commands.demo import DemoConfig, posttrain_config
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.data.pairing import PairedDataset
    from cellfluxrl.rewards import RewardSuite
    from cellfluxrl.rl import nft
    from cellfluxrl.rl.null import within_group_permutation
    from cellfluxrl.rl.reward_worker import RewardWorker, wait_rewards
    from cellfluxrl.rl.rollouts import collect_rollouts, iteration_rng
    from cellfluxrl.rl.step import advantages, build_policies, nft_backward, trainable_parameters

    loaded = load_run(base)
    s = loaded.sampling
    cfgs = [posttrain_config(DemoConfig(), **{**dict(rollout_steps=s.steps, rollout_solver=s.solver,
                                                     rollout_grid=s.grid, cfg_scale=s.cfg_scale, weights=weights,
                                                     kl_weight=0.0, seed=seed), **o}) for o in settings]
    dataset = load_dataset(data)
    device = torch.device("cpu")
    embeddings = torch.as_tensor(np.array(dataset.embeddings))
    policies = build_policies(loaded.net, device, 1, "all")
    subsets = []
    for cfg in cfgs:  # which flattened parameters each setting trains
        probe = copy.deepcopy(loaded.net)
        trainable_parameters(probe, cfg.trainable)
        subsets.append([i for i, p in enumerate(probe.parameters()) if p.requires_grad])
    out = [{"real": [], "shuffled": [], "seconds": 0.0} for _ in cfgs]
    suites: dict = {}
    try:
        for k in range(iters):
            rollouts: dict = {}
            for j, cfg in enumerate(cfgs):
                began = time.perf_counter()
                rkey = tuple(getattr(cfg, key) for key in ROLLOUT_KEYS)
                if rkey not in rollouts:
                    train_weights = cfg.train_weights()
                    key = tuple(train_weights.items())
                    if key not in suites:
                        suite = RewardSuite.from_dataset(dataset, train_weights)
                        suites[key] = (suite, RewardWorker(suite))
                    suite, worker = suites[key]
                    pairs = PairedDataset(dataset, "train", flip_p=0.0, include_ood=False, seed=cfg.seed)
                    ro = collect_rollouts(policies.old, pairs, embeddings, cfg, 1000 + k, 0, cfg.groups_per_step,
                                          device, worker.submit)
                    total, comps, reward_names, _ = wait_rewards(ro.futures)
                    rows = torch.as_tensor(np.concatenate([total[:, None], comps], axis=1), dtype=torch.float64)
                    w = [float(suite.weights.get(name, 0.0)) for name in reward_names]
                    perm = within_group_permutation(rows.shape[0], cfg.group_size, cfg.seed, 1000 + k)
                    rollouts[rkey] = (ro, rows, w, perm, {})
                ro, rows, w, perm, grads = rollouts[rkey]
                lkey = tuple(sorted((key, v) for key, v in asdict(replace(cfg, trainable="all")).items()))
                if lkey not in grads:
                    grads[lkey] = {}
                    for name, table in (("real", rows), ("shuffled", rows[torch.as_tensor(perm)])):
                        r = nft.optimality(advantages(cfg, table, w), cfg.adv_clip).reshape(-1).float()
                        policies.theta.zero_grad(set_to_none=True)
                        nft_backward(policies, ro, r, cfg, iteration_rng(cfg, 1000 + k, 0, 1), device)
                        grads[lkey][name] = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                                             for p in policies.theta.parameters()]
                for name in ("real", "shuffled"):
                    parts = grads[lkey][name]
                    out[j][name].append(torch.cat([parts[i].reshape(-1) for i in subsets[j]]).double().numpy())
                out[j]["seconds"] += time.perf_counter() - began
    finally:
        for suite, worker in suites.values():
            worker.close()
            suite.close()
    return [{name: np.stack(v) if name != "seconds" else v for name, v in o.items()} for o in out]


def agreement(g: np.ndarray) -> tuple[float, float]:
    """Mean and s.e. of the cosine between every two rows of ``g`` (iters, P)."""
    unit = g / np.linalg.norm(g, axis=1, keepdims=True)
    cos = np.array([unit[i] @ unit[j] for i, j in itertools.combinations(range(len(g)), 2)])
    return float(cos.mean()), float(cos.std(ddof=1) / np.sqrt(cos.size))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path)
    p.add_argument("base", type=Path)
    p.add_argument("--set", dest="sets", action="append", default=None,
                   help="PosttrainConfig overrides, KEY=VALUE,... (repeat for several settings)")
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--weights", default=None, help="--weights spec (default: the paper's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| setting | cos(g_i, g_j), real rewards | shuffled rewards (null) | real - null | weights | s |\n"
          "|---|---|---|---|---|---|")
    texts = args.sets or [""]
    results = gradients(args.data, args.base, [parse_set(t) for t in texts], args.iters, args.weights, args.seed)
    for text, res in zip(texts, results):
        (m, se), (m0, se0) = agreement(res["real"]), agreement(res["shuffled"])
        print(f"| {text or 'demo'} | {m:.4f} ± {se:.4f} | {m0:.4f} ± {se0:.4f} | {m - m0:+.4f} | "
              f"{res['real'].shape[1]:,} | {res['seconds']:.0f} |", flush=True)

if __name__ == "__main__":
    main()
