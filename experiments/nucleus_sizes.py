"""Signed morphology statistic per MoA: real targets against each run (RESULTS.md, "What RL trades").

    python experiments/nucleus_sizes.py DATA RUN [RUN ...] [--stat nuc_size] [--n 64] [--k 4]

The rewards are squared deviations, so they cannot say in which direction a run errs. This prints,
per MoA of ``--n`` in-distribution pairs (validation pairs unless ``--pairs test``), the mean of the raw statistic (default the
largest nucleus's area in px, the NucSize reward's ``s``) over the real targets and over each run's
``--k`` candidates per pair (the same pairs and noise seeds as ``evaluate``, each run at its
recorded sampling).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rl_experiment import eval_pairs  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path)
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--stat", default="nuc_size", help="a statistic of the suite's segmentation (RewardResult.stats)")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--pairs", choices=("val", "test"), default="val", help="ID validation (default) or test pairs")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from cellfluxrl.checkpoint import load_run
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.evaluation.candidates import quantize, real_images, run_candidates
    from cellfluxrl.rewards import RewardSuite

    dataset = load_dataset(args.data)
    suite = RewardSuite.from_dataset(str(args.data), {"nuc_size": 1.0})
    pairs = eval_pairs(dataset, args.n, 0, args.pairs)
    moa = np.asarray(pairs.moa)
    batches = [np.arange(b, min(b + args.batch, len(pairs))) for b in range(0, len(pairs), args.batch)]

    def stat(images: torch.Tensor, pos: np.ndarray) -> np.ndarray:
        return np.asarray(suite.score(images, list(moa[pos])).stats[args.stat], dtype=np.float64)

    columns = {"real": np.concatenate([stat(real_images(dataset, pairs, pos), pos) for pos in batches])}
    for run_dir in args.runs:
        run = load_run(run_dir)
        s = run.sampling
        candidates = run_candidates(run.net, dataset, pairs, seed=0, steps=s.steps, cfg_scale=s.cfg_scale,
                                    sigma=s.sigma, grid=s.grid)
        with torch.no_grad():
            per_k = [np.concatenate([stat(quantize(candidates(pos, k)), pos) for pos in batches])
                     for k in range(args.k)]
        columns[run_dir.name] = np.mean(per_k, axis=0)
    suite.close()
    print(f"mean {args.stat} per MoA, {len(pairs)} in-distribution pairs, {args.k} candidates per run\n")
    print("| MoA | n | " + " | ".join(columns) + " |\n|---|---|" + "---|" * len(columns))
    for m in [*np.unique(moa), None]:
        rows = np.ones(len(moa), dtype=bool) if m is None else moa == m
        print(f"| {m or 'all'} | {rows.sum()} | " + " | ".join(f"{v[rows].mean():.1f}" for v in columns.values()) + " |")


if __name__ == "__main__":
    main()
