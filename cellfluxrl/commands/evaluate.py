"""``cellfluxrl evaluate``: Table 1, Figure 5 and Figure 4 for one or more runs."""

from __future__ import annotations

import time
from pathlib import Path

import click

from cellfluxrl.commands import SEED
from cellfluxrl.commands.params import DEVICE, File, Folder, as_usage_error
from cellfluxrl.commands.wording import count
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
@click.argument("runs", nargs=-1, required=True, type=Folder("run"))
@click.option("--data", "dataset", required=True, type=Folder("dataset"), metavar="DIR", help="Dataset folder (with evaluators).")
@click.option("--out", required=True, type=Folder("output"), metavar="DIR", help="Folder for report.json, report.md and figures.")
@click.option("--n", "n", type=click.IntRange(min=2), default=5120, show_default=True,
              help="Test pairs per split: the first N treated test rows in CSV order (CellFlux: 5120).")
@click.option("--split", type=click.Choice(["both", "id", "ood", "all"]), default="both", show_default=True,
              help="Compound split: in-distribution (the headline) and held-out OOD compounds as separate "
                   "sections (both), one of them, or all mixed in one section.")
@click.option("--best-of", "best_of", default="1,2,4", show_default=True, metavar="N,N,...",
              callback=as_usage_error(lambda spec: parse_best_of(spec) and None),
              help="N values of the best-of-N curves (Figure 5).")
@click.option("--table-best-of", "tts_n", type=click.IntRange(min=1), default=None, metavar="N",
              help="N of the table's best-of (TTS) column and of Figure 4, one of --best-of (paper Table 1: 4). "
                   "[default: the largest]")
@weights_option
@click.option("--inception", type=File("Inception weights"), default=None, metavar="FILE",
              help="FID InceptionV3 weights (pytorch-fid/torch-fidelity .pth or TorchScript .pt). "
                   "Without it: the offline FD-judge/KD-judge substitute on the judge classifier's features (not FID/KID).")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Sampler steps for every run. [default: the first run's recorded setting, for every run]")
@click.option("--cfg-scale", type=click.FloatRange(min=0), default=None,
              help="CFG weight w for every run. [default: the first run's recorded setting, for every run]")
@click.option("--sigma", type=click.FloatRange(min=0), default=None,
              help="Source-noise std for every run. [default: the first run's recorded setting, for every run]")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Pairs, source noise and KID subsets.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Pairs per batch.")
@click.option("--kid-subset-size", type=click.IntRange(min=2), default=100, show_default=True, metavar="M",
              help="Images per KID subset: the kernel distance (KID, or KD-judge without --inception) is averaged "
                   "over random subsets of M generated and M real images (fewer when there are fewer).")
@click.option("--kid-subsets", type=click.IntRange(min=1), default=100, show_default=True, metavar="S",
              help="Number of random KID subsets averaged (their spread gives KID's standard deviation).")
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or gpu (= cuda).")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="best: the checkpoint a posttrain run selected on validation pairs (its last when none); "
                   "last: its latest.")
@click.option("--baselines", default="copy-control,train-real", show_default=True, metavar="NAME,...|none",
              help="Baseline columns on the same pairs: copy-control (the control x_0 itself: a run that does not "
                   "beat it on MoA and the judge learned no perturbation), train-real (a real training image of the "
                   "compound; none for held-out compounds); none for no baseline.")
@click.option("--images", "images", multiple=True, default=None, metavar="NAME=PATH",
              help="One more column: images from anywhere (FILE.npz, a folder with samples.csv, a CSV of paths; "
                   "uint8 in the dataset's convention, see `score`). Images naming this evaluation's pairs with K "
                   "candidates each are a column like a run; others like a baseline (one image per pair). Repeatable.")
