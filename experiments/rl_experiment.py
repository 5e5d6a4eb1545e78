"""One post-training experiment and its paired evaluation against the base (RESULTS.md, "RL experiments").

    python experiments/rl_experiment.py DATA BASE OUT --set reward_norm=per_reward,lr=3e-4 --steps 20

Post-trains ``BASE`` into ``OUT`` with the demo's settings (``cellfluxrl.commands.demo.posttrain_config``)
rolled out and trained at the base's recorded sampling, changed by ``--set`` (PosttrainConfig keys),
then samples base and RL on the same ``--n`` in-distribution pairs (validation pairs unless
``--pairs test``: :func:`eval_pairs`) and source noise (``--k``
candidates each, at the RL run's recorded setting, which is the base's) and prints every reward,
the overall (paper-weighted) reward and the judge's MoA accuracy: base, RL, paired difference
RL - base (per pair the mean over the k candidates; mean ± s.e. over pairs) and the real targets.
Re-running resumes the RL run; the base's scores are cached in ``BASE/evalcache_*.npz``.

``--null`` is the control for drift, the within-group shuffled-reward null (``posttrain --reward-null``,
:func:`cellfluxrl.rl.null.within_group_permutation`, docs/posttrain.md): each group's reward rows
are permuted among its rollouts before the advantages are computed, by a permutation of
``(seed, iteration, group)`` that a resume reproduces, so the updates have exactly the real run's
advantages per group but carry no reward signal. (Before issue 31 it permuted across every rollout
of an iteration, with a generator that restarted at each resume: experiments/RESULTS.md says which
tables used that across-group null.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gradient_snr import parse_set  # noqa: E402
from rl_table import REWARDS  # noqa: E402


VAL_OFFSET = 256  # tuning pairs of a dataset without a val split: ID test rows from here on (see eval_pairs)


def eval_pairs(dataset, n: int, seed: int, pairs: str = "val"):
    """The pairs a tuning run is scored on: ``"val"`` (default), ``"val-tune"`` (its tuning half) or ``"test"`` (final tables only).

    ``"val"`` takes the dataset's ``val`` split when it has one; a dataset made before that split
    existed gives its in-distribution treated test rows ``VAL_OFFSET .. VAL_OFFSET + n`` in CSV order,
    disjoint by image from the first 256 that any reported table (demo, README: the first 64) reads.
    """
    from cellfluxrl.evaluation.candidates import Pairs
    from cellfluxrl.model.generate import test_pairs

    if pairs == "test":
        return Pairs.from_dataset(dataset, n, seed, split="id")
    if pairs == "val-tune":  # the tuning half (checkpoint selection reads the other, val-select)
        return Pairs.from_dataset(dataset, n, seed, split="id", images="val-tune")
    if pairs != "val":
        raise ValueError(f"pairs must be val, val-tune or test, got {pairs!r}")
    if dataset.select(split="val", state="treated").size:  # prepared with the val split (data/README.md, "Splits")
        return Pairs.from_dataset(dataset, n, seed, split="id", images="val")
    target, _ = test_pairs(dataset, VAL_OFFSET + n, seed, split="id")
    if target.size < VAL_OFFSET + n:
        raise ValueError(f"only {target.size - VAL_OFFSET} validation rows after the first {VAL_OFFSET}")
    from cellfluxrl.data.pairing import draw_controls

    target = target[VAL_OFFSET:]
    control = draw_controls(dataset, "test", target, seed)
    return Pairs(target, control, dataset.condition[target], dataset.table["compound"][target].astype(str),
                 dataset.table["moa"][target].astype(str))


def scores(data: Path, run: Path, n: int, seed: int, sampling=None, cache: Path | None = None, k: int = 1,
           pairs: str = "val") -> dict:
    """Per-pair values of every reward, ``overall`` and ``judge`` (``(n, k)``: k candidates per pair),
    ``real_*`` (``(n,)``) and ``compound`` (``(n,)``, for clustered errors) for one run on
    :func:`eval_pairs` ``pairs``."""
    from cellfluxrl.checkpoint import load_run
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.evaluation.candidates import MoAFeatures, run_candidates
    from cellfluxrl.evaluation.scoring import evaluate_sources
    from cellfluxrl.rewards import DEFAULT_WEIGHTS, RewardSuite

    if cache is not None and cache.is_file():
        return dict(np.load(cache))
    dataset = load_dataset(data)
    suite = RewardSuite.from_dataset(str(data), {name: 1.0 for name in REWARDS})
    classifier, judge = suite.evaluators.moa_classifier("cpu"), suite.evaluators.judge("cpu")
    pairs = eval_pairs(dataset, n, seed, pairs)
    loaded = load_run(run)
    s = sampling or loaded.sampling
    source = run_candidates(loaded.net, dataset, pairs, seed=seed, steps=s.steps, cfg_scale=s.cfg_scale,
                            sigma=s.sigma, grid=s.grid)
    with torch.no_grad():
        res = evaluate_sources(dataset, pairs, {"x": source}, suite=suite, weights=DEFAULT_WEIGHTS,
                               features=MoAFeatures(judge), classifier=classifier, judge=judge, best_of=(1, k),
                               batch_size=32, kid_subset_size=max(2, min(50, n // 2)), kid_subsets=10, seed=seed)
    suite.close()
    sc, real = res["scores"]["x"], res["scores"]["real"]
    out = {r: sc.components[r] for r in REWARDS} | {"overall": sc.total, "judge": sc.correct.astype(float)}
    out |= {f"real_{r}": real.components[r][:, 0] for r in REWARDS}
    out |= {"real_overall": real.total[:, 0], "real_judge": real.correct[:, 0].astype(float)}
    out |= {"compound": np.asarray(pairs.compound, dtype=str)}
    if cache is not None:
        np.savez(cache, **out)
    return out


def cache_file(run: Path, n: int, seed: int, sampling, k: int, pairs: str = "val") -> Path:
    """Where :func:`scores` caches ``run``'s scores on ``n`` ``pairs`` of ``seed`` at ``sampling`` with ``k``
    candidates (test-pair caches keep their old names)."""
    tag = "" if pairs == "test" else f"_{pairs}"
    return run / f"evalcache{tag}_n{n}_s{seed}_k{sampling.steps}_w{sampling.cfg_scale:g}_c{k}.npz"


def clustered_se(v: np.ndarray, clusters: np.ndarray) -> float:
    """Standard error of the mean of ``v`` ``(n,)`` with pairs clustered by ``clusters`` ``(n,)`` (the CR1
    sandwich; :func:`cellfluxrl.evaluation.uncertainty.mean_sem_clustered` owns it)."""
    from cellfluxrl.evaluation.uncertainty import mean_sem_clustered

    return mean_sem_clustered(v, clusters)[2]


def mean_se(v: np.ndarray, clusters: np.ndarray | None = None) -> str:
    """``mean ± s.e.`` over pairs of a ``(n,)`` or ``(n, k)`` array (then first the mean over k); with
    ``clusters`` (the pairs' compounds) the compound-clustered s.e. follows in brackets."""
    v = np.asarray(v, dtype=np.float64)
    v = v.mean(axis=1) if v.ndim == 2 else v
    text = f"{v.mean():+.3f} ± {v.std(ddof=1) / np.sqrt(v.size):.3f}"
    return text if clusters is None else f"{text} [{clustered_se(v, clusters):.3f}]"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path)
    p.add_argument("base", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--set", dest="overrides", default="", help="PosttrainConfig overrides KEY=VALUE,...")
    p.add_argument("--steps", type=int, default=20, help="RL iterations")
    p.add_argument("--n", type=int, default=64, help="in-distribution test pairs")
    p.add_argument("--weights", default=None, help="reward weights NAME=W,... for training (default: the paper's)")
    p.add_argument("--k", type=int, default=4, help="candidates per pair (their mean is paired)")
    p.add_argument("--null", action="store_true", help="shuffle the rewards within each group (the drift control)")
    p.add_argument("--pairs", choices=("val", "val-tune", "test"), default="val",
                   help="scored pairs: validation (both halves, the default), its tuning half, or test (final tables only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from cellfluxrl.checkpoint import load_run
    from cellfluxrl.commands.demo import DemoConfig, posttrain_config
    from cellfluxrl.rl.loop import posttrain

    base_sampling = load_run(args.base).sampling
    settings = dict(steps=args.steps, rollout_steps=base_sampling.steps, rollout_solver=base_sampling.solver,
                    rollout_grid=base_sampling.grid, cfg_scale=base_sampling.cfg_scale, seed=args.seed, save_every=5,
                    weights=args.weights, reward_null=args.null)
    cfg = posttrain_config(DemoConfig(), **{**settings, **parse_set(args.overrides)})  # --set may change the sampler
    start = time.perf_counter()
    posttrain(args.base, args.out, cfg, device="cpu", on_step=lambda st: print(
        f"step {st['step']}: reward {st['reward']:.3f} kl {st['kl']:.2e} ({st['t_step']:.1f} s)", flush=True))
    print(f"posttrain {time.perf_counter() - start:.0f} s")
    s = load_run(args.out).sampling
    b = scores(args.data, args.base, args.n, args.seed, sampling=s, k=args.k, pairs=args.pairs,
               cache=cache_file(args.base, args.n, args.seed, s, args.k, args.pairs))
    r = scores(args.data, args.out, args.n, args.seed, k=args.k, pairs=args.pairs,
               cache=cache_file(args.out, args.n, args.seed, s, args.k, args.pairs))
    print(f"{args.n} in-distribution {args.pairs} pairs x {args.k} candidates at {s.describe()}; mean ± s.e. over "
          f"pairs [s.e. clustered by compound]\n\n| row | base | RL | RL - base | real |\n|---|---|---|---|---|")
    for k in (*REWARDS, "overall", "judge"):
        print(f"| {k} | {mean_se(b[k])} | {mean_se(r[k])} | {mean_se(r[k] - b[k], b['compound'])} | "
              f"{mean_se(b['real_' + k])} |")


if __name__ == "__main__":
    main()
