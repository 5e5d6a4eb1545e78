"""``cellfluxrl info PATH [--json]``: what a file or folder the project wrote is and how it was made.

It reads everything the commands write: a dataset folder (``prepare``) and each of its files, its
``evaluators/`` and their files; a run folder (``pretrain``, ``posttrain``), its ``checkpoint.pt``
(also alone), ``stats.jsonl``, ``config.json`` and sample grids; a ``sample`` ``FILE.npz``, its
``FILE.png`` and its ``--format`` folder (``samples.csv`` and the images); an ``evaluate`` folder, its
``report.json``, ``report.md`` and figures; a ``demo`` folder and its ``demo.json``.

Each ``describe_*`` function returns a plain JSON-able dict with ``what``, ``path`` and the facts of
that kind; a file that belongs to one of those is ``{"what": "file", "part_of": <its describe>}``.
:func:`format_info` turns it into the lines ``info`` prints. Nothing here writes; a run's weights are
read only for its step count and size.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from cellfluxrl.commands import info_files as files
from cellfluxrl.commands.info_files import counts as _counts
from cellfluxrl.commands.info_files import listed as _listed
from cellfluxrl.commands.info_files import settings_line as _settings_line
from cellfluxrl.commands.wording import count
from cellfluxrl.errors import CellfluxError


def _last_stats(path: Path) -> dict | None:
    """The last JSON record of a ``stats.jsonl`` (``None`` when absent or empty)."""
    if not path.is_file():
        return None
    last = None
    for line in path.read_text().splitlines():
        try:
            last = json.loads(line)
        except ValueError:
            continue
    return last


def describe_dataset(path: Path) -> dict:
    """Facts of a dataset folder (see ``cellfluxrl/data/layout.py``): source, sizes, plates, compounds."""
    from cellfluxrl.data.layout import load_dataset

    ds = load_dataset(path)
    meta, table = ds.meta, ds.table
    treated = table["state"] == "treated"
    evaluators = sorted(p.name for p in ds.evaluators_dir.iterdir()) if ds.evaluators_dir.is_dir() else []
    return {
        "what": "dataset", "path": str(path), "source": meta.get("source"),
        "made_with": {k: meta[k] for k in ("generator", "preparation") if k in meta},
        "cellfluxrl_version": meta.get("cellfluxrl_version"),
        "images": len(ds), "image_shape": [meta["image_size"], meta["image_size"], len(meta["channels"])],
        "channels": list(meta["channels"]), "counts": meta["counts"], "plates": len(set(table["batch"])),
        "compounds": _counts(table["compound"][treated]), "moas": _counts(table["moa"][treated]),
        "ood_compounds": sorted(str(c) for c, o in zip(ds.conditions["compound"], ds.conditions["ood"]) if o),
        "embedding_dim": meta.get("embedding_dim"), "has_masks": bool(meta.get("has_masks")),
        "evaluators": evaluators,
    }


def _run_facts(config: dict, path: Path, state: dict | None) -> dict:
    """What a run config (and its checkpoint ``state``, if any) says: command, settings, seed, version,
    dataset, steps, sampling, rewards, and the reference changes a resume accepted."""
    kind = str(config.get("kind", "pretrain"))
    settings = config.get("posttrain" if kind == "posttrain" else "train") or {}
    dataset = config.get("dataset")
    info = {"path": str(path), "command": f"cellfluxrl {kind}",
            "cellfluxrl_version": config.get("cellfluxrl_version"), "seed": settings.get("seed"),
            "dataset": dataset, "dataset_exists": bool(dataset) and (Path(dataset) / "meta.json").is_file(),
            "image_size": config.get("image_size"), "preset": config.get("preset"),
            "steps_planned": settings.get("steps"), "steps_done": 0, "parameters": None,
            "sampling": config.get("sampling"), "settings": settings}
    if kind == "posttrain":
        info["base_run"] = config.get("base_run")
        info["reward_weights"] = config.get("reward_weights")
        info["reference_changes"] = []
    if state is not None:
        info["steps_done"] = int(state.get("step", 0))
        info["parameters"] = int(sum(v.numel() for v in state["model"].values()))
        if kind == "posttrain":
            info["reference_changes"] = list(state.get("reference_changes") or [])
    if kind == "posttrain" and state is not None:
        from cellfluxrl.commands.selection_view import read_records, selection_facts

        run_dir = path if path.is_dir() else path.parent
        info["selection"] = selection_facts((state or {}).get("selection"), read_records(run_dir / "stats.jsonl"))
    return info


def describe_run(path: Path) -> dict:
    """Facts of a run folder: command, settings, seed, version, dataset, steps done, sampling, rewards,
    the reference changes accepted on resume (``--allow-changed-reference``), the last logged stats."""
    from cellfluxrl.checkpoint import CHECKPOINT_NAME, STATS_NAME, load_checkpoint, read_run_config

    config = read_run_config(path)
    state = load_checkpoint(path / CHECKPOINT_NAME) if (path / CHECKPOINT_NAME).is_file() else None
    info = {"what": "run", **_run_facts(config, path, state)}
    last = _last_stats(path / STATS_NAME)
    if last is not None:
        info["last_stats"] = last
    return info


def describe_checkpoint(path: Path) -> dict:
    """A run's ``checkpoint.pt`` on its own (it holds the run config): the facts of :func:`describe_run`."""
    from cellfluxrl.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    config = state.get("config")
    if not isinstance(config, dict):
        raise CellfluxError(f"{path}: checkpoint has no run config")
    return {"what": "checkpoint", **_run_facts(config, path, state)}


