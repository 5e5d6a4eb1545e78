"""The on-disk dataset layout: one writer that streams, one loader that validates.

A dataset is a folder (documented in ``data/README.md``)::

    DATASET/
      meta.json          format_version, source, channels, image_size, counts, embedding info
      images.npy         uint8 (N, H, W, C), memory-mappable; channels (actin, tubulin, dna)
      metadata.csv       one row per image: id, split, batch, compound, dose, moa, state, source
      conditions.csv     one row per compound: index, compound, moa, smiles, ood, embedding
      embeddings.npy     float32 (n_conditions, D); row i belongs to conditions.csv index i
      masks/nuclei.npy   optional int32 (N, H, W) ground-truth nucleus labels (synthetic data)
      masks/cells.npy    optional int32 (N, H, W) ground-truth cell labels
      evaluators/        reference statistics and MoA classifier (written by `prepare`)

:class:`DatasetWriter` builds it in a temporary sibling folder and renames it into place only when
complete, so an interrupted ``prepare`` never leaves a dataset that looks finished (the sibling
``.OUT.partial-HOST-PID-*`` of a killed run is removed by the next one on that host).
:func:`resume_dataset` tells ``prepare`` run again whether ``OUT`` already holds the dataset it
asks for (then only the missing evaluators are fitted) or one made with other settings (refused). Images are
appended chunk by chunk straight into ``images.npy`` (whose header is written last), so peak memory
does not grow with N. :func:`load_dataset` checks every file and raises a one-line
:class:`~cellfluxrl.errors.CellfluxError` naming the file and row on any problem.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from cellfluxrl import __version__
from cellfluxrl.data.resume import partial_prefix, remove_stale_partials, resume_dataset  # noqa: F401 (re-exported)
from cellfluxrl.errors import CellfluxError

FORMAT_VERSION = 1
METADATA_COLUMNS = ("id", "split", "batch", "compound", "dose", "moa", "state", "source")
CONDITION_COLUMNS = ("index", "compound", "moa", "smiles", "ood", "embedding")
SPLITS = ("train", "test")
STATES = ("control", "treated")
_HEADER_BYTES = 128  # fixed .npy header size, so the shape can be written after the data


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A version-1.0 ``.npy`` header of exactly :data:`_HEADER_BYTES` bytes."""
    body = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (np.dtype(dtype).str, tuple(shape))
    pad = _HEADER_BYTES - 10 - len(body) - 1
    if pad < 0:
        raise ValueError(f"shape {shape} too long for the fixed .npy header")
    body = body + " " * pad + "\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1")


class _NpyAppender:
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


