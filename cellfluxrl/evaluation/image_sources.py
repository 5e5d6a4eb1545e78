"""Images to measure or score, from any of the places they live, with their metadata.

:func:`read_image_set` takes what a user names as ``IMAGES`` and returns an :class:`ImageSet`:
uint8 ``(N, H, W, C)`` images (channels in the dataset's order) and, per image, its plate, well,
compound, concentration, MoA, kind (``generated`` / ``real``) and source. The forms:

* ``FILE.npz`` written by ``cellfluxrl sample``: the key ``generated`` (uint8 ``(N, H, W, C)``),
  ``compound`` and, when present, ``moa`` and ``target_index`` (the dataset row of each pair's real
  target, which gives plate, well and dose); other keys are ignored.
* a folder with ``samples.csv`` (``sample --format tiff|png``): columns ``file`` and ``compound``,
  optional ``dose``, ``moa``, ``plate``, ``well``, ``target_index``; other columns are ignored.
  ``file`` is a multi-channel OME-TIFF (``CYX``) or an RGB PNG beside the CSV.
* ``LIST.csv``, a CSV of paths (relative to its folder or absolute), one row per image: either a
  ``file`` column (one multi-channel image) or one column per dataset channel (``actin``,
  ``tubulin``, ``dna`` for BBBC021), each a grayscale 8- or 16-bit TIFF/PNG plane; ``compound``
  (``DMSO`` for controls) and optional ``dose``, ``plate``, ``well``, ``moa``. 16-bit planes are
  mapped to uint8 per image and channel, their 0.1 and 99.9 percentiles to 0 and 255 (``measure``'s
  documented rule; ``score`` and ``evaluate --images`` pass an explicit
  :class:`~cellfluxrl.evaluation.image_mapping.ImageMapping` instead and refuse what it does not state).
* ``real:SPLIT`` (``train``, ``val``, ``test`` or ``all``): the dataset's own real images.

Where every image names its pair (``target_index``, and optionally ``control_index``, ``seed``
and ``candidate``: npz keys ``target_index``, ``control_index``, ``seeds``, ``candidate``, or CSV
columns of those names), :attr:`ImageSet.pairing` holds them, so that ``score`` grades the images on
the pairs they were made for. An npz carrying a marker (``cellfluxrl_samples``, ``cellfluxrl_candidates``) of a layout version
not in :data:`NPZ_VERSIONS` is refused.

Every problem is a one-line :class:`~cellfluxrl.errors.CellfluxError` raised before anything is
computed: a missing or empty input, an unreadable image, images of different sizes, a channel count
that is not the dataset's, a compound the dataset does not have, an npz sampled from another dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from cellfluxrl.data.compounds import CONTROL
from cellfluxrl.errors import CellfluxError, did_you_mean, finite_float

SPLITS = ("train", "val", "test", "all")
SAMPLES_CSV = "samples.csv"
IMAGE_SUFFIXES = (".tif", ".tiff", ".png")
# npz markers -> the layout versions this version reads: `sample` (commands.sample_outputs) and
# `evaluate --save-images` (evaluation.saved_candidates)
NPZ_VERSIONS = {"cellfluxrl_samples": (2,), "cellfluxrl_candidates": (1,)}
PAIRING = {"target_index": "target_index", "control_index": "control_index", "seeds": "seed", "candidate": "candidate"}


@dataclass(frozen=True)
class ImageSet:
    """Images and their per-image metadata (every array has length N).

    Attributes:
        images: uint8 ``(M, H, W, C)`` array (may be a dataset memmap); row ``rows[i]`` is image ``i``.
        rows: int64 ``(N,)`` which rows of ``images`` form the set, in order.
        plate, well, compound, moa, kind, source: str ``(N,)`` (``""`` where unknown); ``kind`` is
            ``generated`` or ``real``.
        dose: float64 ``(N,)`` concentration (NaN where unknown).
        origin: what the user named (for messages).
        pairing: int64 ``(N,)`` arrays ``target_index``, ``control_index``, ``seed``, ``candidate``, each
            present only when every image has it.
    """

    images: np.ndarray
    rows: np.ndarray
    plate: np.ndarray
    well: np.ndarray
    compound: np.ndarray
    moa: np.ndarray
    kind: np.ndarray
    source: np.ndarray
    dose: np.ndarray
    origin: str
    pairing: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of every image."""
        return tuple(int(s) for s in self.images.shape[1:])

    def batches(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, uint8 (b, H, W, C))`` chunks of at most ``size`` images, in order."""
        for start in range(0, len(self.rows), size):
            yield start, np.asarray(self.images[self.rows[start:start + size]])


def _set(images: np.ndarray, origin: str, rows: np.ndarray | None = None, pairing: dict | None = None,
         **columns) -> ImageSet:
    n = len(images) if rows is None else len(rows)
    text = {k: np.asarray(columns.get(k, [""] * n), dtype=str) for k in ("plate", "well", "compound", "moa", "kind", "source")}
    dose = np.asarray(columns.get("dose", np.full(n, np.nan)), dtype=np.float64)
    rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    pairing = {k: np.asarray(v, dtype=np.int64) for k, v in (pairing or {}).items()}
    return ImageSet(images, rows, dose=dose, origin=origin, pairing=pairing, **text)


def _dataset_moa(dataset, compound: str) -> str:
    if compound == CONTROL:
        return CONTROL
    hit = np.flatnonzero(dataset.conditions["compound"] == compound)
    return str(dataset.conditions["moa"][hit[0]]) if hit.size else ""


def check_against(images: ImageSet, dataset) -> None:
    """Refuse a set whose channel count is not the dataset's or that names a compound it lacks.

    Raises:
        CellfluxError: one line naming the first offending image.
    """
    channels = len(dataset.channels)
    if images.shape[2] != channels:
        raise CellfluxError(f"{images.origin}: images have {images.shape[2]} channel(s), dataset {dataset.root} has "
                            f"{channels} ({', '.join(dataset.channels)})")
    known = {*map(str, dataset.conditions["compound"]), CONTROL}
    for i, name in enumerate(images.compound):
        if str(name) not in known:
            raise CellfluxError(f"{images.origin}: image {i} ({images.source[i]}): compound {str(name)!r} is not in "
                                f"dataset {dataset.root}; {did_you_mean(str(name), known)}")


def _from_dataset(dataset, split: str, origin: str) -> ImageSet:
    """The dataset's real images of one split (or all), read lazily from its memmap."""
    rows = np.arange(len(dataset)) if split == "all" else dataset.select(split=split)
    if rows.size == 0:
        raise CellfluxError(f"{origin}: dataset {dataset.root} has no {split} images")
    t = dataset.table
    return _set(dataset.images, origin, rows, plate=t["batch"][rows], well=t["well"][rows], compound=t["compound"][rows],
                moa=t["moa"][rows], kind=["real"] * len(rows), source=t["id"][rows], dose=t["dose"][rows])


