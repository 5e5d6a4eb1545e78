"""A run's rewards at other sampler step counts, paired against its recorded setting (RESULTS.md,
"Longer RL, finer sampling and the collapse").

    python experiments/sampler_steps.py DATA RUN --steps 10,20 [--n 64] [--k 4] [--seed 0]

Samples ``RUN`` on the first ``--n`` in-distribution test pairs, ``--k`` candidates each from the
same noise seeds, once at its recorded sampling and once per ``--steps`` value (everything else
recorded: solver, grid, CFG, sigma), and prints every reward, the overall reward and the judge's
accuracy: recorded, changed, the paired difference (per pair the mean over the k candidates; mean
± s.e. over pairs) and the real targets. Scores are cached in ``RUN/evalcache_*.npz`` (the same
cache as ``rl_experiment.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rl_experiment import cache_file, mean_se, scores  # noqa: E402
from rl_table import REWARDS  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path)
    p.add_argument("run", type=Path)
    p.add_argument("--steps", required=True, help="comma-separated Heun step counts to compare")
    p.add_argument("--n", type=int, default=64, help="in-distribution pairs")
    p.add_argument("--pairs", choices=("val", "test"), default="val", help="validation (default) or test pairs")
    p.add_argument("--k", type=int, default=4, help="candidates per pair")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from cellfluxrl.checkpoint import load_run

    recorded = load_run(args.run).sampling

    def cached(s) -> dict:
        return scores(args.data, args.run, args.n, args.seed, sampling=s, pairs=args.pairs,
                      cache=cache_file(args.run, args.n, args.seed, s, args.k, args.pairs), k=args.k)

    ref = cached(recorded)
    for steps in (int(v) for v in args.steps.split(",")):
        s = dataclasses.replace(recorded, steps=steps)
        new = cached(s)
        print(f"\n{args.n} in-distribution {args.pairs} pairs x {args.k} candidates: {s.describe()} against {recorded.describe()}\n\n"
              "| row | recorded | changed | changed - recorded | real |\n|---|---|---|---|---|")
        for k in (*REWARDS, "overall", "judge"):
            print(f"| {k} | {mean_se(ref[k])} | {mean_se(new[k])} | {mean_se(new[k] - ref[k])} | "
                  f"{mean_se(ref['real_' + k])} |", flush=True)


if __name__ == "__main__":
    main()
