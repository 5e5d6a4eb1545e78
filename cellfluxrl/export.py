"""Generated cells as files other tools open: multi-channel OME-TIFF (Fiji, napari), RGB PNG, ``samples.csv``.

``cellfluxrl sample --format tiff|png --out DIR`` writes into ``DIR`` one image file per generated
cell and ``samples.csv``, one row per file (:mod:`cellfluxrl.commands.sample_outputs` owns the folder):

- ``tiff``: ``00000_taxol.ome.tif``, uint8 ``(C, H, W)`` with OME axes ``CYX``; its OME-XML names
  the image after its file (``00000_taxol``), the channels with the dataset's channel names (``actin``,
  ``tubulin``, ``dna`` for BBBC021), and records the compound, MoA, dose, plate and the intensity
  scale (:func:`intensity_fields`) in the image's ``Description`` and in a ``MapAnnotation``, so
  Fiji's Bio-Formats importer and napari (via tifffile) show named channels with their provenance.
- ``png``: ``00000_taxol.png``, an 8-bit RGB preview (channel order actin, tubulin, dna = R, G, B,
  as CellFlux shows them); for looking, not for measuring.

Intensities are the dataset's uint8 values. Datasets cropped from raw images (``prepare bbbc021
--raw``, ``prepare images``) map each plate's 0.1 and 99.9 percentiles of the (illumination-corrected)
raw intensities to 0 and 255 and record those ranges in ``meta.json``; a value ``v`` is then about
``lo + v * (hi - lo) / 255`` raw counts. Synthetic images have no raw counts; IMPA crops come as
uint8 without their scaling. Both are said so in the metadata rather than given numbers.

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
CSV_NAME = "samples.csv"
ANNOTATION_NAMESPACE = "cellfluxrl/sample"


def image_name(pair: int, compound: str, fmt: str) -> str:
    """File name of generated image ``pair``: zero-padded index, compound (file-safe), suffix.

    >>> image_name(3, "colchicine 2", "tiff")
    '00003_colchicine_2.ome.tif'
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(compound)).strip("_") or "compound"
    return f"{pair:05d}_{safe}{SUFFIX[fmt]}"


def image_stem(name: str) -> str:
    """A file name without its image suffix: ``00003_taxol.ome.tif`` -> ``00003_taxol``."""
    for suffix in SUFFIX.values():
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def write_ome_tiff(path: str | os.PathLike, image: np.ndarray, channels: Sequence[str], name: str | None = None,
                   description: str | None = None, annotations: Mapping[str, object] | None = None) -> Path:
    """Write one uint8 ``(H, W, C)`` image as an OME-TIFF ``(C, H, W)`` with named channels.

    Args:
        path: output file (``.ome.tif``).
        image: uint8 ``(H, W, C)``, as stored in a dataset / ``samples.npz``.
        channels: ``C`` channel names, in order (e.g. ``("actin", "tubulin", "dna")``).
        name: the OME image name (default: the file name without ``.ome.tif``).
        description: the OME image ``Description`` (free text; Fiji shows it in Image > Show Info).
        annotations: key/value pairs stored as an OME ``MapAnnotation`` of the image (values as text).

    Returns:
        The written path.
    """
    import tifffile

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != len(channels):
        raise ValueError(f"expected (H, W, {len(channels)}) image, got shape {image.shape}")
    planes = np.ascontiguousarray(np.moveaxis(image.astype(np.uint8, copy=False), 2, 0))
    path = Path(path)
    metadata: dict = {"axes": "CYX", "Name": name or image_stem(path.name),
                      "Channel": {"Name": [str(c) for c in channels]}}
    if description:
        metadata["Description"] = description
    if annotations:
        metadata["MapAnnotation"] = {"Namespace": ANNOTATION_NAMESPACE,
                                     "Value": {str(k): str(v) for k, v in annotations.items()}}
    tifffile.imwrite(path, planes, ome=True, photometric="minisblack", metadata=metadata)
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


def intensity_fields(meta: Mapping | None, plate: str, channels: Sequence[str]) -> dict[str, str]:
    """The intensity scale of a generated image of ``plate``, as text fields (CSV columns, OME annotations).

    Args:
        meta: the dataset's ``meta.json`` (``None``: unknown).
        plate: the image's plate (the dataset's ``batch``).
        channels: the dataset's channel names.

    Returns:
        ``intensity``: ``"plate percentiles P_lo/P_hi"`` when the dataset recorded this plate's
        ranges, ``"synthetic: no raw counts"`` for a simulated dataset, else ``"not recorded"``;
        and ``lo_<channel>``, ``hi_<channel>`` for every channel: the raw intensities that map to
        uint8 0 and 255 (``""`` when there are none).
    """
    meta = meta or {}
    preparation = meta.get("preparation") or {}
    ranges = (preparation.get("intensity_ranges") or {}).get(str(plate))
    fields = {"intensity": "not recorded"}
    if ranges is not None:
        lo_p, hi_p = preparation.get("percentiles") or ("?", "?")
        fields["intensity"] = f"plate percentiles {lo_p:g}/{hi_p:g}" if lo_p != "?" else "plate range"
    elif meta.get("source") == "synthetic":
        fields["intensity"] = "synthetic: no raw counts"
    for i, channel in enumerate(channels):
        fields[f"lo_{channel}"] = f"{float(ranges['lo'][i]):g}" if ranges is not None else ""
        fields[f"hi_{channel}"] = f"{float(ranges['hi'][i]):g}" if ranges is not None else ""
    return fields


