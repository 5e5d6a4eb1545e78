"""Generated cells as files other tools open: multi-channel OME-TIFF (Fiji, napari), RGB PNG, ``samples.csv``.

``cellfluxrl sample --format tiff|png`` writes, beside ``FILE.npz`` (which is always written), a
folder ``FILE/`` holding one image file per generated cell and ``samples.csv``, one row per file:

- ``tiff``: ``00000_taxol.ome.tif``, uint8 ``(C, H, W)`` with OME axes ``CYX`` and the dataset's
  channel names (actin, tubulin, DNA for BBBC021) in the OME-XML, so Fiji's Bio-Formats importer and
  napari (via tifffile) show three named channels rather than an RGB picture.
- ``png``: ``00000_taxol.png``, an 8-bit RGB preview (channel order actin, tubulin, DNA = R, G, B,
  as CellFlux shows them); for looking, not for measuring.

This module owns the file formats; it takes plain arrays and imports nothing of the model.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

FORMATS = ("npz", "tiff", "png")
SUFFIX = {"tiff": ".ome.tif", "png": ".png"}


def image_name(pair: int, compound: str, fmt: str) -> str:
    """File name of generated image ``pair``: zero-padded index, compound (file-safe), suffix.

    >>> image_name(3, "colchicine 2", "tiff")
    '00003_colchicine_2.ome.tif'
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(compound)).strip("_") or "compound"
    return f"{pair:05d}_{safe}{SUFFIX[fmt]}"


def write_ome_tiff(path: str | os.PathLike, image: np.ndarray, channels: Sequence[str]) -> Path:
    """Write one uint8 ``(H, W, C)`` image as an OME-TIFF ``(C, H, W)`` with named channels.

    Args:
        path: output file (``.ome.tif``).
        image: uint8 ``(H, W, C)``, as stored in a dataset / ``samples.npz``.
        channels: ``C`` channel names, in order (e.g. ``("actin", "tubulin", "dna")``).

    Returns:
        The written path.
    """
    import tifffile

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != len(channels):
        raise ValueError(f"expected (H, W, {len(channels)}) image, got shape {image.shape}")
    planes = np.ascontiguousarray(np.moveaxis(image.astype(np.uint8, copy=False), 2, 0))
    path = Path(path)
    tifffile.imwrite(path, planes, ome=True, photometric="minisblack",
                     metadata={"axes": "CYX", "Channel": {"Name": [str(c) for c in channels]}})
    return path


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write a uint8 ``(H, W, 3)`` image as an 8-bit RGB PNG (Pillow)."""
    from PIL import Image

    image = np.asarray(image, dtype=np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"an RGB preview needs (H, W, 3) images, got shape {image.shape}")
    path = Path(path)
    Image.fromarray(image).save(path)  # uint8 (H, W, 3) is RGB
    return path


def sample_rows(samples, table: Mapping[str, np.ndarray], files: Sequence[str]) -> list[dict]:
    """One ``samples.csv`` row per generated image.

    Args:
        samples: a :class:`cellfluxrl.model.generate.Samples` (arrays of length N).
        table: the dataset's metadata columns (``batch``, ``dose``, ``source`` ...), indexed by image row.
        files: N file names, one per generated image (``""`` when none was written).

    Returns:
        Dicts with keys ``pair, file, compound, dose, moa, plate, candidate, seed, target_index,
        target_source, control_index, control_source`` and, when rewards were computed, ``reward``
        (the weighted total of the kept candidate) and ``reward_<name>`` for every reward.
    """
    n = len(samples.generated)
    candidate = np.zeros(n, dtype=np.int64)
    if samples.candidate_rewards is not None:
        candidate = np.argmax(samples.candidate_rewards, axis=1)
    rows = []
    for i in range(n):
        t, c = int(samples.target_index[i]), int(samples.control_index[i])
        row = {"pair": i, "file": files[i], "compound": str(samples.compound[i]),
               "dose": float(table["dose"][t]), "moa": str(samples.moa[i]), "plate": str(table["batch"][t]),
               "candidate": int(candidate[i]), "seed": int(samples.seeds[i]),
               "target_index": t, "target_source": str(table["source"][t]),
               "control_index": c, "control_source": str(table["source"][c])}
        if samples.rewards is not None:
            row["reward"] = float(samples.rewards[i])
            for name, values in samples.components.items():
                row[f"reward_{name}"] = float(values[i])
        rows.append(row)
    return rows


def write_csv(path: str | os.PathLike, rows: Sequence[dict]) -> Path:
    """Write dict rows (all with the same keys) as a CSV with a header; floats with repr precision."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["pair"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def export_samples(folder: str | os.PathLike, samples, table: Mapping[str, np.ndarray],
                   channels: Sequence[str], fmt: str) -> Path:
    """Write every generated image of ``samples`` to ``folder`` as ``fmt`` plus ``samples.csv``.

    Args:
        folder: created if missing; files of the same names are replaced.
        samples: a :class:`cellfluxrl.model.generate.Samples`.
        table: the dataset's metadata columns.
        channels: the dataset's channel names.
        fmt: ``"tiff"`` or ``"png"``.

    Returns:
        The path of ``samples.csv``.
    """
    if fmt not in SUFFIX:
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(SUFFIX)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, image in enumerate(samples.generated):
        name = image_name(i, samples.compound[i], fmt)
        if fmt == "tiff":
            write_ome_tiff(folder / name, image, channels)
        else:
            write_png(folder / name, image)
        files.append(name)
    return write_csv(folder / "samples.csv", sample_rows(samples, table, files))
