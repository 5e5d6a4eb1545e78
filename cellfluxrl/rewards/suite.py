"""The plugin contract (RewardBatch, RewardContext) and RewardSuite, the weighted reward sum.

Plugin contract (the same for the seven built-ins and for third-party packages):

- An entry point in the group ``cellfluxrl.rewards`` names a *factory*
  ``make(context: RewardContext) -> reward``; it is imported only when its reward is requested.
- The reward is a callable ``reward(batch: RewardBatch) -> np.ndarray`` float64 ``(B,)``, finite;
  higher is better. It must not modify the batch.
- The suite segments and measures each batch once; every reward reads ``batch.nuclei``,
  ``batch.cells`` and ``batch.stats`` instead of segmenting again, and can share any other
  per-batch computation through :meth:`RewardBatch.shared`.

:class:`RewardSuite` loads the named rewards of a dataset, scores batches (``score``, or
``submit`` on a background thread so GPU rollouts overlap CPU scoring) and checks every output.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from cellfluxrl.errors import CellfluxError
from cellfluxrl.rewards.registry import RewardInfo, available_rewards, check_output, get_info, load_reward

logger = logging.getLogger(__name__)


@dataclass
class RewardBatch:
    """One batch as every reward sees it. Treat all arrays as read-only.

    Attributes:
        images: float32 ``(B, C, H, W)`` in ``[-1, 1]``, channels (actin, tubulin, DNA).
        moa: str ``(B,)`` target MoA of each image (``"DMSO"`` for controls).
        moa_index: int64 ``(B,)`` index of the MoA in :data:`cellfluxrl.data.compounds.MOAS`, -1 for DMSO.
        nuclei: int32 ``(B, H, W)`` nucleus labels (0 = background), from the suite's segmenter.
        cells: int32 ``(B, H, W)`` whole-cell labels.
        stats: :func:`cellfluxrl.rewards.morphology.measure` of (nuclei, cells): float64 ``(B,)`` per key
            (nuc_count, cyto_count, nuc_size, cyto_size, roundness, nuc_in_cyto).
        device: torch device a reward may run models on (``"cpu"``, ``"cuda"``).
    """

    images: np.ndarray
    moa: np.ndarray
    moa_index: np.ndarray
    nuclei: np.ndarray
    cells: np.ndarray
    stats: dict[str, np.ndarray]
    device: str = "cpu"
    _shared: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return self.images.shape[0]

    def shared(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per batch under ``key``; later calls (any reward) reuse the value."""
        if key not in self._shared:
            self._shared[key] = compute()
        return self._shared[key]


