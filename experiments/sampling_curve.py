"""MoA accuracy (judge) against sampler steps and CFG scale for one run: how to sample a base.

    python experiments/sampling_curve.py DATA RUN --steps 5,10,20 --cfg 0,0.2,1,2 --n 128 [--split val]

Every setting is evaluated on the same pairs (``--split val``, the default: in-distribution validation
pairs, ``rl_experiment.eval_pairs``; ``id``/``ood``: test pairs, for a final table only) and the same source noise (paired), with the
evaluation pipeline of ``cellfluxrl evaluate`` (8-bit quantisation, the reward suite, the judge and
the reward classifier). Prints a markdown table: one row per (steps, CFG) with the judge's MoA
accuracy, the reward classifier's, the overall (paper-weighted) reward and FD on the judge's
features, and the seconds spent; ``--json FILE`` writes the same numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rl_experiment import eval_pairs  # noqa: E402

REWARDS = ("moa", "nuc_in_cyto", "roundness", "nuc_size", "cyto_size", "nuc_count", "cyto_count")


def parse_list(text: str, kind=float) -> list:
    return [kind(item) for item in text.split(",") if item.strip()]


def curve(data: Path, run: Path, steps: list[int], cfgs: list[float], n: int, split: str, seed: int) -> list[dict]:
    """One dict per (steps, cfg): accuracies and overall reward (mean, s.e.), FD, seconds."""
    from cellfluxrl.checkpoint import load_run
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.evaluation.candidates import MoAFeatures, Pairs, run_candidates
    from cellfluxrl.evaluation.report import build_report
    from cellfluxrl.evaluation.scoring import evaluate_sources
    from cellfluxrl.rewards import DEFAULT_WEIGHTS, RewardSuite

    dataset = load_dataset(data)
    suite = RewardSuite.from_dataset(dataset, dict(DEFAULT_WEIGHTS))
    classifier, judge = suite.evaluators.moa_classifier("cpu"), suite.evaluators.judge("cpu")
    pairs = eval_pairs(dataset, n, seed, "val") if split == "val" else Pairs.from_dataset(dataset, n, seed, split=split)
    net = load_run(run).net
    rows = []
    for s in steps:
        for w in cfgs:
            name = f"{s} steps, CFG {w:g}"
            source = run_candidates(net, dataset, pairs, seed=seed, steps=s, cfg_scale=w)
            t0 = time.perf_counter()
            with torch.no_grad():
                results = evaluate_sources(dataset, pairs, {name: source}, suite=suite, weights=dict(DEFAULT_WEIGHTS),
                                           features=MoAFeatures(judge), classifier=classifier, judge=judge,
                                           best_of=(1,), batch_size=32, kid_subset_size=min(100, len(pairs) // 2),
                                           kid_subsets=10, seed=seed)
            cells = build_report(results, split="id" if split == "val" else split)["table"]
            rows.append({"steps": s, "cfg_scale": w, "seconds": time.perf_counter() - t0,
                         **{k: cells[name][k] for k in ("moa_accuracy", "moa_accuracy_reward", "overall") + REWARDS},
                         "real": {k: cells["real"][k] for k in ("moa_accuracy", "overall") + REWARDS},
                         "fd_judge": cells[name]["FD-judge-jk_o"]["mean"],  # jackknife-corrected: n < D here
                         "real_moa_accuracy": cells["real"]["moa_accuracy"]["mean"]})
            print(f"{name}: judge accuracy {rows[-1]['moa_accuracy']['mean']:.3f}", flush=True)
    suite.close()
    return rows


def markdown(rows: list[dict], n: int, split: str) -> str:
    """Two tables: accuracies/overall/FD per setting, then every reward per setting beside the real images'."""
    f = lambda c: f"{c['mean']:.3f} ± {c['sem']:.3f}"  # noqa: E731
    lines = [f"{n} {split} pairs, same pairs and source noise for every setting; real images: judge accuracy "
             f"{rows[0]['real_moa_accuracy']:.3f}.", "",
             "| Heun steps | CFG | MoA accuracy (judge) | MoA accuracy (reward clf) | Overall | FD-judge | s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['steps']} | {r['cfg_scale']:g} | {f(r['moa_accuracy'])} | {f(r['moa_accuracy_reward'])} | "
                     f"{f(r['overall'])} | {r['fd_judge']:.2f} | {r['seconds']:.0f} |")
    g = lambda c: f"{c['mean']:.3f}"  # noqa: E731
    lines += ["", "| Heun steps | CFG | " + " | ".join(REWARDS) + " |", "|---|---|" + "---|" * len(REWARDS)]
    for r in rows:
        lines.append(f"| {r['steps']} | {r['cfg_scale']:g} | " + " | ".join(g(r[k]) for k in REWARDS) + " |")
    lines.append("| real | - | " + " | ".join(g(rows[0]["real"][k]) for k in REWARDS) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path)
    p.add_argument("run", type=Path)
    p.add_argument("--steps", default="5,10,20")
    p.add_argument("--cfg", default="0,0.2,1,2")
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--split", default="val", choices=["val", "id", "ood", "all"],
                   help="val: ID validation pairs (tuning); id/ood/all: test pairs (final tables only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = curve(args.data, args.run, parse_list(args.steps, int), parse_list(args.cfg), args.n, args.split, args.seed)
    print(markdown(rows, args.n, args.split))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
