"""Evidence for CellFluxRL post-training on CPU: the paper's Table 1 and Table 2 directions.

    python experiments/rl_table.py WORK --from-demo runs/demo    # reuse the demo's data, base and RL run
    python experiments/rl_table.py WORK                          # everything from scratch, the demo's settings
    python experiments/rl_table.py WORK --quick                  # plumbing check (a few minutes)
    python experiments/rl_table.py WORK --from-demo runs/demo --singles moa,nuc_size --single-steps 40

One source of truth: every size and setting (data, base, RL, sampling) is the demo's
(:class:`cellfluxrl.commands.demo.DemoConfig`; ``--quick``: its ``quick`` preset; ``--from-demo DEMO``:
the settings recorded in ``DEMO/demo.json``), built by the demo's own ``stage_prepare``,
``stage_pretrain`` and ``posttrain_config``. To change the base (crop size, pretraining steps, ...)
make a demo with those options and pass ``--from-demo``. Budgets are RL iterations, not minutes.
``WORK/settings.json`` records the settings; a WORK made with other ones is refused.

Stages (each is skipped when its output exists, so a killed run continues where it stopped):

1. ``WORK/data``: the demo's synthetic dataset with its evaluators (``demo.stage_prepare``), or a
   copy of ``DEMO/data``.
2. ``WORK/base``: the demo's CellFlux base (``demo.stage_pretrain``), or a copy of ``DEMO/base``.
3. ``WORK/rl_all``: DiffusionNFT on the paper's weighted sum of the 7 rewards, ``--rl-steps``
   iterations (default: the demo's ``posttrain_steps``); with ``--from-demo``, ``DEMO/rl`` is used
   instead when it is finished, has that many steps and the same settings.
   ``WORK/rl_<reward>`` for each of ``--singles`` (default all seven): the same RL on that reward
   alone (paper Table 2), ``--single-steps`` iterations each. A finished run leaves
   ``WORK/<run>.done.json``; a run with fewer steps than asked is extended (resumed).
4. Evaluation on the same test pairs and the same source noise for every model (paired), the
   in-distribution compounds (the headline) and the held-out (OOD) compounds apart, ``--pairs``
   per split (default: the demo's ``eval_pairs``); every run sampled with its recorded setting (the
   base's sampler steps and CFG, which the RL runs roll out and train with). Every run gets 4
   candidates per pair from the same noise seeds; a run's column is per pair the mean over its 4
   (best-of-4 for Table 1: each candidate weighted by its chance of being the best of 4, which with
   4 candidates is the best one). Per-pair scores are cached per run in
   ``WORK/eval_columns_{id,ood}.json``, keyed by the run (path, steps, sampling), the pairs and the seed.

Tables (``WORK/rl_table.md``, ``WORK/rl_table.json``, also printed):

* Table 1 (base, base+best-of-4, RL, RL+best-of-4; paired Δ RL − base and Δ RL+bo4 − RL), ID and OOD.
* Table 2: rows the 7 rewards, overall and the judge's MoA accuracy; columns the base, then for
  each single-reward run its paired Δ to the base (own reward in bold), then rl_all's Δ; below it,
  per run, the own reward's Δ and its rank among the 7 reward Δ's in units of each reward's
  base s.d. (1 = the run raised its own reward most).
* The post-training runs (steps, minutes, images/s, rollout reward first → last 20 steps).

CPU time (2 quiet cores, the demo's settings): about ``steps x 15 s`` per RL run (32 rollouts of
the demo's sampler per step), i.e. with the demo's 20 steps ~5 min per run and ~40 min for rl_all +
7 singles (~35 min with ``--from-demo`` reusing DEMO/rl); evaluation about the demo's evaluate stage
((2 + 7) x 4 candidates x 64 pairs x 2 splits, against its 2 x 8 x 64 x 2: ~2.3x); data and base as
in the demo when not reused. ``--quick``: about 2 minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

REWARDS = ("moa", "nuc_in_cyto", "roundness", "nuc_size", "cyto_size", "nuc_count", "cyto_count")
LABELS = {"moa": "MoA", "nuc_in_cyto": "Nuc-in-Cyto", "roundness": "Roundness", "nuc_size": "NucSize",
          "cyto_size": "CytoSize", "nuc_count": "NucCount", "cyto_count": "CytoCount", "overall": "Overall",
          "moa_accuracy": "MoA accuracy (judge)", "moa_accuracy_reward": "MoA accuracy (reward classifier)"}
TTS_N = 4  # Table 1's best-of column (paper: best-of-4)
# DemoConfig fields that are budgets or report options here (--rl-steps, --single-steps, --pairs, TTS_N),
# not settings of the data, base or RL: a WORK folder may be re-run with other values of them.
BUDGETS = ("posttrain_steps", "eval_pairs", "best_of", "tts_n")


def single_reward(name: str) -> str:
    """A ``--weights`` string keeping only ``name`` (the spec is merged into the paper's defaults)."""
    return ",".join(f"{r}={1 if r == name else 0}" for r in REWARDS)


# --------------------------------------------------------------------------- settings (the demo's)

def demo_config(quick: bool, from_demo: Path | None, seed: int | None):
    """The demo's settings: DEMO/demo.json with ``--from-demo``, else the default (or quick) preset."""
    from cellfluxrl.commands.demo import DEMO_PRESETS, DemoConfig

    cfg = DEMO_PRESETS["quick"] if quick else DemoConfig()
    if from_demo is not None:
        path = from_demo / "demo.json"
        if path.is_file():
            stored = json.loads(path.read_text())
            names = [f.name for f in dataclasses.fields(DemoConfig)]
            unknown, missing = sorted(set(stored) - set(names)), [k for k in names if k not in stored]
            if unknown:
                print(f"note: {path} has settings this DemoConfig lacks (ignored): {', '.join(unknown)}")
            if missing:
                print(f"note: {path} predates {', '.join(missing)}: using today's DemoConfig defaults for them")
            cfg = DemoConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k in names})
        else:
            print(f"note: {path} not found: using the demo's {'quick' if quick else 'default'} settings")
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=seed)
    return cfg


