"""Run directories and checkpoints (plain state dicts + plain Python types, ``weights_only`` safe).

A run directory::

    RUN/
      config.json     the resolved run config (see below), written when the run starts
      checkpoint.pt   the latest checkpoint, replaced atomically (temp file + os.replace)
      stats.jsonl     one JSON object per logged step

``checkpoint.pt`` is a dict with at least ``kind`` (``"pretrain"`` or ``"posttrain"``), ``step``
(int), ``config`` (the run config dict), ``model`` and ``ema`` (:class:`VelocityUNet` state dicts).
Pretraining adds ``optimizer`` and ``rng`` (generator and dropout RNG states) for an exact resume;
posttrain adds the checkpoint selected on validation pairs (``selection``, ``best_ema``), which
:func:`load_run` serves by default. The run config dict holds ``dataset`` (absolute path of the
dataset folder), ``image_size`` (its H = W; absent in older runs), ``preset`` (name or
``"custom"``), ``unet`` (the :class:`UNetConfig` as a dict) and ``condition_dim`` (int), which is
all :func:`load_run` needs to rebuild the network, plus the training settings of its kind, and
``sampling``: how the run is meant to be sampled (:class:`Sampling`: Heun steps, CFG scale, grid,
source-noise std). ``sample``, ``evaluate``, ``demo`` and the experiment scripts use it unless told
otherwise (:func:`resolve_sampling`); a run written before it was recorded loads with CellFlux's
defaults and a notice.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from cellfluxrl.errors import CellfluxError
from cellfluxrl.model.unet import VelocityUNet, build_unet
from cellfluxrl.rundir import dead_temps, remove_dead_temps, temp_path

log = logging.getLogger(__name__)

CHECKPOINT_NAME, CONFIG_NAME, STATS_NAME = "checkpoint.pt", "config.json", "stats.jsonl"
KINDS = ("pretrain", "posttrain")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Sampling:
    """How a run is meant to be sampled: ODE solver settings and classifier-free guidance.

    Attributes:
        steps: solver steps (Heun: ``2 steps`` network evaluations per image, twice that with CFG; CellFlux: 50).
        cfg_scale: guidance weight ``w`` in ``(1 + w) v(x, t, c) - w v(x, t, None)`` (CellFlux: 0.2).
        solver: ``"heun"`` or ``"euler"``.
        grid: time grid, ``"edm"`` (CellFlux) or ``"uniform"``.
        sigma: std of the noise added to the control image at sampling (CellFlux: 1.0).
    """

    steps: int = 50
    cfg_scale: float = 0.2
    solver: str = "heun"
    grid: str = "edm"
    sigma: float = 1.0

    def __post_init__(self):
        if int(self.steps) < 1:
            raise CellfluxError(f"sampling: steps must be >= 1, got {self.steps}")
        if not float(self.cfg_scale) >= 0.0 or float(self.cfg_scale) == float("inf"):
            raise CellfluxError(f"sampling: cfg_scale must be a finite number >= 0, got {self.cfg_scale}")
        if not float(self.sigma) >= 0.0 or float(self.sigma) == float("inf"):
            raise CellfluxError(f"sampling: sigma must be a finite number >= 0, got {self.sigma}")
        if self.solver not in ("heun", "euler") or self.grid not in ("edm", "uniform"):
            raise CellfluxError(f"sampling: unknown solver {self.solver!r} or grid {self.grid!r}")

    def to_dict(self) -> dict:
        return {"steps": int(self.steps), "cfg_scale": float(self.cfg_scale), "solver": self.solver,
                "grid": self.grid, "sigma": float(self.sigma)}

    @classmethod
    def from_dict(cls, d: dict, where: str = "run config") -> "Sampling":
        try:
            return cls(steps=int(d["steps"]), cfg_scale=float(d["cfg_scale"]), solver=str(d.get("solver", "heun")),
                       grid=str(d.get("grid", "edm")), sigma=float(d.get("sigma", 1.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise CellfluxError(f"{where}: unreadable sampling settings {d!r} ({type(exc).__name__}: {exc})") from None

    def describe(self) -> str:
        """E.g. ``"20 Heun steps (edm grid), CFG 1.0, sigma 1.0"``."""
        return (f"{self.steps} {self.solver.capitalize()} steps ({self.grid} grid), CFG {self.cfg_scale:g}, "
                f"sigma {self.sigma:g}")


# Runs written before the sampling settings were recorded are sampled with CellFlux's defaults.
LEGACY_SAMPLING = Sampling()


def recorded_sampling(config: dict, where: str = "run config") -> Sampling | None:
    """The ``sampling`` entry of a run config, or ``None`` for a run that predates it."""
    return None if config.get("sampling") is None else Sampling.from_dict(config["sampling"], where)


def resolve_sampling(run_sampling: Sampling | None, steps: int | None = None, cfg_scale: float | None = None
                     ) -> tuple[Sampling, str]:
    """The settings to sample a run with, and where they come from (for the user's output).

    Args:
        run_sampling: the run's recorded settings (``None``: an older run without them).
        steps, cfg_scale: overrides from the command line (``None`` = not given).

    Returns:
        ``(sampling, source)``, source one of ``"recorded in the run"``, ``"given on the command
        line"``, ``"recorded in the run, overridden on the command line"`` or ``"CellFlux defaults
        (the run predates recorded sampling settings)"``.
    """
    base = LEGACY_SAMPLING if run_sampling is None else run_sampling
    given = {k: v for k, v in (("steps", steps), ("cfg_scale", cfg_scale)) if v is not None}
    sampling = replace(base, **given)
    if run_sampling is None:
        source = ("given on the command line; the rest " if given else "") + \
            "CellFlux defaults (the run predates recorded sampling settings)"
    elif given:
        source = "recorded in the run, overridden on the command line" if len(given) < 2 else "given on the command line"
    else:
        source = "recorded in the run"
    return sampling, source


RUN_FILES = (CHECKPOINT_NAME, CONFIG_NAME, STATS_NAME)


def stale_temps(folder: str | os.PathLike, names: tuple[str, ...] = RUN_FILES) -> list[Path]:
    """The temp files ``.NAME.tmp-PID`` of ``names`` in ``folder`` whose writer is dead (killed writes);
    a live process's temp file is never listed (:func:`cellfluxrl.rundir.dead_temps`)."""
    return dead_temps(folder, names)


def remove_stale_temps(folder: str | os.PathLike, names: tuple[str, ...] = RUN_FILES) -> list[Path]:
    """Delete :func:`stale_temps`; returns what was removed."""
    return remove_dead_temps(folder, names)


def truncate_stats(path: str | os.PathLike, step: int) -> int:
    """Keep the ``stats.jsonl`` records up to ``step`` (the resumed checkpoint); returns how many were dropped.

    A run killed after its last checkpoint logged steps it will run (and log) again on resume;
    they are removed, as is a line cut short by the kill.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            ok = int(record["step"]) <= step
        except (ValueError, TypeError, KeyError):
            ok = False
        if ok:
            keep.append(line)
        elif line.strip():
            dropped += 1
    if dropped:
        tmp = temp_path(path)
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
        log.info("%s: dropped %d record(s) after step %d (logged again on resume)", path, dropped, step)
    return dropped


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` with ``torch.save`` to a temp file in the same folder, then rename over ``path``.

    A kill at any moment leaves either the old or the new checkpoint, never a partial one; the
    temp files a killed write left (a dead PID's ``.checkpoint.pt.tmp-PID``) are removed here.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, tuple(dict.fromkeys((path.name, *RUN_FILES))))
    tmp = temp_path(path)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | os.PathLike, kinds: tuple[str, ...] = KINDS) -> dict:
    """Load a cellfluxrl checkpoint on CPU with ``torch.load(weights_only=True)``.

    Raises:
        CellfluxError: missing file, unreadable/not a checkpoint, or a ``kind`` not in ``kinds``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CellfluxError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip, foreign objects
        raise CellfluxError(f"{path}: not a readable cellfluxrl checkpoint ({type(exc).__name__})") from exc
    if not isinstance(state, dict) or "kind" not in state or "model" not in state:
        raise CellfluxError(f"{path}: not a cellfluxrl checkpoint (no 'kind'/'model' entries)")
    if state["kind"] not in kinds:
        raise CellfluxError(f"{path}: checkpoint kind {state['kind']!r}, expected {' or '.join(kinds)}")
    return state


def load_state_strict(net: nn.Module, state: dict, path: str | os.PathLike, what: str = "model") -> None:
    """``net.load_state_dict(state)`` with a one-line error naming the file and the first bad key.

    Raises:
        CellfluxError: a missing or unexpected key, or a shape mismatch.
    """
    own = net.state_dict()
    for key in own:
        if key not in state:
            raise CellfluxError(f"{path}: incompatible {what} weights: missing key {key!r}")
        if tuple(state[key].shape) != tuple(own[key].shape):
            raise CellfluxError(f"{path}: incompatible {what} weights: {key!r} has shape "
                                f"{tuple(state[key].shape)}, expected {tuple(own[key].shape)}")
    for key in state:
        if key not in own:
            raise CellfluxError(f"{path}: incompatible {what} weights: unexpected key {key!r}")
    net.load_state_dict(state)


def build_net(config: dict, path: str | os.PathLike = "config") -> VelocityUNet:
    """A fresh network from a run config dict (``unet`` and ``condition_dim`` entries)."""
    try:
        return build_unet(dict(config["unet"]), int(config["condition_dim"]))
    except KeyError as exc:
        raise CellfluxError(f"{path}: run config lacks {exc.args[0]!r}") from exc


@dataclass
class LoadedRun:
    """A run ready for sampling.

    Attributes:
        net, config, dataset_dir, kind, run_dir: the :class:`VelocityUNet` in eval mode on the requested
            device, the stored run config, the dataset it was trained on, ``"pretrain"``/``"posttrain"``, the folder.
        step: optimizer steps done by the loaded weights (the selected step for the selected checkpoint).
        weights: ``"ema"`` or ``"model"``.
        recorded: the run's recorded :class:`Sampling` (``None`` for runs that predate it).
        checkpoint, last_step: ``"best"`` (selected on validation pairs) or ``"last"``; the last checkpoint's step.
        selection: the checkpoint's ``selection`` entry (``None``: the run predates checkpoint selection).
    """

    net: VelocityUNet
    config: dict
    dataset_dir: Path
    step: int
    kind: str
    run_dir: Path
    weights: str = "ema"
    recorded: Sampling | None = field(default=None)
    checkpoint: str = "last"
    last_step: int | None = None
    selection: dict | None = None

    @property
    def sampling(self) -> Sampling:
        """The settings this run is meant to be sampled with (CellFlux's for older runs)."""
        return LEGACY_SAMPLING if self.recorded is None else self.recorded


CHECKPOINT_CHOICES = ("best", "last")  # load_run's checkpoint argument, sample's and evaluate's --checkpoint


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu", weights: str = "ema",
             checkpoint: str = "best") -> LoadedRun:
    """Load a pretrain or posttrain run: its selected checkpoint by default, else its latest.

    Args:
        run_dir, device: the run folder (holding ``checkpoint.pt``); where to put the network.
        weights: ``"ema"`` (default, as CellFlux evaluates) or ``"model"`` (raw weights).
        checkpoint: ``"best"`` (default): the EMA weights a posttrain run selected on its validation
            pairs (:mod:`cellfluxrl.rl.selection`), else (a pretrain run, selection off, an older
            run) the latest checkpoint; ``"last"``: the latest checkpoint.

    Raises:
        CellfluxError: missing run/checkpoint, foreign file, incompatible weights, a bad ``weights`` or
            ``checkpoint``, or ``"model"`` weights of the selected checkpoint (it keeps only the EMA's).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CellfluxError(f"run folder {run_dir} does not exist")
    if weights not in ("ema", "model"):
        raise CellfluxError(f"weights must be 'ema' or 'model', got {weights!r}")
    if checkpoint not in CHECKPOINT_CHOICES:
        raise CellfluxError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    path = run_dir / CHECKPOINT_NAME
    state = load_checkpoint(path)
    config = state.get("config")
    if not isinstance(config, dict):
        raise CellfluxError(f"{path}: checkpoint has no run config")
    net = build_net(config, path)
    selection = state.get("selection") if isinstance(state.get("selection"), dict) else None
    last_step = int(state.get("step", 0))
    best = checkpoint == "best" and "best_ema" in state and (selection or {}).get("best_step") is not None
    if best and weights == "model":
        raise CellfluxError(f"{path}: the selected checkpoint (step {selection['best_step']}) keeps only its EMA "
                            f"weights; ask for the last checkpoint (--checkpoint last) to use the raw weights")
    key = "best_ema" if best else weights if weights in state else "model"
    load_state_strict(net, state[key], path, key)
    dataset = config.get("dataset")
    return LoadedRun(net=net.eval().to(device), config=config, dataset_dir=Path(dataset) if dataset else Path(),
                     step=int(selection["best_step"]) if best else last_step, kind=str(state["kind"]), run_dir=run_dir,
                     weights="ema" if best else key, recorded=recorded_sampling(config, str(path)),
                     checkpoint="best" if best else "last", last_step=last_step, selection=selection)


def read_run_config(run_dir: str | os.PathLike) -> dict:
    """A run's config without loading its weights: ``RUN/config.json`` (else the checkpoint's).

    Raises:
        CellfluxError: no run folder, or neither a readable config.json nor a checkpoint.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CellfluxError(f"run folder {run_dir} does not exist")
    path = run_dir / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict):
        config = load_checkpoint(run_dir / CHECKPOINT_NAME).get("config")
    if not isinstance(config, dict):
        raise CellfluxError(f"{run_dir}: no run config in {CONFIG_NAME} or {CHECKPOINT_NAME}")
    return config