def _targets(dataset, target_index, compound, origin: str) -> dict[str, np.ndarray]:
    """Plate, well and dose of each generated image from its real target's dataset row (checked)."""
    target = np.asarray(target_index, dtype=np.int64)
    bad = np.flatnonzero((target < 0) | (target >= len(dataset)))
    if bad.size:
        raise CellfluxError(f"{origin}: pair {bad[0]} has target_index {target[bad[0]]}, dataset {dataset.root} has "
                            f"{len(dataset)} images (sampled from another dataset?)")
    held = dataset.table["compound"][target]
    wrong = np.flatnonzero(held != np.asarray(compound, dtype=str))
    if wrong.size:
        i = wrong[0]
        raise CellfluxError(f"{origin}: pair {i} is {str(compound[i])!r} but dataset {dataset.root} row {target[i]} holds "
                            f"{str(held[i])!r} (sampled from another dataset?)")
    t = dataset.table
    return {"plate": t["batch"][target], "well": t["well"][target], "dose": t["dose"][target]}


def _from_npz(path: Path, dataset, mapping=None) -> ImageSet:
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files if k in ("generated", "compound", "moa", *NPZ_VERSIONS, *PAIRING)}
    except (OSError, ValueError, EOFError) as exc:
        raise CellfluxError(f"{path}: not a readable .npz ({type(exc).__name__})") from None
    for marker, versions in NPZ_VERSIONS.items():
        found = data.get(marker)
        if found is not None and (found.shape != () or found.dtype.kind not in "iu" or int(found) not in versions):
            raise CellfluxError(f"{path}: written by another version of cellfluxrl ({marker} layout {found}, this "
                                f"version reads {', '.join(map(str, versions))}); write it again with this version")
    images = data.get("generated")
    if images is None or "compound" not in data:
        raise CellfluxError(f"{path}: no 'generated' and 'compound' arrays; give a FILE.npz written by `cellfluxrl sample`")
    numeric = images.dtype.kind in "uif" if mapping is not None else images.dtype == np.uint8
    if not numeric or images.ndim != 4 or len(data["compound"]) != len(images):
        raise CellfluxError(f"{path}: 'generated' must be {'numeric' if mapping is not None else 'uint8'} (N, H, W, C) "
                            f"with one compound each, got {images.dtype} {images.shape} and {len(data['compound'])} compounds")
    if len(images) == 0:
        raise CellfluxError(f"{path}: holds no images")
    if mapping is not None:
        images = mapping.apply(images, dataset, str(path))
    pairing = {name: data[key] for key, name in PAIRING.items() if key in data and len(data[key]) == len(images)}
    return generated_set(images, data["compound"], dataset, str(path), data.get("moa"), data.get("target_index"),
                         pairing=pairing)