def check_settings(work: Path, cfg) -> None:
    """Record the demo settings in ``WORK/settings.json``; refuse a WORK made with other ones (budgets aside)."""
    path = work / "settings.json"
    current = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(cfg))).items() if k not in BUDGETS}
    if path.is_file():
        stored = json.loads(path.read_text())
        diff = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
        if diff:
            raise SystemExit(f"error: {work} was made with other demo settings ({', '.join(diff)}); "
                             f"use a new WORK (see {path})")
        return
    path.write_text(json.dumps(current, indent=2) + "\n")


def posttrain_config(cfg, steps: int, weights: str | None):
    """The demo's PosttrainConfig (:func:`cellfluxrl.commands.demo.posttrain_config`) with ``steps``
    iterations on ``weights`` (None: the paper's weighted sum)."""
    from cellfluxrl.commands.demo import posttrain_config as demo_posttrain_config

    return demo_posttrain_config(cfg, steps=steps, weights=weights, save_every=max(1, min(10, steps)))


def _plain(pcfg) -> dict:
    from cellfluxrl.config import config_to_dict

    return json.loads(json.dumps(config_to_dict(pcfg)))


def _config_diff(stored: dict, pcfg, ignore=("steps", "save_every", "max_minutes")) -> list[str]:
    """PosttrainConfig fields whose stored value differs from ``pcfg``'s (budgets ignored)."""
    current = _plain(pcfg)
    return sorted(k for k in current if k not in ignore and k in stored and stored[k] != current[k])


# --------------------------------------------------------------------------- stages

def reuse_demo(work: Path, demo: Path) -> None:
    """Copy ``DEMO/data`` and ``DEMO/base`` (made by ``cellfluxrl demo``) into ``WORK`` unless present."""
    for part in ("data", "base"):
        if not (work / part).exists():
            if not (demo / part).is_dir():
                raise SystemExit(f"error: {demo / part} is not a folder (run `cellfluxrl demo --out {demo}` first)")
            shutil.copytree(demo / part, work / part)
    (work / "from-demo.txt").write_text(f"{demo.resolve()}\n")


def stage_data(work: Path, cfg) -> Path:
    from cellfluxrl.commands.demo import stage_prepare

    return stage_prepare(work, cfg)


def stage_base(work: Path, data: Path, cfg) -> Path:
    from cellfluxrl.commands.demo import stage_pretrain

    if (work / "from-demo.txt").is_file():
        return work / "base"
    return stage_pretrain(data, work, cfg, "cpu")