@click.option("--save-images", "save_images", type=Folder("images"), default=None, metavar="DIR",
              help="Write the K candidates of every run as scored (NAME.npz and NAME/ of OME-TIFFs with samples.csv: "
                   "pair, candidate, seed), for `cellfluxrl score` to re-grade. DIR: new, empty, or an earlier one.")
@click.option("--save-images-format", "save_format", type=click.Choice(["both", "npz", "tiff"]), default="both",
              show_default=True, help="What --save-images writes: NAME.npz, the NAME/ OME-TIFF folder, or both.")
@click.option("--allow-changed-reference", is_flag=True,
              help="Evaluate a posttrain run although its evaluators or its base run (evaluated beside it) changed "
                   "since it was trained (refused by default; recorded in report.json).")
def evaluate(runs, dataset, out, n, split, best_of, tts_n, weights, inception, steps, cfg_scale, sigma, seed,
             batch_size, kid_subset_size, kid_subsets, device, checkpoint, baselines, images, save_images, save_format,
             allow_changed_reference):
    """Score RUNs on the same test pairs and seeds: rewards, MoA accuracy, FID/KID, best-of-N.

    In-distribution and held-out (OOD) compounds are reported in separate sections; all runs are
    sampled at one setting (--steps/--cfg-scale/--sigma, else the first run's recorded one), so
    the paired differences compare networks, not samplers; MoA
    accuracy and the distances are graded by the judge, a classifier RL never optimised.

    OUT must be new, empty, or hold an earlier report, which is replaced whole at the end.

    \b
    Example:
      cellfluxrl evaluate --data data/synthetic runs/base runs/rl --best-of 1,2,4,8 --out runs/eval
    """
    from cellfluxrl.commands import report_folder as folder
    from cellfluxrl.commands.interrupts import StopSignals
    from cellfluxrl.rundir import hold

    best = parse_best_of(best_of)
    if tts_n is not None and tts_n not in {1, *best}:
        raise click.UsageError(f"--table-best-of {tts_n} is not one of --best-of {best_of}")
    from cellfluxrl.rewards import parse_weights

    parse_weights(weights)  # a bad weight is refused before anything is loaded
    baselines = _parse_baselines(baselines)
    folder.check_writable_folder(Path(out))
    externals = _read_images(list(images), dataset, list(runs), baselines, seed)
    _check_save_images(save_images, Path(out))
    with hold(out, "evaluate"), StopSignals(graceful=False) as stop:
        folder.check_report_folder(Path(out))
        staged = staged_images = None
        try:
            staged, n_sections = _prepare(Path(out), list(runs), dataset, allow_changed_reference, n=n, split=split,
                                          best_of=best, steps=steps, cfg_scale=cfg_scale, sigma=sigma, seed=seed,
                                          device=resolve_device(device))
            report = _evaluate_into(staged, list(runs), dataset, allow_changed_reference, n_sections, n=n, split=split,
                                    best_of=best, weights=weights, seed=seed, batch_size=batch_size, steps=steps,
                                    cfg_scale=cfg_scale, sigma=sigma, inception=inception,
                                    device=resolve_device(device), kid_subset_size=kid_subset_size,
                                    kid_subsets=kid_subsets, tts_n=tts_n, baselines=baselines,
                                    images_sources=externals, checkpoint=checkpoint,
                                    **_save_options(save_images, save_format))
            if save_images is not None:
                staged_images = report["settings"].pop("_save_images_staged")
            folder.replace_folder(staged, Path(out))
            if staged_images is not None:
                folder.replace_folder(staged_images, Path(save_images))
        except KeyboardInterrupt:
            stop.exit(f"evaluate stopped by {stop.name} before it finished: nothing of it was kept and {out} is as it "
                      f"was; run the same command to evaluate again")
        finally:
            for path in (staged, staged_images):
                if path is not None and path.exists():
                    folder.discard(path)
    click.echo(print_report(report))
    click.echo(f"wrote {out / 'report.md'}, {out / 'report.json'} and the figures")


