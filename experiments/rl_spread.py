"""Training randomness in the error bars (issue 31, item 4): several RL runs of one recipe on one base,
each scored by ``rl_experiment.py`` on the same pairs and noise, against that base.

    python experiments/rl_spread.py BASE/evalcache_X.npz RUN1/evalcache_X.npz RUN2/evalcache_X.npz [...]

For every reward row, ``overall`` and the judge: each run's paired gain over the base (per pair the mean
over its candidates; mean [compound-clustered s.e.]), the mean of the runs' gains, the between-run
standard deviation of the gains, and an s.e. of that mean which counts the training's randomness: the
larger of ``sd / sqrt(R)`` (between runs) and ``sqrt(sum of the within-run s.e.^2) / R`` (the pairs'
noise alone), the rule issue 31 fixes for pooling seeds. The within-run s.e. alone is conditional on one
trained model; this one is not.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rl_compare import ROWS  # noqa: E402


def pooled(gains: np.ndarray, within: np.ndarray) -> tuple[float, float, float]:
    """``(mean, between-run sd, s.e.)`` of R runs' gains ``(R,)`` with their within-run s.e. ``(R,)``."""
    r = gains.size
    sd = float(gains.std(ddof=1)) if r > 1 else float("nan")
    se = max(sd / np.sqrt(r) if r > 1 else 0.0, float(np.sqrt(np.sum(within ** 2))) / r)
    return float(gains.mean()), sd, se


def main(argv=None) -> None:
    from cellfluxrl.evaluation.uncertainty import mean_sem_clustered

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", type=Path, help="the base's scores (rl_experiment.py's cache)")
    p.add_argument("runs", type=Path, nargs="+", help="the RL runs' scores on the same pairs and noise")
    args = p.parse_args(argv)
    base = np.load(args.base, allow_pickle=True)
    runs = [np.load(path, allow_pickle=True) for path in args.runs]
    compound = base["compound"].astype(str)
    for path, run in zip(args.runs, runs):
        if not np.array_equal(run["compound"].astype(str), compound):
            sys.exit(f"{path}: scored on other pairs than {args.base}")
    names = [path.parent.name for path in args.runs]
    print(f"| row | {' | '.join(names)} | mean of runs | between-run sd | s.e. with training randomness |")
    print("|---" * (len(names) + 4) + "|")
    for row in ROWS:
        gains, within = [], []
        for run in runs:
            mean, _, clustered = mean_sem_clustered(run[row].mean(axis=1) - base[row].mean(axis=1), compound)
            gains.append(mean)
            within.append(clustered)
        mean, sd, se = pooled(np.array(gains), np.array(within))
        cells = " | ".join(f"{g:+.3f} [{w:.3f}]" for g, w in zip(gains, within))
        print(f"| {row} | {cells} | {mean:+.3f} | {sd:.3f} | {se:.3f} |")


if __name__ == "__main__":
    main()
