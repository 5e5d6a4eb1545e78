"""Typed, frozen run configurations with CellFlux's defaults; TOML/CLI overrides; JSON dump.

Generic helpers (usable for any frozen dataclass config, e.g. the posttrain one):
:func:`load_toml_overrides` reads a TOML file and checks every key against the dataclass fields
(an unknown key is a :class:`CellfluxError` naming it and the file), :func:`replace_validated`
applies overrides (``None`` = not given) with type checks, :func:`config_to_dict` /
:func:`dump_json` write plain JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellfluxrl.errors import CellfluxError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib



# Seeds reach numpy (SeedSequence, RandomState: non-negative, below 2**32 for the latter) and torch.
SEED_MAX = 2**32 - 1


def check_seed(seed: int, where: str = "seed") -> int:
    """``seed`` as an int in ``[0, SEED_MAX]``, or a one-line :class:`CellfluxError` naming ``where``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise CellfluxError(f"{where} must be an integer from 0 to {SEED_MAX}, got {seed!r}")
    return seed

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
        grad_clip: max global grad norm, 0 = no clipping (CellFlux: none).
        ema_decay: EMA decay, with warm-up ``min(ema_decay, (1 + n) / (10 + n))``.
        noise_sigma, noise_prob: source noise std and per-batch probability (1.0, 0.5).
        cond_drop_prob: per-batch probability of dropping the condition for CFG (0.2).
        flip_p: probability of each horizontal/vertical flip, per image (0.3).
        time_sampling: ``skewed`` (CellFlux) or ``uniform``.
        include_ood: also train on the held-out compounds (CellFlux: no).
        dequantize: uniform dequantisation noise (CellFlux: yes).
        ckpt_every: write ``checkpoint.pt`` every this many steps (and at the end).
        log_every: append to ``stats.jsonl`` every this many steps.
        seed: base seed of data order, pairing, noise, times, dropout.
        num_workers: DataLoader worker processes (0 = load in the main process).
        channels_last: use the channels-last memory format (faster convs on recent GPUs).
        sample_steps, sample_cfg_scale: how the run is meant to be sampled (Heun steps on the EDM
            grid and the CFG weight; CellFlux: 50 and 0.2), recorded as the run's ``sampling``
            and used by ``sample``/``evaluate``/``posttrain`` unless told otherwise.
    """

    preset: str = "paper"
    steps: int = 100_000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-4
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
    ckpt_every: int = 1000
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    channels_last: bool = False
    sample_steps: int = 50
    sample_cfg_scale: float = 0.2

    def __post_init__(self):
        check_seed(self.seed, "config: seed")
        positive = ("steps", "batch_size", "grad_accum", "ckpt_every", "log_every", "sample_steps")
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
        if self.time_sampling not in ("skewed", "uniform"):
            raise CellfluxError(f"config: time_sampling must be skewed or uniform, got {self.time_sampling!r}")


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


def validate_overrides(overrides: dict, cls, where: str) -> dict:
    """Check keys and types of ``overrides`` against dataclass ``cls``; returns coerced values."""
    types_ = field_types(cls)
    out = {}
    for key, value in overrides.items():
        if key not in types_:
            raise CellfluxError(f"{where}: unknown key {key!r} (known: {', '.join(types_)})")
        out[key] = _coerce(value, types_[key], f"{where}: {key}")
    return out


def load_toml_overrides(path: str | os.PathLike, cls, tables: dict[str, type] | None = None) -> dict:
    """Overrides for ``cls`` from a TOML file.

    Top-level keys must be fields of ``cls``; a table ``[name]`` is allowed only when ``tables``
    maps ``name`` to a dataclass, whose fields its keys must be (e.g. ``{"unet": UNetConfig}``).

    Returns:
        ``{field: value}`` for ``cls``, plus ``{table_name: {field: value}}`` for the tables.

    Raises:
        CellfluxError: missing/unparsable file, unknown key (named), wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise CellfluxError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise CellfluxError(f"{path}: invalid TOML ({exc})") from exc
    tables = tables or {}
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in tables:
                raise CellfluxError(f"{path}: unknown table [{key}]")
            out[key] = validate_overrides(value, tables[key], f"{path} [{key}]")
        else:
            out.update(validate_overrides({key: value}, cls, str(path)))
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
    """Rebuild a config from :func:`config_to_dict` output (validated; unknown keys are an error)."""
    return cls(**validate_overrides(d, cls, cls.__name__))


def dump_json(obj: dict, path: str | os.PathLike) -> None:
    """Write a JSON file atomically (temp file + rename)."""
    path = Path(path)
    from cellfluxrl.rundir import temp_path

    tmp = temp_path(path)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _toml_value(value: Any, where: str) -> str:
    """One TOML value: bool, int, float (repr round-trips, inf/nan as TOML spells them), str, list."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        return text if any(c in text for c in ".en") else f"{text}.0"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v, where) for v in value) + "]"
    raise CellfluxError(f"{where}: cannot write {type(value).__name__} {value!r} as TOML")


def dump_toml(settings: dict, tables: dict[str, dict] | None = None, header: str = "") -> str:
    """Settings as TOML text that :func:`load_toml_overrides` reads back to the same values.

    Args:
        settings: top-level ``{key: value}`` (bool, int, float, str, lists of those; ``None`` values
            are written as a comment, since TOML has no null and an absent key keeps the default
            ``None`` of such fields).
        tables: ``{table name: {key: value}}``, written after the top level as ``[name]``.
        header: comment lines put first (each prefixed with ``# ``).

    Returns:
        The TOML text (ends with a newline).
    """
    lines = [f"# {line}".rstrip() for line in header.splitlines()]

    def block(items: dict, where: str) -> None:
        for key, value in items.items():
            if value is None:
                lines.append(f"# {key} = (not set: the default)")
            else:
                lines.append(f"{key} = {_toml_value(value, f'{where}{key}')}")

    block(settings, "")
    for name, items in (tables or {}).items():
        lines += ["", f"[{name}]"]
        block(items, f"[{name}] ")
    return "\n".join(lines) + "\n"