def generated_set(images: np.ndarray, compound, dataset, origin: str, moa=None, target_index=None,
                  pairing: dict | None = None) -> ImageSet:
    """An :class:`ImageSet` of generated images held in memory (what ``sample`` has before writing).

    Args:
        images: uint8 ``(N, H, W, C)``.
        compound: ``(N,)`` compound names.
        dataset: the loaded dataset they were sampled from.
        origin: a name for messages; sources are ``"<origin name>#i"``.
        moa: ``(N,)`` MoA names (``None``: the dataset's MoA of each compound).
        target_index: ``(N,)`` dataset row of each pair's real target (gives plate, well and dose;
            checked to hold the same compound), or ``None``.
        pairing: the :attr:`ImageSet.pairing` arrays (``None``: none).
    """
    compound = np.asarray(compound).astype(str)
    extra = _targets(dataset, target_index, compound, origin) if target_index is not None else {}
    moa = np.asarray(moa).astype(str) if moa is not None else [_dataset_moa(dataset, c) for c in compound]
    name = Path(origin).name
    return _set(images, origin, pairing=pairing, compound=compound, moa=moa, kind=["generated"] * len(images),
                source=[f"{name}#{i}" for i in range(len(images))], **extra)


def _read_rows(path: Path, required: tuple[str, ...]) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and ``(line, row)`` of a CSV; CellfluxError naming a missing column or a ragged line."""
    from cellfluxrl.data.csv_input import csv_rows, read_header

    header = read_header(path, required)
    rows = list(csv_rows(path, tuple(header)))
    if not rows:
        raise CellfluxError(f"{path}: no rows")
    return header, rows


def _to_uint8(plane: np.ndarray, where: str) -> np.ndarray:
    """One channel as uint8: 8-bit as is, 16-bit mapped from its 0.1/99.9 percentiles to 0/255."""
    if plane.dtype == np.uint8:
        return plane
    if plane.dtype != np.uint16:
        raise CellfluxError(f"{where}: {plane.dtype} pixels; expected 8- or 16-bit unsigned integers")
    lo, hi = np.percentile(plane, (0.1, 99.9))
    scaled = (plane.astype(np.float32) - lo) * (255.0 / max(hi - lo, 1e-6))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def read_image_file(path: Path, where: str, raw: bool = False) -> np.ndarray:
    """One image file as ``(H, W, C)`` uint8: a TIFF (``CYX``, ``YXS`` or ``YX``) or a PNG.

    ``raw``: the pixels as stored (any dtype), for an explicit
    :class:`~cellfluxrl.evaluation.image_mapping.ImageMapping`; else 16-bit planes are mapped per
    image (see the module docstring).

    Raises:
        CellfluxError: missing, not TIFF/PNG, unreadable, or not 2-D with channels.
    """
    if not path.is_file():
        raise CellfluxError(f"{where}: {path} is {'a folder' if path.is_dir() else 'missing'}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                image, axes = series.asarray(), series.axes
            if axes in ("CYX", "SYX"):
                image = np.moveaxis(image, 0, -1)
            elif axes == "YX":
                image = image[..., None]
            elif axes not in ("YXS", "YXC"):
                raise CellfluxError(f"{where}: {path} has axes {axes} {image.shape}; expected one 2-D image (CYX, YXS or YX)")
        elif suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                image = np.asarray(im)
            if image.ndim == 2:
                image = image[..., None]
        else:
            raise CellfluxError(f"{where}: {path} is neither TIFF (.tif, .tiff) nor PNG")
    except CellfluxError:
        raise
    except Exception as exc:  # tifffile and Pillow raise many types for a damaged file
        raise CellfluxError(f"{where}: {path} is not a readable image ({type(exc).__name__})") from None
    if raw:
        return image
    return np.stack([_to_uint8(image[..., c], f"{where}: {path}") for c in range(image.shape[-1])], axis=-1)


def _stack(images: list[np.ndarray], wheres: list[str]) -> np.ndarray:
    """Stack ``(H, W, C)`` images; CellfluxError naming the first that differs in size or channels."""
    for image, where in zip(images, wheres):
        if image.shape != images[0].shape:
            a, b = images[0].shape, image.shape
            raise CellfluxError(f"mixed image sizes: {wheres[0]} is {a[0]}x{a[1]} px with {a[2]} channel(s), "
                                f"{where} is {b[0]}x{b[1]} px with {b[2]}")
    return np.stack(images)


def _dose(text: str, where: str) -> float:
    return np.nan if text.strip().lower() in ("", "nan", "none", "null") else finite_float(text, f"{where}: dose")


def _pairing(header: list[str], values: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """The pairing columns of a CSV that every row fills with an integer."""
    out = {}
    for name in PAIRING.values():
        column = values.get(name, [])
        if name in header and all(v.strip().lstrip("-").isdigit() for v in column):
            out[name] = np.asarray([int(v) for v in column], dtype=np.int64)
    return out


def _from_table(path: Path, dataset, kind: str, mapping=None) -> ImageSet:
    """A ``samples.csv`` (kind ``generated``) or a CSV of paths (kind ``real``)."""
    channels = tuple(dataset.channels) if mapping is None or mapping.channels is None else mapping.channels
    header, rows = _read_rows(path, ("compound",))
    per_channel = "file" not in header
    if per_channel and any(c not in header for c in channels):
        raise CellfluxError(f"{path}: needs a 'file' column or one column per channel ({', '.join(channels)})")
    images, wheres, meta = [], [], {k: [] for k in ("plate", "well", "compound", "moa", "source", "dose")}
    targets, pair_values = [], {name: [] for name in PAIRING.values()}
    for line, row in rows:
        where = f"{path} line {line}"
        files = [row[c] for c in channels] if per_channel else [row["file"]]
        paths = [Path(f) if Path(f).is_absolute() else path.parent / f for f in files]
        planes = [read_image_file(p, where, raw=mapping is not None) for p in paths]
        if per_channel:
            for plane, channel, p in zip(planes, channels, paths):
                if plane.shape[2] != 1:
                    raise CellfluxError(f"{where}: {channel} file {p} has {plane.shape[2]} channels; give one "
                                        f"grayscale plane per channel column")
            _stack(planes, [f"{where} ({c})" for c in channels])
        images.append(np.concatenate(planes, axis=-1) if per_channel else planes[0])
        wheres.append(where)
        compound = row["compound"]
        meta["compound"].append(compound)
        meta["moa"].append(row.get("moa") or _dataset_moa(dataset, compound))
        meta["plate"].append(row.get("plate", ""))
        meta["well"].append(row.get("well", ""))
        meta["dose"].append(_dose(row.get("dose", ""), where))
        meta["source"].append(files[-1] if per_channel else files[0])
        targets.append(row.get("target_index", ""))
        for name in pair_values:
            pair_values[name].append(row.get(name, ""))
    stacked = _stack(images, wheres)
    if mapping is not None:
        stacked = mapping.apply(stacked, dataset, str(path))
    pairing = _pairing(header, pair_values)
    if "target_index" in pairing and (kind == "generated" or mapping is not None):
        found = _targets(dataset, [int(t) for t in targets], np.asarray(meta["compound"]), str(path))
        for key in ("plate", "well"):  # fill what samples.csv left out
            meta[key] = [m or str(f) for m, f in zip(meta[key], found[key])]
        meta["dose"] = [f if np.isnan(m) else m for m, f in zip(meta["dose"], found["dose"])]
    return _set(stacked, str(path), pairing=pairing, kind=[kind] * len(stacked), **meta)


def _from_folder(folder: Path, dataset, mapping=None) -> ImageSet:
    table = folder / SAMPLES_CSV
    if not table.is_file():
        has_images = any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())
        what = "has images but no" if has_images else "is empty: no images and no"
        raise CellfluxError(f"{folder} {what} {SAMPLES_CSV} (written by `cellfluxrl sample --format tiff|png`); "
                            f"for your own images give a CSV of paths")
    return _from_table(table, dataset, "generated", mapping)


def read_image_set(spec: str, dataset, mapping=None) -> ImageSet:
    """Read ``IMAGES`` (see the module docstring) and check it against ``dataset``.

    Args:
        spec: ``FILE.npz``, a folder with ``samples.csv``, ``LIST.csv`` or ``real:SPLIT``.
        dataset: the loaded :class:`~cellfluxrl.data.layout.Dataset` (channels, compounds, metadata).
        mapping: an :class:`~cellfluxrl.evaluation.image_mapping.ImageMapping` (channel order, size,
            intensity scale) applied to files and npz arrays; ``None``: uint8 as stored (16-bit
            planes of a CSV of paths mapped per image, as ``measure`` documents).

    Returns:
        The :class:`ImageSet`, every image of the same ``(H, W, C)``.

    Raises:
        CellfluxError: one line naming the problem (see the module docstring).
    """
    if spec.startswith("real:"):
        split = spec.split(":", 1)[1]
        if split not in SPLITS:
            raise CellfluxError(f"{spec}: unknown split {split!r}; use real:{'|real:'.join(SPLITS)}")
        found = _from_dataset(dataset, split, spec)
    else:
        path = Path(spec)
        if path.is_dir():
            found = _from_folder(path, dataset, mapping)
        elif not path.exists():
            raise CellfluxError(f"{path} does not exist")
        elif path.suffix.lower() == ".npz":
            found = _from_npz(path, dataset, mapping)
        elif path.suffix.lower() == ".csv":
            found = _from_table(path, dataset, "real", mapping)
        else:
            raise CellfluxError(f"{path}: give a FILE.npz from `cellfluxrl sample`, a folder with {SAMPLES_CSV}, "
                                f"a CSV of image paths, or real:SPLIT")
    check_against(found, dataset)
    return found
