"""``cellfluxrl info PATH [--json]``: what a dataset, a run or a sample file is and how it was made.

Each ``describe_*`` function returns a plain JSON-able dict with ``what`` (``"dataset"``, ``"run"``
or ``"samples"``), ``path`` and the facts of that kind; :func:`format_info` turns it into the lines
``info`` prints. Nothing here writes; a run's weights are read only for its step count and size.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import click

from cellfluxrl.errors import CellfluxError

MAX_LISTED = 12  # compounds named in the text view (all of them in --json)


def _counts(values) -> dict[str, int]:
    """Occurrences of each value, most frequent first (ties in name order)."""
    return dict(sorted(Counter(str(v) for v in values).items(), key=lambda kv: (-kv[1], kv[0])))


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


def describe_run(path: Path) -> dict:
    """Facts of a run folder: command, settings, seed, version, dataset, steps done, sampling, rewards."""
    from cellfluxrl.checkpoint import CHECKPOINT_NAME, STATS_NAME, load_checkpoint, read_run_config

    config = read_run_config(path)
    kind = str(config.get("kind", "pretrain"))
    settings = config.get("posttrain" if kind == "posttrain" else "train") or {}
    info = {"what": "run", "path": str(path), "command": f"cellfluxrl {kind}",
            "cellfluxrl_version": config.get("cellfluxrl_version"), "seed": settings.get("seed"),
            "dataset": config.get("dataset"),
            "dataset_exists": bool(config.get("dataset")) and (Path(config["dataset"]) / "meta.json").is_file(),
            "image_size": config.get("image_size"), "preset": config.get("preset"),
            "steps_planned": settings.get("steps"), "steps_done": 0, "parameters": None,
            "sampling": config.get("sampling"), "settings": settings}
    if kind == "posttrain":
        info["base_run"] = config.get("base_run")
        info["reward_weights"] = config.get("reward_weights")
    if (path / CHECKPOINT_NAME).is_file():
        state = load_checkpoint(path / CHECKPOINT_NAME)
        info["steps_done"] = int(state.get("step", 0))
        info["parameters"] = int(sum(v.numel() for v in state["model"].values()))
    last = _last_stats(path / STATS_NAME)
    if last is not None:
        info["last_stats"] = last
    return info


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
        meta = {k[len("meta_"):]: data[k].item() for k in data.files if k.startswith("meta_")}
        rewards = {k: float(data[k].mean()) for k in sorted(data.files) if k.startswith("reward")}
        return {"what": "samples", "path": str(path), "images": int(data["generated"].shape[0]),
                "image_shape": list(data["generated"].shape[1:]), "compounds": _counts(data["compound"]),
                "recorded": meta, "mean_rewards": rewards}


def describe(path: Path) -> dict:
    """Tell what ``path`` is and describe it; one-line :class:`CellfluxError` when it is none of them."""
    path = Path(path)
    if not path.exists():
        raise CellfluxError(f"{path} does not exist")
    if path.is_file():
        if path.suffix == ".npz":
            return describe_samples(path)
        raise CellfluxError(f"{path} is a file but not a sample file (FILE.npz); info reads a dataset folder, "
                            f"a run folder or a FILE.npz")
    if (path / "meta.json").is_file():
        return describe_dataset(path)
    if (path / "config.json").is_file() or (path / "checkpoint.pt").is_file():
        return describe_run(path)
    raise CellfluxError(f"{path} is a folder but neither a dataset (no meta.json) nor a run (no config.json or "
                        f"checkpoint.pt)")


def _listed(counts: dict[str, int]) -> str:
    """``name (n), ...`` for the first :data:`MAX_LISTED` entries, then how many more."""
    items = [f"{k} ({v})" for k, v in list(counts.items())[:MAX_LISTED]]
    more = len(counts) - MAX_LISTED
    return ", ".join(items) + (f", and {more} more" if more > 0 else "")


def _settings_line(settings: dict) -> str:
    """``key=value ...`` with JSON values (floats to 4 significant digits)."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={json.dumps(v)}" for k, v in settings.items())


def format_info(info: dict) -> str:
    """The human-readable lines of a :func:`describe` dict."""
    lines = [f"{info['path']}: {info['what']}"]
    if info["what"] == "dataset":
        h, w, c = info["image_shape"]
        lines += [f"  made by: cellfluxrl prepare ({info['source']}), version {info['cellfluxrl_version']}",
                  f"  images: {info['images']} of {h}x{w}x{c} ({', '.join(info['channels'])}), "
                  f"{info['plates']} plates, masks: {'yes' if info['has_masks'] else 'no'}"]
        lines += [f"  {split}: {n['treated']} treated, {n['control']} controls" for split, n in info["counts"].items()]
        for section, settings in info["made_with"].items():
            lines.append(f"  {section}: {_settings_line(settings)}")
        lines.append(f"  compounds ({len(info['compounds'])}, treated images): {_listed(info['compounds'])}")
        lines.append(f"  MoAs ({len(info['moas'])}): {_listed(info['moas'])}")
        if info["ood_compounds"]:
            lines.append(f"  held-out (OOD) compounds: {', '.join(info['ood_compounds'])}")
        lines.append(f"  evaluators: {', '.join(info['evaluators']) or 'none (prepare --no-evaluators)'}")
    elif info["what"] == "run":
        moved = "" if info["dataset_exists"] else " (missing: give `sample --data DIR` / `evaluate --data DIR`)"
        lines += [f"  made by: {info['command']}, version {info['cellfluxrl_version']}, seed {info['seed']}",
                  f"  dataset: {info['dataset']}{moved}",
                  f"  network: preset {info['preset']}, {info['image_size']} px"
                  + (f", {info['parameters']:,} parameters" if info["parameters"] else ""),
                  f"  steps done: {info['steps_done']} of {info['steps_planned']}"]
        if info.get("base_run"):
            lines.append(f"  base run: {info['base_run']}")
        if info.get("reward_weights"):
            lines.append("  reward weights: " + ",".join(f"{k}={v:g}" for k, v in info["reward_weights"].items()))
        if info["sampling"]:
            lines.append(f"  recorded sampling: {_settings_line(info['sampling'])}")
        lines.append(f"  settings: {_settings_line(info['settings'])}")
        if info.get("last_stats"):
            lines.append(f"  last logged: {_settings_line(info['last_stats'])}")
    else:
        h, w, c = info["image_shape"]
        lines += [f"  images: {info['images']} generated, {h}x{w}x{c}",
                  f"  compounds: {_listed(info['compounds'])}",
                  f"  recorded: {_settings_line(info['recorded'])}"]
        if info["mean_rewards"]:
            lines.append("  mean rewards: " + ", ".join(f"{k}={v:.4f}" for k, v in info["mean_rewards"].items()))
    return "\n".join(lines)


@click.command("info")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts) instead of text.")
def info(path, as_json):
    """Describe PATH: a dataset folder, a run folder or a sample FILE.npz.

    Shows what it is, how it was made (command, settings, seed, version), sizes, compounds, steps
    done, recorded sampling and rewards where it has them.

    \b
    Example:
      cellfluxrl info runs/base
      cellfluxrl info data/synthetic --json | python -c "import json,sys; print(json.load(sys.stdin)['images'])"
    """
    described = describe(path)
    click.echo(json.dumps(described, indent=2, default=str) if as_json else format_info(described))
