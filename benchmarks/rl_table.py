"""Evidence for CellFluxRL post-training on CPU: the paper's Table 1 and Table 2 directions.

    python benchmarks/rl_table.py WORK            # full run (about 1.5 h on a free 2-core CPU)
    python benchmarks/rl_table.py WORK --quick    # plumbing check (minutes)
    python benchmarks/rl_table.py WORK --from-demo runs/demo   # reuse the data and base of `cellfluxrl demo`

Stages (each is skipped when its output exists, so a killed run continues where it stopped):

1. ``WORK/data``: synthetic BBBC21-like dataset (``--size`` px, default 48 to fit the CPU budget)
   with its evaluators (reference statistics + MoA classifier).
2. ``WORK/base``: a ``tiny`` CellFlux base model pretrained on CPU.
3. ``WORK/rl_all``: DiffusionNFT post-training on the paper's weighted sum of the 7 rewards,
   at most ``--rl-minutes`` (20) of wall time; ``WORK/rl_nuc_size`` and ``WORK/rl_moa``: single-reward
   runs (paper Table 2) with ``--single-minutes`` (14) each.
4. Evaluation on the same test pairs and the same source noise for every model (paired), the
   in-distribution compounds (the headline) and the held-out (OOD) compounds in separate tables;
   every run sampled with its recorded setting (the base's sampler steps and CFG, which the RL runs
   roll out and train with): every reward, the overall (paper-weighted) reward, the judge's MoA
   accuracy and the reward classifier's, mean +- standard error over pairs, for base, RL and
   RL + best-of-4 (selected by the overall reward); the paired differences RL - base and
   RL+best-of-4 - RL; and the single-reward runs.

Writes ``WORK/rl_table.md`` and ``WORK/rl_table.json`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

REWARDS = ("moa", "nuc_in_cyto", "roundness", "nuc_size", "cyto_size", "nuc_count", "cyto_count")
LABELS = {"moa": "MoA", "nuc_in_cyto": "Nuc-in-Cyto", "roundness": "Roundness", "nuc_size": "NucSize",
          "cyto_size": "CytoSize", "nuc_count": "NucCount", "cyto_count": "CytoCount", "overall": "Overall",
          "moa_accuracy": "MoA accuracy (judge)", "moa_accuracy_reward": "MoA accuracy (reward classifier)"}


def single_reward(name: str) -> str:
    """A ``--weights`` string keeping only ``name`` (the spec is merged into the paper's defaults)."""
    return ",".join(f"{r}={1 if r == name else 0}" for r in REWARDS)


def settings(args) -> dict:
    """Every size and budget of the experiment (``--quick`` shrinks them all)."""
    if args.quick:
        return dict(size=32, n_images=300, plates=2, classifier_epochs=2, pretrain_steps=20, pretrain_batch=8,
                    sample_steps=3, cfg_scale=args.cfg_scale,
                    rl=dict(steps=2, group_size=4, groups_per_step=2, rollout_batch=8,
                            train_timesteps=2, grid_every=1, save_every=1, lr=1e-4),
                    rl_minutes=0.0, single_minutes=0.0, single_steps=1, pairs=8)
    return dict(size=args.size, n_images=args.n_images, plates=4, classifier_epochs=20,
                pretrain_steps=args.pretrain_steps, pretrain_batch=16,
                sample_steps=args.sample_steps, cfg_scale=args.cfg_scale,
                rl=dict(steps=10_000, group_size=args.group_size, groups_per_step=args.groups_per_step,
                        rollout_batch=32, train_timesteps=args.train_timesteps,
                        grid_every=10, save_every=5, lr=args.rl_lr, kl_weight=args.kl_weight),
                rl_minutes=args.rl_minutes, single_minutes=args.single_minutes, single_steps=10_000,
                pairs=args.pairs)


def reuse_demo(work: Path, demo: Path) -> None:
    """Copy ``DEMO/data`` and ``DEMO/base`` (made by ``cellfluxrl demo``) into ``WORK`` unless present."""
    import shutil

    for part in ("data", "base"):
        if not (work / part).exists():
            if not (demo / part).is_dir():
                raise SystemExit(f"error: {demo / part} is not a folder (run `cellfluxrl demo --out {demo}` first)")
            shutil.copytree(demo / part, work / part)
    (work / "from-demo.txt").write_text(f"{demo.resolve()}\n")


def stage_data(work: Path, s: dict, seed: int) -> Path:
    from cellfluxrl.data.synthetic import prepare_synthetic
    from cellfluxrl.evaluators import fit_evaluators

    data = work / "data"
    if not (data / "evaluators").is_dir():
        if not (data / "meta.json").is_file():
            prepare_synthetic(data, n_images=s["n_images"], seed=seed, size=s["size"], n_plates=s["plates"],
                              progress=True)
        print(fit_evaluators(data, seed=seed, progress=True, classifier_epochs=s["classifier_epochs"]))
    return data


def stage_base(work: Path, data: Path, s: dict, seed: int) -> Path:
    from cellfluxrl.config import PretrainConfig
    from cellfluxrl.pretrain import train

    run = work / "base"
    if (work / "from-demo.txt").is_file():
        return run
    cfg = PretrainConfig(preset="tiny", steps=s["pretrain_steps"], batch_size=s["pretrain_batch"], seed=seed,
                         ckpt_every=max(1, min(500, s["pretrain_steps"])), sample_steps=s["sample_steps"],
                         sample_cfg_scale=s["cfg_scale"])
    start = time.perf_counter()
    train(data, run, cfg, compile=False)
    print(f"pretrain: {s['pretrain_steps']} steps ({(time.perf_counter() - start) / 60:.1f} min this call)")
    return run


def stage_rl(work: Path, base: Path, name: str, weights: str | None, steps: int, minutes: float, s: dict,
             seed: int) -> tuple[Path, dict]:
    from cellfluxrl.checkpoint import load_run
    from cellfluxrl.posttrain import PosttrainConfig, posttrain

    run, done = work / name, work / f"{name}.done.json"
    if done.is_file():
        return run, json.loads(done.read_text())
    # Roll out (and train the guided velocity) exactly as the base is sampled: one setting everywhere.
    sampling = load_run(base).sampling
    cfg = PosttrainConfig(**{**s["rl"], "steps": steps}, rollout_steps=sampling.steps, cfg_scale=sampling.cfg_scale,
                          weights=weights, max_minutes=minutes, seed=seed)
    start = time.perf_counter()
    posttrain(base, run, cfg, device="cpu",
              on_step=lambda st: print(f"  {name} step {st['step']}: reward {st['reward']:.3f} kl {st['kl']:.2e} "
                                       f"({st['t_step']:.1f} s, wait {st['reward_wait_share']:.1%})", flush=True))
    records = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    info = {"steps": records[-1]["step"], "minutes": (time.perf_counter() - start) / 60,
            "train_minutes": sum(r["t_step"] for r in records) / 60,
            "images_per_s": float(np.mean([r["images_per_s"] for r in records])),
            "reward_wait_share": float(np.mean([r["reward_wait_share"] for r in records])),
            "weights": weights or "paper", "config": {**s["rl"], "steps": steps, "max_minutes": minutes}}
    done.write_text(json.dumps(info, indent=2))
    return run, info


def reward_trend(run: Path, k: int = 20) -> tuple[float, float]:
    """Mean training (rollout) reward of the first and of the last ``k`` post-training steps of ``run``."""
    rewards = [json.loads(line)["reward"] for line in (run / "stats.jsonl").read_text().splitlines()]
    return float(np.mean(rewards[:k])), float(np.mean(rewards[-k:]))


def evaluate_runs(data: Path, runs: dict[str, Path], s: dict, seed: int, split: str) -> dict:
    """Per-pair scores of every run on the same pairs and source noise of one compound split
    (``"id"`` or ``"ood"``), each run sampled with its recorded setting: name -> _Scores (P, 4)."""
    from cellfluxrl.checkpoint import load_run
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.evaluate import MoAFeatures, Pairs, evaluate_sources, run_candidates
    from cellfluxrl.rewards import DEFAULT_WEIGHTS, RewardSuite

    dataset = load_dataset(data)
    suite = RewardSuite.from_dataset(str(data), {name: 1.0 for name in REWARDS})
    classifier, judge = suite.evaluators.moa_classifier("cpu"), suite.evaluators.judge("cpu")
    pairs = Pairs.from_dataset(dataset, s["pairs"], seed, split=split)
    sources = {}
    for name, run in runs.items():
        loaded = load_run(run)
        sampling = loaded.sampling
        sources[name] = run_candidates(loaded.net, dataset, pairs, seed=seed, steps=sampling.steps,
                                       cfg_scale=sampling.cfg_scale, sigma=sampling.sigma, grid=sampling.grid)
    with torch.no_grad():
        results = evaluate_sources(dataset, pairs, sources, suite=suite, weights=DEFAULT_WEIGHTS,
                                   features=MoAFeatures(judge), classifier=classifier, judge=judge, best_of=(1, 4),
                                   batch_size=32, kid_subset_size=max(2, min(100, len(pairs) // 2)),
                                   kid_subsets=20, seed=seed)
    suite.close()
    return results["scores"]


def columns(scores) -> dict[str, dict[str, np.ndarray]]:
    """Per-pair values (P,) of every row for N = 1 and best-of-4 of each run."""
    from cellfluxrl.metrics import best_of_n

    out = {}
    for name, sc in scores.items():
        if name == "real":
            continue
        rows = np.arange(sc.total.shape[0])
        for label, pick in ((name, np.zeros(rows.size, dtype=np.int64)), (f"{name}+best-of-4", best_of_n(sc.total, 4))):
            values = {r: sc.components[r][rows, pick] for r in REWARDS}
            values["overall"] = sc.total[rows, pick]
            values["moa_accuracy"] = sc.correct[rows, pick].astype(np.float64)
            values["moa_accuracy_reward"] = sc.correct_reward[rows, pick].astype(np.float64)
            out[label] = values
    return out


def mean_se(v: np.ndarray) -> str:
    v = np.asarray(v, dtype=np.float64)
    se = v.std(ddof=1) / np.sqrt(v.size) if v.size > 1 else 0.0
    return f"{v.mean():.3f} ± {se:.3f}"


def markdown(cols: dict, info: dict, s: dict, ood: dict | None = None, sampling: str = "") -> str:
    rows = [*REWARDS, "overall", "moa_accuracy", "moa_accuracy_reward"]
    heads = ["base", "base+best-of-4", "rl_all", "rl_all+best-of-4"]
    lines = ["### Table 1 direction, in-distribution compounds: base vs RL vs RL + best-of-4 (paired)", "",
             f"{len(cols['base']['overall'])} held-out test pairs of in-distribution compounds, every run sampled "
             f"with its recorded setting ({sampling}), {s['size']}x{s['size']} synthetic crops; mean ± s.e. over "
             f"pairs; Δ columns are paired differences.", "",
             "| Metric | " + " | ".join(heads) + " | Δ RL − base | Δ RL+bo4 − RL |", "|---" * (len(heads) + 3) + "|"]
    for r in rows:
        cells = [mean_se(cols[h][r]) for h in heads]
        cells += [mean_se(cols["rl_all"][r] - cols["base"][r]), mean_se(cols["rl_all+best-of-4"][r] - cols["rl_all"][r])]
        lines.append(f"| {LABELS[r]} | " + " | ".join(cells) + " |")
    if ood is not None:
        lines += ["", "### The same on the held-out (OOD) compounds (never seen in pretraining or RL)", "",
                  f"{len(ood['base']['overall'])} test pairs.", "",
                  "| Metric | " + " | ".join(heads) + " | Δ RL − base |", "|---" * (len(heads) + 2) + "|"]
        for r in rows:
            cells = [mean_se(ood[h][r]) for h in heads] + [mean_se(ood["rl_all"][r] - ood["base"][r])]
            lines.append(f"| {LABELS[r]} | " + " | ".join(cells) + " |")
    singles = [c for c in ("rl_nuc_size", "rl_moa") if c in cols]
    heads2 = [h for c in singles for h in (c, f"Δ {c} − base")] + ["rl_all", "base"]
    lines += ["", "### Table 2 direction: single-reward runs (Δ: paired difference to the base)", "",
              "| Metric | " + " | ".join(heads2) + " |", "|---" * (len(heads2) + 1) + "|"]
    for r in rows:
        cells = [cell for c in singles for cell in (mean_se(cols[c][r]), mean_se(cols[c][r] - cols["base"][r]))]
        cells += [mean_se(cols["rl_all"][r]), mean_se(cols["base"][r])]
        lines.append(f"| {LABELS[r]} | " + " | ".join(cells) + " |")
    lines += ["", "### Post-training runs", "", "| Run | weights | steps | minutes | images/s | reward wait share | "
              "rollout reward, first 20 → last 20 steps |", "|---|---|---|---|---|---|---|"]
    for name, i in info.items():
        lines.append(f"| {name} | {i['weights']} | {i['steps']} | {i['train_minutes']:.1f} | {i['images_per_s']:.2f} | "
                     f"{i['reward_wait_share']:.1%} | {i['trend'][0]:.3f} → {i['trend'][1]:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("work", type=Path)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the plumbing in minutes")
    p.add_argument("--size", type=int, default=48, help="crop size (px); 96 is the paper's but 4x the CPU time")
    p.add_argument("--from-demo", type=Path, help="reuse DEMO/data and DEMO/base of `cellfluxrl demo --out DEMO`")
    p.add_argument("--n-images", type=int, default=3000, help="crops simulated (the demo's 3,000)")
    p.add_argument("--pretrain-steps", type=int, default=1000, help="tiny base steps at batch 16 (the demo's)")
    p.add_argument("--rl-minutes", type=float, default=20.0, help="wall-time cap of the all-rewards posttrain")
    p.add_argument("--single-minutes", type=float, default=14.0, help="wall-time cap of each single-reward run")
    p.add_argument("--rl-lr", type=float, default=6e-5, help="posttrain lr (paper 2e-5 over 1200 larger steps)")
    p.add_argument("--kl-weight", type=float, default=0.1)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--groups-per-step", type=int, default=8)
    p.add_argument("--sample-steps", type=int, default=10,
                   help="Heun steps the base records (RL rolls out with the base's recorded steps)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="CFG the base records (RL trains at the base's)")
    p.add_argument("--train-timesteps", type=int, default=2)
    p.add_argument("--pairs", type=int, default=256, help="held-out test pairs evaluated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = settings(args)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.from_demo:
        reuse_demo(work, args.from_demo)
    data = stage_data(work, s, args.seed)
    base = stage_base(work, data, s, args.seed)
    runs, info = {"base": base}, {}
    runs["rl_all"], info["rl_all"] = stage_rl(work, base, "rl_all", None, s["rl"]["steps"], s["rl_minutes"], s, args.seed)
    for reward in ("nuc_size", "moa"):
        name = f"rl_{reward}"
        runs[name], info[name] = stage_rl(work, base, name, single_reward(reward), s["single_steps"],
                                          s["single_minutes"], s, args.seed)
    for name in info:
        info[name]["trend"] = reward_trend(runs[name])
    from cellfluxrl.checkpoint import load_run

    sampling = "; ".join(f"{name}: {load_run(run).sampling.describe()}" for name, run in runs.items()
                         if name in ("base", "rl_all"))
    key = {"runs": {name: i["steps"] for name, i in info.items()}, "pairs": s["pairs"], "sampling": sampling}
    per_split = {}
    for split in ("id", "ood"):
        cache = work / f"eval_columns_{split}.json"
        cached = json.loads(cache.read_text()) if cache.is_file() else {}
        if cached.get("key") == key:  # same runs, pairs and sampler: reuse the per-pair scores
            cols = {c: {r: np.asarray(v) for r, v in vals.items()} for c, vals in cached["columns"].items()}
        else:
            cols = columns(evaluate_runs(data, runs, s, args.seed, split))
            cache.write_text(json.dumps({"key": key, "columns": {c: {r: v.tolist() for r, v in vals.items()}
                                                                 for c, vals in cols.items()}}))
        per_split[split] = cols
    text = markdown(per_split["id"], info, s, ood=per_split["ood"], sampling=sampling)
    (work / "rl_table.md").write_text(text)
    (work / "rl_table.json").write_text(json.dumps(
        {"settings": {k: v for k, v in s.items()}, "runs": info, "sampling": sampling,
         "columns": {split: {c: {r: v.tolist() for r, v in vals.items()} for c, vals in cols.items()}
                     for split, cols in per_split.items()}}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
