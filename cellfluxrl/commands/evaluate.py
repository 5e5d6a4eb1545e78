"""``cellfluxrl evaluate``: Table 1, Figure 5 and Figure 4 for one or more runs."""

from __future__ import annotations

from pathlib import Path

import click

from cellfluxrl.rewards.weights import weights_option


def parse_best_of(spec: str) -> tuple[int, ...]:
    """``"1,2,4,8"`` -> ``(1, 2, 4, 8)``; CellfluxError naming the bad item."""
    from cellfluxrl.errors import CellfluxError

    values = []
    for item in spec.split(","):
        try:
            value = int(item.strip())
        except ValueError:
            raise CellfluxError(f"--best-of {spec!r}: {item.strip()!r} is not an integer") from None
        if value < 1:
            raise CellfluxError(f"--best-of {spec!r}: values must be >= 1, got {value}")
        values.append(value)
    return tuple(sorted(set(values)))


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@click.command("evaluate")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", "dataset", required=True, type=click.Path(path_type=Path), help="Dataset folder (with evaluators).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for report.json, report.md and figures.")
@click.option("--n", "n", type=click.IntRange(min=2), default=5120, show_default=True,
              help="Test pairs per split: the first N treated test rows in CSV order (CellFlux: 5120).")
@click.option("--split", type=click.Choice(["both", "id", "ood", "all"]), default="both", show_default=True,
              help="Compound split: in-distribution (the headline) and held-out OOD compounds as separate "
                   "sections (both), one of them, or all mixed in one section.")
@click.option("--best-of", "best_of", default="1,2,4", show_default=True, metavar="N,N,...",
              help="N values of the best-of-N curves (Figure 5); the table's TTS column uses the largest.")
@weights_option
@click.option("--inception", type=click.Path(path_type=Path), default=None,
              help="FID InceptionV3 weights (pytorch-fid/torch-fidelity .pth or TorchScript .pt). "
                   "Without it: the offline FD-judge/KD-judge substitute on the judge classifier's features (not FID/KID).")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Sampler steps for every run. [default: each run's recorded setting]")
@click.option("--cfg-scale", type=click.FloatRange(min=0), default=None,
              help="CFG weight w for every run. [default: each run's recorded setting]")
@click.option("--sigma", type=click.FloatRange(min=0), default=None,
              help="Source-noise std for every run. [default: each run's recorded setting]")
@click.option("--seed", type=int, default=0, show_default=True, help="Pairs, source noise and KID subsets.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Pairs per batch.")
@click.option("--kid-subset-size", type=click.IntRange(min=2), default=100, show_default=True)
@click.option("--kid-subsets", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
def evaluate(runs, dataset, out, n, split, best_of, weights, inception, steps, cfg_scale, sigma, seed, batch_size,
             kid_subset_size, kid_subsets, device):
    """Score RUNs on the same test pairs and seeds: rewards, MoA accuracy, FID/KID, best-of-N.

    In-distribution and held-out (OOD) compounds are reported in separate sections; each run is
    sampled with its recorded sampler steps and CFG unless --steps/--cfg-scale are given; MoA
    accuracy and the distances are graded by the judge, a classifier RL never optimised.

    \b
    Example:
      cellfluxrl evaluate --data data/synthetic runs/base runs/rl --best-of 1,2,4,8 --out runs/eval
    """
    from tqdm import tqdm

    from cellfluxrl.evaluate import evaluate as run_evaluation

    bars: dict = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:  # created on the first batch, so an early error prints no bar
            for bar in bars.values():
                bar.close()
            bars[stage] = tqdm(total=total, desc=f"evaluate ({stage})", unit="pair")
        bars[stage].update(done - bars[stage].n)

    try:
        report = run_evaluation(dataset, list(runs), n=n, split=split, best_of=parse_best_of(best_of), weights=weights,
                                seed=seed, batch_size=batch_size, steps=steps, cfg_scale=cfg_scale, sigma=sigma,
                                inception=inception, device=resolve_device(device), out=out,
                                kid_subset_size=kid_subset_size, kid_subsets=kid_subsets, on_progress=on_progress)
    finally:
        for bar in bars.values():
            bar.close()
    click.echo(print_report(report))
    click.echo(f"wrote {out / 'report.md'}, {out / 'report.json'} and the figures")


def print_report(report: dict, columns=None) -> str:
    """The text the commands print: how each run was sampled, then one table per split."""
    from cellfluxrl.report import markdown_table, sampling_lines, section_title

    lines = ["sampling:", *sampling_lines(report["settings"]), ""]
    for section in report["sections"].values():
        shown = None if columns is None else [c for c in columns if c in section["columns"]]
        lines += [f"## {section_title(section)}", "", markdown_table(section, shown), ""]
    first = next(iter(report["sections"].values()))
    lines.append(first["distance"]["note"])
    return "\n".join(lines)
