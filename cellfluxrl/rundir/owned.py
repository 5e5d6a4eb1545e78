"""Ownership of output folders: a command writes only into what it wrote, recognised by name and content.

A command writes only into an absent or empty folder, or one holding nothing but the files it
writes itself (:func:`check_owned`); a dataset folder (``meta.json``) is never a run. A file is the
command's by its name *and*, for the names a user's file could plausibly have (``stats.jsonl``,
``config.json``, ``checkpoint.pt``, ``samples/``, ``report.md``, ``validation.png``), by its content (:data:`OWN_FILES`):
a marker or schema every file the project writes carries, checked cheaply (a checkpoint's pickled
structure is read from its zip without loading a tensor). Figures and ``report.json`` (which
``evaluate`` parses and checks itself) pass on their names.

Plumbing: no torch, imports only :mod:`cellfluxrl.errors`.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

from cellfluxrl.errors import CellfluxError

RUN_KINDS = ("pretrain", "posttrain")
CHECKPOINT_KEYS = ("kind", "step", "config", "model", "ema")  # every run checkpoint's top-level keys
STATS_VALUES = ("loss", "reward")  # a stats record holds a number under one of these
REPORT_MD_START = "# Evaluation on "  # the first line of every report.md (evaluation.report_text)
VALIDATION_PLOT_MARK = "cellfluxrl posttrain validation curve"  # Software text of RUN/validation.png (commands.selection_view)


def stats_problem(path: Path) -> str | None:
    """Why ``path`` is not a run's ``stats.jsonl``; ``None`` when it is one.

    A run's log holds one JSON object per line, written as ``{"step": <int>, ...}`` (``step`` its
    first key) with a number under ``"loss"`` (pretrain, posttrain) or ``"reward"`` (posttrain);
    its last line may be cut short by a kill. An empty file is one too (a resume that dropped every
    record leaves it).
    """
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return "not a text file"
    lines = text.split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if number == len(lines) and record is None and line.startswith('{"step": '):
            continue  # a last line cut short by a kill
        if not (isinstance(record, dict) and next(iter(record), None) == "step" and type(record["step"]) is int
                and any(isinstance(record.get(key), (int, float)) for key in STATS_VALUES)):
            return f"line {number} is not a cellfluxrl stats record"
    return None


def run_config_problem(path: Path) -> str | None:
    """Why ``path`` is not a run's ``config.json`` (a JSON object whose ``kind`` is a run kind); ``None`` when it is."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        stored = None
    found = stored.get("kind") if isinstance(stored, dict) else None
    return None if found in RUN_KINDS else "not a run config"


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a run's ``checkpoint.pt``; ``None`` when it is one.

    Cheap whatever the checkpoint's size: a ``torch.save`` file is a zip whose ``*/data.pkl`` holds
    the pickled structure without the tensor bytes; its strings (read with :mod:`pickletools`,
    nothing is executed) must name every key of :data:`CHECKPOINT_KEYS` and a run kind.
    """
    import pickletools
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")), None)
            data = archive.read(name) if name is not None else None
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError):
        data = None
    if data is None:
        return "not a torch checkpoint"
    try:
        strings = {arg for _, arg, _ in pickletools.genops(data) if isinstance(arg, str)}
    except Exception:  # a malformed pickle of any kind: not ours
        return "not a readable torch checkpoint"
    if not set(CHECKPOINT_KEYS) <= strings or not strings & set(RUN_KINDS):
        return "not a cellfluxrl run checkpoint"
    return None


def sample_grids_problem(path: Path) -> str | None:
    """Why ``path`` is not a posttrain ``samples`` folder (only ``step_NNNNNN.png`` grids and hidden temp files)."""
    if not path.is_dir():
        return "not a folder"
    for entry in sorted(path.iterdir()):
        if not entry.name.startswith(".") and not fnmatch.fnmatch(entry.name, "step_*.png"):
            return f"it holds {entry.name}"
    return None


def report_md_problem(path: Path) -> str | None:
    """Why ``path`` is not an evaluation's ``report.md`` (its first line); ``None`` when it is one."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
    except (OSError, UnicodeDecodeError):
        first = ""
    return None if first.startswith(REPORT_MD_START) else "not a cellfluxrl report"


