"""Files as the dataset writer makes them: ``.npy`` arrays appended chunk by chunk, and the umask.

:class:`NpyAppender` streams items into a ``.npy`` whose header is written last (peak memory does
not grow with N); :func:`follow_umask` gives the private temp files and folders of
``tempfile.mkstemp``/``mkdtemp`` the mode a plain ``open``/``mkdir`` would have. Standard library
and numpy only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

_HEADER_BYTES = 128  # fixed .npy header size, so the shape can be written after the data


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A version-1.0 ``.npy`` header of exactly :data:`_HEADER_BYTES` bytes."""
    body = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (np.dtype(dtype).str, tuple(shape))
    pad = _HEADER_BYTES - 10 - len(body) - 1
    if pad < 0:
        raise ValueError(f"shape {shape} too long for the fixed .npy header")
    body = body + " " * pad + "\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1")


class NpyAppender:
    """Append arrays of a fixed item shape to a ``.npy`` file; the header is written on close."""

    def __init__(self, path: Path, dtype: np.dtype, item_shape: tuple[int, ...]):
        self.path, self.dtype, self.item_shape, self.n = path, np.dtype(dtype), tuple(item_shape), 0
        self._file = open(path, "wb")
        self._file.write(b"\0" * _HEADER_BYTES)

    def append(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if array.shape[1:] != self.item_shape:
            raise ValueError(f"{self.path.name}: expected items of shape {self.item_shape}, got {array.shape[1:]}")
        self._file.write(array.tobytes())
        self.n += array.shape[0]

    def close(self) -> None:
        self._file.seek(0)
        self._file.write(_npy_header(self.dtype, (self.n, *self.item_shape)))
        self._file.close()


def follow_umask(path: str | os.PathLike) -> None:
    """Give a folder or file made by ``tempfile.mkdtemp``/``mkstemp`` (always private: 0o700/0o600)
    the mode a plain ``mkdir``/``open`` would have given it: 0o777 / 0o666 minus the umask."""
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~current_umask())


def current_umask() -> int:
    """The process umask (read from /proc on Linux; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
