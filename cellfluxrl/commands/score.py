"""``cellfluxrl score --data DATA IMAGES... --out DIR``: evaluate's report for images made by anything."""

from __future__ import annotations

import os
from pathlib import Path

import click

from cellfluxrl.commands import SEED
from cellfluxrl.commands.params import DEVICE, File, Folder
from cellfluxrl.rewards.weights import weights_option


def column_names(specs: list[str]) -> list[tuple[str, str]]:
    """``[NAME=]PATH`` arguments -> ``(name, path)``; a bare path is named after its file or folder
    (``runs/impa.npz`` -> ``impa``, ``real:test`` -> ``real-test``), repeats get ``#2``, ``#3``."""
    out, seen = [], {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or "/" in name or name.startswith("real:"):
            path = spec
            name = path.replace(":", "-") if path.startswith("real:") else Path(path.rstrip("/")).name
            name = name[:-4] if name.lower().endswith(".npz") else name
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}#{seen[name]}", path))
    return out


def usage_error(message: str, option: str) -> click.BadParameter:
    """A usage error (exit 2) naming the option; a message that starts with an option names that one."""
    first, _, rest = message.partition(" ")
    if first.startswith("--") and rest:
        return click.BadParameter(rest, param_hint=first)
    return click.BadParameter(message, param_hint=option)


def check_out_place(out: Path, specs: list[str], dataset: Path) -> None:
    """Refuse an ``--out`` that is or lies in an IMAGES folder, is the folder of an IMAGES file, holds an
    IMAGES path (it would be replaced whole), or lies in the dataset."""
    from cellfluxrl.commands.sample_outputs import dataset_above, real_path
    from cellfluxrl.errors import CellfluxError

    real = real_path(out)
    for spec in specs:
        if spec.startswith("real:") or not Path(spec).exists():
            continue
        images = Path(os.path.realpath(spec))
        if real == images.parent or images.is_dir() and (real == images or images in real.parents):
            raise CellfluxError(f"--out {out} is in the image folder {spec}; score never writes into what it reads: "
                                f"choose a path outside it")
        if real in images.parents:
            raise CellfluxError(f"--out {out} holds {spec}, which it would replace; choose another folder")
    found = dataset_above(real)
    if found is not None:
        raise CellfluxError(f"--out {out} is in the dataset folder {found}; choose a path outside it")


@click.command("score")
@click.argument("images", nargs=-1, required=True, metavar="[NAME=]IMAGES...")
@click.option("--data", "dataset", required=True, type=Folder("dataset"), metavar="DIR", help="Dataset folder (with evaluators).")
@click.option("--out", required=True, type=Folder("output"), metavar="DIR", help="Folder for report.json, report.md and figures.")
@click.option("--channels", default=None, metavar="NAME,NAME,...",
              help="The images' channel names in stored order, e.g. dna,tubulin,actin; reordered to the dataset's. "
                   "[default: the dataset's order]")
@click.option("--size", type=click.Choice(["resize", "crop"]), default=None,
              help="Images of another size: resize (antialiased bilinear) or crop (centre). [default: refuse them]")
@click.option("--intensity", default="dataset", show_default=True, metavar="dataset|range:LO:HI|percentile:PLO:PHI",
              help="How the images' pixels were scaled: the dataset's uint8 convention (per-plate 0.1/99.9 percentiles); "
                   "a fixed range LO..HI meaning 0..255 (range:0:1 for floats); or each image's own PLO/PHI percentiles "
                   "(mapped to the dataset's median ones).")
@click.option("--best-of", "best_of", default=None, metavar="N,N,...",
              help="N values of the best-of-N curves for images with several candidates per pair. "
                   "[default: 1,2,4,... up to the candidates per pair]")
@weights_option
@click.option("--inception", type=File("Inception weights"), default=None, metavar="FILE",
              help="FID InceptionV3 weights; without: FD-judge/KD-judge on the judge's features (not FID/KID).")
@click.option("--split", type=click.Choice(["both", "id", "ood", "all"]), default="both", show_default=True,
              help="Sections: in-distribution and held-out compounds apart (both), one of them, or all mixed.")
@click.option("--baselines", default="copy-control,train-real", show_default=True, metavar="NAME,...|none",
              help="Baseline columns on each source's pairs (copy-control, train-real) or none.")