def _read_images(specs: list[str], dataset: Path, runs: list[Path], baselines, seed: int) -> dict:
    """``--images NAME=PATH`` read and checked before anything is written (a usage error naming the bad one)."""
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.errors import CellfluxError
    from cellfluxrl.evaluation.image_mapping import ImageMapping
    from cellfluxrl.evaluation.pipeline import read_externals, run_names

    named = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{spec!r}: give NAME=PATH", param_hint="--images")
        if name in named:
            raise click.BadParameter(f"{name!r} given twice", param_hint="--images")
        named[name] = path
    if not named:
        return {}
    try:
        return read_externals(named, load_dataset(dataset), seed, [*run_names(runs), *baselines], ImageMapping())
    except CellfluxError as exc:
        raise click.BadParameter(str(exc), param_hint="--images") from None


def _check_save_images(save_images: Path | None, out: Path) -> None:
    """Refuse a ``--save-images`` folder that holds what evaluate did not write, or is --out or in it."""
    from cellfluxrl.commands.report_folder import check_writable_folder
    from cellfluxrl.commands.sample_outputs import dataset_above, real_path
    from cellfluxrl.errors import CellfluxError
    from cellfluxrl.evaluation.saved_candidates import folder_problem

    if save_images is None:
        return
    real, report = real_path(save_images), real_path(out)
    try:
        if real == report or report in real.parents or real in report.parents:
            raise CellfluxError(f"{save_images} and --out {out} overlap; give two separate folders")
        if dataset_above(real) is not None:
            raise CellfluxError(f"{save_images} is in the dataset folder {dataset_above(real)}; choose a path outside it")
        check_writable_folder(save_images, "--save-images")
        problem = folder_problem(save_images)
        if problem:
            raise CellfluxError(problem)
    except CellfluxError as exc:
        raise click.BadParameter(str(exc).removeprefix("--save-images "), param_hint="--save-images") from None


def _save_options(save_images: Path | None, save_format: str) -> dict:
    """``_evaluate_into``'s options for ``--save-images`` (the staged folder is made there)."""
    if save_images is None:
        return {}
    return {"save_images_to": Path(save_images), "save_formats": ("npz", "tiff") if save_format == "both" else (save_format,)}


def _parse_baselines(text: str) -> tuple[str, ...]:
    """``--baselines`` as names (a usage error, exit 2, for an unknown one)."""
    from cellfluxrl.errors import CellfluxError
    from cellfluxrl.evaluation.baselines import parse_baselines

    try:
        return parse_baselines(text)
    except CellfluxError as exc:
        raise click.BadParameter(str(exc), param_hint="--baselines") from None


def _prepare(out: Path, runs: list[Path], dataset: Path, allow_changed_reference: bool,
             **options) -> tuple[Path, int]:
    """Everything checked before the slow part: the runs against --data (:func:`preflight`, printed),
    their references (a changed one refused unless allowed); then the staged output folder.

    Returns:
        ``(staged folder, number of sections to evaluate)`` (1 when ``--split both`` finds no held-out compounds).
    """
    from cellfluxrl.checkpoint import read_run_config
    from cellfluxrl.commands.report_folder import reference_changes_of, staged_folder
    from cellfluxrl.provenance import check_reference

    lines, counts = _preflight(runs, dataset, **options)
    changes = reference_changes_of(runs, [read_run_config(run) for run in runs], dataset)
    for change in check_reference(changes, "evaluate", "--allow-changed-reference", allow_changed_reference):
        lines.insert(0, f"warning: evaluating against a changed reference (recorded in report.json): {change}")
    for line in lines:
        click.echo(line, err=True)
    return staged_folder(out), len(counts)


