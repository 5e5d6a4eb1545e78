"""Pretraining's data order: which items each rank's micro-batch ``p`` holds, a pure function of
``(seed, epoch)``, so a resumed run reads exactly the batches an uninterrupted one would."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from cellfluxrl.errors import CellfluxError


def epoch_permutation(n_items: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled item order of one epoch, int64 ``(n_items,)``, a pure function of ``(seed, epoch)``."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n_items)


def batches_per_epoch(n_items: int, batch_size: int, world_size: int = 1) -> int:
    """Full micro-batches each rank gets per epoch (drop_last); at least 1 or an error."""
    per_rank = n_items // world_size
    n = per_rank // batch_size
    if n < 1:
        raise CellfluxError(f"{n_items} training pairs are too few for batch size {batch_size} x {world_size} "
                            f"process(es); lower --batch-size")
    return n


def micro_batch(position: int, n_items: int, batch_size: int, seed: int, rank: int = 0,
                world_size: int = 1) -> tuple[int, np.ndarray]:
    """``(epoch, item indices)`` of micro-batch number ``position`` of rank ``rank``.

    The epoch permutation is truncated to a multiple of ``world_size`` and dealt round-robin, as
    ``DistributedSampler(shuffle=True, drop_last=True)`` does; each rank then takes consecutive
    chunks of ``batch_size``.
    """
    bpe = batches_per_epoch(n_items, batch_size, world_size)
    epoch, j = divmod(int(position), bpe)
    perm = epoch_permutation(n_items, seed, epoch)
    mine = perm[: (n_items // world_size) * world_size][rank::world_size]
    return epoch, mine[j * batch_size:(j + 1) * batch_size]


class EpochItems(torch.utils.data.Dataset):
    """Items addressed as ``(epoch, i)`` so the epoch travels to DataLoader workers with the index."""

    def __init__(self, paired):
        self.paired = paired

    def __len__(self) -> int:
        return len(self.paired)

    def __getitem__(self, key):
        epoch, i = key
        self.paired.set_epoch(epoch)
        return self.paired[i]


class BatchOrder(torch.utils.data.Sampler):
    """Yields the micro-batches ``start, start + 1, ...`` as lists of ``(epoch, i)``."""

    def __init__(self, n_items: int, batch_size: int, seed: int, rank: int, world_size: int,
                 start: int, stop: int):
        self.args = (n_items, batch_size, seed, rank, world_size)
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[list]:
        for p in range(self.start, self.stop):
            epoch, idx = micro_batch(p, *self.args)
            yield [(epoch, int(i)) for i in idx]


def collate(items: list[dict]) -> dict:
    return {"x_0": torch.stack([it["x_0"] for it in items]), "x_1": torch.stack([it["x_1"] for it in items]),
            "cond": torch.tensor([it["cond"] for it in items], dtype=torch.int64)}
