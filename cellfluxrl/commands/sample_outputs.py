"""What ``cellfluxrl sample`` writes, and the checks that it writes over nothing else.

Two shapes of output:

* ``--format npz --out FILE.npz``: ``FILE.npz`` (images + metadata) and the grid ``FILE.png`` beside
  it, each written to a temp file and renamed into place.
* ``--format tiff|png --out DIR``: the folder ``DIR`` holding one image per generated cell,
  ``samples.csv`` (:mod:`cellfluxrl.export`), ``samples.npz``, ``grid.png`` and the marker
  :data:`FOLDER_MARKER` listing those files. It is built in a hidden sibling folder and swapped in
  whole (as ``evaluate`` does), so a re-run with fewer images leaves no stale ones.

Ownership is recognised by content: an npz holding :data:`NPZ_MARKER` (or, written by earlier
versions, every key of :data:`LEGACY_KEYS`); a PNG carrying the text chunk ``cellfluxrl: sample
grid`` (or any PNG beside an earlier version's npz of the same name); a folder whose marker lists
every file in it (or, from earlier versions, whose ``samples.csv`` lists them). Anything else in the
way is refused with one line naming it, before the model is loaded. Nothing is written in or under
a dataset folder (``meta.json`` beside ``images.npy`` or ``metadata.csv``), and inside a run folder
(``checkpoint.pt``, or a run's ``config.json``) only as a subfolder that is new or holds nothing but
``sample``'s own outputs.

Part of the command layer (it reuses the staging of :mod:`cellfluxrl.commands.report_folder`);
imports only plumbing besides, no torch.
"""

from __future__ import annotations

import fnmatch
import json
import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Mapping

import numpy as np

from cellfluxrl.errors import CellfluxError

NPZ_MARKER = "cellfluxrl_samples"  # npz key (value: the layout version) of a file `sample` wrote
NPZ_VERSION = 2
LEGACY_KEYS = frozenset({"generated", "controls", "targets", "target_index", "control_index", "compound", "moa",
                         "seeds", "meta_run"})  # what every sample npz of versions <= 0.2 holds
LEGACY_META = {"weights_from": "network"}  # old meta_* names -> current ones
FOLDER_MARKER = ".cellfluxrl-sample.json"
FOLDER_NPZ, FOLDER_GRID = "samples.npz", "grid.png"
PNG_KEY, PNG_TEXT = b"cellfluxrl", b"sample grid"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MACHINERY = (".*.lock", ".*.tmp-*", ".*.partial-*")  # locks, temp files and staged folders beside outputs
COMMAND = "`cellfluxrl sample`"


# --------------------------------------------------------------------------------------------
# Recognising sample's own files.

