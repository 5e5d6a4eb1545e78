"""``evaluate --save-images DIR``: the K candidates a table graded, written so that ``score`` re-grades them.

Per run column ``NAME`` (candidates of every section, in pair order, candidate ``k`` = 0..K-1):

* ``NAME.npz``: ``generated`` uint8 ``(N, H, W, C)``, ``compound``, ``moa``, ``target_index``,
  ``control_index``, ``seeds`` (the evaluation seed: candidate ``k`` of a pair started from noise
  seeded by ``(seed, target_index, k)``), ``candidate``, ``pair`` (position in its section),
  ``section`` (``id``/``ood``/``all``) and the marker :data:`CANDIDATES_MARKER`.
* ``NAME/``: the same images as multi-channel OME-TIFF (``id_00003_k1_taxol.ome.tif``) and
  ``samples.csv`` (``pair, file, compound, dose, moa, plate, well, candidate, seed, target_index,
  control_index, section``), the layout ``score`` and ``measure`` read.

The candidates are stored as the table scored them (8 bits: what :func:`~cellfluxrl.evaluation.candidates.quantize`
keeps), so scoring them again gives the table's numbers. ``DIR`` holds :data:`FOLDER_MARKER`
listing what was written: a folder with it and nothing else is replaced whole by the next
``--save-images``; anything else is refused (:func:`folder_problem`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cellfluxrl.images import to_uint8

CANDIDATES_MARKER, CANDIDATES_VERSION = "cellfluxrl_candidates", 1
FOLDER_MARKER = ".cellfluxrl-candidates.json"
FORMATS = ("npz", "tiff")


class CandidateRecorder:
    """Keeps the uint8 candidates a :data:`~cellfluxrl.evaluation.candidates.CandidateFn` served."""

    def __init__(self, candidates, n_pairs: int):
        self.candidates, self.n_pairs = candidates, int(n_pairs)
        self.images: dict[int, dict[int, np.ndarray]] = {}

    def __call__(self, pos: np.ndarray, k: int):
        x = self.candidates(pos, k)
        for p, image in zip(np.asarray(pos).tolist(), to_uint8(x)):
            self.images.setdefault(int(k), {})[int(p)] = image
        return x

    def stacked(self) -> np.ndarray:
        """uint8 ``(P, K, H, W, C)``."""
        ks = sorted(self.images)
        return np.stack([np.stack([self.images[k][p] for k in ks]) for p in range(self.n_pairs)])


def folder_problem(folder: Path) -> str | None:
    """Why ``--save-images`` may not write ``folder`` (``None``: new, empty, or its own earlier output)."""
    if folder.exists() and not folder.is_dir():
        return f"--save-images {folder} is a file; give a folder"
    if not folder.exists() or not any(folder.iterdir()):
        return None
    if (folder / "meta.json").exists():
        return f"--save-images {folder} is a dataset folder; give a new or empty folder"
    try:
        listed = set(json.loads((folder / FOLDER_MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        listed = set()
    for entry in sorted(p.name for p in folder.iterdir()):
        if entry != FOLDER_MARKER and entry not in listed:
            return f"--save-images {folder} holds {entry}, which evaluate did not write; choose a new or empty folder"
    return None


def write_candidates(folder: Path, name: str, sections: list[tuple[str, object, np.ndarray]], dataset, seed: int,
                     formats=FORMATS) -> list[str]:
    """Write one run's candidates (see the module docstring); returns the names written in ``folder``.

    Args:
        folder: an existing folder (the command's staged one).
        name: the run's column name.
        sections: ``(section, Pairs, uint8 (P, K, H, W, C))`` per section, in report order.
        dataset: the dataset (channels, metadata).
        seed: the evaluation seed.
        formats: ``"npz"`` and/or ``"tiff"``.
    """
    from cellfluxrl.export import write_csv, write_ome_tiff

    columns = {k: [] for k in ("generated", "compound", "moa", "target_index", "control_index", "candidate", "pair",
                               "section")}
    for part, pairs, images in sections:
        for p in range(len(pairs)):
            for k in range(images.shape[1]):
                for key, value in (("generated", images[p, k]), ("compound", pairs.compound[p]), ("moa", pairs.moa[p]),
                                   ("target_index", pairs.target[p]), ("control_index", pairs.control[p]),
                                   ("candidate", k), ("pair", p), ("section", part)):
                    columns[key].append(value)
    arrays = {k: np.asarray(v) for k, v in columns.items()}
    arrays["seeds"] = np.full(len(arrays["pair"]), int(seed), dtype=np.int64)
    written = []
    if "npz" in formats:
        np.savez_compressed(folder / f"{name}.npz", **arrays, **{CANDIDATES_MARKER: np.asarray(CANDIDATES_VERSION)})
        written.append(f"{name}.npz")
    if "tiff" in formats:
        (folder / name).mkdir()
        rows, table = [], dataset.table
        for i in range(len(arrays["pair"])):
            t = int(arrays["target_index"][i])
            file = f"{arrays['section'][i]}_{int(arrays['pair'][i]):05d}_k{int(arrays['candidate'][i])}.ome.tif"
            write_ome_tiff(folder / name / file, arrays["generated"][i], dataset.channels)
            rows.append({"pair": int(arrays["pair"][i]), "file": file, "compound": str(arrays["compound"][i]),
                         "dose": float(table["dose"][t]), "moa": str(arrays["moa"][i]), "plate": str(table["batch"][t]),
                         "well": str(table["well"][t]), "candidate": int(arrays["candidate"][i]), "seed": int(seed),
                         "target_index": t, "control_index": int(arrays["control_index"][i]),
                         "section": str(arrays["section"][i])})
        write_csv(folder / name / "samples.csv", rows)
        written.append(name)
    return written


def write_marker(folder: Path, names: list[str]) -> None:
    """The marker listing what ``--save-images`` wrote in ``folder``."""
    (folder / FOLDER_MARKER).write_text(json.dumps({"written_by": "cellfluxrl evaluate --save-images",
                                                    "files": sorted(names)}, indent=1) + "\n")
