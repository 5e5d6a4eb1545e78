"""``info`` on the files the project writes besides dataset and run folders: a checkpoint alone,
``stats.jsonl``, an ``evaluate`` folder and its ``report.json``, a ``sample --format`` folder and its
``samples.csv``, a dataset's evaluator files (``reference_stats.json``, ``classifier.json``, the MoA
classifiers ``moa_classifier.pt``/``judge.pt``) and a ``demo`` folder.

Each ``describe_*`` returns a plain JSON-able dict with ``what`` and ``path``; each ``lines_*`` the
text ``info`` prints for it (the first line, ``PATH: WHAT``, is the caller's). Nothing here writes.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

from cellfluxrl.commands.wording import count
from cellfluxrl.errors import CellfluxError


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``, or one line naming the file and what it should have been."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CellfluxError(f"{path}: not a readable {what} ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise CellfluxError(f"{path}: not a {what} (a JSON object expected)")
    return data


MAX_LISTED = 12  # names listed in the text view (all of them in --json)


def counts(values) -> dict[str, int]:
    """Occurrences of each value, most frequent first (ties in name order)."""
    return dict(sorted(Counter(str(v) for v in values).items(), key=lambda kv: (-kv[1], kv[0])))


def listed(counted: dict[str, int]) -> str:
    """``name (n), ...`` for the first :data:`MAX_LISTED` entries, then how many more."""
    items = [f"{k} ({v})" for k, v in list(counted.items())[:MAX_LISTED]]
    more = len(counted) - MAX_LISTED
    return ", ".join(items) + (f", and {more} more" if more > 0 else "")


# ------------------------------------------------------------------------------------------ stats.jsonl

def describe_stats(path: Path) -> dict:
    """``stats.jsonl`` of a pretrain or posttrain run: records, step range, logged keys, the last record."""
    records, bad = [], 0
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CellfluxError(f"{path}: not a readable stats.jsonl ({type(exc).__name__})") from None
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
    return {"what": "stats", "path": str(path), "records": len(records), "unreadable_lines": bad,
            "first_step": min(steps) if steps else None, "last_step": max(steps) if steps else None,
            "keys": sorted({k for r in records for k in r}), "last": records[-1] if records else None}


def lines_stats(info: dict) -> list[str]:
    lines = [f"  {count(info['records'], 'record')}" + (f", steps {info['first_step']}-{info['last_step']}"
                                                         if info["first_step"] is not None else "")]
    if info["unreadable_lines"]:
        lines.append(f"  {count(info['unreadable_lines'], 'unreadable line')} (skipped)")
    lines.append(f"  keys: {', '.join(info['keys'])}")
    if info["last"]:
        lines.append(f"  last: {settings_line(info['last'])}")
    return lines


def settings_line(settings: dict) -> str:
    """``key=value ...`` with JSON values (floats to 4 significant digits)."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={json.dumps(v)}" for k, v in settings.items())


# ------------------------------------------------------------------------------------------ evaluate

def describe_report(path: Path) -> dict:
    """An ``evaluate`` report: ``report.json`` itself, or the ``--out`` folder holding it (with its files)."""
    from cellfluxrl.commands.report_folder import read_report

    folder = path if path.is_dir() else path.parent
    report = read_report(folder / "report.json")
    s = report["settings"]
    sections = {}
    for name, section in report["sections"].items():
        table = section.get("table", {})
        sections[name] = {"n_pairs": section.get("n_pairs"), "n_compounds": section.get("n_conditions"),
                          "columns": list(section.get("columns", [])),
                          "overall": {c: (table.get(c, {}).get("overall") or {}).get("mean") for c in section.get("columns", [])},
                          "moa_accuracy": {c: (table.get(c, {}).get("moa_accuracy") or {}).get("mean")
                                           for c in section.get("columns", [])}}
    fingerprints = s.get("fingerprints") or {}
    info = {"what": "evaluation" if path.is_dir() else "report", "path": str(path),
            "format": report.get("format"), "cellfluxrl_version": (report.get("versions") or {}).get("cellfluxrl"),
            "dataset": s.get("dataset"), "runs": [{k: r.get(k) for k in ("name", "path", "kind", "step")}
                                                  for r in s.get("runs", [])],
            "split": s.get("split"), "seed": s.get("seed"), "best_of": s.get("best_of"), "weights": s.get("weights"),
            "sampling": (s.get("sampling") or {}).get("text"), "sections": sections,
            "accepted_reference_changes": list(fingerprints.get("accepted_reference_changes", []))}
    if path.is_dir():
        info["files"] = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    return info


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def lines_report(info: dict) -> list[str]:
    lines = [f"  made by: cellfluxrl evaluate, version {info['cellfluxrl_version']}, seed {info['seed']}",
             f"  dataset: {info['dataset']}"]
    lines += [f"  run {r['name']}: {r['path']} ({r['kind']}, step {r['step']})" for r in info["runs"]]
    lines.append(f"  sampling: {info['sampling']}; best-of {info['best_of']}; weights {info['weights']}")
    for name, section in info["sections"].items():
        lines.append(f"  section {name}: {count(section['n_pairs'] or 0, 'test pair')}, "
                     f"{count(section['n_compounds'] or 0, 'compound')}")
        lines.append("    overall: " + ", ".join(f"{c} {_cell(v)}" for c, v in section["overall"].items()))
        lines.append("    MoA accuracy (judge): " + ", ".join(f"{c} {_cell(v)}" for c, v in section["moa_accuracy"].items()))
    for change in info["accepted_reference_changes"]:
        lines.append(f"  accepted reference change (--allow-changed-reference): {change}")
    if info.get("files"):
        lines.append(f"  files: {', '.join(info['files'])}")
    return lines


