"""Output folders a command owns: one writer at a time, nothing of the user's written over, dead temp files.

Three conventions, each owned here:

* **The lock.** A command that writes a folder ``F`` (a run, a dataset, an evaluation report) holds
  ``F``'s lock for its whole life: an exclusive ``flock`` on the file ``.F.lock`` beside ``F`` (so
  the lock never sits among the folder's own files, and a dataset can still be renamed into place).
  The kernel drops the lock when its process ends, however it ends; the file records who held it
  (``{"pid", "host", "command"}`` as JSON) and is removed on release. A second writer gets one line
  naming the holder's PID; a lock file left by a killed process is taken over (the caller is told,
  :attr:`FolderLock.took_over`). Nested holds of one folder in one process share the lock.
* **Temp files.** Files are written as ``.NAME.tmp-PID`` beside ``NAME``, then renamed over it
  (:func:`temp_path`); such a file is removed by another process only when ``PID`` is dead
  (:func:`dead_temps`), so a live writer's temp file is never deleted under it.
* **Ownership.** A command writes only into an absent or empty folder, or one holding nothing but
  the files it writes itself (:func:`check_owned`), recognised by name and, for the names a user's
  file could have (``stats.jsonl``, ``config.json``, ``checkpoint.pt``, ...), by content
  (:data:`OWN_FILES`); a dataset folder (``meta.json``) is never a run. This one lives in
  :mod:`cellfluxrl.rundir.owned` and is re-exported here.

Plumbing: no torch, imports only :mod:`cellfluxrl.errors`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from cellfluxrl.errors import CellfluxError
from cellfluxrl.rundir.owned import (OWN_FILES, check_contents, check_owned,  # noqa: F401 (the API)
                                     check_run_folder)

log = logging.getLogger(__name__)


class FolderBusy(CellfluxError):
    """Another live process holds the folder's lock."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (``os.kill(pid, 0)``; someone else's counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OverflowError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Temp files.

def temp_path(path: str | os.PathLike) -> Path:
    """The temp file ``.NAME.tmp-PID`` that this process writes before renaming it over ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def temp_writer(tmp: Path) -> int | None:
    """The PID in a ``.NAME.tmp-PID`` name, or ``None`` when the name does not end in one."""
    pid = tmp.name.rsplit("-", 1)[-1]
    return int(pid) if ".tmp-" in tmp.name and pid.isdigit() else None


def dead_temps(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """The temp files ``.NAME.tmp-PID`` of ``names`` in ``folder`` whose writer is no longer running."""
    found = []
    for name in names:
        for tmp in Path(folder).glob(f".{name}.tmp-*"):
            pid = temp_writer(tmp)
            if pid is not None and pid != os.getpid() and not pid_alive(pid):
                found.append(tmp)
    return sorted(found)


def remove_dead_temps(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete :func:`dead_temps` (what killed writes left); returns what was removed."""
    removed = []
    for tmp in dead_temps(folder, names):
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:  # gone already, or not ours to delete: harmless
            continue
    if removed:
        log.info("removed %d temp file(s) of killed writes: %s", len(removed), ", ".join(p.name for p in removed))
    return removed


# --------------------------------------------------------------------------------------------
# The lock.

def lock_path(folder: str | os.PathLike) -> Path:
    """``.NAME.lock`` beside the folder (its real path, so two spellings of one folder share it)."""
    folder = Path(folder).resolve()
    return folder.with_name(f".{folder.name}.lock")


@dataclass
class FolderLock:
    """A held folder lock.

    Attributes:
        folder: the locked folder (resolved).
        path: the lock file.
        fd: the open, ``flock``-ed file descriptor.
        took_over: ``{"pid", "host", "command"}`` of a killed holder whose lock file was taken over,
            else ``None``.
    """

    folder: Path
    path: Path
    fd: int
    took_over: dict | None = None
    depth: int = 1

    def describe_takeover(self) -> str | None:
        """One line for the user when a dead process's lock was taken over."""
        if not self.took_over:
            return None
        owner = self.took_over
        return (f"took over the lock of {self.folder} left by {owner.get('command', '?')} (PID "
                f"{owner.get('pid', '?')}), which is no longer running")


_HELD: dict[Path, FolderLock] = {}


def _read_holder(fd: int) -> dict:
    """The JSON a lock file holds (``{}`` when empty or unreadable)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def acquire(folder: str | os.PathLike, command: str) -> FolderLock:
    """Take the lock of ``folder`` for ``command`` (non-blocking).

    Raises:
        FolderBusy: a live process holds it (one line naming its PID, host and command).
        CellfluxError: the lock file cannot be created (the parent folder is not writable).
    """
    import fcntl

    path = lock_path(folder)
    held = _HELD.get(path)
    if held is not None:
        held.depth += 1
        return held
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CellfluxError(f"cannot create {path.parent} ({exc.strerror or exc})") from None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CellfluxError(f"{Path(folder)}: cannot write its lock file {path} ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CellfluxError(f"{path}: cannot lock ({exc.strerror or exc})") from None
            raise FolderBusy(f"{Path(folder)} is in use by {holder.get('command', 'another command')} (PID "
                             f"{holder.get('pid', '?')} on {holder.get('host', '?')}); wait for it to finish or "
                             f"stop it") from None
        try:  # the holder we raced may have released and removed the file: then lock the new one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = _read_holder(fd)
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "command": command}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(mine).encode())
    took_over = previous if previous.get("pid") not in (None, os.getpid()) else None
    lock = FolderLock(folder=Path(folder).resolve(), path=path, fd=fd, took_over=took_over)
    if took_over:
        log.warning("%s", lock.describe_takeover())
    _HELD[path] = lock
    return lock


def release(lock: FolderLock) -> None:
    """Drop one hold of ``lock``; the last one removes the lock file and unlocks it."""
    lock.depth -= 1
    if lock.depth > 0:
        return
    _HELD.pop(lock.path, None)
    try:
        lock.path.unlink()  # before unlocking: a waiter that opened it re-checks the inode
    except OSError:
        pass
    os.close(lock.fd)


@contextmanager
def hold(folder: str | os.PathLike, command: str) -> Iterator[FolderLock]:
    """``with hold(RUN, "pretrain") as lock:`` the folder's lock for the block, released on any exit."""
    lock = acquire(folder, command)
    try:
        yield lock
    finally:
        release(lock)


@contextmanager
def hold_as_main(folder: str | os.PathLike, command: str) -> Iterator[FolderLock | None]:
    """:func:`hold` in the main process of a torchrun job (``RANK`` 0 or unset); other ranks hold nothing.

    Commands take the lock first, before their heavy imports, so a second writer is refused at
    once; the library they call holds it again (nested holds share the lock).
    """
    if os.environ.get("RANK", "0") != "0":
        yield None
        return
    with hold(folder, command) as lock:
        yield lock