def describe_samples(path: Path) -> dict:
    """Facts of a ``sample`` output ``FILE.npz``: images, compounds, recorded sampling, rewards."""
    import numpy as np

    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CellfluxError(f"{path}: not a readable .npz file ({exc})") from None
    with data:
        if "generated" not in data.files:
            raise CellfluxError(f"{path}: an .npz without 'generated' images; not a `cellfluxrl sample` file")
        from cellfluxrl.commands.sample_outputs import recorded_meta

        meta = recorded_meta({k: data[k] for k in data.files if k.startswith("meta_")})
        rewards = {k: float(data[k].mean()) for k in sorted(data.files) if k.startswith("reward")}
        return {"what": "samples", "path": str(path), "images": int(data["generated"].shape[0]),
                "image_shape": list(data["generated"].shape[1:]), "compounds": _counts(data["compound"]),
                "recorded": meta, "mean_rewards": rewards}


# What each file name the project writes belongs to: (folder kind, the folder holding it).
DATASET_FILES = ("meta.json", "images.npy", "metadata.csv", "conditions.csv", "embeddings.npy")
REPORT_FILES = ("report.md",)


def _folder_kind(folder: Path) -> str | None:
    """``"dataset"``, ``"run"``, ``"evaluation"``, ``"sample images"`` or ``"demo"`` for a folder the project
    wrote (from the file that marks each), else ``None``."""
    marks = (("meta.json", "dataset"), ("demo.json", "demo"), ("report.json", "evaluation"),
             ("samples.csv", "sample images"), ("config.json", "run"), ("checkpoint.pt", "run"))
    return next((kind for mark, kind in marks if (folder / mark).is_file()), None)


def _describe_folder(folder: Path, kind: str) -> dict:
    describers = {"dataset": describe_dataset, "run": describe_run, "evaluation": files.describe_report,
                  "sample images": files.describe_export, "demo": files.describe_demo}
    return describers[kind](folder)


def _part_of(path: Path, container: Path, kind: str) -> dict:
    """A file that belongs to a folder of ``kind``: named, with the folder described."""
    return {"what": "file", "path": str(path), "part_of": _describe_folder(container, kind)}


