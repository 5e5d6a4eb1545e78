"""The steps every ``prepare`` subcommand shares: options, the size check, resume, evaluators, lock and signals.

``synthetic``, ``bbbc021`` (``--impa``/``--raw``) and ``images`` all check their inputs (:func:`check_size`
for a crop size), then run their work through :func:`held`: the dataset folder's lock
(:mod:`cellfluxrl.rundir`) and SIGINT/SIGTERM handling that says what was kept
(:mod:`cellfluxrl.commands.interrupts`); inside, :func:`resume` says whether ``OUT`` already holds
this dataset and :func:`finish` fits the evaluators it lacks.
"""

from __future__ import annotations

from pathlib import Path

import click

from cellfluxrl.commands.params import File

CROP_SIZE = click.IntRange(min=32)  # every prepare --size; check_size adds the UNet multiple


def evaluator_options(f):
    """``--segmenter``, ``--cellpose-model``, ``--no-evaluators``: how (or whether) the evaluators are fitted."""
    f = click.option("--segmenter", type=click.Choice(["classical", "cellpose"]), default="classical",
                     show_default=True, help="Segmentation backend for the reference statistics.")(f)
    f = click.option("--cellpose-model", default=None,
                     help="Cellpose model name (cached weights) or local path, for --segmenter cellpose.")(f)
    f = click.option("--no-evaluators", is_flag=True,
                     help="Skip fitting reference statistics and the MoA classifier.")(f)
    return f


def embeddings_option(f):
    """``--embeddings FILE.csv``: a user's compound embeddings (see data/README.md), passed on as ``embeddings=``."""
    return click.option(
        "--embeddings", type=File("embeddings CSV"), default=None, metavar="FILE.csv",
        help="Compound embeddings to use instead of the built-in ones: a CSV laid out like "
             "cellfluxrl/data/bbbc021_emb_fp.csv (a header line, then one line per compound: its name, "
             "then D numbers); every compound of the dataset (DMSO included) needs a row. Default: RDKit "
             "Morgan counts from the SMILES, else CellFlux's shipped BBBC021 row.")(f)


def absolute(path: Path | None) -> str | None:
    """A path option as the dataset's meta.json records it (absolute), or None."""
    return None if path is None else str(Path(path).resolve())


def resume(out: Path, source: str, section: str, settings: dict, segmenter: str, cellpose_model: str | None,
            no_evaluators: bool, seed: int) -> bool:
    """Whether OUT already holds this dataset (``prepare`` run again after a kill, or twice): then say
    what is left to do on stderr. A dataset or evaluator made with other settings is refused (one
    line naming the setting)."""
    from cellfluxrl.data.resume import resume_dataset
    from cellfluxrl.rewards.evaluators import segmenter_options
    from cellfluxrl.rewards.evaluators_resume import evaluators_to_fit

    if not resume_dataset(out, source, section, settings):
        return False
    missing = []
    if not no_evaluators:
        from cellfluxrl.data.layout import load_dataset
        from cellfluxrl.rewards.evaluators_fit import half_hashes

        halves = half_hashes(load_dataset(out), seed)
        missing = evaluators_to_fit(out / "evaluators", segmenter, segmenter_options(segmenter, cellpose_model), seed,
                                    halves=halves)
    todo = f"fitting the missing evaluators ({', '.join(missing)})" if missing else "nothing left to do"
    click.echo(f"resuming {out}: its images were already written with these settings; {todo}", err=True)
    return True


def finish(out: Path, segmenter: str, cellpose_model: str | None, no_evaluators: bool, seed: int) -> None:
    """Fit the evaluators the dataset lacks (unless skipped; those already fitted with these settings
    are kept) and print its summary."""
    from cellfluxrl.data.layout import load_dataset

    evaluators = None
    if not no_evaluators:
        from cellfluxrl.rewards.evaluators_fit import fit_evaluators

        evaluators = fit_evaluators(out, segmenter=segmenter, cellpose_model=cellpose_model, seed=seed, resume=True)
    click.echo(summarize(load_dataset(out), evaluators))


def held(out: Path, work) -> None:
    """Run ``work()`` holding OUT's lock; SIGINT/SIGTERM stop it at once and say what was kept.

    A build interrupted while writing images keeps nothing (its partial folder is removed); one
    interrupted while fitting evaluators keeps the dataset and the evaluators already written,
    which the same command resumes from. Exits 130 (SIGINT) / 143 (SIGTERM).
    """
    from cellfluxrl.commands.interrupts import StopSignals
    from cellfluxrl.rundir import hold

    with hold(out, "prepare"), StopSignals(graceful=False) as stop:
        try:
            work()
        except KeyboardInterrupt:
            if (out / "meta.json").is_file():
                kept = sorted(p.name for p in (out / "evaluators").glob("*") if not p.name.startswith(".")) \
                    if (out / "evaluators").is_dir() else []
                stop.exit(f"prepare stopped by {stop.name} while fitting the evaluators: the dataset {out} is kept, "
                          f"with {', '.join(kept) if kept else 'no evaluator files yet'}; run the same command to "
                          f"fit the rest")
            stop.exit(f"prepare stopped by {stop.name} while writing {out}: nothing was kept (the partial build is "
                      f"removed); run the same command to start again")


def size_multiple() -> int:
    """Crop sizes must be a multiple of this so that every UNet preset can take them (its downsampling)."""
    from cellfluxrl.model.unet import PRESETS

    return max(2 ** (len(preset.channel_mult) - 1) for preset in PRESETS.values())


def check_size(size: int, option: str = "--size") -> None:
    """Refuse a crop size no UNet preset can take, before anything is written (one line with the accepted ones).

    The one validator of every ``prepare`` (and ``demo``) crop size: a dataset whose crops
    ``pretrain`` would reject is never built. A usage error (exit 2): the user typed it.
    """
    k = size_multiple()
    if size % k:
        near = sorted({max(32, size - size % k), size - size % k + k})
        raise click.UsageError(f"{option} {size}: the UNet presets take crops of a multiple of {k} px, at least 32 "
                               f"(e.g. {', '.join(map(str, near))}, 48 or 96)")


def summarize(dataset, evaluators: dict | None = None) -> str:
    """A short human-readable summary of a dataset (and of its fitted evaluators)."""
    meta, table = dataset.meta, dataset.table
    lines = [f"dataset {dataset.root} ({meta['source']}): {len(dataset)} images "
             f"{meta['image_size']}x{meta['image_size']}x{len(meta['channels'])} ({', '.join(meta['channels'])})"]
    for split, counts in meta["counts"].items():
        lines.append(f"  {split:5s}: {counts['treated']} treated, {counts['control']} controls")
    n_ood = int(dataset.conditions["ood"].sum())
    lines.append(f"  {len(set(table['batch']))} plates, {len(dataset.conditions['compound'])} conditions "
                 f"({n_ood} OOD), {len(set(table['moa'])) - 1} MoAs + DMSO, embedding dim {meta['embedding_dim']}")
    for key, value in (evaluators or {}).items():
        lines.append(f"  {key}: {value}")
    return "\n".join(lines)
