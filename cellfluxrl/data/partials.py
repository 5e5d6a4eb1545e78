"""The build folders of ``prepare``: their names and the clean-up of those left by killed runs.

:class:`~cellfluxrl.data.layout.DatasetWriter` builds a dataset in a hidden sibling folder
``.OUT.partial-HOST-PID-XXXX`` and renames it to ``OUT`` when complete. This module owns that
naming; it imports only the plumbing's liveness test (:func:`cellfluxrl.rundir.pid_alive`), so the writer
(:mod:`cellfluxrl.data.layout`) and the resume check (:mod:`cellfluxrl.data.resume`, which loads
datasets) both sit above it.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

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
