"""Paired differences between runs scored by ``rl_experiment.py`` (RESULTS.md, "RL recipe").

    python experiments/rl_compare.py A/evalcache_val_n64_s0_k5_w2_c4.npz B/evalcache_val_n64_s0_k5_w2_c4.npz [C ...]

Each file holds one run's per-pair scores on the same pairs and source noise (``rl_experiment.scores``);
prints, for every reward row, ``overall`` and the judge's accuracy, the mean ± per-pair s.e.
[compound-clustered s.e.] of each file after the first minus the first (per pair the mean over its
candidates). Refuses files scored on different pairs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rl_experiment import mean_se  # noqa: E402
from rl_table import REWARDS  # noqa: E402

ROWS = (*REWARDS, "overall", "judge")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reference", type=Path, help="the run every other is paired against (e.g. the null or the base)")
    p.add_argument("others", type=Path, nargs="+")
    args = p.parse_args(argv)
    for path in (args.reference, *args.others):
        if not path.is_file():
            raise SystemExit(f"error: {path}: no such score file (run rl_experiment.py on that run first)")
    ref = dict(np.load(args.reference))
    others = [dict(np.load(path)) for path in args.others]
    for path, other in zip(args.others, others):
        if not np.array_equal(other["compound"], ref["compound"]) or not np.array_equal(
                other["real_overall"], ref["real_overall"]):
            raise SystemExit(f"error: {path} was scored on other pairs than {args.reference}")
    names = [f"{path.parent.name} - {args.reference.parent.name}" for path in args.others]
    print("| row | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for row in ROWS:
        cells = [mean_se(other[row] - ref[row], ref["compound"]) for other in others]
        print(f"| {row} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