def _describe_file(path: Path) -> dict:
    """A file the project wrote, by its name and where it lies."""
    name, parent = path.name, path.parent
    own = {"stats.jsonl": files.describe_stats, "report.json": files.describe_report,
           "reference_stats.json": files.describe_reference, "classifier.json": files.describe_classifier_report}
    if name in own:
        return own[name](path)
    if path.suffix == ".npz":
        return describe_samples(path)
    if path.suffix == ".pt":
        from cellfluxrl.rewards.moa_classifier import FORMAT

        return describe_checkpoint(path) if name == "checkpoint.pt" or not _is_classifier(path, FORMAT) \
            else files.describe_classifier(path)
    for container in (parent, parent.parent):  # masks/nuclei.npy, samples/step_000050.png lie one level down
        kind = _folder_kind(container)
        if kind is not None and _belongs(path, container, kind):
            return _part_of(path, container, kind)
    if path.suffix == ".png" and path.with_suffix(".npz").is_file():  # sample's FILE.png beside FILE.npz
        return {"what": "file", "path": str(path), "part_of": describe_samples(path.with_suffix(".npz"))}
    measured = files.describe_measurements(path) if path.suffix == ".csv" else None
    if measured is not None:
        return measured
    raise CellfluxError(f"{path} is a file that cellfluxrl did not write (or not one info reads); info reads a "
                        f"dataset, run, evaluate, sample or demo folder and each file in them")


def _belongs(path: Path, container: Path, kind: str) -> bool:
    """Whether ``path`` is one of the files a folder of ``kind`` holds."""
    rel = path.relative_to(container).as_posix()
    if kind == "dataset":
        return rel in DATASET_FILES or rel in ("masks/nuclei.npy", "masks/cells.npy")
    if kind == "run":
        return rel in ("config.json", "validation.png") or (rel.startswith("samples/step_") and path.suffix == ".png")
    if kind == "evaluation":
        return rel in REPORT_FILES or (rel.startswith("fig") and path.suffix == ".png")
    if kind == "sample images":
        return "/" not in rel and (rel == "samples.csv" or rel.endswith(".ome.tif") or rel.endswith(".png"))
    return rel == "demo.json"


def _is_classifier(path: Path, fmt: str) -> bool:
    """Whether a ``.pt`` file is a stored MoA classifier (its ``format`` entry)."""
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not loadable: describe_checkpoint says so in one line
        return False
    return isinstance(payload, dict) and payload.get("format") == fmt


def describe(path: Path) -> dict:
    """Tell what ``path`` is and describe it; one-line :class:`CellfluxError` when it is none of them."""
    path = Path(path)
    if not path.exists():
        raise CellfluxError(f"{path} does not exist")
    if path.is_file():
        return _describe_file(path)
    kind = _folder_kind(path)
    if kind is not None:
        return _describe_folder(path, kind)
    if path.name == "evaluators" and (path.parent / "meta.json").is_file():
        return {"what": "folder", "path": str(path), "part_of": describe_dataset(path.parent)}
    if path.name == "samples" and _folder_kind(path.parent) == "run":
        return {"what": "folder", "path": str(path), "part_of": describe_run(path.parent)}
    if path.name == "masks" and _folder_kind(path.parent) == "dataset":
        return {"what": "folder", "path": str(path), "part_of": describe_dataset(path.parent)}
    raise CellfluxError(f"{path} is a folder but none that cellfluxrl writes (a dataset has meta.json, a run "
                        f"config.json or checkpoint.pt, an evaluation report.json, sample images samples.csv, "
                        f"a demo demo.json)")


def _dataset_lines(info: dict) -> list[str]:
    h, w, c = info["image_shape"]
    lines = [f"  made by: cellfluxrl prepare ({info['source']}), version {info['cellfluxrl_version']}",
             f"  images: {info['images']} of {h}x{w}x{c} ({', '.join(info['channels'])}), "
             f"{count(info['plates'], 'plate')}, masks: {'yes' if info['has_masks'] else 'no'}"]
    lines += [f"  {split}: {n['treated']} treated, {count(n['control'], 'control')}" for split, n in info["counts"].items()]
    for section, settings in info["made_with"].items():
        lines.append(f"  {section}: {_settings_line(settings)}")
    lines.append(f"  compounds ({len(info['compounds'])}, treated images): {_listed(info['compounds'])}")
    lines.append(f"  MoAs ({len(info['moas'])}): {_listed(info['moas'])}")
    if info["ood_compounds"]:
        lines.append(f"  held-out (OOD) compounds: {', '.join(info['ood_compounds'])}")
    lines.append(f"  evaluators: {', '.join(info['evaluators']) or 'none (prepare --no-evaluators)'}")
    return lines


