"""Candidate sources of an evaluation: the test pairs, their seeded source noise, a run's samples.

Every run is evaluated on the same :class:`Pairs` and the same source noise (:func:`pair_noise`,
seeded by ``(seed, target index, k)``), so columns differ only by their networks. A candidate
source is a function ``(pair positions int64 (B,), k) -> float32 (B, C, H, W) in [-1, 1]``
(:data:`CandidateFn`): :func:`run_candidates` samples a velocity network with a run's sampling
settings; tests and benchmarks pass any image source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from cellfluxrl.images import to_model, to_uint8

# A source of candidates: (pair positions int64 (B,), candidate index k) -> float (B, C, H, W) in [-1, 1].
CandidateFn = Callable[[np.ndarray, int], torch.Tensor]


@dataclass
class Pairs:
    """The evaluation pairs.

    Attributes:
        target, control: int64 ``(P,)`` image indices of the treated targets and their controls.
        condition: int64 ``(P,)`` row of the target's compound in ``dataset.conditions``.
        compound, moa: str ``(P,)`` compound and MoA names of the targets.
    """

    target: np.ndarray
    control: np.ndarray
    condition: np.ndarray
    compound: np.ndarray
    moa: np.ndarray

    def __len__(self) -> int:
        return int(self.target.size)

    @classmethod
    def from_dataset(cls, dataset, n: int, seed: int, split: str = "id", images: str = "test") -> "Pairs":
        """The first ``n`` treated rows of ``split`` (``"id"``, ``"ood"``, ``"all"``) with controls, from
        the test images (``images="val"``: the validation images)."""
        from cellfluxrl.model.generate import test_pairs

        target, control = test_pairs(dataset, n, seed, split=split, images=images)
        return cls(target, control, dataset.condition[target], dataset.table["compound"][target].astype(str),
                   dataset.table["moa"][target].astype(str))

    def order(self) -> np.ndarray:
        """Processing order: grouped by condition (stable, so CSV order within a condition)."""
        return np.argsort(self.condition, kind="stable")


class MoAFeatures:
    """The offline substitute feature extractor: an MoA classifier's penultimate features.

    With the judge (the default in :func:`evaluate`) the distances are named FD-judge/KD-judge;
    ``name``/``kid_name`` can say which network it is when another one is used.
    """

    def __init__(self, classifier, source: str = "", name: str = "FD-judge", kid_name: str = "KD-judge"):
        self.classifier, self.source = classifier, source
        self.name, self.kid_name = name, kid_name
        self.dim = int(classifier.config["widths"][-1])

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return np.asarray(self.classifier.features(images), dtype=np.float64)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """float ``(B, C, H, W)`` -> the same images through 8 bits: clamp, floor to uint8, back to [-1, 1]."""
    return to_model(to_uint8(images), dequantize=False)


def pair_noise(target_index: int, k: int, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The source noise ``eps`` of candidate ``k`` of a pair: float32 ``shape``, fixed by ``(seed, target, k)``."""
    state = np.random.SeedSequence([int(seed), int(target_index), int(k)]).generate_state(2, np.uint64)
    generator = torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def run_candidates(net: torch.nn.Module, dataset, pairs: Pairs, *, seed: int, steps: int, cfg_scale: float,
                   sigma: float = 1.0, device: str | torch.device = "cpu", solver: str = "heun",
                   grid: str = "edm") -> CandidateFn:
    """The candidates of a velocity network: CellFlux sampling from per-(pair, k) seeded source noise.

    ``steps``, ``cfg_scale``, ``sigma``, ``solver`` and ``grid`` are the run's sampling settings
    (:class:`cellfluxrl.checkpoint.Sampling`).
    """
    from cellfluxrl.model.generate import generate

    embeddings = torch.tensor(np.array(dataset.embeddings), dtype=torch.float32)

    def candidates(pos: np.ndarray, k: int) -> torch.Tensor:
        x_ctrl = to_model(np.asarray(dataset.images[pairs.control[pos]]), dequantize=False)
        eps = torch.stack([pair_noise(pairs.target[p], k, seed, tuple(x_ctrl.shape[1:])) for p in pos])
        x_0 = (x_ctrl + float(sigma) * eps).to(device)
        cond = embeddings[pairs.condition[pos]].to(device)
        x_1_hat, _ = generate(net, x_0, cond, generator=torch.Generator(), sigma=0.0, num_steps=steps,
                              grid=grid, solver=solver, cfg_scale=cfg_scale)
        return x_1_hat.float().cpu()

    return candidates


def real_images(dataset, pairs: Pairs, pos: np.ndarray) -> torch.Tensor:
    """The real targets of some pairs, float32 ``(B, C, H, W)`` in [-1, 1] (exact uint8 levels)."""
    return to_model(np.asarray(dataset.images[pairs.target[pos]]), dequantize=False)