@dataclass
class RewardContext:
    """What a reward factory gets: the dataset's evaluators and the device.

    Attributes:
        evaluators: the dataset's :class:`cellfluxrl.rewards.evaluators.Evaluators` (reference statistics,
            MoA classifier, segmenter settings).
        device: torch device for models (``"cpu"``, ``"cuda"``).
    """

    evaluators: Any
    device: str = "cpu"

    def reference(self, stat: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-MoA (mean, std) float64 ``(13,)`` of a morphology statistic; row = ``moa_index + 1``."""
        return self.evaluators.reference_arrays(stat)

    def moa_classifier(self):
        """The dataset's MoA classifier (:class:`cellfluxrl.rewards.moa_classifier.MoAClassifier`), eval mode."""
        return self.evaluators.moa_classifier(self.device)


@dataclass
class RewardResult:
    """The rewards of one batch.

    Attributes:
        total: float64 ``(B,)``, ``sum_k w_k r_k`` over the weighted rewards.
        components: name -> float64 ``(B,)`` unweighted reward values, in weight order.
        stats: the morphology statistics of the batch (float64 ``(B,)`` per key).
        weights: the weights used.
        shared: what the rewards computed once for the batch (:meth:`RewardBatch.shared`, e.g.
            ``"moa_proba"``: the MoA classifier's probabilities, float64 ``(B, n_classes)``).
    """

    total: np.ndarray
    components: dict[str, np.ndarray]
    stats: dict[str, np.ndarray]
    weights: dict[str, float]
    shared: dict = field(default_factory=dict)


def _as_numpy_images(images) -> np.ndarray:
    """torch or numpy float ``(B, C, H, W)`` -> contiguous float32 numpy copy, clamped to [-1, 1].

    Generated images may overshoot [-1, 1]; they are clamped as they would be when saved as uint8.
    """
    if hasattr(images, "detach"):
        images = images.detach().to("cpu").float().numpy()
    images = np.array(images, dtype=np.float32, copy=True)
    if images.ndim != 4 or images.shape[1] != 3:
        raise CellfluxError(f"rewards: expected float (B, 3, H, W) images in [-1, 1], got {images.shape}")
    finite = np.isfinite(images).reshape(images.shape[0], -1).all(axis=1)
    if not finite.all():
        raise CellfluxError(f"rewards: image {int(np.argmin(finite))} of the batch holds NaN or inf values")
    return np.clip(images, -1.0, 1.0, out=images)


class RewardSuite:
    """The weighted sum of named rewards over one dataset's evaluators.

    Build it with :meth:`from_dataset`. Not thread-safe across concurrent :meth:`score` calls;
    :meth:`submit` serialises work on its single background worker.

    Args:
        evaluators: the dataset's :class:`~cellfluxrl.rewards.evaluators.Evaluators`.
        weights: name -> weight (> 0; zero weights are dropped).
        segmenter: a segmenter whose settings match the evaluators' (checked by the caller).
        device: torch device for model-based rewards.
        available: the discovered rewards (default :func:`available_rewards`).
    """

    def __init__(self, evaluators, weights: Mapping[str, float], segmenter, device: str = "cpu",
                 available: Mapping[str, RewardInfo] | None = None):
        available = dict(available_rewards() if available is None else available)
        self._weights = {name: float(w) for name, w in weights.items() if float(w) != 0.0}
        if not self._weights:
            raise CellfluxError("rewards: no reward has a non-zero weight")
        self.evaluators, self.segmenter, self.device = evaluators, segmenter, device
        self.context = RewardContext(evaluators, device)
        self.infos = {name: get_info(name, available) for name in self._weights}
        self.rewards = {name: load_reward(info, self.context) for name, info in self.infos.items()}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    @classmethod
    def from_dataset(cls, dataset, weights: Mapping[str, float], device: str = "cpu", segmenter: str | None = None,
                     cellpose_model: str | None = None) -> "RewardSuite":
        """Load the evaluators of ``DATASET/evaluators`` and the named rewards.

        Args:
            dataset: dataset folder or loaded :class:`~cellfluxrl.data.layout.Dataset`.
            weights: name -> weight, e.g. from :func:`~cellfluxrl.rewards.parse_weights`.
            device: torch device for the MoA classifier (and plugins that use one).
            segmenter: ``None`` = the backend the reference statistics were measured with; a given
                backend must reproduce the stored settings.
            cellpose_model: Cellpose model name or path (with ``segmenter="cellpose"``).

        Raises:
            CellfluxError: evaluators missing (says how to fit them), segmenter settings differ from
                the stored ones, unknown reward, or a reward that fails to load.
        """
        from cellfluxrl.rewards.evaluators import load_evaluators

        root = dataset.root if hasattr(dataset, "evaluators_dir") else dataset  # a loaded Dataset or a folder
        evaluators = load_evaluators(os.fspath(root))
        seg = evaluators.make_segmenter(segmenter, cellpose_model)
        return cls(evaluators, weights, seg, device=device)

    @property
    def weights(self) -> dict[str, float]:
        """name -> weight of the rewards in the sum (a copy)."""
        return dict(self._weights)

    def make_batch(self, images, moa: Sequence[str]) -> RewardBatch:
        """Segment and measure once: float ``(B, 3, H, W)`` in [-1, 1] + B MoA names -> RewardBatch."""
        from cellfluxrl.rewards.evaluators import moa_index
        from cellfluxrl.rewards.morphology import measure

        x = _as_numpy_images(images)
        moa = np.asarray(list(moa) if not isinstance(moa, np.ndarray) else moa).astype(str).reshape(-1)
        if moa.shape[0] != x.shape[0]:
            raise CellfluxError(f"rewards: {x.shape[0]} images but {moa.shape[0]} MoA labels")
        index = moa_index(moa)
        nuclei, cells = self.segmenter.segment(x)
        stats = measure(nuclei, cells)
        return RewardBatch(x, moa, index, nuclei, cells, stats, self.device)

    def score_batch(self, batch: RewardBatch) -> RewardResult:
        """Every weighted reward on a prepared batch, each output checked (float64 (B,), finite)."""
        n = len(batch)
        components = {name: check_output(self.infos[name], self.rewards[name](batch), n) for name in self._weights}
        total = np.zeros(n, dtype=np.float64)
        for name, w in self._weights.items():
            total += w * components[name]
        return RewardResult(total, components, batch.stats, self.weights, dict(batch._shared))

    def score(self, images, moa: Sequence[str]) -> RewardResult:
        """Rewards of a batch.

        Args:
            images: torch or numpy float ``(B, 3, H, W)`` in ``[-1, 1]`` (any device; copied to CPU).
            moa: the target MoA name of each image (``"DMSO"`` for controls).

        Returns:
            :class:`RewardResult` with ``total`` float64 ``(B,)`` = ``sum_k w_k r_k``.

        Raises:
            CellfluxError: bad shapes, unknown MoA, or a reward returning a wrong or non-finite value.
        """
        return self.score_batch(self.make_batch(images, moa))

    def submit(self, images, moa: Sequence[str]) -> concurrent.futures.Future:
        """:meth:`score` on a background worker thread; returns a Future of :class:`RewardResult`.

        The images are copied to CPU now, so the caller may reuse its buffers at once. The numba
        kernels release the GIL, so scoring overlaps the caller's next GPU rollout.
        """
        x = _as_numpy_images(images)
        moa = list(moa)
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewards")
        return self._executor.submit(self.score, x, moa)

    def close(self) -> None:
        """Stop the background worker (waits for submitted work)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> "RewardSuite":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> list[str]:
        """One line per reward: ``name  weight  package==version (entry point)``."""
        return [f"{name}={w:g}  {self.infos[name].origin}" for name, w in self._weights.items()]