def _change_line(entry) -> str:
    """One accepted reference change of a posttrain checkpoint (``{"step", "changes"}``)."""
    if isinstance(entry, dict):
        return f"at step {entry.get('step')}: {'; '.join(map(str, entry.get('changes', [])))}"
    return str(entry)


def _run_lines(info: dict) -> list[str]:
    moved = "" if info["dataset_exists"] else " (missing: give `sample --data DIR` / `evaluate --data DIR`)"
    lines = [f"  made by: {info['command']}, version {info['cellfluxrl_version']}, seed {info['seed']}",
             f"  dataset: {info['dataset']}{moved}",
             f"  network: preset {info['preset']}, {info['image_size']} px"
             + (f", {info['parameters']:,} parameters" if info["parameters"] else ""),
             f"  steps done: {info['steps_done']} of {info['steps_planned']}"]
    if info.get("base_run"):
        lines.append(f"  base run: {info['base_run']}")
    if info.get("reward_weights"):
        lines.append("  reward weights: " + ",".join(f"{k}={v:g}" for k, v in info["reward_weights"].items()))
    if "reference_changes" in info:
        changes = info["reference_changes"]
        lines += ([f"  resumed against a changed reference (--allow-changed-reference) {_change_line(e)}"
                   for e in changes] or ["  reference: unchanged since the run started"])
    if info["sampling"]:
        lines.append(f"  recorded sampling: {_settings_line(info['sampling'])}")
    lines.append(f"  settings: {_settings_line(info['settings'])}")
    if info.get("selection"):
        from cellfluxrl.commands.selection_view import selection_lines

        lines += selection_lines(info["selection"])
    if info.get("last_stats"):
        lines.append(f"  last logged: {_settings_line(info['last_stats'])}")
    return lines


def _samples_lines(info: dict) -> list[str]:
    h, w, c = info["image_shape"]
    lines = [f"  images: {info['images']} generated, {h}x{w}x{c}", f"  compounds: {_listed(info['compounds'])}",
             f"  recorded: {_settings_line(info['recorded'])}"]
    if info["mean_rewards"]:
        lines.append("  mean rewards: " + ", ".join(f"{k}={v:.4f}" for k, v in info["mean_rewards"].items()))
    return lines


LINES = {"dataset": _dataset_lines, "run": _run_lines, "checkpoint": _run_lines, "samples": _samples_lines,
         "stats": files.lines_stats, "report": files.lines_report, "evaluation": files.lines_report,
         "sample images": files.lines_export, "reference statistics": files.lines_reference,
         "MoA classifier report": files.lines_classifier_report, "MoA classifier": files.lines_classifier,
         "demo": files.lines_demo, "measurements": files.lines_measurements}


def format_info(info: dict) -> str:
    """The human-readable lines of a :func:`describe` dict (a file or folder that is part of another
    thing: one line naming it, then that thing's lines)."""
    if info["what"] in ("file", "folder"):
        whole = info["part_of"]
        return f"{info['path']}: {info['what']} of the {whole['what']} {whole['path']}\n" + format_info(whole)
    return "\n".join([f"{info['path']}: {info['what']}", *LINES[info["what"]](info)])


@click.command("info")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts) instead of text.")
def info(path, as_json):
    """Describe PATH: anything cellfluxrl wrote, a folder or a file in one.

    Dataset, run, evaluate, sample (FILE.npz, its --format folder) and demo folders, and the files
    in them (checkpoint.pt, stats.jsonl, report.json, samples.csv, reference_stats.json, ...). Shows
    what it is, how it was made (command, settings, seed, version), sizes, compounds, steps done,
    recorded sampling and rewards where it has them.

    \b
    Example:
      cellfluxrl info runs/base
      cellfluxrl info runs/eval/report.json
      cellfluxrl info data/synthetic --json | python -c "import json,sys; print(json.load(sys.stdin)['images'])"
    """
    described = describe(path)
    click.echo(json.dumps(described, indent=2, default=str) if as_json else format_info(described))