def first_batch_line(stage: str, done: int, total: int, seconds: float, n_splits: int = 1) -> str:
    """After the first batch of pairs: what it took (loading and start-up included) and what all
    ``n_splits`` sections of ``total`` pairs need at that speed (an upper bound: start-up is paid once)."""
    from cellfluxrl.progress import format_duration

    pairs = total * n_splits
    return (f"evaluate: the first {done} of {count(total, f'{stage} pair')} took {format_duration(seconds)} (start-up included); "
            f"{'both sections' if n_splits > 1 else 'the evaluation'} ({count(pairs, 'pair')}) "
            f"{'need' if n_splits > 1 else 'needs'} at most about "
            f"{format_duration(seconds * pairs / max(done, 1))} at this speed")


def _evaluate_into(staged: Path, runs: list[Path], dataset: Path, allow_changed_reference: bool, n_splits: int,
                   **options) -> dict:
    """Run the evaluation into ``staged`` (progress bars on stderr) and add the fingerprints of the
    runs and evaluators, and the accepted reference changes, to its report.json. ``n_splits``: the
    sections that will be evaluated (:func:`_prepare`), for the first time estimate."""
    from cellfluxrl.checkpoint import read_run_config
    from cellfluxrl.commands.report_folder import reference_changes_of, report_fingerprints
    from cellfluxrl.evaluation.pipeline import evaluate as run_evaluation
    from cellfluxrl.evaluation.pipeline import run_names
    from cellfluxrl.evaluation.report_text import write_report
    from cellfluxrl.progress import progress

    bars: dict = {}
    began = time.perf_counter()

    def on_progress(stage: str, done: int, total: int) -> None:
        if not bars:  # the first batch: how long the whole evaluation will take at this speed
            click.echo(first_batch_line(stage, done, total, time.perf_counter() - began, n_splits), err=True)
        if stage not in bars:  # created on the first batch, so an early error prints no bar
            for bar in bars.values():
                bar.close()
            bars[stage] = progress(total=total, desc=f"evaluate ({stage})", unit="pair")
        bars[stage].update(done - bars[stage].n)

    save_to = options.pop("save_images_to", None)
    if save_to is not None:
        from cellfluxrl.commands.report_folder import staged_folder

        options["save_images"] = staged_folder(save_to)
    try:
        report = run_evaluation(dataset, runs, out=staged, on_progress=on_progress, **options)
    except BaseException:
        if save_to is not None:
            from cellfluxrl.commands.report_folder import discard

            discard(options["save_images"])
        raise
    finally:
        for bar in bars.values():
            bar.close()
    configs = [read_run_config(run) for run in runs]
    accepted = reference_changes_of(runs, configs, dataset) if allow_changed_reference else []
    report["settings"]["fingerprints"] = report_fingerprints(runs, run_names(runs), configs, dataset, accepted)
    if save_to is not None:
        report["settings"]["saved_images"] = str(save_to)
    write_report(report, staged)
    if save_to is not None:
        report["settings"]["_save_images_staged"] = options["save_images"]
    return report


def preflight(runs: list[Path], dataset: Path, *, n: int, split: str, best_of: tuple[int, ...], steps: int | None,
              cfg_scale: float | None, sigma: float | None, seed: int, device: str) -> list[str]:
    """Check the runs against --data and say what is about to happen, before the slow part.

    Reads only the run configs and the dataset's tables (no weights). A run trained on another
    dataset gets a warning line; one trained on another image size or condition width is refused.

    Returns:
        the lines to print: warnings, then what is evaluated (pairs per split, columns, each run's
        sampling settings and the images it generates).

    Raises:
        CellfluxError: a missing run, or a run that cannot work on --data.
    """
    return _preflight(runs, dataset, n=n, split=split, best_of=best_of, steps=steps, cfg_scale=cfg_scale,
                      sigma=sigma, seed=seed, device=device)[0]