@click.option("--seed", type=SEED, default=None,
              help="Baselines' draws, unpaired images' real targets, KID subsets. [default: the seed the images "
                   "name when they all name one (evaluate --save-images), else 0]")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Pairs per batch.")
@click.option("--kid-subset-size", type=click.IntRange(min=2), default=100, show_default=True, metavar="M",
              help="Images per KID subset.")
@click.option("--kid-subsets", type=click.IntRange(min=1), default=100, show_default=True, metavar="S",
              help="Number of KID subsets.")
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or gpu.")
@click.option("--measurements", type=click.Path(path_type=Path), default=None, metavar="FILE.csv",
              help="Also write CellProfiler-named measurements of every IMAGES source: FILE.csv (per image) and "
                   "FILE_Nuclei.csv, FILE_Cells.csv, FILE_Cytoplasm.csv (per object), as `sample --measurements`; "
                   "Metadata_Source is NAME=SOURCE (docs/score.md).")
def score(images, dataset, out, channels, size, intensity, best_of, weights, inception, split, baselines, seed,
          batch_size, kid_subset_size, kid_subsets, device, measurements):
    """Score IMAGES from any generator: evaluate's rewards, judge, distances and baselines.

    Each IMAGES ([NAME=]PATH) is a FILE.npz (from `sample` or `evaluate --save-images`), a folder
    with samples.csv (`sample --format tiff|png`, `evaluate --save-images`), or a CSV of image
    paths with a compound column. Images that name their pairs (target_index, control_index, seed,
    candidate) are graded on them, and two such sources on the same pairs get paired differences;
    others are graded against real test images of their compounds and compared unpaired (Welch,
    clustered by compound); the report says which. Pixels must mean what the dataset's mean: say
    otherwise with --channels, --size and --intensity (docs/score.md).

    OUT must be new, empty, or hold an earlier report (replaced whole); it is never in an IMAGES folder.
    --measurements FILE.csv writes measure's tables of the images too (never over a file measure did not write).

    \b
    Example:
      cellfluxrl score --data data/bbbc021 impa=impa_out/samples.csv runs/eval_images/base.npz --out runs/score
    """
    from cellfluxrl.commands import report_folder as folder
    from cellfluxrl.commands.evaluate import parse_best_of
    from cellfluxrl.commands.sample import check_measurements
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.errors import CellfluxError
    from cellfluxrl.evaluation.baselines import parse_baselines
    from cellfluxrl.evaluation.image_mapping import ImageMapping
    from cellfluxrl.evaluation.measurement_tables import check_set_names
    from cellfluxrl.rewards import parse_weights

    for option, check in (("--channels/--size/--intensity", lambda: ImageMapping.parse(channels, size, intensity)),
                          ("--baselines", lambda: parse_baselines(baselines)), ("--weights", lambda: parse_weights(weights)),
                          ("--best-of", lambda: best_of is None or parse_best_of(best_of)),
                          ("--data", lambda: load_dataset(dataset)),
                          ("--out", lambda: (folder.check_writable_folder(Path(out)), folder.check_report_folder(Path(out)),
                                             check_out_place(Path(out), list(images), Path(dataset))))):
        try:
            check()
        except CellfluxError as exc:
            raise usage_error(str(exc), option) from None
    check_measurements(measurements, Path(out))  # a usage error naming --measurements; writes nothing
    mapping, data = ImageMapping.parse(channels, size, intensity), load_dataset(dataset)
    sources = _read_sources(list(images), data, mapping, seed)
    if measurements is not None:
        try:
            check_set_names([s.name for s in sources])
        except CellfluxError as exc:
            raise usage_error(str(exc), "--measurements") from None
    seed = _seed_of(sources) if seed is None else seed
    report = _score_into(Path(out), data, sources, seed=seed, mapping=mapping, weights=parse_weights(weights),
                         best_of=None if best_of is None else parse_best_of(best_of), split=split,
                         baselines=parse_baselines(baselines), inception=inception, device=device, batch_size=batch_size,
                         kid_subset_size=kid_subset_size, kid_subsets=kid_subsets, measurements=measurements)
    click.echo(print_score(report))
    click.echo(f"wrote {out / 'report.md'}, {out / 'report.json'} and the figures")


