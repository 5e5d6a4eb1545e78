"""Image sources that `measure` and `score` must refuse (one line, exit 2, nothing written)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def bad_image_sources(folder: Path, size: int) -> dict[Path, str]:
    """Write four bad sources into ``folder``; returns ``{source: words its error must contain}``:
    an empty folder, a folder of OME-TIFFs of two sizes (``size`` and 40), a 1-channel npz, and an
    npz naming a compound no dataset has."""
    import tifffile

    empty, mixed = folder / "empty", folder / "mixed"
    empty.mkdir()
    mixed.mkdir()
    for i, side in enumerate((size, 40)):
        tifffile.imwrite(mixed / f"{i}.ome.tif", np.zeros((3, side, side), np.uint8), ome=True, metadata={"axes": "CYX"})
    (mixed / "samples.csv").write_text("file,compound\n0.ome.tif,taxol\n1.ome.tif,taxol\n")
    gray, unknown = folder / "gray.npz", folder / "unknown.npz"
    np.savez(gray, generated=np.zeros((2, size, size, 1), np.uint8), compound=np.array(["taxol", "taxol"]))
    np.savez(unknown, generated=np.zeros((2, size, size, 3), np.uint8), compound=np.array(["taxol", "aspirin"]))
    return {empty: "is empty", mixed: "mixed image sizes", gray: "1 channel(s)",
            unknown: "compound 'aspirin' is not in dataset"}