# ------------------------------------------------------------------------------------------ sample --format

def describe_export(folder: Path) -> dict:
    """A ``sample --format tiff|png`` folder: ``samples.csv`` rows, the image files, compounds, rewards, and
    the ``samples.npz`` written with them (inside the folder; beside it, as ``FOLDER.npz``, from earlier versions)."""
    table = folder / "samples.csv"
    try:
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CellfluxError(f"{table}: not a readable samples.csv ({type(exc).__name__})") from None
    if rows and not {"pair", "file", "compound"} <= set(rows[0]):
        raise CellfluxError(f"{table}: not a `cellfluxrl sample` table (no pair/file/compound columns)")
    files = [r["file"] for r in rows if r.get("file")]
    missing = [name for name in files if not (folder / name).is_file()]
    rewards = sorted(k for k in (rows[0] if rows else {}) if k.startswith("reward"))
    npz = folder / "samples.npz" if (folder / "samples.npz").is_file() else folder.with_suffix(".npz")  # older: beside
    return {"what": "sample images", "path": str(folder), "rows": len(rows), "files": len(files),
            "missing_files": missing, "formats": counts(Path(n).name.split(".", 1)[-1] for n in files),
            "compounds": counts(r["compound"] for r in rows), "reward_columns": rewards,
            "npz": str(npz) if npz.is_file() else None}


def lines_export(info: dict) -> list[str]:
    formats = ", ".join(f"{n} .{fmt}" for fmt, n in info["formats"].items()) or "none"
    lines = [f"  samples.csv: {count(info['rows'], 'row')}; image files: {formats}",
             f"  compounds: {listed(info['compounds'])}"]
    if info["missing_files"]:
        lines.append(f"  missing: {count(len(info['missing_files']), 'listed file')} (first {info['missing_files'][0]})")
    if info["reward_columns"]:
        lines.append(f"  reward columns: {', '.join(info['reward_columns'])}")
    lines.append(f"  images and metadata: {info['npz'] or 'no samples.npz with it'}")
    return lines


# ------------------------------------------------------------------------------------------ evaluators

def describe_reference(path: Path) -> dict:
    """A dataset's ``reference_stats.json``: images measured, segmenter, statistics, MoAs with their counts."""
    data = read_json(path, "reference statistics file")
    if "moas" not in data or not isinstance(data["moas"], dict):
        raise CellfluxError(f"{path}: not a cellfluxrl reference statistics file (no 'moas')")
    return {"what": "reference statistics", "path": str(path), "format": data.get("format"),
            "split": data.get("split"), "n_images": data.get("n_images"), "excluded": data.get("excluded"),
            "segmenter": (data.get("segmenter") or {}).get("name"), "statistics": list(data.get("stats", [])),
            "moas": {m: v.get("n") for m, v in data["moas"].items() if isinstance(v, dict)}}


def lines_reference(info: dict) -> list[str]:
    moas = ", ".join(f"{m} ({n})" for m, n in info["moas"].items())
    return [f"  {_some(info['n_images'], str(info['split']) + ' image')} measured with the {info['segmenter']} segmenter "
            f"(excluded: {info['excluded']})",
            f"  statistics: {', '.join(info['statistics'])}",
            f"  MoAs ({len(info['moas'])}): {moas}"]


def _some(n, noun: str, plural: str | None = None) -> str:
    """:func:`count` for a stored number that may be missing (``None``: ``"? images"``)."""
    return count(n, noun, plural) if isinstance(n, int) else f"{'?' if n is None else n} {plural or noun + 's'}"


def _classifier_facts(report: dict) -> dict:
    keys = ("n_classes", "n_train", "n_test", "test_accuracy", "epochs", "seed", "widths", "seconds")
    return {k: report.get(k) for k in keys}


def describe_classifier_report(path: Path) -> dict:
    """``classifier.json``: the reward MoA classifier's and the judge's training and test figures."""
    data = read_json(path, "classifier report")
    if "test_accuracy" not in data:
        raise CellfluxError(f"{path}: not a cellfluxrl classifier report (no 'test_accuracy')")
    return {"what": "MoA classifier report", "path": str(path), "reward_classifier": _classifier_facts(data),
            "judge": _classifier_facts(data.get("judge") or {}), "halves": data.get("halves")}


