"""Robustness of the MoA classifier to blur, noise and resampling: the old and the new recipe.

    python experiments/classifier_robustness.py DATA_DIR            # old and new recipe
    python experiments/classifier_robustness.py DATA_DIR --half     # + new recipe on half the train crops
    python experiments/classifier_robustness.py DATA_DIR --synthetic 4000,48,4,7 --prepare-half \
        --skip-old --before --epochs 20 --seed 7                 # the reward classifier as `prepare` fits it

If ``DATA_DIR`` does not exist, a synthetic set is written there first (``--synthetic
N,SIZE,PLATES,SEED``; default the 20k set, 96 px, 6 plates, seed 0). Both recipes train on the treated in-distribution train crops (as ``prepare`` does) and are
tested on the treated in-distribution test crops under each condition of
:data:`cellfluxrl.rewards.degradations.ROBUSTNESS_CONDITIONS`:

* ``old``: flips and 90-degree rotations only (``degrade=False``), default epochs;
* ``new``: plus :func:`cellfluxrl.rewards.degradations.random_degradation` on every batch (``degrade=True``);
* ``new, half train`` (``--half``): the new recipe on a random half of the train crops (the lead
  trains a reward classifier and a judge on disjoint halves);
* ``before 2026-12-04`` (``--before``): the degradation recipe before batch 32 and without the
  gain/contrast jitter (batch 128, jitter p 0.5).

``--prepare-half`` trains every recipe on the reward classifier's half instead of all the train
crops (the first of :func:`cellfluxrl.rewards.evaluators_fit.classifier_halves` with ``--seed``, as
``prepare`` does).

Prints a markdown table (accuracy per condition, binomial standard error in the header, train
seconds and optimizer steps) and writes it, with the raw numbers, to ``--out`` (json) if given.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch


def load_split(data_dir: Path, seed: int = 0, synthetic: tuple[int, int, int, int] = (20000, 96, 6, 0),
               prepare_half: bool = False) -> dict:
    """Treated in-distribution train/test crops and labels (uint8 ``(N, H, W, 3)``, int64 ``(N,)``).

    ``synthetic``: ``(n_images, size, n_plates, seed)`` of the set written if ``data_dir`` is missing.
    ``prepare_half``: ``train`` is the reward classifier's half (``classifier_halves(dataset, seed)``).
    """
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.rewards.evaluators_fit import _treated_in_distribution, classifier_halves

    if not data_dir.exists():
        from cellfluxrl.data.synthetic import prepare_synthetic

        n_images, size, n_plates, data_seed = synthetic
        start = time.perf_counter()
        prepare_synthetic(data_dir, n_images=n_images, seed=data_seed, size=size, n_plates=n_plates, progress=False)
        print(f"wrote {n_images} synthetic {size} px crops (seed {data_seed}) to {data_dir} "
              f"in {time.perf_counter() - start:.0f} s")
    dataset = load_dataset(data_dir)
    train_idx, train_labels = _treated_in_distribution(dataset, "train")
    if prepare_half:  # the reward classifier's half, dealt by (plate, well) groups as prepare does
        train_idx, train_labels, first, _ = classifier_halves(dataset, seed)
        train_idx, train_labels = train_idx[first], train_labels[first]
    test_idx, test_labels = _treated_in_distribution(dataset, "test")
    half = np.sort(np.random.default_rng(seed).permutation(train_idx.size)[: train_idx.size // 2])
    train = np.asarray(dataset.images[train_idx])
    return {"train": (train, train_labels), "half": (train[half], train_labels[half]),
            "test": (np.asarray(dataset.images[test_idx]), test_labels)}


def run_recipe(name: str, images: np.ndarray, labels: np.ndarray, test: tuple, seed: int, **kwargs) -> dict:
    """Train one classifier and report its robustness; returns a table row."""
    from cellfluxrl.rewards.moa_classifier import robustness_report, train_moa_classifier

    model, info = train_moa_classifier(images, labels, seed=seed, **kwargs)
    report = robustness_report(model, *test)
    row = {"classifier": name, "n_train": int(labels.size), **report, "train s": round(info["seconds"], 1),
           "steps": info["steps"], "epochs": info["epochs"]}
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict], n_test: int) -> str:
    """The robustness table: one row per classifier."""
    from cellfluxrl.rewards.degradations import ROBUSTNESS_CONDITIONS

    conds = list(ROBUSTNESS_CONDITIONS)
    lines = [f"Accuracy on {n_test:,} real treated test crops, +- its binomial s.e. sqrt(p (1 - p) / n)", "",
             "| classifier | train crops | " + " | ".join(conds) + " | train s | steps |",
             "|---|---:|" + "---:|" * len(conds) + "---:|---:|"]
    for r in rows:
        cells = " | ".join(f"{r[c]:.3f} ± {math.sqrt(r[c] * (1 - r[c]) / n_test):.3f}" for c in conds)
        lines.append(f"| {r['classifier']} | {r['n_train']:,} | {cells} | {r['train s']:.0f} | {r['steps']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", type=Path, help="dataset folder (the 20k synthetic set is made if missing)")
    parser.add_argument("--half", action="store_true", help="also train the new recipe on half the train crops")
    parser.add_argument("--seed", type=int, default=0, help="training seed (and seed of the half split)")
    parser.add_argument("--synthetic", default="20000,96,6,0",
                        help="N,SIZE,PLATES,SEED of the synthetic set written if DATA_DIR is missing")
    parser.add_argument("--prepare-half", action="store_true",
                        help="train on the reward classifier's half (evaluators_fit.classifier_halves), as prepare does")
    parser.add_argument("--before", action="store_true",
                        help="also train the recipe before 2026-12-04 (batch 128, gain/contrast jitter p 0.5)")
    parser.add_argument("--skip-old", action="store_true", help="do not train the old recipe")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the new recipe (default: its default)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="write the rows and the table to this json file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    synthetic = tuple(int(v) for v in args.synthetic.split(","))
    if len(synthetic) != 4:
        parser.error(f"--synthetic: expected N,SIZE,PLATES,SEED, got {args.synthetic!r}")
    data = load_split(args.data_dir, args.seed, synthetic, args.prepare_half)
    test = data["test"]
    print(f"train {data['train'][1].size} crops, test {test[1].size} crops, torch threads {torch.get_num_threads()}")
    rows = []
    if not args.skip_old:
        rows.append(run_recipe("old (flips/rot90)", *data["train"], test, args.seed, degrade=False))
    if args.before:
        from cellfluxrl.rewards.degradations import DegradationConfig

        rows.append(run_recipe("before 2026-12-04 (batch 128, gain jitter)", *data["train"], test, args.seed,
                               degrade=True, epochs=args.epochs, batch_size=128,
                               degradation=DegradationConfig(p_gain=0.5)))
    rows.append(run_recipe("new (+ degradations)", *data["train"], test, args.seed, degrade=True, epochs=args.epochs))
    if args.half:
        rows.append(run_recipe("new, half train", *data["half"], test, args.seed, degrade=True, epochs=args.epochs))
    table = markdown(rows, test[1].size)
    print(table)
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "table": table}, indent=1))


if __name__ == "__main__":
    main()
