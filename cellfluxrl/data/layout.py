"""The on-disk dataset layout: one writer that streams, one loader that validates.

A dataset is a folder (documented in ``data/README.md``)::

    DATASET/
      meta.json          format_version, source, channels, image_size, counts, embedding info
      images.npy         uint8 (N, H, W, C), memory-mappable; channels (actin, tubulin, dna)
      metadata.csv       one row per image: id, split, batch, compound, dose, moa, state, source, well
                         (well optional: datasets written before it load with each image its own well)
      conditions.csv     one row per compound: index, compound, moa, smiles, ood, embedding
      embeddings.npy     float32 (n_conditions, D); row i belongs to conditions.csv index i
      masks/nuclei.npy   optional int32 (N, H, W) ground-truth nucleus labels (synthetic data)
      masks/cells.npy    optional int32 (N, H, W) ground-truth cell labels
      evaluators/        reference statistics and MoA classifier (written by `prepare`)

:class:`DatasetWriter` builds it in a temporary sibling folder and renames it into place only when
complete, so an interrupted ``prepare`` never leaves a dataset that looks finished (the sibling
``.OUT.partial-HOST-PID-*`` of a killed run is removed by the next one on that host).
:func:`cellfluxrl.data.resume.resume_dataset` tells ``prepare`` run again whether ``OUT`` already holds the dataset it
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
from cellfluxrl.data.duplicates import CropDigests
from cellfluxrl.data.npy_stream import NpyAppender, follow_umask
from cellfluxrl.data.partials import partial_prefix, remove_stale_partials
from cellfluxrl.data.splits import (VAL_FRACTION, VAL_RULE, VAL_SUBSETS, group_ids, validation_split,
                                    validation_subsets)
from cellfluxrl.errors import CellfluxError

FORMAT_VERSION = 1
METADATA_COLUMNS = ("id", "split", "batch", "compound", "dose", "moa", "state", "source")
OPTIONAL_COLUMNS = ("well",)  # "" or absent: the image is its own group (cellfluxrl.data.splits.group_ids)
CONDITION_COLUMNS = ("index", "compound", "moa", "smiles", "ood", "embedding")
SPLITS = ("train", "val", "test")
SOURCE_SPLITS = ("train", "test")  # what a source assigns; the writer deals "val" out of train on finish
STATES = ("control", "treated")


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
        self._images = NpyAppender(self.tmp / "images.npy", np.uint8, (*shape, len(self.channels)))
        self._masks = None
        if with_masks:
            (self.tmp / "masks").mkdir()
            self._masks = (NpyAppender(self.tmp / "masks" / "nuclei.npy", np.int32, shape),
                           NpyAppender(self.tmp / "masks" / "cells.npy", np.int32, shape))
        self._rows_file = open(self.tmp / "metadata.csv", "w", newline="", encoding="utf-8")
        self._rows = csv.DictWriter(self._rows_file, fieldnames=METADATA_COLUMNS + OPTIONAL_COLUMNS)
        self._rows.writeheader()
        self.counts: dict[str, dict[str, int]] = {s: {t: 0 for t in STATES} for s in SPLITS}
        self.validation: dict = {}
        self._digests = CropDigests()  # identical crops must share a split and a well (checked on finish)

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
        """Append a chunk: uint8 ``(n, H, W, C)`` images, ``n`` metadata rows, optional int32 masks.

        A row's ``split`` is ``train`` or ``test`` (:data:`SOURCE_SPLITS`); its optional ``well``
        names the well (or field) its crop comes from (``""``: not recorded).
        """
        if images.dtype != np.uint8 or images.ndim != 4 or len(rows) != images.shape[0]:
            raise ValueError(f"add() needs uint8 (n, H, W, C) images and n rows, got {images.dtype} "
                             f"{images.shape} and {len(rows)} rows")
        for row in rows:
            if row["split"] not in SOURCE_SPLITS or row["state"] not in STATES:
                raise ValueError(f"row {row.get('id')}: bad split/state {row['split']!r}/{row['state']!r}")
            self._rows.writerow({**{k: row[k] for k in METADATA_COLUMNS}, "well": row.get("well", "")})
        self._images.append(images)
        self._digests.add(images)
        if self._masks is not None:
            if nuclei is None or cells is None:
                raise ValueError("this dataset stores masks: add() needs nuclei and cells")
            self._masks[0].append(nuclei)
            self._masks[1].append(cells)

    def finish(self, conditions: list[Mapping[str, Any]], embeddings: np.ndarray,
               extra_meta: Mapping[str, Any] | None = None, val_seed: int = 0) -> Path:
        """Deal the validation split, write the conditions, embeddings and meta.json, validate, and
        move into place. A dataset in which two identical crops sit in different splits or wells is
        refused (:class:`cellfluxrl.data.duplicates.CropDigests`).

        The ``val`` split is dealt out of ``train`` by whole (plate, well) groups, stratified by MoA,
        with same-plate controls (:func:`cellfluxrl.data.splits.validation_split`); its rule, share
        and seed are recorded in ``meta.json["validation"]``.

        Args:
            conditions: one mapping per compound with keys ``compound, moa, smiles, ood, embedding``
                (``embedding`` is ``"user"``, ``"morgan"``, ``"cellflux"`` or ``"name-seeded"``, see
                :mod:`cellfluxrl.data.fingerprints`), in embedding-row order.
            embeddings: float32 ``(len(conditions), D)``.
            extra_meta: more entries for meta.json (generator settings, skipped counts, ...).
            val_seed: seed of the validation deal.
        """
        self._close_streams()
        self._deal_validation(conditions, val_seed)
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.shape[0] != len(conditions):
            raise ValueError(f"{len(conditions)} conditions but {embeddings.shape[0]} embedding rows")
        with open(self.tmp / "conditions.csv", "w", newline="", encoding="utf-8") as f:
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
            "validation": self.validation,
            **dict(extra_meta or {}),
        }
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        load_dataset(self.tmp)  # never publish a dataset the loader would reject
        if self.out.exists():
            self.out.rmdir()  # empty (checked in __init__)
        os.replace(self.tmp, self.out)
        return self.out

    def _deal_validation(self, conditions: list[Mapping[str, Any]], seed: int) -> None:
        """Rewrite metadata.csv with ``val`` dealt out of ``train``; set :attr:`counts`."""
        path = self.tmp / "metadata.csv"
        columns = METADATA_COLUMNS + OPTIONAL_COLUMNS
        table = {c: np.asarray(v) for c, v in _read_csv(path, columns).items()}
        held_out = {str(c["compound"]) for c in conditions if c["ood"]}
        ood = np.isin(table["compound"], list(held_out))
        groups = group_ids(table["batch"], table["well"])
        table["split"] = validation_split(table["split"], table["state"], table["moa"], table["batch"], groups,
                                          ood, seed)
        self._digests.check(table["split"], groups, table, f"{self.out}")
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows(zip(*(table[c].tolist() for c in columns)))
        self.counts = {s: {t: int(((table["split"] == s) & (table["state"] == t)).sum()) for t in STATES}
                       for s in SPLITS}
        self.validation = {"rule": VAL_RULE, "fraction": VAL_FRACTION, "seed": int(seed),
                           "groups": "plate + well" if (table["well"] != "").any() else "image (no wells recorded)"}

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
        table: metadata columns, each a numpy array of length N (``dose`` float64, others str;
            ``well`` is ``""`` where not recorded).
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
        """Image indices (int64, ascending = CSV order) matching a split and/or state.

        ``split`` is a stored split (``train``, ``val``, ``test``) or one of the validation subsets
        :data:`~cellfluxrl.data.splits.VAL_SUBSETS` (``val-select``, ``val-tune``).
        """
        keep = np.ones(len(self), dtype=bool)
        if split in VAL_SUBSETS:
            keep &= self.val_subsets[split]
        elif split is not None:
            keep &= self.table["split"] == split
        if state is not None:
            keep &= self.table["state"] == state
        if not include_ood:
            ood = np.append(self.conditions["ood"], False)  # index -1 (controls) -> False
            keep &= ~ood[self.condition]
        return np.flatnonzero(keep)

    @property
    def val_subsets(self) -> dict[str, np.ndarray]:
        """bool ``(N,)`` per validation subset (:func:`cellfluxrl.data.splits.validation_subsets`)."""
        if "val_subsets" not in self._cache:
            t = self.table
            self._cache["val_subsets"] = validation_subsets(t["split"], t["state"], t["moa"], t["batch"], self.groups)
        return self._cache["val_subsets"]

    @property
    def groups(self) -> np.ndarray:
        """int64 ``(N,)`` (plate, well) group of every image (:func:`cellfluxrl.data.splits.group_ids`)."""
        if "groups" not in self._cache:
            self._cache["groups"] = group_ids(self.table["batch"], self.table["well"])
        return self._cache["groups"]

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


def _read_csv(path: Path, columns: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """The named columns of a CSV as lists of strings; an ``optional`` column that is absent is all ``""``."""
    if not path.is_file():
        _fail(path, "missing file")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            _fail(path, "empty file")
        missing = [c for c in columns if c not in header]
        if missing:
            _fail(path, f"missing column(s) {', '.join(missing)}")
        present = [c for c in (*columns, *optional) if c in header]
        pos = [header.index(c) for c in present]
        out: dict[str, list[str]] = {c: [] for c in present}
        for line, row in enumerate(reader, start=2):
            if len(row) != len(header):
                _fail(path, f"line {line} has {len(row)} fields, expected {len(header)}")
            for c, p in zip(present, pos):
                out[c].append(row[p])
    n = len(out[columns[0]]) if columns else 0
    return {**{c: [""] * n for c in optional}, **out}


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

    raw = _read_csv(root / "metadata.csv", METADATA_COLUMNS, OPTIONAL_COLUMNS)
    if len(raw["id"]) != n:
        _fail(root / "metadata.csv", f"{len(raw['id'])} rows for {n} images")
    table = {c: np.asarray(v, dtype=str) for c, v in raw.items()}
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
