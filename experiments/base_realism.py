"""How real the demo's base model looks, on the tuning validation pairs (issue 30): per seed, the
judge's accuracy, the texture statistic against real, the share of failing pairs, per-compound rewards.

    python experiments/base_realism.py --root experiments/runs/realism --seeds 0,1,2 --tag baseline \\
        [--steps 1000] [--lr 1e-3] [--lr-schedule cosine --warmup 50 --lr-final 0.1] [--batch 16] \\
        [--ema 0.999] [--cfg 2.0] [--sample-steps 5] [--grid edm|uniform] [--solver heun|euler] [--noise-prob 1.0] [--weights ema|model] [--k 4] [--threads 2]

Per seed ``S``: the demo's synthetic dataset of seed S (``ROOT/sS/data``, prepared once and shared
by every tag), a base run pretrained with the demo's settings and the given changes
(``ROOT/sS/TAG``; resumed if present), then, sampled at ``--cfg`` / ``--sample-steps`` with ``--k``
candidates per pair (each pair's value the mean over its candidates):

- the **tuning** half of the validation pairs (``val-tune``: in-distribution compounds; the
  numbers settings are chosen by), and
- the held-out (OOD) compounds' test pairs (``--ood-pairs``, default 64; they have no validation
  pairs: a check that nothing gets worse, never a criterion).

Printed and written to ``ROOT/TAG.json``: judge accuracy, the texture statistic of base and real
and their paired gap, the share of pairs whose base overall reward (the paper's weights) is below
-15, the overall reward, and per compound the base and real overall with the number of pairs.
Sampling-only changes (``--cfg``, ``--sample-steps``, ``--grid``, ``--solver``, ``--weights``) reuse a tag's base runs: give
``--base-tag``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

FAIL_BELOW = -15.0  # a pair "fails" when its base overall reward is below this (issue 30)


def pretrain(data: Path, run: Path, seed: int, args) -> Path:
    """The demo's base run of ``seed`` with the given changes (resumed when present)."""
    from cellfluxrl.commands.demo import DemoConfig, pretrain_config
    from cellfluxrl.distributed import init_distributed
    from cellfluxrl.model.pretrain import train

    cfg = dataclasses.replace(DemoConfig(), seed=seed, pretrain_steps=args.steps or DemoConfig().pretrain_steps,
                              pretrain_batch=args.batch or DemoConfig().pretrain_batch,
                              pretrain_lr=args.lr or DemoConfig().pretrain_lr)
    pcfg = dataclasses.replace(pretrain_config(cfg), lr_schedule=args.lr_schedule, warmup_steps=args.warmup,
                               lr_final=args.lr_final, ema_decay=args.ema)
    if args.noise_prob is not None:
        pcfg = dataclasses.replace(pcfg, noise_prob=args.noise_prob)
    t0 = time.perf_counter()
    train(data, run, pcfg, dist=init_distributed("cpu"))
    print(f"seed {seed}: pretrain {run} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return run


def score(data: Path, run: Path, images: str, split: str, n: int, seed: int, args) -> dict:
    """Per-pair scores of the base run and of the real targets on one pair set."""
    from cellfluxrl.checkpoint import load_run
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.evaluation.candidates import MoAFeatures, Pairs, run_candidates
    from cellfluxrl.evaluation.report import TEXTURE, build_report
    from cellfluxrl.evaluation.scoring import evaluate_sources
    from cellfluxrl.rewards import DEFAULT_WEIGHTS, RewardSuite

    dataset = load_dataset(data)
    pairs = Pairs.from_dataset(dataset, n, seed, split, images=images)
    loaded = load_run(run, device="cpu", weights=args.weights)
    steps = args.sample_steps or loaded.recorded.steps
    cfg_scale = loaded.recorded.cfg_scale if args.cfg is None else args.cfg
    suite = RewardSuite.from_dataset(dataset, dict(DEFAULT_WEIGHTS))
    judge = suite.evaluators.judge("cpu")
    source = run_candidates(loaded.net, dataset, pairs, seed=seed, steps=steps, cfg_scale=cfg_scale,
                            sigma=loaded.recorded.sigma, solver=args.solver or loaded.recorded.solver,
                            grid=args.grid or loaded.recorded.grid)
    t0 = time.perf_counter()
    with torch.no_grad():
        results = evaluate_sources(dataset, pairs, {"base": source}, suite=suite, weights=dict(DEFAULT_WEIGHTS),
                                   features=MoAFeatures(judge), classifier=suite.evaluators.moa_classifier("cpu"),
                                   judge=judge, best_of=(1, args.k), tts_n=args.k, batch_size=32, kid_subset_size=10,
                                   kid_subsets=10, seed=seed)
    suite.close()
    report = build_report(results, split=split)
    base, real = results["scores"]["base"], results["scores"]["real"]
    overall = base.total.mean(axis=1)
    return {"pairs": len(pairs), "images": images, "split": split, "sampling": {"steps": steps, "cfg": cfg_scale,
                                                                     "grid": args.grid or loaded.recorded.grid,
                                                                     "solver": args.solver or loaded.recorded.solver},
            "seconds": time.perf_counter() - t0, "compound": pairs.compound.tolist(),
            "overall": overall.tolist(), "real_overall": real.total[:, 0].tolist(),
            "judge": base.correct.mean(axis=1).tolist(), "real_judge": real.correct[:, 0].astype(float).tolist(),
            "texture": base.texture.mean(axis=1).tolist(), "real_texture": real.texture[:, 0].tolist(),
            "table": {c: {r: report["table"][c][r] for r in ("overall", "moa_accuracy", TEXTURE)}
                      for c in ("base", "real")}}


def summary(s: dict) -> dict:
    """The issue's numbers from per-pair scores (clustered by compound where it is a mean)."""
    from cellfluxrl.evaluation.uncertainty import mean_sem_clustered

    compound = np.asarray(s["compound"])
    out = {}
    for name, values in (("judge", s["judge"]), ("real_judge", s["real_judge"]), ("overall", s["overall"]),
                         ("real_overall", s["real_overall"]), ("texture", s["texture"]),
                         ("real_texture", s["real_texture"]),
                         ("texture_gap", np.subtract(s["texture"], s["real_texture"]))):
        mean, _, clustered = mean_sem_clustered(np.asarray(values, dtype=float), compound)
        out[name] = [mean, clustered]
    failing = np.asarray(s["overall"]) < FAIL_BELOW
    out["failing_share"] = [float(failing.mean()), float(np.sqrt(failing.mean() * (1 - failing.mean()) / failing.size))]
    per = {}
    for c in sorted(set(compound.tolist())):
        m = compound == c
        per[c] = {"n": int(m.sum()), "base": float(np.mean(np.asarray(s["overall"])[m])),
                  "real": float(np.mean(np.asarray(s["real_overall"])[m]))}
    out["per_compound"] = per
    return out


def markdown(tag: str, rows: dict) -> str:
    """One table: per seed and pair set, the issue's numbers (mean [compound-clustered s.e.])."""
    def cell(v):
        return f"{v[0]:.3f} [{v[1]:.3f}]"

    lines = [f"#### {tag}", "", "| seed | pairs | n | judge acc. | real judge | texture base | texture real | "
             "texture gap | overall | share < -15 | compounds < -15 (n) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in rows.items():
        seed, part = key.split("/")
        bad = [f"{c} {v['base']:.1f} ({v['n']})" for c, v in r["per_compound"].items() if v["base"] < FAIL_BELOW]
        lines.append(f"| {seed} | {part} | {r['n']} | {cell(r['judge'])} | {r['real_judge'][0]:.3f} | "
                     f"{cell(r['texture'])} | {r['real_texture'][0]:.4f} | {cell(r['texture_gap'])} | "
                     f"{cell(r['overall'])} | {r['failing_share'][0]:.3f} ± {r['failing_share'][1]:.3f} | "
                     f"{', '.join(bad) or '-'} |")
    return "\n".join(lines)


def paired(root: Path, before: str, after: str) -> str:
    """Paired differences ``after - before`` on the same pairs and noise, per seed and pair set (mean
    [compound-clustered s.e.]), from result files that kept their per-pair values; ``before`` and
    ``after`` may each join several files with commas (their rows merged, later files winning)."""
    from cellfluxrl.evaluation.uncertainty import mean_sem_clustered

    def rows(tags: str) -> dict:
        out = {}
        for tag in tags.split(","):
            out.update(json.loads((root / f"{tag}.json").read_text())["rows"])
        return out

    a, b = rows(before), rows(after)
    lines = [f"#### {after} - {before} (paired)", "", "| seed | pairs | n | judge | overall | texture |", "|---|---|---|---|---|---|"]
    for key in sorted(set(a) & set(b)):
        pa, pb = a[key].get("per_pair"), b[key].get("per_pair")
        if pa is None or pb is None or pa["compound"] != pb["compound"]:
            continue
        compound, cells = np.asarray(pa["compound"]), []
        for name in ("judge", "overall", "texture"):
            mean, _, clustered = mean_sem_clustered(np.subtract(pb[name], pa[name]), compound)
            cells.append(f"{mean:+.3f} [{clustered:.3f}]")
        seed, part = key.split("/")
        lines.append(f"| {seed} | {part} | {len(compound)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), default=None,
                   help="print paired differences AFTER - BEFORE of two result files and exit")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--tag", help="name of this setting (its base runs and results)")
    p.add_argument("--base-tag", default=None, help="sample another tag's base runs (sampling-only changes)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant")
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--lr-final", type=float, default=0.0)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--cfg", type=float, default=None, help="CFG scale [default: the run's recorded]")
    p.add_argument("--sample-steps", type=int, default=None, help="Heun steps [default: the run's recorded]")
    p.add_argument("--grid", choices=("edm", "uniform"), default=None, help="time grid [default: the run's recorded]")
    p.add_argument("--solver", choices=("heun", "euler"), default=None, help="ODE solver [default: the run's recorded]")
    p.add_argument("--noise-prob", type=float, default=None,
                   help="share of training batches with source noise [default: the demo's]")
    p.add_argument("--k", type=int, default=4, help="candidates per pair")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="the run's EMA or raw weights")
    p.add_argument("--ood-pairs", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.compare:
        print(paired(args.root, *args.compare))
        return
    if not args.tag:
        p.error("--tag is required")
    torch.set_num_threads(args.threads)
    from cellfluxrl.commands.demo import DemoConfig, stage_prepare

    rows = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        folder = args.root / f"s{seed}"
        data = stage_prepare(folder, dataclasses.replace(DemoConfig(), seed=seed))
        run = folder / (args.base_tag or args.tag)
        if args.base_tag is None:
            pretrain(data, run, seed, args)
        for part, (images, split, n) in {"val-tune": ("val-tune", "id", 10_000),
                                         "ood-test": ("test", "ood", args.ood_pairs)}.items():
            scores = score(data, run, images, split, n, seed, args)
            rows[f"{seed}/{part}"] = {"n": scores["pairs"], "sampling": scores["sampling"],
                                      "seconds": scores["seconds"], **summary(scores),
                                      "per_pair": {k: scores[k] for k in ("compound", "overall", "judge", "texture")}}
            print(f"seed {seed} {part}: {scores['pairs']} pairs in {scores['seconds']:.0f} s", file=sys.stderr)
    args.root.mkdir(parents=True, exist_ok=True)
    (args.root / f"{args.tag}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                            "rows": rows}, indent=1))
    print(markdown(args.tag, rows))


if __name__ == "__main__":
    main()
