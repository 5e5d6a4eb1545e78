"""Post-training settings, :class:`PosttrainConfig`: defaults follow the paper, then DiffusionNFT
(docs/posttrain.md gives each default and where we depart from them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from cellfluxrl.config import check_seed
from cellfluxrl.errors import CellfluxError
from cellfluxrl.rewards.weights import DEFAULT_WEIGHTS

TRAINABLE = ("all", "conditioning")  # which weights RL updates (cellfluxrl.rl.step.trainable_parameters)
# What --weights overrides when every reward is standardised first (reward_norm "per_reward"): the
# paper's seven with moa 2 and nuc_in_cyto 1 instead of 5 and 2. With standardised rewards a weight
# sets the reward's share of the advantage; the paper's 5 and 2 (meant for raw rewards, where
# morphology holds 97 % of the variance) give MoA and Nuc-in-Cyto 63 % of it and left the
# morphology rewards below drift (docs/posttrain.md; experiments/RESULTS.md, "RL recipe").
STANDARDISED_WEIGHTS = {**DEFAULT_WEIGHTS, "moa": 2.0, "nuc_in_cyto": 1.0}


@dataclass(frozen=True)
class PosttrainConfig:
    """Post-training settings; defaults follow the paper, then DiffusionNFT (see docs/posttrain.md)."""

    # The command line's words that are not keys here (posttrain's options): named in an error
    # (cellfluxrl.config.unknown_key_error); None: an option that is no setting.
    KEY_SYNONYMS: ClassVar[dict[str, str | None]] = {
        "iterations": "steps", "stop_after_no_signal": "no_signal_stop", "no_adaptive": "adaptive",
        "no_reward_null": "reward_null", "out": None,
        "config": None, "device": None, "dry_run": None, "allow_changed_reference": None}

    weights: str | None = None  # NAME=W,... overriding the named training weights (train_weights)
    steps: int = 1200  # RL iterations (each takes grad_steps optimizer steps; paper: 1200 x 1)
    group_size: int = 8  # m rollouts per fixed (x_0, c) group
    groups_per_step: int = 16  # groups per iteration over all ranks (16 x 8 = 128 rollouts per step)
    rollout_steps: int = 10  # solver steps of the rollout sampler (DiffusionNFT: 10; Heun NFE = 2 steps)
    rollout_grid: str = "edm"  # rollout time grid (CellFlux sampler: edm)
    rollout_solver: str = "heun"  # rollout ODE solver: heun (CellFlux) or euler (NFE = steps)
    rollout_batch: int = 64  # rollouts per sampler call and per reward job (rounded down to whole groups)
    sigma: float = 1.0  # std of the noise injected into the control (CellFlux: 1.0)
    cfg_scale: float | None = None  # CFG of rollouts AND of the trained (guided) velocity; None: the base run's sampling CFG
    train_source: str = "fresh"  # x_0 of the forward process: clean control + fresh sigma noise, or "rollout" (exact source)
    t_sampling: str = "grid"  # training t: the rollout grid's times (paper App. B) or U[0,1)
    forward_noise: str = "group"  # "group": a group's rollouts share their fresh source noise and t (common random numbers); "independent"
    train_timesteps: int | None = None  # t values per rollout per step (None: int(0.99 rollout_steps), as DiffusionNFT)
    train_t_max: float = 1.0  # training times are drawn only from t <= train_t_max (grid times above it, or U[0, t_max))
    train_batch: int = 32  # (rollout, t) items per forward/backward micro-batch
    grad_steps: int = 1  # optimizer steps per iteration: the shuffled items split into this many chunks (DiffusionNFT OCR: 2)
    nft_beta: float = 1.0  # DiffusionNFT guidance strength beta (implicit policies, Eqs. 8-9); 1.0 = their default
    kl_weight: float = 1.0  # weight of ||v_theta - v_ref||^2 to the frozen base (the paper's "KL weight beta = 1")
    kl_target: str = "ref"  # "ref": the frozen base (paper Eq. 7); "old": the sampling policy v_old (Algorithm 1 line 13)
    trainable: str = "all"  # "all" weights, or "conditioning" (condition projection + every block's embedding projection)
    adv_clip: float = 5.0  # advantage clip C; r = 0.5 + clip(A) / (2 C) (DiffusionNFT: 5)
    reward_norm: str = "per_reward"  # each reward standardised before weighting (paper App. E); "none": the raw weighted sum (paper Table 1)
    adaptive: bool = False  # DiffusionNFT's self-normalised (adaptive-weighting) loss instead of plain velocity MSE
    lr: float = 2e-5  # AdamW learning rate (paper App. B)
    weight_decay: float = 1e-4  # AdamW weight decay (DiffusionNFT)
    grad_clip: float = 1.0  # max global gradient norm
    old_rate: float = 0.001  # old-policy decay growth per step: eta_i = min(old_rate i, old_max)
    old_max: float = 0.5  # old-policy decay cap (DiffusionNFT decay_type 1)
    eval_ema_max: float = 0.9  # evaluation EMA decay min((1 + s) / (10 + s), eval_ema_max) (DiffusionNFT)
    max_minutes: float = 0.0  # stop after the step that passes this wall time, with a checkpoint (0 = no limit)
    save_every: int = 10  # checkpoint period (steps); also saved at the end
    no_signal_stop: int = 25  # stop (with a checkpoint) after this many steps in a row without signal; 0 = never
    grid_every: int = 50  # sample-grid period (steps); 0 = never
    grid_pairs: int = 8  # held-out test pairs shown in each grid (control | base | RL | real target)
    validate_every: int = 50  # validate the EMA on val-select pairs every this many steps (and after the last); 0 = never
    validate_pairs: int = 64  # val-select pairs (in-distribution compounds) scored at each validation
    validate_draws: int = 1  # source-noise draws per validation pair (the same draws at every validation)
    select_margin: float = 1.0  # a checkpoint replaces the selected one when better by more than this many s.e.
    seed: int = 0  # seeds the pairs, the source noise and the t draws (a function of (seed, step, rank))
    reward_null: bool = False  # the control run: each group's reward rows permuted among its rollouts (rl/null.py)
    bf16: bool = True  # bf16 autocast for every forward pass on GPU (ignored on CPU)

    def __post_init__(self):
        check_seed(self.seed, "posttrain: seed")
        positive = ("steps", "group_size", "groups_per_step", "rollout_steps", "rollout_batch", "train_batch",
                    "grad_steps", "nft_beta", "adv_clip", "save_every", "lr", "validate_pairs", "validate_draws")
        for name in positive:
            if not getattr(self, name) > 0:
                raise CellfluxError(f"posttrain: {name} must be > 0, got {getattr(self, name)!r}")
        if self.cfg_scale is not None and not 0.0 <= self.cfg_scale < float("inf"):
            raise CellfluxError(f"posttrain: cfg_scale must be a finite number >= 0, got {self.cfg_scale!r}")
        for name in ("sigma", "kl_weight", "max_minutes", "weight_decay", "grad_clip", "old_rate", "grid_every",
                     "grid_pairs", "no_signal_stop", "validate_every", "select_margin"):
            if not getattr(self, name) >= 0:
                raise CellfluxError(f"posttrain: {name} must be >= 0, got {getattr(self, name)!r}")
        if self.select_margin == float("inf"):
            raise CellfluxError("posttrain: select_margin must be finite (in standard errors), got inf")
        if self.group_size < 2:
            raise CellfluxError(f"posttrain: group_size must be >= 2 (advantages are group-centred), got {self.group_size}")
        for name in ("old_max", "eval_ema_max"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise CellfluxError(f"posttrain: {name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.reward_norm not in ("none", "per_reward"):
            raise CellfluxError(f"posttrain: reward_norm must be none or per_reward, got {self.reward_norm!r}")
        if self.train_source not in ("fresh", "rollout"):
            raise CellfluxError(f"posttrain: train_source must be fresh or rollout, got {self.train_source!r}")
        if self.forward_noise not in ("group", "independent"):
            raise CellfluxError(f"posttrain: forward_noise must be group or independent, got {self.forward_noise!r}")
        if self.rollout_grid not in ("edm", "uniform") or self.t_sampling not in ("grid", "uniform"):
            raise CellfluxError(f"posttrain: bad rollout_grid {self.rollout_grid!r} or t_sampling {self.t_sampling!r}")
        if self.rollout_solver not in ("heun", "euler"):
            raise CellfluxError(f"posttrain: rollout_solver must be heun or euler, got {self.rollout_solver!r}")
        if self.kl_target not in ("ref", "old"):
            raise CellfluxError(f"posttrain: kl_target must be ref or old, got {self.kl_target!r}")
        if self.trainable not in TRAINABLE:
            raise CellfluxError(f"posttrain: trainable must be one of {', '.join(TRAINABLE)}, got {self.trainable!r}")
        if not 0.0 < self.train_t_max <= 1.0:
            raise CellfluxError(f"posttrain: train_t_max must be in (0, 1], got {self.train_t_max!r}")
        if self.train_timesteps is not None and not 1 <= self.train_timesteps:
            raise CellfluxError(f"posttrain: train_timesteps must be >= 1, got {self.train_timesteps}")
        if self.t_sampling == "grid" and self.n_train_timesteps > len(self.train_grid):
            raise CellfluxError(f"posttrain: train_timesteps {self.n_train_timesteps} > the {len(self.train_grid)} "
                                f"times of the {self.rollout_steps}-step {self.rollout_grid} grid at t <= "
                                f"train_t_max {self.train_t_max:g}")

    @property
    def guidance(self) -> float:
        """The CFG scale ``w`` of rollouts and training (an unresolved ``None`` counts as 0)."""
        return float(self.cfg_scale or 0.0)

    def train_weights(self, available=None, where: str | None = None) -> dict[str, float]:
        """The weights RL trains on: ``weights`` merged into :data:`STANDARDISED_WEIGHTS` with
        ``reward_norm = "per_reward"``, into the paper's with the raw sum (``"none"``).

        Args:
            available: the reward names ``weights`` may name (default: the installed rewards).
            where: where ``weights`` was given, for the error (default ``--weights '...'``; a settings
                file: ``"FILE: weights = '...'"``).

        Raises:
            CellfluxError: a bad ``weights`` string (:func:`cellfluxrl.rewards.weights.parse_weights`).
        """
        from cellfluxrl.rewards.weights import parse_weights

        defaults = STANDARDISED_WEIGHTS if self.reward_norm == "per_reward" else None
        return parse_weights(self.weights, available, defaults=defaults, where=where)

    @property
    def n_train_timesteps(self) -> int:
        """t values per rollout per step (resolves ``None`` to DiffusionNFT's 99% of the grid)."""
        if self.train_timesteps is not None:
            return self.train_timesteps
        return max(1, int(0.99 * self.rollout_steps))

    @property
    def train_grid(self) -> tuple[float, ...]:
        """The rollout grid's step times ``t_0 .. t_{N-1}`` at or below ``train_t_max`` (float, ascending).

        These are the points where the Heun predictor evaluates the velocity; the last one of the
        5-step EDM grid, 0.998, drives only 0.2 % of the path, so ``train_t_max < 0.998`` drops it.
        """
        from cellfluxrl.model.sampler import time_grid

        grid = [float(t) for t in time_grid(self.rollout_steps, kind=self.rollout_grid)[:-1]]
        return tuple(t for t in grid if t <= self.train_t_max)
