"""Typed, frozen run configurations with CellFlux's defaults; TOML/CLI overrides; JSON dump.

Generic helpers (usable for any frozen dataclass config, e.g. the posttrain one):
:func:`load_toml_overrides` reads a UTF-8 TOML file and checks every key against the dataclass
fields (an unknown key is a :class:`CellfluxError` naming it and the file, with the key it most
likely means), :func:`replace_validated` applies overrides (``None`` = not given) with type checks,
:func:`config_to_dict` / :func:`dump_json` write plain JSON (:mod:`cellfluxrl.config_toml` writes TOML).

A config class may declare two class-level tables (``typing.ClassVar``, not fields):

- ``RENAMED_KEYS``, ``{old key: new key}``: a key that was renamed. The old one is still read
  everywhere (a TOML file, with a deprecation note; a stored run config; a keyword of the class),
  and giving both with different values is refused (:func:`upgrade_keys`).
- ``KEY_SYNONYMS``, ``{word: key or None}``: what a user may write for a key (the command line's
  spelling of an option whose key differs, e.g. posttrain's ``--iterations`` for ``steps``; ``None``
  for an option that is no setting, e.g. ``device``); only used to name the key in an error.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from cellfluxrl.errors import CellfluxError, did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

# Seeds reach numpy (SeedSequence, RandomState: non-negative, below 2**32 for the latter) and torch.
SEED_MAX = 2**32 - 1


def check_seed(seed: int, where: str = "seed") -> int:
    """``seed`` as an int in ``[0, SEED_MAX]``, or a one-line :class:`CellfluxError` naming ``where``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise CellfluxError(f"{where} must be an integer from 0 to {SEED_MAX}, got {seed!r}")
    return seed


def upgrade_keys(settings: dict, cls, where: str, note: bool = False) -> dict:
    """``settings`` (a TOML file's, a stored run config's, keywords) with every old key of
    ``cls.RENAMED_KEYS`` put under its new name; ``where`` names the source in messages; ``note`` logs a
    deprecation warning per old key (for a file the user edits; stored configs are upgraded silently).

    Raises:
        CellfluxError: an old key and its new one both given, with different values.
    """
    out = dict(settings)
    for old, new in getattr(cls, "RENAMED_KEYS", {}).items():
        if old not in out:
            continue
        value = out.pop(old)
        if new in out and out[new] != value:
            raise CellfluxError(f"{where}: both {old!r} (the old name of {new!r}) and {new!r} are set, to {value!r} "
                                f"and {out[new]!r}; keep only {new!r}")
        out[new] = value
        (log.warning if note else log.debug)("%s: key %r is deprecated, read as %r; rename it (docs/cli.md)",
                                             where, old, new)
    return out


