"""Resuming ``prepare``: is ``OUT`` the dataset asked for, and what did a killed build leave?

:class:`~cellfluxrl.data.layout.DatasetWriter` builds a dataset in a hidden sibling folder
``.OUT.partial-HOST-PID-XXXX`` and renames it to ``OUT`` when complete, so ``OUT`` is either absent,
or a finished dataset (perhaps still missing evaluators). ``prepare`` run again asks
:func:`resume_dataset` whether ``OUT`` holds the dataset it would write (same source and settings:
skip to the evaluators) or another one (refused with one line naming the setting); the writer
removes the build folders of killed runs (:func:`remove_stale_partials`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Mapping

from cellfluxrl.errors import CellfluxError
from cellfluxrl.rundir import pid_alive as _alive  # one owner of the liveness test


def partial_prefix(out: Path) -> str:
    """Name prefix of the temporary build folders of ``out`` made on this host: ``.OUT.partial-HOST-``."""
    return f".{out.name}.partial-{socket.gethostname()}-"


def remove_stale_partials(out: str | os.PathLike) -> list[Path]:
    """Delete the temporary build folders of ``out`` left by killed ``prepare`` runs on this host.

    A folder ``.OUT.partial-HOST-PID-XXXX`` next to ``out`` whose process ``PID`` no longer runs is
    a build that was killed before its rename; those of running processes (a concurrent
    ``prepare``) and of other hosts are left alone.

    Returns:
        The folders removed.
    """
    out = Path(out)
    prefix, removed = partial_prefix(out), []
    if not out.parent.is_dir():
        return removed
    for path in out.parent.glob(f"{prefix}*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def resume_dataset(out: str | os.PathLike, source: str, section: str, settings: Mapping[str, Any]) -> bool:
    """Whether ``prepare`` may resume ``out``: it already holds a finished dataset with these settings.

    Args:
        out: the dataset folder ``prepare`` was asked to write.
        source: the meta.json ``source`` it must have (``"synthetic"``, ``"bbbc021-impa"``, ...).
        section: the meta.json entry that records the settings (``"generator"``, ``"preparation"``).
        settings: the requested settings (JSON values), compared one by one with that entry.

    Returns:
        False when ``out`` does not exist or is an empty folder (write the dataset); True when it
        is a finished, valid dataset of ``source`` with equal settings (skip to the evaluators).

    Raises:
        CellfluxError: ``out`` holds something that is not a finished dataset, a dataset that
            :func:`~cellfluxrl.data.layout.load_dataset` rejects, or one made from another source
            or with another setting (one line naming the first differing setting, its stored and
            requested values).
    """
    out = Path(out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    if not (out / "meta.json").is_file():
        raise CellfluxError(f"output {out} already exists and is not empty (and is not a finished dataset: no "
                            f"meta.json); choose a new folder")
    from cellfluxrl.data.layout import load_dataset

    meta = load_dataset(out).meta
    stored = {"source": meta.get("source"), **dict(meta.get(section) or {})}
    wanted = json.loads(json.dumps({"source": source, **dict(settings)}))
    for key, value in wanted.items():
        if stored.get(key) != value:
            raise CellfluxError(f"{out}: already prepared with {key} {json.dumps(stored.get(key))}, not "
                                f"{json.dumps(value)}; re-run with the same settings to resume it, or choose a "
                                f"new folder")
    return True