def is_sample_npz(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an npz that ``sample`` wrote (reads only the zip's list of arrays)."""
    try:
        with zipfile.ZipFile(path) as archive:
            keys = {name[:-4] for name in archive.namelist() if name.endswith(".npy")}
    except (OSError, zipfile.BadZipFile, ValueError):
        return False
    return NPZ_MARKER in keys or LEGACY_KEYS <= keys


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC-32 of type + data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def mark_png(png: bytes) -> bytes:
    """A PNG's bytes with the ``tEXt`` chunk ``cellfluxrl: sample grid`` inserted before ``IEND``."""
    if not png.startswith(PNG_SIGNATURE) or png[-8:-4] != b"IEND":
        raise ValueError("not a PNG ending in IEND")
    return png[:-12] + _png_chunk(b"tEXt", PNG_KEY + b"\0" + PNG_TEXT) + png[-12:]


def is_sample_png(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a grid ``sample`` wrote: a PNG with its text chunk, or any PNG beside an
    npz of the same name that an earlier version of ``sample`` wrote."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if not data.startswith(PNG_SIGNATURE):
        return False
    if b"tEXt" + PNG_KEY + b"\0" + PNG_TEXT in data:
        return True
    npz = path.with_suffix(".npz")
    return is_sample_npz(npz) and not _has_marker(npz)


def _has_marker(npz: Path) -> bool:
    """Whether a sample npz carries :data:`NPZ_MARKER` (is of this version or later)."""
    try:
        with zipfile.ZipFile(npz) as archive:
            return f"{NPZ_MARKER}.npy" in archive.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def folder_files(folder: Path) -> set[str] | None:
    """The names ``sample`` wrote into an export ``folder`` (from its marker, or the ``samples.csv``
    of an earlier version), or ``None`` when the folder is not one ``sample`` wrote."""
    import csv

    marker = folder / FOLDER_MARKER
    if marker.is_file():
        try:
            listed = json.loads(marker.read_text()).get("files")
        except (OSError, ValueError, UnicodeDecodeError, AttributeError):
            return None
        return {FOLDER_MARKER, *map(str, listed)} if isinstance(listed, list) else None
    table = folder / "samples.csv"
    try:
        with open(table, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            if header[:3] != ["pair", "file", "compound"]:
                return None
            return {"samples.csv", *(row[1] for row in reader if len(row) > 1 and row[1])}
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def _machinery(name: str) -> bool:
    """A lock, temp file or staged folder of a command (``.NAME.lock``, ``.NAME.tmp-PID``, ...)."""
    return any(fnmatch.fnmatch(name, pattern) for pattern in MACHINERY)


def foreign_in_folder(folder: Path) -> str | None:
    """The first entry of an export ``folder`` that ``sample`` did not write (``None``: all its own)."""
    entries = sorted(p.name for p in folder.iterdir())
    owned = folder_files(folder) if entries else set()
    if owned is None:
        return entries[0] if entries else None
    return next((name for name in entries if name not in owned and not _machinery(name)), None)


def foreign_in_tree(folder: Path) -> Path | None:
    """The first file or folder under ``folder`` that ``sample`` did not write (``None``: all its own).

    Its own: sample npz files and their grids, export folders holding only what sample wrote,
    folders holding only those, and the locks and temp files beside them.
    """
    for entry in sorted(folder.iterdir()):
        if _machinery(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink() and folder_files(entry) is not None:
            name = foreign_in_folder(entry)
            found = entry / name if name is not None else None
        elif entry.is_dir() and not entry.is_symlink():
            found = foreign_in_tree(entry)
        elif entry.is_file() and entry.suffix == ".npz" and is_sample_npz(entry):
            found = None
        elif entry.is_file() and entry.suffix == ".png" and is_sample_png(entry):
            found = None
        else:
            found = entry
        if found is not None:
            return found
    return None


# --------------------------------------------------------------------------------------------
# Where --out may be.

def real_path(path: Path) -> Path:
    """``path`` made absolute with its existing part resolved (symlinks, ``..``); it need not exist."""
    path = Path(os.path.abspath(path))
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing.resolve() / path.relative_to(existing)


def is_dataset(folder: Path) -> bool:
    """Whether ``folder`` is a dataset: ``meta.json`` with the images or the table beside it."""
    return (folder / "meta.json").is_file() and any((folder / name).exists() for name in ("images.npy", "metadata.csv"))


def is_run(folder: Path) -> bool:
    """Whether ``folder`` is a run: a ``checkpoint.pt``, or a ``config.json`` of a pretrain/posttrain run."""
    if (folder / "checkpoint.pt").is_file():
        return True
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(config, dict) and config.get("kind") in ("pretrain", "posttrain")


def dataset_above(path: Path) -> Path | None:
    """The dataset folder that is ``path`` or holds it, else ``None``."""
    return next((folder for folder in (path, *path.parents) if is_dataset(folder)), None)


def run_above(path: Path) -> Path | None:
    """The nearest run folder that is ``path`` or holds it, else ``None``."""
    return next((folder for folder in (path, *path.parents) if is_run(folder)), None)


def check_writable(out: Path, folder_out: bool) -> None:
    """Refuse an ``--out`` that cannot be written, before anything is generated; creates nothing.

    An existing parent folder gets a probe file (removed at once); a parent still to be made needs
    a writable nearest existing folder above it.
    """
    parent = Path(os.path.abspath(out)).parent
    folder = parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise CellfluxError(f"--out {out}: cannot write in {folder} (not a folder)")
    if folder != parent or folder_out:  # created, or renamed into place: the folder must let us
        if not os.access(folder, os.W_OK | os.X_OK):
            raise CellfluxError(f"--out {out}: cannot write in {folder} (Permission denied)")
        return
    probe = folder / f".{out.name}.probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as exc:
        raise CellfluxError(f"--out {out}: cannot write in {folder} ({exc.strerror or type(exc).__name__})") from None


def _check_place(out: Path, real: Path, folder_out: bool) -> None:
    """Refuse an ``--out`` inside a dataset, or inside a run other than as a subfolder of sample's own."""
    dataset = dataset_above(real)
    if dataset is not None:
        where = "is a dataset folder" if dataset == real else f"is inside the dataset folder {dataset}"
        raise CellfluxError(f"--out {out} {where}; sample never writes into a dataset (training reads it): "
                            f"choose a path outside it")
    run = run_above(real if folder_out else real.parent)
    if run is None:
        return
    if run == real or run == real.parent and not folder_out:
        example = run / "NAME" if folder_out else run / "NAME" / out.name
        what = "is a run folder" if run == real else f"would write into the run folder {run}"
        raise CellfluxError(f"--out {out} {what}; sample writes into a run only as a new subfolder: "
                            f"give e.g. --out {example}")
    child = run / real.relative_to(run).parts[0]
    if child == real or not child.exists():
        return  # the output folder itself (checked as such) or a new subfolder
    found = foreign_in_tree(child) if child.is_dir() else child
    if found is not None:
        raise CellfluxError(f"--out {out}: {found} is in the run folder {run} and {COMMAND} did not write it; "
                            f"sample writes into a run only as a new subfolder")


def check_out(out: Path, folder_out: bool) -> None:
    """Every check of ``--out`` that needs no model: writable, not in a dataset or a run, nothing foreign.

    Args:
        out: ``FILE.npz`` (``folder_out`` False; ``FILE.png`` goes beside it) or the folder ``DIR``.
        folder_out: whether ``out`` is the export folder of ``--format tiff|png``.

    Raises:
        CellfluxError: one line naming the path in the way and why.
    """
    check_writable(out, folder_out)
    real = real_path(out)
    _check_place(out, real, folder_out)
    if folder_out:
        if real.is_dir():
            name = foreign_in_folder(real)
            if name is not None:
                raise CellfluxError(f"--out {out} holds {name}, which {COMMAND} did not write; choose a new or "
                                    f"empty folder")
        return
    png = out.with_suffix(".png")
    if png.is_dir():
        raise CellfluxError(f"--out {out}: {png} is a folder; give a FILE.npz path whose FILE.png is free")
    if out.exists() and not is_sample_npz(out):
        raise CellfluxError(f"--out {out} exists and {COMMAND} did not write it; choose a new path (sample "
                            f"writes over only its own files)")
    if png.exists() and not is_sample_png(png):
        raise CellfluxError(f"--out {out}: {png} exists and {COMMAND} did not write it (the grid goes beside "
                            f"FILE.npz); choose a new path")


# --------------------------------------------------------------------------------------------
# Writing.

def npz_arrays(samples, meta: Mapping[str, object]) -> dict[str, np.ndarray]:
    """The arrays of a sample npz: images and pairs, rewards when scored, ``meta_<key>`` scalars and the marker."""
    arrays = {"generated": samples.generated, "controls": samples.controls, "targets": samples.targets,
              "target_index": samples.target_index, "control_index": samples.control_index,
              "compound": samples.compound, "moa": samples.moa, "seeds": samples.seeds,
              NPZ_MARKER: np.asarray(NPZ_VERSION)}
    if samples.rewards is not None:
        arrays["rewards"] = samples.rewards
        arrays["candidate_rewards"] = samples.candidate_rewards
        for name, values in samples.components.items():
            arrays[f"reward_{name}"] = values
    arrays.update({f"meta_{k}": np.asarray(v) for k, v in meta.items()})
    return arrays


def recorded_meta(arrays: Mapping[str, np.ndarray]) -> dict[str, object]:
    """The ``meta_*`` entries of a sample npz as ``{key: value}``, old names read as the current ones
    (``meta_weights_from`` -> ``network``)."""
    meta = {k[len("meta_"):]: np.asarray(arrays[k]).item() for k in arrays if k.startswith("meta_")}
    old = {k for k in meta if k in LEGACY_META and LEGACY_META[k] not in meta}  # a current name wins over its old one
    return {LEGACY_META[k] if k in old else k: v for k, v in meta.items() if k not in LEGACY_META or k in old}


def grid_png(samples, title: str | None) -> bytes:
    """The bytes of the marked grid PNG: one row per compound, columns control | generated | real target."""
    import tempfile

    from cellfluxrl.grids import save_grid

    rows, labels = [], []
    for name in dict.fromkeys(samples.compound.tolist()):
        i = int(np.flatnonzero(samples.compound == name)[0])
        rows.append([samples.controls[i], samples.generated[i], samples.targets[i]])
        labels.append(f"{name}\n{samples.moa[i]}")
    with tempfile.TemporaryDirectory() as scratch:  # matplotlib names the format by the suffix
        path = save_grid(Path(scratch) / "grid.png", rows, labels, ["control", "generated", "real target"],
                         title=title)
        return mark_png(path.read_bytes())


def _write_atomic(path: Path, write) -> None:
    """``write(file)`` into the temp file ``.NAME.tmp-PID`` beside ``path``, then rename it over ``path``."""
    from cellfluxrl.rundir import temp_path

    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_npz_outputs(out: Path, samples, meta: Mapping[str, object]) -> tuple[Path, Path]:
    """Write ``FILE.npz`` and the grid ``FILE.png`` (each atomically); returns both paths."""
    from cellfluxrl.rundir import remove_dead_temps

    png = out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(out.parent, [out.name, png.name])
    image = grid_png(samples, str(meta.get("run") or "") or None)
    _write_atomic(out, lambda f: np.savez_compressed(f, **npz_arrays(samples, meta)))
    _write_atomic(png, lambda f: f.write(image))
    return out, png


def write_folder_outputs(out: Path, samples, meta: Mapping[str, object], dataset, fmt: str) -> list[str]:
    """Build the export folder in a hidden sibling and swap it in whole for ``out``.

    Args:
        out: the folder ``DIR`` (checked by :func:`check_out`).
        samples: a :class:`cellfluxrl.model.generate.Samples`.
        meta: the ``meta_*`` scalars of ``samples.npz``.
        dataset: the :class:`cellfluxrl.data.layout.Dataset` sampled (table, channels, meta.json).
        fmt: ``"tiff"`` or ``"png"``.

    Returns:
        The names written into ``out`` (images, ``samples.csv``, ``samples.npz``, ``grid.png``, marker).
    """
    from cellfluxrl.commands.report_folder import discard, replace_folder, staged_folder
    from cellfluxrl.export import export_samples

    staged = staged_folder(out)
    try:
        export_samples(staged, samples, dataset.table, dataset.channels, fmt, meta=dataset.meta)
        np.savez_compressed(staged / FOLDER_NPZ, **npz_arrays(samples, meta))
        (staged / FOLDER_GRID).write_bytes(grid_png(samples, str(meta.get("run") or "") or None))
        files = sorted(p.name for p in staged.iterdir())
        (staged / FOLDER_MARKER).write_text(json.dumps({"written_by": "cellfluxrl sample", "files": files},
                                                       indent=1) + "\n")
        replace_folder(staged, out)
    except BaseException:
        discard(staged)
        raise
    return files