def validation_plot_problem(path: Path) -> str | None:
    """Why ``path`` is not a posttrain run's ``validation.png`` (a PNG whose text chunks, before the
    image data, carry :data:`VALIDATION_PLOT_MARK`); ``None`` when it is one."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        head = b""
    if not head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "not a PNG image"
    return None if VALIDATION_PLOT_MARK.encode() in head.split(b"IDAT", 1)[0] else "not a cellfluxrl validation plot"


# The files whose name a user's file could plausibly have, recognised by their content. A name
# missing here (figures, report.json, which its command reads and checks itself) passes on its name.
OWN_FILES: dict[str, Callable[[Path], str | None]] = {
    "stats.jsonl": stats_problem, "config.json": run_config_problem, "checkpoint.pt": checkpoint_problem,
    "samples": sample_grids_problem, "report.md": report_md_problem, "validation.png": validation_plot_problem}


def check_contents(folder: str | os.PathLike, names: Iterable[str], command: str, what: str = "folder",
                   recognise: Mapping[str, Callable[[Path], str | None]] | None = None) -> None:
    """Refuse an entry of ``folder`` named like ``command``'s own file but not written by it.

    Args:
        folder: the output folder.
        names: the entries to check (absent ones and names ``recognise`` lacks are skipped).
        command, what: as in :func:`check_owned`.
        recognise: ``{name: problem(path) -> reason or None}`` (default :data:`OWN_FILES`).

    Raises:
        CellfluxError: one line naming the file and why it is not the command's.
    """
    folder = Path(folder)
    recognise = OWN_FILES if recognise is None else recognise
    for name in sorted(names):
        problem = recognise.get(name)
        reason = problem(folder / name) if problem is not None and (folder / name).exists() else None
        if reason:
            raise CellfluxError(f"{what} {folder} holds {name}, which {command} did not write ({reason}); choose a "
                                f"new or empty folder")


def check_owned(folder: str | os.PathLike, command: str, allowed: Iterable[str], what: str = "folder",
                recognise: Mapping[str, Callable[[Path], str | None]] | None = None) -> bool:
    """Refuse a folder that holds files ``command`` did not write; True when it holds some of its own.

    A file is the command's by its name *and*, for the names in ``recognise``, by its content
    (:func:`check_contents`): a user's ``stats.jsonl`` is refused like a user's ``notes.txt``.

    Args:
        folder: the output folder.
        command: the command's name for the message (``"pretrain"``).
        allowed: ``fnmatch`` patterns of the top-level names the command writes (temp files of
            those names, ``.NAME.tmp-*``, are allowed too).
        what: how to name the folder in the message (``"RUN"``, ``"--out"``).
        recognise: content checks by name (default :data:`OWN_FILES`; ``{}``: names only).

    Returns:
        False for an absent or empty folder, True for one holding only allowed names.

    Raises:
        CellfluxError: a file in place of the folder, a dataset folder, or a foreign entry (named).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CellfluxError(f"{what} {folder} is a file; give a folder")
    if not folder.exists():
        return False
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return False
    allowed = list(allowed)
    if "meta.json" in entries and not any(fnmatch.fnmatch("meta.json", pat) for pat in allowed):
        raise CellfluxError(f"{what} {folder} is a dataset folder (it has meta.json); {command} writes into a "
                            f"new or empty folder")
    patterns = [*allowed, *(f".{pat}.tmp-*" for pat in allowed)]
    for name in entries:
        if not any(fnmatch.fnmatch(name, pat) for pat in patterns):
            raise CellfluxError(f"{what} {folder} holds {name}, which {command} did not write; choose a new or "
                                f"empty folder")
    check_contents(folder, entries, command, what, recognise)
    return True


def check_run_folder(folder: str | os.PathLike, kind: str, names: Iterable[str],
                     checkpoint: str = "checkpoint.pt") -> bool:
    """May ``kind`` write into this run folder? True when it already holds run files.

    A folder with a ``checkpoint`` is a run to resume; files the user added beside it under other
    names are left alone, since a run writes only its own names. Without one, the folder must pass
    :func:`check_owned` for ``names``. Either way its ``config.json`` (when present) must be a run
    config of this ``kind``, and every present file of ``names`` must be a run's by its content
    (:data:`OWN_FILES`: a user's ``stats.jsonl`` or ``checkpoint.pt`` is never written over).

    Raises:
        CellfluxError: a foreign file, a dataset folder, or a ``config.json`` of another kind or program.
    """
    folder = Path(folder)
    names = list(names)
    resuming = folder.is_dir() and (folder / checkpoint).is_file() and not (folder / "meta.json").exists()
    if not resuming and not check_owned(folder, kind, names, "run folder", recognise={}):
        return False
    config = folder / "config.json"
    if config.is_file():
        try:
            stored = json.loads(config.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            stored = None
        found = stored.get("kind") if isinstance(stored, dict) else None
        if found != kind:
            what = f"a {found} run" if found in RUN_KINDS else "a config.json that is not a run's"
            raise CellfluxError(f"{folder} holds {what}; {kind} writes into a new or empty folder, or resumes "
                                f"its own run")
    check_contents(folder, [name for name in names if name != "config.json"], kind, "run folder")
    return True
