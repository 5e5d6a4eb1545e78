"""The same image twice: content hashes of input fields and of written crops.

A plate map copied with a slip lists the same image files again under other wells; a CSV row pasted
twice lists a field twice. Both put identical cells into two (plate, well) groups, so the group-wise
deals of :mod:`cellfluxrl.data.splits` (train/val/test, and the two classifier halves) can place one
image on both sides of a held-out boundary, and the dataset silently holds repeats. Two guards,
both on content (not paths, which differ for copies):

* :func:`field_digest`: BLAKE2b of a field's channel files; ``prepare images`` refuses a field whose
  files have the same content as an earlier row's, naming both CSV lines.
* :class:`CropDigests`: BLAKE2b of every crop :class:`~cellfluxrl.data.layout.DatasetWriter`
  writes, for every source (synthetic, images CSV, IMPA, raw BBBC021); :meth:`CropDigests.check`
  refuses a dataset in which two identical crops sit in different splits or different (plate, well)
  groups. The splits and the classifier halves are dealt by whole groups, so with identical crops
  always in one group no image content can reach two splits or both halves.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

from cellfluxrl.errors import CellfluxError

DIGEST_BYTES = 16  # BLAKE2b digest size: 128 bits, collisions out of reach for any dataset
_READ_BYTES = 1 << 20


def content_digest(data: bytes | memoryview) -> bytes:
    """BLAKE2b (:data:`DIGEST_BYTES` bytes) of some bytes."""
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def field_digest(paths: Sequence[Path]) -> bytes:
    """BLAKE2b of the contents of a field's channel files, in order (the files are read, not decoded).

    Args:
        paths: the channel files (actin, tubulin, dna).

    Returns:
        :data:`DIGEST_BYTES` bytes; equal for two fields exactly when their files hold the same bytes
        (whatever their names).
    """
    outer = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for path in paths:
        inner = hashlib.blake2b(digest_size=DIGEST_BYTES)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(_READ_BYTES), b""):
                inner.update(block)
        outer.update(inner.digest())
    return outer.digest()


class CropDigests:
    """The content hash of every crop written to a dataset, and the repeats among them.

    :meth:`add` is called per chunk in writing order (row ``i`` = image ``i``); only a first index
    per distinct crop and the ``(first, repeat)`` index pairs are kept (16 bytes per image).
    """

    def __init__(self) -> None:
        self.first: dict[bytes, int] = {}
        self.repeats: list[tuple[int, int]] = []
        self.n = 0

    def add(self, images: np.ndarray) -> None:
        """Hash a chunk of uint8 ``(n, H, W, C)`` crops."""
        for image in np.ascontiguousarray(images):
            digest = content_digest(image.data)
            first = self.first.setdefault(digest, self.n)
            if first != self.n:
                self.repeats.append((first, self.n))
            self.n += 1

    def check(self, split: np.ndarray, groups: np.ndarray, table: dict[str, np.ndarray], where: str) -> None:
        """Refuse two identical crops in different splits or different (plate, well) groups.

        Args:
            split: str ``(N,)`` final split of every image (``train``/``val``/``test``).
            groups: int ``(N,)`` group of every image (:func:`cellfluxrl.data.splits.group_ids`).
            table: the metadata columns (``id``, ``source``, ``batch``, ``well``), for the message.
            where: the dataset being written, named first.

        Raises:
            CellfluxError: naming both images (id and source), their splits or wells.
        """
        for a, b in self.repeats:
            if split[a] == split[b] and groups[a] == groups[b]:
                continue  # a repeat inside one well and split cannot cross a held-out boundary

            def name(i: int) -> str:
                well = str(table["well"][i]) or "none recorded"
                return (f"{table['id'][i]} ({table['source'][i]}; plate {table['batch'][i]}, well {well}, "
                        f"{split[i]})")

            raise CellfluxError(f"{where}: images {name(a)} and {name(b)} are identical (same pixels), so one image "
                                f"would sit in two wells or splits; the same image is listed twice in the input: "
                                f"remove the repeat")
