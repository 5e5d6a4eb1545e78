"""Checkpoint selection on validation pairs: the rule, the scoring of a policy, and the state a run keeps.

Every ``validate_every`` iterations, and after the last, ``posttrain`` scores the evaluation EMA (the
network ``sample`` and ``evaluate`` use) on a fixed set of ``val-select`` pairs: in-distribution
compounds, never the test pairs and never the ``val-tune`` pairs that settings are tuned on. It
samples at the run's recorded setting (:func:`cellfluxrl.rl.loop.rollout_sampling`) with
``validate_draws`` source-noise draws per pair, the same draws at every validation (common random
numbers), and scores with the reward suite (never the judge, which stays independent). A pair's
score is the mean over its draws of the paper-weighted overall reward (:data:`PAPER_WEIGHTS`:
moa 5, nuc_in_cyto 2, the others 1), whatever weights the run trains on.

The rule (:func:`decide`). The first validated checkpoint is selected. A later one replaces the
selected one only when its mean paired gain over it (same pairs, same noise) exceeds
``select_margin`` times the compound-clustered standard error of that gain (:func:`clustered_se`).
Each candidate is compared with the *selected* checkpoint, not the previous one: a slow climb wins
once it adds up to more than the noise, while a gain within the noise keeps the earlier, less
drifted checkpoint. The selected score is still a maximum over noisy scores (biased up); the
test pairs, read once by ``evaluate``, give the number to report.

The run keeps the selected EMA weights in ``checkpoint.pt`` (``best_ema``) beside the selection
state (``selection``), so a resume continues the same comparison and
:func:`cellfluxrl.checkpoint.load_run` serves them by default.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from cellfluxrl.errors import CellfluxError
from cellfluxrl.rewards.weights import DEFAULT_WEIGHTS

log = logging.getLogger(__name__)

PAPER_WEIGHTS: dict[str, float] = dict(DEFAULT_WEIGHTS)  # the overall reward a checkpoint is selected by
SELECTION_KEY, BEST_KEY = "selection", "best_ema"  # their entries in checkpoint.pt
RULE = ("a later checkpoint replaces the selected one when its mean paired gain on the same val-select pairs "
        "and noise exceeds {margin:g} x the compound-clustered s.e. of that gain")


@dataclass(frozen=True)
class ValidationSet:
    """The fixed validation pairs of a run.

    Attributes:
        target_idx: int64 ``(n,)`` treated ``val-select`` rows (in-distribution compounds, CSV order).
        control_idx: int64 ``(n,)`` their same-plate controls.
        clusters: str ``(n,)`` the compound of each pair (the clusters of the s.e.).
    """

    target_idx: np.ndarray
    control_idx: np.ndarray
    clusters: np.ndarray

    def __len__(self) -> int:
        return int(self.target_idx.size)


def validation_set(dataset, n: int, seed: int) -> ValidationSet:
    """The first ``n`` in-distribution ``val-select`` pairs (:func:`cellfluxrl.model.generate.test_pairs`).

    Raises:
        CellfluxError: the dataset has no ``val-select`` treated images (prepared before the split).
    """
    from cellfluxrl.model.generate import test_pairs

    target, control = test_pairs(dataset, n, seed, split="id", images="val-select")
    return ValidationSet(target, control, np.asarray(dataset.table["compound"][target]).astype(str))


def clustered_se(values: np.ndarray, clusters: np.ndarray) -> float:
    """Standard error of ``mean(values)`` with errors clustered by ``clusters`` (CR1).

    ``sqrt(G / (G - 1) * sum_g (sum_{i in g} (v_i - mean))^2) / n`` over the ``G`` clusters; with one
    cluster the per-item ``sd / sqrt(n)``; with fewer than 2 items 0.0 (no noise estimate).

    Args:
        values: float ``(n,)``.
        clusters: ``(n,)`` labels (any hashable dtype).

    Returns:
        The s.e. (float, same unit as ``values``).
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    n = values.size
    if n < 2:
        return 0.0
    labels = np.unique(np.asarray(clusters).reshape(-1), return_inverse=True)[1]
    groups = int(labels.max()) + 1
    if groups < 2:
        return float(values.std(ddof=1) / np.sqrt(n))
    sums = np.bincount(labels, weights=values - values.mean(), minlength=groups)
    return float(np.sqrt(groups / (groups - 1) * np.sum(sums ** 2)) / n)


def paper_overall(components: dict[str, np.ndarray]) -> np.ndarray:
    """The paper-weighted overall reward ``sum_k w_k r_k`` (float64 ``(B,)``) from unweighted rewards.

    Raises:
        CellfluxError: a reward of :data:`PAPER_WEIGHTS` is missing from ``components``.
    """
    missing = [name for name in PAPER_WEIGHTS if name not in components]
    if missing:
        raise CellfluxError(f"checkpoint selection: the reward scorer lacks {', '.join(missing)} (the paper's "
                            f"overall reward needs all of {', '.join(PAPER_WEIGHTS)})")
    return sum(w * np.asarray(components[name], dtype=np.float64) for name, w in PAPER_WEIGHTS.items())