def _preflight(runs: list[Path], dataset: Path, *, n: int, split: str, best_of: tuple[int, ...], steps: int | None,
               cfg_scale: float | None, sigma: float | None, seed: int, device: str) -> tuple[list[str], dict[str, int]]:
    """:func:`preflight`'s lines, and the test pairs of each section to be evaluated (``{"id": n, ...}``;
    no ``"ood"`` when ``--split both`` finds no held-out compounds)."""
    from cellfluxrl.checkpoint import read_run_config, recorded_sampling, trained_on_problem
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.errors import CellfluxError
    from cellfluxrl.evaluation.pipeline import EVAL_SPLITS, run_names, shared_sampling
    from cellfluxrl.model.generate import test_pairs

    data = load_dataset(dataset)
    lines, configs = [], []
    for run in runs:
        config = read_run_config(run)
        problem = trained_on_problem(config, str(run), dataset)
        if problem is not None and problem[0] == "error":
            raise CellfluxError(problem[1])
        if problem is not None:
            lines.append(f"warning: {problem[1]}")
        configs.append(config)
    counts = {}
    for part in EVAL_SPLITS[split]:
        try:
            counts[part] = len(test_pairs(data, n, seed, split=part)[0])
        except CellfluxError:
            if split != "both" or part != "ood":
                raise
            # no held-out compounds: evaluate reports in-distribution only (and says so)
    k = max(best_of)
    names = run_names(runs)
    columns = ", ".join([*names, *([f"{name}+best-of-{k}" for name in names] if k > 1 else []), "real"])
    pairs = " + ".join(f"{c} {part}" for part, c in counts.items())
    lines.append(f"evaluate: {len(runs)} run(s) on {dataset} ({device}): {pairs} test pairs, best-of "
                 f"{','.join(map(str, best_of))}; columns {columns}")
    sampling, reason = shared_sampling([(name, recorded_sampling(config, name)) for name, config in zip(names, configs)],
                                       steps, cfg_scale, sigma)
    lines.append(f"  sampling, every run: {sampling.describe()} ({reason})")
    evals = 2 * sampling.steps * (2 if sampling.cfg_scale > 0 else 1)
    images = sum(counts.values()) * k
    for name, config in zip(names, configs):
        lines.append(f"  {name} ({config.get('kind', '?')}): {count(images, 'image')}, about "
                     f"{count(images * evals, 'network evaluation')}")
    return lines, counts


def checkpoint_lines(settings: dict) -> list[str]:
    """Which checkpoint each post-trained run was evaluated at, one line each (none for a run's only one)."""
    lines = []
    for run in settings.get("runs", []):
        last, step = run.get("last_step"), run.get("step")
        if run.get("kind") == "posttrain" and last is not None:
            which = "the checkpoint selected on validation pairs" if run.get("checkpoint") == "best" else "the last checkpoint"
            lines.append(f"- {run['name']}: {which}, step {step} of {last}")
    return lines


def print_report(report: dict, columns=None) -> str:
    """The text the commands print: how each run was sampled, then one table per split."""
    from cellfluxrl.evaluation.report_text import SE_LEGEND, markdown_table, sampling_lines, section_title

    lines = ["sampling:", *sampling_lines(report["settings"]), *checkpoint_lines(report["settings"]), "",
             f"cells: {SE_LEGEND}", ""]
    for section in report["sections"].values():
        shown = None if columns is None else [c for c in columns if c in section["columns"]]
        lines += [f"## {section_title(section)}", "", markdown_table(section, shown), ""]
        baselines = section.get("baselines") or {}
        lines += [f"{note}." for note in baselines.get("notes", [])]
        lines += [f"{run} does not beat copy-control on {' and '.join(section['labels'].get(r, r) for r in rows)}: it "
                  f"has learned no perturbation there." for run, rows in (baselines.get("learned_nothing") or {}).items()]
    first = next(iter(report["sections"].values()))
    lines.append(first["distance"]["note"])
    for part, section in report["sections"].items():
        note = section["distance"].get("per_compound", {}).get("note")
        if note and not section["distance"]["per_compound"]["shown"]:
            lines.append(f"{part}: {note}")
    return "\n".join(lines)