def describe_classifier(path: Path) -> dict:
    """A stored MoA classifier (``moa_classifier.pt``, ``judge.pt``): classes, widths, training figures."""
    import torch

    from cellfluxrl.rewards.moa_classifier import FORMAT

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip, foreign objects
        raise CellfluxError(f"{path}: not a readable .pt file ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CellfluxError(f"{path}: a .pt file that is neither a run checkpoint nor a cellfluxrl MoA classifier")
    config, stored = payload.get("config") or {}, payload.get("info") or {}
    return {"what": "MoA classifier", "path": str(path), "classes": list(config.get("classes", [])),
            "widths": list(config.get("widths", [])),
            "parameters": int(sum(v.numel() for v in payload["state_dict"].values())), **_classifier_facts(stored)}


def _classifier_line(facts: dict) -> str:
    accuracy = "n/a" if facts.get("test_accuracy") is None else f"{facts['test_accuracy']:.3f}"
    return (f"test accuracy {accuracy} on {_some(facts.get('n_test'), 'image')}; "
            f"{_some(facts.get('n_classes'), 'class', 'classes')}, {_some(facts.get('n_train'), 'train image')}, "
            f"{_some(facts.get('epochs'), 'epoch')}, seed {facts.get('seed')}")


def lines_classifier_report(info: dict) -> list[str]:
    lines = [f"  reward classifier: {_classifier_line(info['reward_classifier'])}",
             f"  judge: {_classifier_line(info['judge'])}"]
    return lines + ([f"  halves: {info['halves']}"] if info.get("halves") else [])


def lines_classifier(info: dict) -> list[str]:
    return [f"  {info['parameters']:,} parameters, widths {info['widths']}", f"  {_classifier_line(info)}",
            f"  classes ({len(info['classes'])}): {', '.join(info['classes'])}"]


# ------------------------------------------------------------------------------------------ demo

def describe_demo(folder: Path) -> dict:
    """A ``cellfluxrl demo --out`` folder: its settings (``demo.json``) and which stages are finished."""
    settings = read_json(folder / "demo.json", "demo settings file")
    stages = {"data": (folder / "data" / "meta.json").is_file(), "base": (folder / "base" / "checkpoint.pt").is_file(),
              "rl": (folder / "rl" / "checkpoint.pt").is_file(), "eval": (folder / "eval" / "report.json").is_file()}
    return {"what": "demo", "path": str(folder), "settings": settings, "stages": stages}


def lines_demo(info: dict) -> list[str]:
    done = [name for name, ok in info["stages"].items() if ok]
    todo = [name for name, ok in info["stages"].items() if not ok]
    return [f"  stages done: {', '.join(f'{n}/' for n in done) or 'none'}"
            + (f"; to do: {', '.join(f'{n}/' for n in todo)} (re-run the demo to finish)" if todo else ""),
            f"  settings: {settings_line(info['settings'])}",
            "  each stage folder is described by `cellfluxrl info` too"]


# ------------------------------------------------------------------------------------ measure's CSVs

def describe_measurements(path: Path) -> dict | None:
    """A table ``cellfluxrl measure`` wrote (recognised by its exact header), else ``None``.

    The image table (``FILE.csv``): images, compounds, kinds (generated/real) and the mean counts;
    an object table (``FILE_Nuclei.csv``, ...): its compartment, objects and images.
    """
    import csv

    from cellfluxrl.evaluation.measurement_tables import COMPARTMENTS, IMAGE_HEADER, object_header

    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = tuple(next(reader, []))
            tables = {IMAGE_HEADER: "Image", **{object_header(c): c for c in COMPARTMENTS}}
            if header not in tables:
                return None
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    table, column = tables[header], {name: i for i, name in enumerate(header)}
    info = {"what": "measurements", "path": str(path), "table": table, "rows": len(rows)}
    if table == "Image":
        info["compounds"] = len({r[column["Metadata_Compound"]] for r in rows})
        info["kinds"] = sorted({r[column["Metadata_Kind"]] for r in rows}) if "Metadata_Kind" in column else []
        info["mean_counts"] = {c: sum(float(r[column[f"Image_Count_{c}"]]) for r in rows) / max(len(rows), 1)
                               for c in COMPARTMENTS}
    else:
        info["images"] = len({r[column["ImageNumber"]] for r in rows})
    return info


def lines_measurements(info: dict) -> list[str]:
    """The ``info`` lines of :func:`describe_measurements`."""
    if info["table"] == "Image":
        counts = ", ".join(f"{c} {v:.2f}" for c, v in info["mean_counts"].items())
        return [f"  `cellfluxrl measure` image table: {info['rows']} image(s), {info['compounds']} compound(s)"
                + (f" ({', '.join(info['kinds'])})" if info["kinds"] else ""), f"  mean objects per image: {counts}"]
    return [f"  `cellfluxrl measure` {info['table']} table: {info['rows']} object(s) in {info['images']} image(s)"]