@dataclass(frozen=True)
class Decision:
    """The rule's verdict on one validated checkpoint.

    Attributes:
        replace: whether it becomes the selected checkpoint.
        gain: mean paired gain over the selected checkpoint (``None`` for the first validation).
        gain_se: the compound-clustered s.e. of ``gain`` (``None`` for the first).
    """

    replace: bool
    gain: float | None = None
    gain_se: float | None = None


def decide(scores: np.ndarray, best_scores: np.ndarray | None, clusters: np.ndarray, margin: float) -> Decision:
    """Apply the selection rule (module docstring) to one candidate.

    Args:
        scores: float ``(n,)`` the candidate's per-pair overall reward.
        best_scores: float ``(n,)`` the selected checkpoint's on the same pairs and noise, or ``None``.
        clusters: ``(n,)`` compound of each pair.
        margin: how many s.e. the gain must exceed (0: any gain).

    Returns:
        :class:`Decision`.
    """
    if best_scores is None:
        return Decision(True)
    diff = np.asarray(scores, np.float64) - np.asarray(best_scores, np.float64)
    gain, se = float(diff.mean()), clustered_se(diff, clusters)
    return Decision(gain > margin * se, gain, se)


def score_policy(net: torch.nn.Module, dataset, pairs: ValidationSet, scorer, sampling, k: int, seed: int,
                 device: torch.device, batch_size: int = 64) -> tuple[np.ndarray, dict[str, float]]:
    """Score a policy on the validation pairs, ``k`` draws each.

    Draw ``j`` of pair ``i`` is request ``i k + j`` of :func:`cellfluxrl.model.generate.sample_pairs`
    (its source noise fixed by ``seed``), so every validation of a run sees the same noise.

    Args:
        net: the velocity network in eval mode on ``device``.
        dataset: the run's dataset.
        pairs: :class:`ValidationSet`.
        scorer: a reward suite whose ``score`` returns every reward of :data:`PAPER_WEIGHTS` in ``components``.
        sampling: a :class:`cellfluxrl.checkpoint.Sampling`.
        k: draws per pair.
        seed: seed of the source noise.
        device: where to sample.
        batch_size: images per solver batch.

    Returns:
        ``(scores, means)``: float64 ``(n,)`` per-pair mean overall reward, and name -> the mean of
        each unweighted reward over all ``n k`` images.
    """
    from cellfluxrl.model.generate import sample_pairs

    n = len(pairs)
    rep = np.repeat(np.arange(n), k)
    samples = sample_pairs(net, dataset, pairs.target_idx[rep], pairs.control_idx[rep], seed=seed,
                           num_steps=sampling.steps, cfg_scale=sampling.cfg_scale, grid=sampling.grid,
                           solver=sampling.solver, sigma=sampling.sigma, batch_size=batch_size, best_of_k=1,
                           suite=scorer, device=device)
    components = {name: np.asarray(values, np.float64) for name, values in samples.components.items()}
    overall = paper_overall(components)
    means = {name: float(components[name].mean()) for name in PAPER_WEIGHTS}
    return overall.reshape(n, k).mean(axis=1), means