def _read_sources(specs: list[str], data, mapping, seed):
    """Every IMAGES read, mapped, checked and put on its pairs (a usage error naming the first bad one)."""
    from cellfluxrl.errors import CellfluxError
    from cellfluxrl.evaluation.pipeline import read_externals

    named = column_names(specs)
    try:
        return list(read_externals(dict(named), data, 0 if seed is None else seed,
                                   ["copy-control", "train-real"], mapping).values())
    except CellfluxError as exc:
        raise usage_error(str(exc), "IMAGES") from None


def _seed_of(sources) -> int:
    """The one noise seed every paired image names, else 0."""
    import numpy as np

    seeds = np.unique(np.concatenate([s.seed for s in sources]))
    return int(seeds[0]) if seeds.size == 1 and seeds[0] >= 0 else 0


def _score_into(out: Path, data, sources, *, seed: int, mapping, measurements: Path | None = None, **options) -> dict:
    """Score into a staged folder beside ``out`` and swap it in whole (nothing of it kept on an error);
    with ``measurements``, write the sources' tables just before the swap."""
    from cellfluxrl.commands import report_folder as folder
    from cellfluxrl.commands.interrupts import StopSignals
    from cellfluxrl.evaluation.external import pair_images
    from cellfluxrl.evaluation.report_figures import write_section_figures
    from cellfluxrl.evaluation.report_text import markdown_report, write_report
    from cellfluxrl.evaluation.score_report import comparison_lines, score_images
    from cellfluxrl.progress import progress
    from cellfluxrl.rundir import hold

    if seed != 0 and any(not s.paired for s in sources):  # unpaired targets are drawn with the seed
        sources = [s if s.paired else pair_images(s.images, data, seed, s.name) for s in sources]
    bars: dict = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            for bar in bars.values():
                bar.close()
            bars[stage] = progress(total=total, desc=f"score ({stage})", unit="pair")
        bars[stage].update(max(done - bars[stage].n, 0))

    settings = {"dataset": str(data.root), "mapping": mapping.describe(),
                "images": {s.name: {"origin": s.images.origin, "paired": s.paired, "pairs": len(s.pairs),
                                    "candidates": s.k} for s in sources}}
    with hold(out, "score"), StopSignals(graceful=False) as stop:
        folder.check_report_folder(out)
        staged = folder.staged_folder(out)
        try:
            report, firsts = score_images(data, sources, seed=seed, settings=settings, on_progress=on_progress, **options)
            for part, section in report["sections"].items():
                section["files"] = write_section_figures(section, firsts[part], staged, dataset=data)
            write_report(report, staged)
            extra = [line for section in report["sections"].values()
                     for line in ["", f"### Comparisons ({section['split']})", "", *comparison_lines(section)]
                     if section.get("comparison", {}).get("versus")]
            if extra:
                (staged / "report.md").write_text(markdown_report(report) + "\n".join(extra) + "\n")
            if measurements is not None:
                _write_measurements(measurements, sources, data)
            folder.replace_folder(staged, out)
        except KeyboardInterrupt:
            stop.exit(f"score stopped by {stop.name} before it finished: nothing of it was kept and {out} is as it was")
        finally:
            for bar in bars.values():
                bar.close()
            if staged.exists():
                folder.discard(staged)
    return report


def _write_measurements(measurements: Path, sources, data) -> None:
    """measure's four tables of every source's images in one set (``Metadata_Source``: ``NAME=SOURCE``)."""
    from cellfluxrl.evaluation.measurement_tables import named_sets, write_measurements

    images = named_sets([(s.name, s.images) for s in sources])
    write_measurements(images, data, measurements)
    click.echo(f"wrote the measurements of {len(images)} images ({len(sources)} source(s)) to {measurements} and "
               f"its object tables", err=True)


def print_score(report: dict) -> str:
    """What ``score`` prints: how the images were read, evaluate's tables, then the comparisons."""
    from cellfluxrl.commands.evaluate import print_report
    from cellfluxrl.evaluation.score_report import comparison_lines

    s = report["settings"]
    lines = [f"images ({s['mapping']}):"]
    lines += [f"- {name}: {i['origin']}, {i['pairs']} pairs x {i['candidates']} candidate(s), "
              f"{'paired (they name their pairs)' if i['paired'] else 'unpaired (compounds only)'}"
              for name, i in s["images"].items()]
    text = print_report(report)
    for section in report["sections"].values():
        more = comparison_lines(section)
        if more:
            text += f"\n\n{section['split']}: " + "\n".join(more)
    return "\n".join(lines) + "\n" + text