class DatasetWriter:
    """Stream images and metadata into a new dataset folder; rename into place on :meth:`finish`.

    Use as a context manager: an exception inside the ``with`` block deletes the partial folder.

    Args:
        out: the dataset folder to create; must not exist or be empty.
        image_size: H = W of every image (px).
        channels: channel names, in order.
        source: ``"synthetic"``, ``"bbbc021-impa"`` or ``"bbbc021-raw"``.
        with_masks: whether ground-truth ``masks/nuclei.npy`` and ``masks/cells.npy`` are written.
    """

    def __init__(self, out: str | os.PathLike, image_size: int, channels: Iterable[str], source: str,
                 with_masks: bool = False):
        self.out = Path(out)
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise CellfluxError(f"output {self.out} already exists and is not empty; choose a new folder")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(self.out)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{partial_prefix(self.out)}{os.getpid()}-", dir=self.out.parent))
        follow_umask(self.tmp)  # mkdtemp makes it drwx------ whatever the umask; colleagues must read it
        self.image_size, self.channels, self.source = int(image_size), tuple(channels), source
        shape = (self.image_size, self.image_size)
        self._images = _NpyAppender(self.tmp / "images.npy", np.uint8, (*shape, len(self.channels)))
        self._masks = None
        if with_masks:
            (self.tmp / "masks").mkdir()
            self._masks = (_NpyAppender(self.tmp / "masks" / "nuclei.npy", np.int32, shape),
                           _NpyAppender(self.tmp / "masks" / "cells.npy", np.int32, shape))
        self._rows_file = open(self.tmp / "metadata.csv", "w", newline="")
        self._rows = csv.DictWriter(self._rows_file, fieldnames=METADATA_COLUMNS)
        self._rows.writeheader()
        self.counts: dict[str, dict[str, int]] = {s: {t: 0 for t in STATES} for s in SPLITS}

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    @property
    def n_images(self) -> int:
        return self._images.n

    def add(self, images: np.ndarray, rows: list[Mapping[str, Any]],
            nuclei: np.ndarray | None = None, cells: np.ndarray | None = None) -> None:
        """Append a chunk: uint8 ``(n, H, W, C)`` images, ``n`` metadata rows, optional int32 masks."""
        if images.dtype != np.uint8 or images.ndim != 4 or len(rows) != images.shape[0]:
            raise ValueError(f"add() needs uint8 (n, H, W, C) images and n rows, got {images.dtype} "
                             f"{images.shape} and {len(rows)} rows")
        for row in rows:
            if row["split"] not in SPLITS or row["state"] not in STATES:
                raise ValueError(f"row {row.get('id')}: bad split/state {row['split']!r}/{row['state']!r}")
            self.counts[row["split"]][row["state"]] += 1
            self._rows.writerow({k: row[k] for k in METADATA_COLUMNS})
        self._images.append(images)
        if self._masks is not None:
            if nuclei is None or cells is None:
                raise ValueError("this dataset stores masks: add() needs nuclei and cells")
            self._masks[0].append(nuclei)
            self._masks[1].append(cells)

    def finish(self, conditions: list[Mapping[str, Any]], embeddings: np.ndarray,
               extra_meta: Mapping[str, Any] | None = None) -> Path:
        """Write the conditions, embeddings and meta.json, validate, and move into place.

        Args:
            conditions: one mapping per compound with keys ``compound, moa, smiles, ood, embedding``
                (``embedding`` is ``"user"``, ``"morgan"``, ``"cellflux"`` or ``"name-seeded"``, see
                :mod:`cellfluxrl.data.fingerprints`), in embedding-row order.
            embeddings: float32 ``(len(conditions), D)``.
            extra_meta: more entries for meta.json (generator settings, skipped counts, ...).
        """
        self._close_streams()
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.shape[0] != len(conditions):
            raise ValueError(f"{len(conditions)} conditions but {embeddings.shape[0]} embedding rows")
        with open(self.tmp / "conditions.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CONDITION_COLUMNS)
            writer.writeheader()
            for i, c in enumerate(conditions):
                writer.writerow({"index": i, "compound": c["compound"], "moa": c["moa"],
                                 "smiles": c.get("smiles", ""), "ood": int(bool(c["ood"])),
                                 "embedding": c["embedding"]})
        np.save(self.tmp / "embeddings.npy", embeddings)
        meta = {
            "format_version": FORMAT_VERSION, "source": self.source, "channels": list(self.channels),
            "image_size": self.image_size, "n_images": self.n_images, "counts": self.counts,
            "n_conditions": len(conditions), "embedding_dim": int(embeddings.shape[1]),
            "has_masks": self._masks is not None, "cellfluxrl_version": __version__,
            **dict(extra_meta or {}),
        }
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        load_dataset(self.tmp)  # never publish a dataset the loader would reject
        if self.out.exists():
            self.out.rmdir()  # empty (checked in __init__)
        os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        """Close everything and delete the partial folder."""
        self._close_streams()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _close_streams(self) -> None:
        if not self._rows_file.closed:
            self._rows_file.close()
            self._images.close()
            for appender in self._masks or ():
                appender.close()


@dataclass
class Dataset:
    """A loaded, validated dataset. Arrays are memory-mapped; nothing is read until indexed.

    Attributes:
        root: the dataset folder.
        meta: the parsed meta.json.
        images: uint8 ``(N, H, W, C)`` memmap.
        table: metadata columns, each a numpy array of length N (``dose`` float64, others str).
        conditions: conditions columns, each an array of length n_conditions (``ood`` bool).
        embeddings: float32 ``(n_conditions, D)``.
        condition: int64 ``(N,)`` row of each image's compound in ``conditions`` (-1 for controls).
        nuclei, cells: int32 ``(N, H, W)`` memmaps of ground-truth labels, or ``None``.
    """

    root: Path
    meta: dict
    images: np.ndarray
    table: dict[str, np.ndarray]
    conditions: dict[str, np.ndarray]
    embeddings: np.ndarray
    condition: np.ndarray
    nuclei: np.ndarray | None = None
    cells: np.ndarray | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(self.meta["channels"])

    @property
    def evaluators_dir(self) -> Path:
        return self.root / "evaluators"

    def select(self, split: str | None = None, state: str | None = None,
               include_ood: bool = True) -> np.ndarray:
        """Image indices (int64, ascending = CSV order) matching a split and/or state."""
        keep = np.ones(len(self), dtype=bool)
        if split is not None:
            keep &= self.table["split"] == split
        if state is not None:
            keep &= self.table["state"] == state
        if not include_ood:
            ood = np.append(self.conditions["ood"], False)  # index -1 (controls) -> False
            keep &= ~ood[self.condition]
        return np.flatnonzero(keep)

    def controls_by_batch(self, split: str) -> dict[str, np.ndarray]:
        """Control image indices of a split, grouped by batch (plate)."""
        key = ("controls", split)
        if key not in self._cache:
            idx = self.select(split=split, state="control")
            batches = self.table["batch"][idx]
            self._cache[key] = {b: idx[batches == b] for b in np.unique(batches)}
        return self._cache[key]


def _fail(path: Path, what: str) -> None:
    raise CellfluxError(f"{path}: {what}")


def _read_csv(path: Path, columns: tuple[str, ...]) -> dict[str, list[str]]:
    if not path.is_file():
        _fail(path, "missing file")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            _fail(path, "empty file")
        missing = [c for c in columns if c not in header]
        if missing:
            _fail(path, f"missing column(s) {', '.join(missing)}")
        pos = [header.index(c) for c in columns]
        out: dict[str, list[str]] = {c: [] for c in columns}
        for line, row in enumerate(reader, start=2):
            if len(row) != len(header):
                _fail(path, f"line {line} has {len(row)} fields, expected {len(header)}")
            for c, p in zip(columns, pos):
                out[c].append(row[p])
    return out


def _load_npy(path: Path, dtype: np.dtype, ndim: int) -> np.ndarray:
    if not path.is_file():
        _fail(path, "missing file")
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as exc:
        _fail(path, f"corrupt or truncated .npy ({' '.join(str(exc).split())})")
    if array.dtype != dtype or array.ndim != ndim:
        _fail(path, f"expected {np.dtype(dtype)} with {ndim} dims, found {array.dtype} {array.shape}")
    return array


def load_dataset(root: str | os.PathLike) -> Dataset:
    """Open and validate a dataset folder (see the module docstring for the layout).

    Raises:
        CellfluxError: a missing/corrupt file, a bad column or value (naming file and row), a
            treated compound without a condition, or a shape that disagrees with meta.json.
    """
    root = Path(root)
    if not root.is_dir():
        raise CellfluxError(f"dataset folder {root} does not exist")
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        _fail(meta_path, "missing file (not a cellfluxrl dataset, or an unfinished prepare)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        _fail(meta_path, f"not valid JSON ({exc})")
    if meta.get("format_version") != FORMAT_VERSION:
        _fail(meta_path, f"format_version {meta.get('format_version')!r}, this cellfluxrl reads {FORMAT_VERSION}")

    images = _load_npy(root / "images.npy", np.uint8, 4)
    n, size, channels = images.shape[0], int(meta["image_size"]), len(meta["channels"])
    if images.shape[1:] != (size, size, channels) or n != meta["n_images"]:
        _fail(root / "images.npy", f"shape {images.shape} disagrees with meta.json "
                                   f"({meta['n_images']}, {size}, {size}, {channels})")

    raw = _read_csv(root / "metadata.csv", METADATA_COLUMNS)
    if len(raw["id"]) != n:
        _fail(root / "metadata.csv", f"{len(raw['id'])} rows for {n} images")
    table = {c: np.asarray(v) for c, v in raw.items()}
    for column, allowed in (("split", SPLITS), ("state", STATES)):
        bad = np.flatnonzero(~np.isin(table[column], allowed))
        if bad.size:
            _fail(root / "metadata.csv", f"row {bad[0] + 2}: {column} {str(table[column][bad[0]])!r} is not one of {allowed}")
    try:
        table["dose"] = table["dose"].astype(np.float64)
    except ValueError:
        _fail(root / "metadata.csv", "column dose holds a non-number")

    cond_raw = _read_csv(root / "conditions.csv", CONDITION_COLUMNS)
    conditions = {c: np.asarray(v) for c, v in cond_raw.items()}
    conditions["index"] = conditions["index"].astype(np.int64)
    conditions["ood"] = conditions["ood"] == "1"
    if not np.array_equal(conditions["index"], np.arange(len(conditions["index"]))):
        _fail(root / "conditions.csv", "index column must be 0..n-1 in order")
    embeddings = _load_npy(root / "embeddings.npy", np.float32, 2)
    if embeddings.shape[0] != len(conditions["index"]):
        _fail(root / "embeddings.npy", f"{embeddings.shape[0]} rows for {len(conditions['index'])} conditions")
    embeddings = np.asarray(embeddings)
    if not np.isfinite(embeddings).all():
        _fail(root / "embeddings.npy", "holds NaN or inf")

    lookup = {name: i for i, name in enumerate(conditions["compound"])}
    condition = np.full(n, -1, dtype=np.int64)
    treated = np.flatnonzero(table["state"] == "treated")
    for i in treated:
        j = lookup.get(table["compound"][i])
        if j is None:
            _fail(root / "metadata.csv", f"row {i + 2}: compound {str(table['compound'][i])!r} has no row in conditions.csv")
        condition[i] = j

    nuclei = cells = None
    if meta.get("has_masks"):
        nuclei = _load_npy(root / "masks" / "nuclei.npy", np.int32, 3)
        cells = _load_npy(root / "masks" / "cells.npy", np.int32, 3)
        for path, m in ((root / "masks" / "nuclei.npy", nuclei), (root / "masks" / "cells.npy", cells)):
            if m.shape != (n, size, size):
                _fail(path, f"shape {m.shape}, expected {(n, size, size)}")
    return Dataset(root, meta, images, table, conditions, embeddings, condition, nuclei, cells)
