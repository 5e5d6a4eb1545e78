"""Images from any generator as columns on evaluation pairs: paired where they name their pairs.

An :class:`~cellfluxrl.evaluation.image_sources.ImageSet` becomes :class:`PairedImages`: evaluation
:class:`~cellfluxrl.evaluation.candidates.Pairs` and, per pair, the positions of its ``K``
candidates in the set, which :func:`image_candidates` serves as a
:data:`~cellfluxrl.evaluation.candidates.CandidateFn` to
:func:`~cellfluxrl.evaluation.scoring.evaluate_sources` (so images are graded by exactly the code
that grades runs).

* **Paired**: every image names its real target (``target_index``; ``control_index``, ``seed``
  and ``candidate`` when known: ``sample`` and ``evaluate --save-images`` write them). Images with
  the same ``(target, control, seed)`` are the candidates of one pair, ordered by ``candidate``
  (else as stored); every pair must have the same number. A missing control is drawn from the
  target's plate with ``seed``.
* **Unpaired**: images that name only their compound. Image ``i`` becomes a pair whose real target
  is a treated *test* image of its compound drawn by ``(seed, i)`` (and a same-plate control), so the
  real column is the compound's real test images; comparisons with other sources are unpaired.

Two sources are compared on pairs only when both are paired and name the same pairs
(:func:`same_pairs`); otherwise their difference is unpaired: the difference of means with the
standard errors of both added in quadrature (Welch's, per pair and clustered by compound;
:func:`unpaired_difference`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cellfluxrl.data.compounds import CONTROL
from cellfluxrl.errors import CellfluxError
from cellfluxrl.evaluation.candidates import CandidateFn, Pairs
from cellfluxrl.images import to_model

UNPAIRED_SALT = 0x5C0E  # separates the draw of an unpaired image's target from other draws of the same seed


@dataclass
class PairedImages:
    """One image source on its pairs.

    Attributes:
        name: the column name.
        images: the :class:`~cellfluxrl.evaluation.image_sources.ImageSet`.
        pairs: the evaluation pairs the images were made for (or drawn for, unpaired).
        seed: int64 ``(P,)`` the noise seed each pair names (-1: none).
        grid: int64 ``(P, K)`` position in ``images`` of candidate ``k`` of pair ``p``.
        paired: whether the images named their pairs.
    """

    name: str
    images: object
    pairs: Pairs
    seed: np.ndarray
    grid: np.ndarray
    paired: bool

    @property
    def k(self) -> int:
        return int(self.grid.shape[1])

    def keys(self) -> list[tuple[int, int, int]]:
        """``(target, control, seed)`` per pair."""
        return list(zip(self.pairs.target.tolist(), self.pairs.control.tolist(), self.seed.tolist()))

    def subset(self, positions: np.ndarray) -> "PairedImages":
        """The same source restricted to some pairs (in the given order)."""
        p = self.pairs
        pairs = Pairs(p.target[positions], p.control[positions], p.condition[positions], p.compound[positions],
                      p.moa[positions])
        return PairedImages(self.name, self.images, pairs, self.seed[positions], self.grid[positions], self.paired)


def _pairs_of(dataset, target: np.ndarray, control: np.ndarray) -> Pairs:
    t = dataset.table
    return Pairs(target.astype(np.int64), control.astype(np.int64), dataset.condition[target].astype(np.int64),
                 t["compound"][target].astype(str), t["moa"][target].astype(str))


def _check_treated(images, dataset) -> None:
    dmso = np.flatnonzero(np.asarray(images.compound) == CONTROL)
    if dmso.size:
        raise CellfluxError(f"{images.origin}: image {dmso[0]} ({images.source[dmso[0]]}) is {CONTROL}: score grades "
                            f"treated images against their compound's real ones; leave the controls out")


def pair_images(images, dataset, seed: int, name: str) -> PairedImages:
    """An image set on its pairs (see the module docstring).

    Args:
        images: an :class:`~cellfluxrl.evaluation.image_sources.ImageSet` checked against ``dataset``.
        dataset: the loaded dataset.
        seed: draws the missing controls and, for unpaired images, their real targets.
        name: the column name.

    Raises:
        CellfluxError: a DMSO image, pairs with different numbers of candidates, a compound with no
            real test image to compare with.
    """
    from cellfluxrl.data.pairing import draw_controls

    _check_treated(images, dataset)
    pairing = images.pairing
    if "target_index" not in pairing:
        return _unpaired(images, dataset, seed, name)
    target = pairing["target_index"]
    control = pairing.get("control_index")
    if control is None:
        splits = np.unique(dataset.table["split"][target])
        control = draw_controls(dataset, str(splits[0]) if splits.size == 1 else None, target, seed)
    noise = pairing.get("seed", np.full(len(target), -1, dtype=np.int64))
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, key in enumerate(zip(target.tolist(), control.tolist(), noise.tolist())):
        groups.setdefault(key, []).append(i)
    sizes = {len(v) for v in groups.values()}
    if len(sizes) > 1:
        raise CellfluxError(f"{images.origin}: pairs have {min(sizes)} to {max(sizes)} candidates; every pair needs the "
                            f"same number (images with the same target_index, control_index and seed)")
    if "candidate" in pairing:
        groups = {key: sorted(v, key=lambda i: int(pairing["candidate"][i])) for key, v in groups.items()}
    keys = list(groups)
    grid = np.asarray([groups[key] for key in keys], dtype=np.int64)
    pairs = _pairs_of(dataset, np.asarray([k[0] for k in keys]), np.asarray([k[1] for k in keys]))
    return PairedImages(name, images, pairs, np.asarray([k[2] for k in keys], dtype=np.int64), grid, True)


def _unpaired(images, dataset, seed: int, name: str) -> PairedImages:
    """Each image a pair with a real test target of its compound drawn by ``(seed, image index)``."""
    from cellfluxrl.data.pairing import draw_controls

    test = dataset.select(split="test", state="treated")
    by_compound = {c: test[dataset.table["compound"][test] == c] for c in np.unique(np.asarray(images.compound))}
    target = np.empty(len(images), dtype=np.int64)
    for i, compound in enumerate(np.asarray(images.compound)):
        rows = by_compound[compound]
        if rows.size == 0:
            raise CellfluxError(f"{images.origin}: compound {compound!r} has no real test image in dataset "
                                f"{dataset.root} to compare with")
        target[i] = np.random.default_rng([int(seed), i, UNPAIRED_SALT]).choice(rows)
    control = draw_controls(dataset, "test", target, seed)
    grid = np.arange(len(images), dtype=np.int64)[:, None]
    return PairedImages(name, images, _pairs_of(dataset, target, control), np.full(len(images), -1, np.int64), grid,
                        False)


def image_candidates(source: PairedImages) -> CandidateFn:
    """Candidate ``k`` of some pairs: float32 ``(B, C, H, W)`` in [-1, 1], the exact uint8 levels."""
    images = source.images

    def candidates(pos: np.ndarray, k: int) -> torch.Tensor:
        rows = images.rows[source.grid[np.asarray(pos), k]]
        return to_model(np.asarray(images.images[rows]), dequantize=False)

    return candidates


def same_pairs(a: PairedImages, b: PairedImages) -> bool:
    """Whether two sources can be compared pair by pair: both paired, on the same set of pairs."""
    return a.paired and b.paired and sorted(a.keys()) == sorted(b.keys())


def aligned(source: PairedImages, keys: list[tuple[int, int, int]]) -> PairedImages:
    """``source`` with its pairs put in the order of ``keys`` (the same set of pairs)."""
    where = {key: i for i, key in enumerate(source.keys())}
    return source.subset(np.asarray([where[key] for key in keys], dtype=np.int64))


def sections_of(source: PairedImages, dataset, split: str = "both") -> dict[str, np.ndarray]:
    """Pair positions per report section: ``{"id": ..., "ood": ...}`` by the compounds' held-out flag
    (``split="all"``: one section), sections without pairs left out; pair order is kept."""
    if split == "all":
        return {"all": np.arange(len(source.pairs), dtype=np.int64)}
    held_out = np.asarray(dataset.conditions["ood"], dtype=bool)[source.pairs.condition]
    parts = {"id": np.flatnonzero(~held_out), "ood": np.flatnonzero(held_out)}
    return {part: pos for part, pos in parts.items() if pos.size and (split == "both" or split == part)}


def map_onto(source: PairedImages, pairs: Pairs) -> PairedImages:
    """``source`` on an evaluation's own ``pairs`` (``evaluate --images``).

    Paired images are matched by target and control (each pair must be there); unpaired ones by
    compound: the ``j``-th pair of a compound takes the ``j``-th image of it (one candidate).

    Raises:
        CellfluxError: a pair the images do not cover, or a compound with fewer images than pairs.
    """
    if source.paired:
        where = {(t, c): i for i, (t, c, _) in enumerate(source.keys())}
        positions = []
        for p, key in enumerate(zip(pairs.target.tolist(), pairs.control.tolist())):
            if key not in where:
                raise CellfluxError(f"--images {source.name}: no image for pair {p} (target row {key[0]}, control row "
                                    f"{key[1]}); give images made on this evaluation's pairs (same --n and --seed)")
            positions.append(where[key])
        grid = source.grid[np.asarray(positions, dtype=np.int64)]
        return PairedImages(source.name, source.images, pairs, source.seed[positions], grid, True)
    compound = np.asarray(source.images.compound)[source.grid[:, 0]]
    grid = np.empty((len(pairs), 1), dtype=np.int64)
    for name in np.unique(pairs.compound):
        need = np.flatnonzero(pairs.compound == name)
        have = source.grid[compound == name, 0]
        if have.size < need.size:
            raise CellfluxError(f"--images {source.name}: {have.size} image(s) of {name}, the evaluation has "
                                f"{need.size} pair(s) of it")
        grid[need, 0] = have[:need.size]
    return PairedImages(source.name, source.images, pairs, np.full(len(pairs), -1, np.int64), grid, False)


def unpaired_difference(a: dict, b: dict) -> dict:
    """``a - b`` of two report cells (``{"mean", "sem", "sem_compound"}``) from independent samples:
    Welch's standard error ``sqrt(se_a^2 + se_b^2)``, per pair and clustered by compound."""
    if a.get("mean") is None or b.get("mean") is None:
        return {"mean": None, "sem": None, "sem_compound": None}

    def both(key):
        return None if a.get(key) is None or b.get(key) is None else float(np.hypot(a[key], b[key]))

    return {"mean": float(a["mean"] - b["mean"]), "sem": both("sem"), "sem_compound": both("sem_compound")}
