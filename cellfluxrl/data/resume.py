"""Resuming ``prepare``: is ``OUT`` the dataset asked for, and what did a killed build leave?

:class:`~cellfluxrl.data.layout.DatasetWriter` builds a dataset in a hidden sibling folder
``.OUT.partial-HOST-PID-XXXX`` and renames it to ``OUT`` when complete, so ``OUT`` is either absent,
or a finished dataset (perhaps still missing evaluators). ``prepare`` run again asks
:func:`resume_dataset` whether ``OUT`` holds the dataset it would write (same source and settings:
skip to the evaluators) or another one (refused with one line naming the setting); the writer
removes the build folders of killed runs (:func:`cellfluxrl.data.partials.remove_stale_partials`).
This module sits above :mod:`cellfluxrl.data.layout` (it loads the dataset); the writer's folder
naming is in :mod:`cellfluxrl.data.partials`, below both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from cellfluxrl.data.layout import load_dataset
from cellfluxrl.errors import CellfluxError


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
    meta = load_dataset(out).meta
    stored = {"source": meta.get("source"), **dict(meta.get(section) or {})}
    wanted = json.loads(json.dumps({"source": source, **dict(settings)}))
    for key, value in wanted.items():
        if stored.get(key) != value:
            raise CellfluxError(f"{out}: already prepared with {key} {json.dumps(stored.get(key))}, not "
                                f"{json.dumps(value)}; re-run with the same settings to resume it, or choose a "
                                f"new folder")
    return True