def _dataset_meta(folder: str | os.PathLike) -> dict | None:
    """A dataset's parsed ``meta.json``, or ``None`` when it is gone or unreadable."""
    try:
        meta = json.loads((Path(folder) / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def trained_on_problem(config: dict, run: str, dataset_dir: str | os.PathLike) -> tuple[str, str] | None:
    """Whether a run fits another dataset than its own (``evaluate --data``).

    Args:
        config: the run config (:func:`read_run_config`).
        run: how to name the run in the message.
        dataset_dir: the dataset it is about to be evaluated on.

    Returns:
        ``None`` when it is the dataset the run was trained on (same folder); else
        ``("warning", line)`` for another dataset of the same image size and condition width, or
        ``("error", line)`` when the image size or condition-embedding width differ (it cannot work).
    """
    trained = config.get("dataset")
    if trained and Path(trained).resolve() == Path(dataset_dir).resolve():
        return None
    meta, old = _dataset_meta(dataset_dir) or {}, _dataset_meta(trained) if trained else None
    size = config.get("image_size") or (old or {}).get("image_size")
    if size and meta.get("image_size") and int(size) != int(meta["image_size"]):
        return "error", (f"run {run} was trained on {size} px images ({trained}); --data {dataset_dir} has "
                         f"{meta['image_size']} px images: evaluate it on a dataset of its image size")
    dim = config.get("condition_dim")
    if dim and meta.get("embedding_dim") and int(dim) != int(meta["embedding_dim"]):
        return "error", (f"run {run} was trained with {dim}-dim condition embeddings ({trained}); --data "
                         f"{dataset_dir} has {meta['embedding_dim']}-dim ones: it cannot be evaluated there")
    return "warning", (f"run {run} was trained on {trained or 'an unrecorded dataset'}, not on --data {dataset_dir}: "
                       f"its column uses that dataset's test pairs and condition embeddings")


def load_cellflux_weights(path: str | os.PathLike, net: VelocityUNet) -> None:
    """Initialise ``net`` from a CellFlux (guided-diffusion ADM UNet) checkpoint or state dict.

    Accepts a bare state dict or a dict with a ``model`` entry (CellFlux's ``checkpoint-*.pth``;
    ``argparse.Namespace`` entries are allowed in the safe loader), strips ``module.`` /
    ``_orig_mod.`` / ``model.`` prefixes and maps the names (:func:`cellfluxrl.model.unet.map_cellflux_state_dict`).

    Raises:
        CellfluxError: missing/unreadable file, unknown names, missing keys or shape mismatches.
    """
    from cellfluxrl.model.unet import map_cellflux_state_dict

    path = Path(path)
    if not path.is_file():
        raise CellfluxError(f"--init-from checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CellfluxError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CellfluxError(f"{path}: no UNet state dict found")
    mapped = map_cellflux_state_dict(state)
    load_state_strict(net, mapped, path, "CellFlux")
    log.info("initialised from CellFlux weights %s (%d tensors)", path, len(mapped))