def _records(run: Path) -> list[dict]:
    path = run / "stats.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def run_info(run: Path) -> dict:
    """Steps, times and settings of a posttrain run, from its ``config.json`` and ``stats.jsonl``."""
    records, config = _records(run), json.loads((run / "config.json").read_text())
    weights = config.get("reward_weights", {})
    return {"path": str(run.resolve()), "steps": int(records[-1]["step"]) if records else 0,
            "planned_steps": int(config["posttrain"]["steps"]),
            "train_minutes": sum(r["t_step"] for r in records) / 60,
            "images_per_s": float(np.mean([r["images_per_s"] for r in records])) if records else float("nan"),
            "reward_wait_share": float(np.mean([r["reward_wait_share"] for r in records])) if records else float("nan"),
            "weights": ",".join(f"{k}={v:g}" for k, v in weights.items()), "config": config["posttrain"]}


def demo_rl(demo: Path, steps: int, pcfg) -> Path | None:
    """``DEMO/rl`` when it is a finished posttrain run of ``steps`` steps with ``pcfg``'s settings."""
    run = demo / "rl"
    if not all((run / f).is_file() for f in ("config.json", "stats.jsonl", "checkpoint.pt")):
        return None
    info = run_info(run)
    why = None
    if json.loads((run / "config.json").read_text()).get("kind") != "posttrain":
        why = "not a posttrain run"
    elif info["steps"] < info["planned_steps"]:
        why = f"unfinished ({info['steps']} of {info['planned_steps']} steps)"
    elif info["steps"] != steps:
        why = f"{info['steps']} steps, --rl-steps {steps}"
    elif info["config"].get("weights"):
        why = f"weights {info['config']['weights']!r}, not the paper's"
    elif _config_diff(info["config"], pcfg):
        why = f"other settings ({', '.join(_config_diff(info['config'], pcfg))})"
    if why:
        print(f"not reusing {run} as rl_all: {why}; training WORK/rl_all")
        return None
    return run


def stage_rl(work: Path, base: Path, name: str, weights: str | None, steps: int, cfg) -> tuple[Path, dict]:
    """Post-train (or resume/extend) ``WORK/name``; returns the run and :func:`run_info`."""
    from cellfluxrl.rl.loop import posttrain

    run, done = work / name, work / f"{name}.done.json"
    pcfg = posttrain_config(cfg, steps, weights)
    if done.is_file():
        info = json.loads(done.read_text())
        diff = _config_diff(info["config"], pcfg)
        if diff:
            raise SystemExit(f"error: {run} was trained with other settings ({', '.join(diff)}); use a new WORK")
        if info["steps"] >= steps:
            return Path(info["path"]), info
    print(f"== {name}: {steps} RL steps, weights {weights or 'paper'}")
    posttrain(base, run, pcfg, device="cpu",
              on_step=lambda st: print(f"  {name} step {st['step']}: reward {st['reward']:.3f} kl {st['kl']:.2e} "
                                       f"({st['t_step']:.1f} s, wait {st['reward_wait_share']:.1%})", flush=True))
    info = run_info(run)
    done.write_text(json.dumps(info, indent=2))
    return run, info


def reward_trend(run: Path, k: int = 20) -> tuple[float, float]:
    """Mean training (rollout) reward of the first and of the last ``k`` post-training steps of ``run``."""
    rewards = [r["reward"] for r in _records(run)]
    return float(np.mean(rewards[:k])), float(np.mean(rewards[-k:]))


# --------------------------------------------------------------------------- evaluation

def columns(scores, k: int) -> dict[str, dict[str, np.ndarray]]:
    """Per-pair values (P,) of every row of each run: the mean over its ``k`` candidates and, when
    ``k > 1``, the best-of-``k`` of those ``k`` (``best_of_n_weights``, as ``evaluate``)."""
    from cellfluxrl.evaluation.metrics import best_of_n_weights

    out = {}
    for name, sc in scores.items():
        if name == "real":
            continue
        picks = [(name, best_of_n_weights(sc.total, 1))]
        if k > 1:
            picks.append((f"{name}+best-of-{k}", best_of_n_weights(sc.total, k)))
        for label, w in picks:
            values = {r: (w * sc.components[r]).sum(1) for r in REWARDS}
            values["overall"] = (w * sc.total).sum(1)
            values["moa_accuracy"] = (w * sc.correct).sum(1)
            values["moa_accuracy_reward"] = (w * sc.correct_reward).sum(1)
            out[label] = values
    return out


