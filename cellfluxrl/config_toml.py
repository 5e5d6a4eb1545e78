"""Settings written as TOML text (``pretrain/posttrain --dry-run``) that the config readers of
:mod:`cellfluxrl.config` read back to the same values."""

from __future__ import annotations

import json
from typing import Any

from cellfluxrl.errors import CellfluxError


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
    """Settings as TOML text that :func:`cellfluxrl.config.load_toml_overrides` reads back to the same values.

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