def describe_intensity(fields: Mapping[str, str], plate: str, channels: Sequence[str]) -> str:
    """One sentence for a Fiji user: what a pixel value of the image means (from :func:`intensity_fields`)."""
    kind = fields["intensity"]
    if kind.startswith("plate"):
        spans = ", ".join(f"{c} {fields[f'lo_{c}']}-{fields[f'hi_{c}']}" for c in channels)
        return (f"Pixel values: uint8, 0 and 255 are the {kind} of plate {plate}'s raw intensities (illumination-"
                f"corrected when cropped from fields): raw = lo + value * (hi - lo) / 255 with lo-hi {spans}.")
    if kind.startswith("synthetic"):
        return "Pixel values: uint8 from the synthetic simulator; there are no raw counts to map them back to."
    return "Pixel values: the dataset's uint8 values; their scaling from raw counts is not recorded in the dataset."


def sample_rows(samples, table: Mapping[str, np.ndarray], files: Sequence[str], meta: Mapping | None = None,
                channels: Sequence[str] = ()) -> list[dict]:
    """One ``samples.csv`` row per generated image.

    Args:
        samples: a :class:`cellfluxrl.model.generate.Samples` (arrays of length N).
        table: the dataset's metadata columns (``batch``, ``dose``, ``well`` ...), indexed by image row.
        files: N file names, one per generated image (``""`` when none was written).
        meta: the dataset's ``meta.json``, for the intensity scale (``None``: not recorded).
        channels: the dataset's channel names (the ``lo_``/``hi_`` columns; none when empty).

    Returns:
        Dicts with keys ``pair, file, compound, dose, moa, plate, well, candidate, seed,
        target_index, control_index, control_well`` (indices are rows of the dataset's
        ``metadata.csv``, whose ``source`` names each crop's origin; the control shares the plate),
        then ``intensity, lo_<channel>, hi_<channel>...`` (:func:`intensity_fields`) and, when rewards
        were computed, ``reward`` (the weighted total of the kept candidate) and ``reward_<name>``.
    """
    n = len(samples.generated)
    candidate = np.zeros(n, dtype=np.int64)
    if samples.candidate_rewards is not None:
        candidate = np.argmax(samples.candidate_rewards, axis=1)
    wells = table.get("well", np.full(len(table["batch"]), "", dtype=object))
    rows = []
    for i in range(n):
        t, c = int(samples.target_index[i]), int(samples.control_index[i])
        plate = str(table["batch"][t])
        row = {"pair": i, "file": files[i], "compound": str(samples.compound[i]),
               "dose": float(table["dose"][t]), "moa": str(samples.moa[i]), "plate": plate, "well": str(wells[t]),
               "candidate": int(candidate[i]), "seed": int(samples.seeds[i]),
               "target_index": t, "control_index": c, "control_well": str(wells[c])}
        row.update(intensity_fields(meta, plate, channels) if channels else {})
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


def ome_annotations(row: Mapping[str, object]) -> dict[str, object]:
    """The ``samples.csv`` row of an image as its OME ``MapAnnotation`` (file name and rewards left out)."""
    return {k: v for k, v in row.items() if k != "file" and not k.startswith("reward")}


def ome_description(row: Mapping[str, object], channels: Sequence[str]) -> str:
    """The OME ``Description`` of an image: what it is and what its pixel values mean."""
    what = (f"cellfluxrl sample pair {row['pair']}: {row['compound']} ({row['moa']}), dose {row['dose']:g}, "
            f"plate {row['plate']}, generated from control row {row['control_index']}.")
    fields = {k: str(row.get(k, "")) for k in ("intensity", *(f"{b}_{c}" for c in channels for b in ("lo", "hi")))}
    return f"{what} {describe_intensity(fields, str(row['plate']), channels)}"


def export_samples(folder: str | os.PathLike, samples, table: Mapping[str, np.ndarray],
                   channels: Sequence[str], fmt: str, meta: Mapping | None = None) -> Path:
    """Write every generated image of ``samples`` to ``folder`` as ``fmt`` plus ``samples.csv``.

    Args:
        folder: created if missing; files of the same names are replaced (the ``sample`` command
            writes into a new staged folder, see :mod:`cellfluxrl.commands.sample_outputs`).
        samples: a :class:`cellfluxrl.model.generate.Samples`.
        table: the dataset's metadata columns.
        channels: the dataset's channel names.
        fmt: ``"tiff"`` or ``"png"``.
        meta: the dataset's ``meta.json`` (the per-plate intensity ranges); ``None``: not recorded.

    Returns:
        The path of ``samples.csv``.
    """
    if fmt not in SUFFIX:
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(SUFFIX)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = [image_name(i, samples.compound[i], fmt) for i in range(len(samples.generated))]
    rows = sample_rows(samples, table, files, meta, channels)
    for name, image, row in zip(files, samples.generated, rows):
        if fmt == "tiff":
            write_ome_tiff(folder / name, image, channels, name=image_stem(name),
                           description=ome_description(row, channels), annotations=ome_annotations(row))
        else:
            write_png(folder / name, image)
    return write_csv(folder / CSV_NAME, rows)