def evaluate_split(data: Path, runs: dict[str, Path], n_pairs: int, seed: int, split: str, cache: Path) -> dict:
    """Per-pair columns of every run on one compound split (``"id"``/``"ood"``), paired: the same pairs
    and source noise for every run, each sampled with its recorded setting; cached per run."""
    from cellfluxrl.checkpoint import load_run
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.evaluation.candidates import MoAFeatures, Pairs, run_candidates
    from cellfluxrl.evaluation.scoring import evaluate_sources
    from cellfluxrl.rewards import DEFAULT_WEIGHTS, RewardSuite

    entries = json.loads(cache.read_text()).get("entries", {}) if cache.is_file() else {}
    cols, todo = {}, {}
    for name, path in runs.items():
        loaded = load_run(path, weights="ema")
        k = TTS_N  # every run: the same K candidates per pair, so every column is a K-candidate mean
        key = {"path": str(Path(path).resolve()), "step": int(loaded.step), "sampling": loaded.sampling.to_dict(),
               "pairs": n_pairs, "seed": seed, "candidates": k}
        entry = entries.get(name)
        if entry is not None and entry.get("key") == key:  # same run, pairs and sampler: reuse the scores
            cols.update({c: {r: np.asarray(v) for r, v in vals.items()} for c, vals in entry["columns"].items()})
        else:
            todo.setdefault(k, {})[name] = (loaded, key)
    if todo:
        dataset = load_dataset(data)
        suite = RewardSuite.from_dataset(str(data), {name: 1.0 for name in REWARDS})
        classifier, judge = suite.evaluators.moa_classifier("cpu"), suite.evaluators.judge("cpu")
        pairs = Pairs.from_dataset(dataset, n_pairs, seed, split=split)
        try:
            for k, group in todo.items():
                print(f"== evaluate ({split}): {', '.join(group)} on {len(pairs)} pairs, {k} candidate(s) each")
                sources = {name: run_candidates(loaded.net, dataset, pairs, seed=seed, steps=loaded.sampling.steps,
                                                cfg_scale=loaded.sampling.cfg_scale, sigma=loaded.sampling.sigma,
                                                solver=loaded.sampling.solver, grid=loaded.sampling.grid)
                           for name, (loaded, _) in group.items()}
                with torch.no_grad():
                    results = evaluate_sources(dataset, pairs, sources, suite=suite, weights=DEFAULT_WEIGHTS,
                                               features=MoAFeatures(judge), classifier=classifier, judge=judge,
                                               best_of=(1, k), tts_n=k, batch_size=32,
                                               kid_subset_size=max(2, min(100, len(pairs) // 2)), kid_subsets=20,
                                               seed=seed)
                new = columns(results["scores"], k)
                cols.update(new)
                for name, (_, key) in group.items():
                    mine = {c: {r: v.tolist() for r, v in vals.items()} for c, vals in new.items()
                            if c == name or c.startswith(f"{name}+")}
                    entries[name] = {"key": key, "columns": mine}
                cache.write_text(json.dumps({"entries": entries}))
        finally:
            suite.close()
    return cols


# --------------------------------------------------------------------------- tables

def _mean_se(v) -> tuple[float, float]:
    v = np.asarray(v, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0


def mean_se(v) -> str:
    m, se = _mean_se(v)
    return f"{m:.3f} ± {se:.3f}"


def table1(cols: dict, title: str, note: str, full: bool = True) -> list[str]:
    rows = [*REWARDS, "overall", "moa_accuracy", "moa_accuracy_reward"]
    heads = ["base", f"base+best-of-{TTS_N}", "rl_all", f"rl_all+best-of-{TTS_N}"]
    extra = ["Δ RL − base", "Δ RL+bo4 − RL"] if full else ["Δ RL − base"]
    lines = [title, "", note, "", "| Metric | " + " | ".join(heads + extra) + " |",
             "|---" * (len(heads) + len(extra) + 1) + "|"]
    for r in rows:
        cells = [mean_se(cols[h][r]) for h in heads] + [mean_se(cols["rl_all"][r] - cols["base"][r])]
        if full:
            cells.append(mean_se(cols[f"rl_all+best-of-{TTS_N}"][r] - cols["rl_all"][r]))
        lines.append(f"| {LABELS[r]} | " + " | ".join(cells) + " |")
    return lines


def own_reward_ranks(cols: dict, singles: list[str]) -> list[dict]:
    """Per single-reward run: its own reward's paired Δ (mean, s.e.) and the rank of that Δ among the
    7 reward Δ's, each in units of the reward's base s.d. over pairs (rewards with s.d. 0 left out)."""
    base = cols["base"]
    sd = {r: float(np.std(base[r], ddof=1)) if len(base[r]) > 1 else 0.0 for r in REWARDS}
    out = []
    for reward in singles:
        run = cols[f"rl_{reward}"]
        z = {r: float(np.mean(run[r] - base[r])) / sd[r] for r in REWARDS if sd[r] > 0}
        mean, se = _mean_se(run[reward] - base[reward])
        rank = 1 + sum(v > z[reward] for r, v in z.items() if r != reward) if reward in z else None
        top = max(z, key=z.get) if z else None
        out.append({"reward": reward, "delta": mean, "se": se, "z": z.get(reward), "rank": rank, "of": len(z),
                    "top": top, "top_z": z.get(top) if top else None, "z_all": z})
    return out


def table2(cols: dict, singles: list[str], title: str) -> tuple[list[str], list[dict]]:
    rows = [*REWARDS, "overall", "moa_accuracy"]
    heads = ["base"] + [f"Δ rl_{r}" for r in singles] + ["Δ rl_all"]
    lines = [title, "", "Base: mean ± s.e. over pairs; Δ: paired difference run − base (mean ± s.e.); "
             "**bold**: the reward the run optimises.", "",
             "| Metric | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for row in rows:
        cells = [mean_se(cols["base"][row])]
        for reward in singles:
            cell = mean_se(cols[f"rl_{reward}"][row] - cols["base"][row])
            cells.append(f"**{cell}**" if row == reward else cell)
        cells.append(mean_se(cols["rl_all"][row] - cols["base"][row]))
        lines.append(f"| {LABELS[row]} | " + " | ".join(cells) + " |")
    ranks = own_reward_ranks(cols, singles)
    lines.append("")
    for i in ranks:
        if i["rank"] is None:
            where = "rank n/a (base s.d. of this reward is 0)"
        else:
            where = (f"rank of own reward among the {i['of']} reward Δ's (in units of each reward's base s.d.): "
                     f"{i['rank']} of {i['of']} ({i['z']:+.2f} s.d.; largest: {LABELS[i['top']]} {i['top_z']:+.2f})")
        lines.append(f"- rl_{i['reward']}: own reward Δ = {i['delta']:.3f} ± {i['se']:.3f}; {where}")
    first = sum(i["rank"] == 1 for i in ranks)
    up = sum(i["delta"] > 0 for i in ranks)
    lines += ["", f"Own reward ranked first in {first} of {len(ranks)} single-reward runs; own reward Δ > 0 in "
              f"{up} of {len(ranks)}."]
    return lines, ranks


def markdown(per_split: dict, info: dict, singles: list[str], sampling: str) -> tuple[str, dict]:
    ids = per_split["id"]
    n = len(ids["base"]["overall"])
    lines = table1(ids, "### Table 1 direction, in-distribution compounds: base vs RL vs RL + best-of-4 (paired)",
                   f"{n} held-out test pairs of in-distribution compounds, every run sampled with its recorded "
                   f"setting ({sampling}); mean ± s.e. over pairs; Δ columns are paired differences.")
    if "ood" in per_split:
        ood = per_split["ood"]
        lines += [""] + table1(ood, "### The same on the held-out (OOD) compounds (never seen in pretraining or RL)",
                               f"{len(ood['base']['overall'])} test pairs.", full=False)
    ranks = {}
    lines.append("")
    t2, ranks["id"] = table2(ids, singles, "### Table 2 direction, in-distribution compounds: single-reward runs "
                             "(paired Δ to the base)")
    lines += t2
    if "ood" in per_split:
        t2, ranks["ood"] = table2(per_split["ood"], singles, "### Table 2 direction, held-out (OOD) compounds")
        lines += [""] + t2
    lines += ["", "### Post-training runs", "", "| Run | weights | steps | train minutes | images/s | reward wait share | "
              "rollout reward, first 20 → last 20 steps |", "|---|---|---|---|---|---|---|"]
    for name, i in info.items():
        lines.append(f"| {name} | {i['weights']} | {i['steps']} | {i['train_minutes']:.1f} | {i['images_per_s']:.2f} | "
                     f"{i['reward_wait_share']:.1%} | {i['trend'][0]:.3f} → {i['trend'][1]:.3f} |")
    return "\n".join(lines) + "\n", ranks


# --------------------------------------------------------------------------- main

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("work", type=Path)
    p.add_argument("--quick", action="store_true", help="the demo's quick preset: checks the plumbing in minutes")
    p.add_argument("--from-demo", type=Path, help="reuse DEMO/data, DEMO/base (and DEMO/rl as rl_all when finished) "
                   "of `cellfluxrl demo --out DEMO`, with the settings in DEMO/demo.json")
    p.add_argument("--rl-steps", type=int, help="iterations of the all-rewards run [the demo's posttrain_steps]")
    p.add_argument("--single-steps", type=int, help="iterations of each single-reward run [the demo's posttrain_steps]")
    p.add_argument("--singles", default=",".join(REWARDS), help="single-reward runs (comma-separated reward names)")
    p.add_argument("--pairs", type=int, help="held-out test pairs evaluated per split [the demo's eval_pairs]")
    p.add_argument("--seed", type=int, help="seed of every stage [the demo's]")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 2),
                   help="torch intra-op threads [OMP_NUM_THREADS or 2]")
    args = p.parse_args(argv)
    singles = [s.strip() for s in args.singles.split(",") if s.strip()]
    unknown = [s for s in singles if s not in REWARDS]
    if unknown or len(set(singles)) != len(singles):
        p.error(f"--singles: give distinct names among {', '.join(REWARDS)} (got {args.singles!r})")
    torch.set_num_threads(args.threads)
    cfg = demo_config(args.quick, args.from_demo, args.seed)
    rl_steps = args.rl_steps or cfg.posttrain_steps
    single_steps = args.single_steps or cfg.posttrain_steps
    n_pairs = args.pairs or cfg.eval_pairs
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    check_settings(work, cfg)
    print(f"settings: {dataclasses.asdict(cfg)}; rl_steps {rl_steps}, single_steps {single_steps}, pairs {n_pairs}")
    print(f"posttrain: {_plain(posttrain_config(cfg, rl_steps, None))}")

    if args.from_demo:
        reuse_demo(work, args.from_demo)
    data = stage_data(work, cfg)
    base = stage_base(work, data, cfg)
    runs, info = {"base": base}, {}
    reused = demo_rl(args.from_demo, rl_steps, posttrain_config(cfg, rl_steps, None)) if args.from_demo else None
    if reused is not None:
        runs["rl_all"], info["rl_all"] = reused, run_info(reused)
        print(f"rl_all: reusing {reused} ({info['rl_all']['steps']} steps)")
    else:
        runs["rl_all"], info["rl_all"] = stage_rl(work, base, "rl_all", None, rl_steps, cfg)
    for reward in singles:
        name = f"rl_{reward}"
        runs[name], info[name] = stage_rl(work, base, name, single_reward(reward), single_steps, cfg)
    for name in info:
        info[name]["trend"] = reward_trend(runs[name])

    from cellfluxrl.checkpoint import load_run
    from cellfluxrl.data.layout import load_dataset

    described = {name: load_run(run).sampling.describe() for name, run in runs.items()}
    sampling = "; ".join(f"{name}: {d}" for name, d in described.items() if name in ("base", "rl_all"))
    if any(d != described["base"] for d in described.values()):
        sampling += "; " + "; ".join(f"{n}: {d}" for n, d in described.items() if n not in ("base", "rl_all"))
    splits = ["id"] + (["ood"] if np.asarray(load_dataset(data).conditions["ood"]).sum() > 0 else [])
    per_split = {split: evaluate_split(data, runs, n_pairs, cfg.seed, split, work / f"eval_columns_{split}.json")
                 for split in splits}
    text, ranks = markdown(per_split, info, singles, sampling)
    (work / "rl_table.md").write_text(text)
    (work / "rl_table.json").write_text(json.dumps(
        {"settings": {"demo": json.loads(json.dumps(dataclasses.asdict(cfg))), "rl_steps": rl_steps,
                      "single_steps": single_steps, "pairs": n_pairs, "singles": singles,
                      "from_demo": str(args.from_demo) if args.from_demo else None},
         "runs": info, "sampling": sampling, "own_reward_ranks": ranks,
         "columns": {split: {c: {r: v.tolist() for r, v in vals.items()} for c, vals in cols.items()}
                     for split, cols in per_split.items()}}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