class Selector:
    """Validates a run's policy and keeps the selected checkpoint (main process only).

    Args:
        dataset: the run's dataset.
        pairs: the fixed :class:`ValidationSet`.
        scorer: the reward suite (see :func:`score_policy`).
        sampling: the run's :class:`~cellfluxrl.checkpoint.Sampling`.
        every, k, margin, seed: ``validate_every``, ``validate_draws``, ``select_margin``, ``seed`` of the run.
        device: where to sample.
        batch_size: images per solver batch.
    """

    def __init__(self, dataset, pairs: ValidationSet, scorer, sampling, *, every: int, k: int, margin: float,
                 seed: int, device: torch.device, batch_size: int = 64):
        self.dataset, self.pairs, self.scorer, self.sampling = dataset, pairs, scorer, sampling
        self.every, self.k, self.margin, self.seed, self.device = every, k, margin, seed, device
        self.batch_size = batch_size
        self.best_step: int | None = None
        self.best_scores: np.ndarray | None = None
        self.best_se: float | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.validations = 0

    def due(self, done: int, last: int) -> bool:
        """Whether iteration ``done`` is validated: every ``every`` iterations and the last."""
        return done % self.every == 0 or done == last

    def validate(self, step: int, net: torch.nn.Module) -> dict:
        """Score ``net`` (the EMA after iteration ``step``), apply the rule, keep its weights if selected.

        Returns:
            The keys this step's ``stats.jsonl`` record gains: ``val_overall`` (mean paper-weighted
            overall reward) and its clustered s.e. ``val_overall_se``, ``val/NAME`` (mean unweighted
            rewards), ``val_gain`` and ``val_gain_se`` (over the previously selected checkpoint; absent
            at the first), ``val_selected`` (this step is now selected), ``val_best_step``,
            ``val_seconds``.
        """
        began = time.perf_counter()
        scores, means = score_policy(net, self.dataset, self.pairs, self.scorer, self.sampling, self.k, self.seed,
                                     self.device, self.batch_size)
        decision = decide(scores, self.best_scores, self.pairs.clusters, self.margin)
        se = clustered_se(scores, self.pairs.clusters)
        if decision.replace:
            self.best_step, self.best_scores, self.best_se = int(step), scores, se
            self.best_weights = {name: t.detach().to("cpu").clone() for name, t in net.state_dict().items()}
        self.validations += 1
        record = {"val_overall": float(scores.mean()), "val_overall_se": se,
                  **{f"val/{name}": value for name, value in means.items()}}
        if decision.gain is not None:
            record.update(val_gain=decision.gain, val_gain_se=decision.gain_se)
        record.update(val_selected=decision.replace, val_best_step=self.best_step,
                      val_seconds=time.perf_counter() - began)
        log.info("validation at step %d: overall %.4f [%.4f]; selected step %d", step, record["val_overall"], se,
                 self.best_step)
        return record

    def state(self) -> dict:
        """The checkpoint entries: ``selection`` (plain types) and, once a step is selected, ``best_ema``."""
        selection = {"status": "on", "every": self.every, "pairs": len(self.pairs), "k": self.k,
                     "margin": self.margin, "rule": RULE.format(margin=self.margin), "validations": self.validations,
                     "best_step": self.best_step, "best_se": self.best_se,
                     "best_overall": None if self.best_scores is None else float(self.best_scores.mean()),
                     "best_scores": None if self.best_scores is None else [float(v) for v in self.best_scores]}
        return {SELECTION_KEY: selection, **({BEST_KEY: self.best_weights} if self.best_weights is not None else {})}

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint's :meth:`state` (a resumed run compares with the same selected one).

        Raises:
            CellfluxError: the stored selection was made on another number of pairs.
        """
        stored = state.get(SELECTION_KEY) or {}
        if stored.get("status") != "on" or stored.get("best_step") is None:
            return
        scores = np.asarray(stored["best_scores"], np.float64)
        if scores.size != len(self.pairs) or BEST_KEY not in state:
            raise CellfluxError(f"checkpoint selection: the stored selection holds {scores.size} pair scores, the "
                                f"run's val-select set has {len(self.pairs)} (the dataset changed?)")
        self.best_step, self.best_scores, self.best_se = int(stored["best_step"]), scores, stored.get("best_se")
        self.best_weights = dict(state[BEST_KEY])
        self.validations = int(stored.get("validations", 0))


def off_state(reason: str) -> dict:
    """The checkpoint's ``selection`` entry when a run selects no checkpoint (``reason`` says why)."""
    return {SELECTION_KEY: {"status": "off", "reason": reason}}


def _off(why: str) -> str:
    """Warn that selection is off and why; returns the reason recorded in the checkpoint."""
    log.warning("checkpoint selection is off: %s; sample and evaluate will use the last checkpoint", why)
    return f"off: {why}"


def build_selector(dataset, cfg, sampling, device: torch.device, scorer=None) -> tuple[Selector | None, str | None]:
    """The run's :class:`Selector`, or ``(None, reason)`` when selection is off.

    Off when ``cfg.validate_every`` is 0, or (with a warning) when the dataset has no ``val-select``
    pairs (prepared before the validation split) or no evaluators to score them with.

    Args:
        dataset: the run's dataset.
        cfg: the run's settings (``select_*``, ``seed``).
        sampling: the run's :class:`~cellfluxrl.checkpoint.Sampling`.
        device: where to sample and score.
        scorer: what scores the validation images (default: a reward suite of the dataset with the
            paper's weights, apart from the training suite so that its worker thread is left alone).
    """
    if cfg.validate_every == 0:
        return None, "off (validate_every 0)"
    try:
        pairs = validation_set(dataset, cfg.validate_pairs, cfg.seed)
    except CellfluxError as exc:
        return None, _off(f"no val-select pairs ({exc})")
    if scorer is None:
        from cellfluxrl.rewards import RewardSuite

        try:
            scorer = RewardSuite.from_dataset(dataset, PAPER_WEIGHTS, device=str(device))
        except CellfluxError as exc:
            return None, _off(f"no reward suite to score them ({exc})")
    return Selector(dataset, pairs, scorer, sampling, every=cfg.validate_every, k=cfg.validate_draws,
                    margin=cfg.select_margin, seed=cfg.seed, device=device), None
