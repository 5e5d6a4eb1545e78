"""Source/target pairing exactly as CellFlux does it.

Every treated image ``x_1`` of a split is paired with a DMSO control ``x_0`` drawn uniformly from the
same batch (plate) and split; the network never sees the plate, only the choice of ``x_0``. The
draw, the dequantisation noise and the flips of item ``i`` depend only on ``(seed, epoch, i)``, so
a resumed run sees the same pairs as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import torch

from cellfluxrl.data.layout import Dataset
from cellfluxrl.errors import CellfluxError
from cellfluxrl.images import to_model


def check_controls(dataset: Dataset, split: str, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Controls by batch, after checking that every batch of ``targets`` has at least one.

    Raises:
        CellfluxError: the split has no treated images, or a plate has no DMSO controls.
    """
    if targets.size == 0:
        raise CellfluxError(f"{dataset.root}: split {split!r} has no treated images")
    controls = dataset.controls_by_batch(split)
    for batch in np.unique(dataset.table["batch"][targets]):
        if batch not in controls:
            raise CellfluxError(f"{dataset.root}: plate {str(batch)!r} has no DMSO controls in split {split!r}")
    return controls


def draw_controls(dataset: Dataset, split: str, targets: np.ndarray, seed: int) -> np.ndarray:
    """One same-plate control index per target (int64 ``(len(targets),)``), deterministic in ``seed``."""
    controls = check_controls(dataset, split, targets)
    rng = np.random.default_rng(seed)
    return np.array([rng.choice(controls[b]) for b in dataset.table["batch"][targets]], dtype=np.int64)


class PairedDataset(torch.utils.data.Dataset):
    """Yields ``(x_0, x_1, cond)`` training pairs.

    Items are dicts: ``x_0`` float32 ``(C, H, W)`` in [-1, 1] (clean control, same plate and split),
    ``x_1`` float32 ``(C, H, W)`` (treated target), ``cond`` int64 row in ``dataset.embeddings``,
    ``moa`` str, ``index`` and ``control_index`` int64 image indices.

    Args:
        dataset: a loaded dataset.
        split: ``"train"`` or ``"test"``.
        flip_p: probability of each of the horizontal and vertical flips, applied independently to
            ``x_0`` and ``x_1`` (CellFlux: 0.3 in training, 0 otherwise).
        include_ood: keep the held-out (OOD) compounds (CellFlux trains without them).
        dequantize: add uniform dequantisation noise (CellFlux: train and test).
        seed: base seed of the per-item randomness.
    """

    def __init__(self, dataset: Dataset, split: str = "train", flip_p: float = 0.3,
                 include_ood: bool = False, dequantize: bool = True, seed: int = 0):
        self.dataset, self.split, self.flip_p = dataset, split, float(flip_p)
        self.dequantize, self.seed, self.epoch = dequantize, int(seed), 0
        self.targets = dataset.select(split=split, state="treated", include_ood=include_ood)
        self.controls = check_controls(dataset, split, self.targets)
        self.batches = dataset.table["batch"][self.targets]

    def set_epoch(self, epoch: int) -> None:
        """Change the per-item randomness (call once per epoch, as with DistributedSampler)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.targets.size

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        target = int(self.targets[i])
        control = int(rng.choice(self.controls[self.batches[i]]))
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        images = np.stack([self.dataset.images[control], self.dataset.images[target]])
        x = to_model(images, generator=generator, dequantize=self.dequantize)
        flips = rng.random((2, 2)) < self.flip_p  # [image, (horizontal, vertical)]
        out = []
        for k in range(2):
            dims = [d for d, flip in zip((2, 1), flips[k]) if flip]
            out.append(torch.flip(x[k], dims) if dims else x[k])
        return {"x_0": out[0], "x_1": out[1], "cond": int(self.dataset.condition[target]),
                "moa": str(self.dataset.table["moa"][target]), "index": target, "control_index": control}