def accepts_renamed_keys(cls):
    """Class decorator: ``cls(old=v)`` stands for ``cls(new=v)`` for each ``cls.RENAMED_KEYS`` entry
    (so programs written against the old keyword keep working); both with different values are refused."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **upgrade_keys(kwargs, cls, cls.__name__))

    cls.__init__ = __init__
    return cls


# PretrainConfig's word-valued settings and their allowed values.
CHOICES = {"lr_schedule": ("constant", "cosine"), "time_sampling": ("skewed", "uniform"),
           "sample_solver": ("heun", "euler"), "sample_grid": ("edm", "uniform")}


@accepts_renamed_keys
@dataclass(frozen=True)
class PretrainConfig:
    """Flow-matching pretraining (defaults: CellFlux's BBBC021 run unless noted).

    Attributes:
        preset: UNet preset (``paper`` = CellFlux's 56.2M ADM UNet, ``tiny`` for CPU).
        steps: optimizer steps (CellFlux counts epochs; 100 epochs of its split at batch 128 is
            of this order; choose per dataset).
        batch_size: images per process per micro-batch (CellFlux: 32 per GPU x 4 GPUs).
        grad_accum: micro-batches per optimizer step (CellFlux: 1).
        lr, beta1, beta2, weight_decay: AdamW (CellFlux: 1e-4, 0.9, 0.95, torch default 0.01).
        lr_schedule, warmup_steps, lr_final: ``constant`` (CellFlux) or ``cosine`` (a half cosine to
            ``lr * lr_final`` at the last step) after a linear warm-up of ``warmup_steps`` (0: none)
            (:func:`cellfluxrl.model.pretrain.lr_at`).
        grad_clip: max global grad norm, 0 = no clipping (CellFlux: none).
        ema_decay: EMA decay, with warm-up ``min(ema_decay, (1 + n) / (10 + n))``.
        noise_sigma, noise_prob: source noise std and per-batch probability (1.0, 0.5).
        cond_drop_prob: per-batch probability of dropping the condition for CFG (0.2).
        flip_p: probability of each horizontal/vertical flip, per image (0.3).
        time_sampling: ``skewed`` (CellFlux) or ``uniform``.
        include_ood: also train on the held-out compounds (CellFlux: no).
        dequantize: uniform dequantisation noise (CellFlux: yes).
        save_every: write ``checkpoint.pt`` every this many steps (and at the end); called
            ``ckpt_every`` in 0.1 (still read: ``RENAMED_KEYS``).
        log_every: append to ``stats.jsonl`` every this many steps.
        seed: base seed of data order, pairing, noise, times, dropout.
        num_workers: DataLoader worker processes (0 = load in the main process).
        channels_last: use the channels-last memory format (faster convs on recent GPUs).
        sample_steps, sample_cfg_scale, sample_solver, sample_grid: how the run is meant to be
            sampled (solver steps, the CFG weight, ``heun`` or ``euler``, the ``edm`` or ``uniform``
            time grid; CellFlux: 50, 0.2, heun, edm), recorded as the run's ``sampling`` and used by
            ``sample``/``evaluate``/``posttrain`` unless told otherwise.
    """

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"ckpt_every": "save_every"}
    # The command line's words that are not keys here (pretrain's options): named in an error.
    KEY_SYNONYMS: ClassVar[dict[str, str | None]] = {
        "train_steps": "steps", "out": None, "config": None, "device": None, "compile": None, "no_compile": None,
        "init_from": None, "dry_run": None}

    preset: str = "paper"
    steps: int = 100_000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    lr_final: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.01
    grad_clip: float = 0.0
    ema_decay: float = 0.999
    noise_sigma: float = 1.0
    noise_prob: float = 0.5
    cond_drop_prob: float = 0.2
    flip_p: float = 0.3
    time_sampling: str = "skewed"
    include_ood: bool = False
    dequantize: bool = True
    save_every: int = 1000
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    channels_last: bool = False
    sample_steps: int = 50
    sample_cfg_scale: float = 0.2
    sample_solver: str = "heun"
    sample_grid: str = "edm"

    def __post_init__(self):
        check_seed(self.seed, "config: seed")
        positive = ("steps", "batch_size", "grad_accum", "save_every", "log_every", "sample_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise CellfluxError(f"config: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("noise_prob", "cond_drop_prob", "flip_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise CellfluxError(f"config: {name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("lr", "noise_sigma", "weight_decay", "grad_clip", "num_workers", "sample_cfg_scale"):
            if not getattr(self, name) >= 0 or getattr(self, name) == float("inf"):
                raise CellfluxError(f"config: {name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise CellfluxError(f"config: ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.warmup_steps < 0 or not 0.0 <= self.lr_final <= 1.0:
            raise CellfluxError(f"config: warmup_steps must be >= 0 and lr_final in [0, 1], got "
                                f"{self.warmup_steps} and {self.lr_final}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise CellfluxError(f"config: {name} must be {' or '.join(allowed)}, got {getattr(self, name)!r}")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a type hint (int, float, bool, str, tuple[int, ...], X | None)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except CellfluxError:
                pass
        raise CellfluxError(f"{where}: {value!r} is not a {hint}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise CellfluxError(f"{where}: expected a list, got {value!r}")
        inner = typing.get_args(hint)[0] if typing.get_args(hint) else Any
        return tuple(_coerce(v, inner, where) for v in value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(hint) and isinstance(value, hint):
        return value
    raise CellfluxError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def field_types(cls) -> dict[str, Any]:
    """Resolved type hints of a dataclass's fields."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def unknown_key_error(key: str, cls, where: str) -> CellfluxError:
    """The one-line error for a key that is no field of ``cls``, naming the key meant when there is one.

    A command-line spelling (``--save-every``, ``save-every``) of a key is named as that key; a word of
    ``cls.KEY_SYNONYMS`` (``iterations``) as its key, or as an option that is no setting; otherwise the
    closest field name (difflib), and the list of keys.
    """
    known = list(field_types(cls))
    spelled = str(key).lstrip("-").replace("-", "_")
    meant = {**getattr(cls, "RENAMED_KEYS", {}), **getattr(cls, "KEY_SYNONYMS", {})}
    option = "--" + spelled.replace("_", "-")
    if spelled in meant and meant[spelled] is None:
        hint = f"{option} is a command-line option, not a setting of this file"
    elif spelled in meant:
        hint = f"the key is {meant[spelled]!r} ({option} on the command line)"
    elif spelled in known:
        hint = f"the key is spelled {spelled!r} (with underscores)"
    else:
        hint = did_you_mean(key, known)
    return CellfluxError(f"{where}: unknown key {key!r}; {hint}")


def validate_overrides(overrides: dict, cls, where: str, note: bool = False) -> dict:
    """Check keys and types of ``overrides`` against dataclass ``cls``; returns coerced values. Old keys
    are read under their new names (:func:`upgrade_keys`, which ``note`` is passed to).

    Raises:
        CellfluxError: an unknown key (:func:`unknown_key_error`), a value of the wrong type, or an old
            and a new key given with different values.
    """
    types_ = field_types(cls)
    out = {}
    for key, value in upgrade_keys(overrides, cls, where, note=note).items():
        if key not in types_:
            raise unknown_key_error(key, cls, where)
        out[key] = _coerce(value, types_[key], f"{where}: {key}")
    return out


def read_toml(path: str | os.PathLike) -> dict:
    """A TOML file's content, or one line naming the file and what is wrong with it.

    Raises:
        CellfluxError: a missing or unreadable file, bytes that are not UTF-8 (the line and column of the
            first bad byte; TOML files are UTF-8), or invalid TOML (tomllib's line and column).
    """
    path = Path(path)
    if not path.is_file():
        raise CellfluxError(f"config file {path} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CellfluxError(f"config file {path}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark (some Windows editors) is allowed
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise CellfluxError(f"{path} line {line}, column {column}: byte 0x{raw[exc.start]:02x} is not UTF-8; a TOML "
                            f"file must be saved as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CellfluxError(f"{path}: invalid TOML ({exc})") from None


def load_toml_overrides(path: str | os.PathLike, cls, tables: dict[str, type] | None = None) -> dict:
    """Overrides for ``cls`` from a TOML file (UTF-8).

    Top-level keys must be fields of ``cls``; a table ``[name]`` is allowed only when ``tables``
    maps ``name`` to a dataclass, whose fields its keys must be (e.g. ``{"unet": UNetConfig}``).
    An old key (``cls.RENAMED_KEYS``) is read as its new one, with a deprecation warning.

    Returns:
        ``{field: value}`` for ``cls``, plus ``{table_name: {field: value}}`` for the tables.

    Raises:
        CellfluxError: missing/unreadable/non-UTF-8/unparsable file, unknown key (named, with the key
            it likely means), wrong type, an old and a new key with different values.
    """
    path = Path(path)
    data = read_toml(path)
    tables = tables or {}
    settings = {k: v for k, v in data.items() if not isinstance(v, dict)}
    out = validate_overrides(settings, cls, str(path), note=True)
    for key, value in data.items():
        if not isinstance(value, dict):
            continue
        if key not in tables:
            known = ", ".join(f"[{t}]" for t in tables) or "none"
            what = f"{key!r} is a setting: write {key} = VALUE" if key in field_types(cls) else f"tables here: {known}"
            raise CellfluxError(f"{path}: unknown table [{key}]; {what}")
        out[key] = validate_overrides(value, tables[key], f"{path} [{key}]", note=True)
    return out


def replace_validated(cfg, **overrides):
    """``dataclasses.replace`` with type checks; ``None`` values mean "not given" and are skipped."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(cfg, **validate_overrides(given, type(cfg), "option"))


def config_to_dict(cfg) -> dict:
    """A frozen dataclass config as a plain dict (tuples become lists) for JSON and checkpoints."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if dataclasses.is_dataclass(v):
            return config_to_dict(v)
        return v

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def config_from_dict(cls, d: dict):
    """Rebuild a config from :func:`config_to_dict` output (validated; unknown keys are an error; old keys
    of ``cls.RENAMED_KEYS``, as older runs stored them, are read under their new names)."""
    return cls(**validate_overrides(d, cls, cls.__name__))


def dump_json(obj: dict, path: str | os.PathLike) -> None:
    """Write a JSON file atomically (temp file + rename)."""
    path = Path(path)
    from cellfluxrl.rundir import temp_path

    tmp = temp_path(path)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
