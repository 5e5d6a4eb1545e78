"""Click parameter types shared by the commands: folders vs files, devices, and values that must
exit with status 2 (a usage error, via :class:`click.BadParameter`) when invalid.

Only click is imported here, so ``cellfluxrl --help`` stays fast.
"""

from __future__ import annotations

import re
from pathlib import Path

import click

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|(cuda|gpu)(:\d+)?)$")


def _a(word: str) -> str:
    """``"a dataset"``, ``"an Inception weights"``: the indefinite article and the word."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


class Folder(click.ParamType):
    """A folder path (need not exist yet); an existing *file* is refused as such (exit 2).

    Args:
        what: what the folder holds, for the message (``"dataset"``, ``"run"``, ``"output"``).
    """

    name = "folder"

    def __init__(self, what: str):
        self.what = what

    def convert(self, value, param, ctx) -> Path:
        path = Path(value)
        if path.is_file():
            self.fail(f"{path} is a file; give {_a(self.what)} folder", param, ctx)
        return path


class File(click.ParamType):
    """A file path (need not exist yet); an existing *folder* is refused as such (exit 2).

    Args:
        what: what the file is (``"TOML config"``, ``"Inception weights"``), for the message.
    """

    name = "file"

    def __init__(self, what: str):
        self.what = what

    def convert(self, value, param, ctx) -> Path:
        path = Path(value)
        if path.is_dir():
            self.fail(f"{path} is a folder; give {_a(self.what)} file", param, ctx)
        return path


class Device(click.ParamType):
    """``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``; ``gpu`` and ``gpu:N`` mean CUDA."""

    name = "device"

    def get_metavar(self, param, ctx=None) -> str:
        return "auto|cpu|cuda[:N]|gpu"

    def convert(self, value, param, ctx) -> str:
        text = str(value).strip().lower()
        if not DEVICE_PATTERN.match(text):
            self.fail(f"{value!r} is not a device; use auto, cpu, cuda, cuda:N or gpu (= cuda)", param, ctx)
        return text.replace("gpu", "cuda")


DEVICE = Device()


def as_usage_error(check):
    """A click callback running ``check(value)``; a :class:`CellfluxError` becomes a usage error (exit 2).

    ``check`` returns the converted value (or ``None`` to keep the given one).
    """
    def callback(ctx, param, value):
        from cellfluxrl.errors import CellfluxError

        if value is None:
            return None
        try:
            converted = check(value)
        except CellfluxError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
        return value if converted is None else converted
    return callback


def _positive(value: float) -> float:
    """``value`` if it is a positive finite number, else a one-line CellfluxError."""
    import math

    if not (math.isfinite(value) and value > 0):
        from cellfluxrl.errors import CellfluxError

        raise CellfluxError(f"must be a positive finite number, got {value!r}")
    return value


POSITIVE = as_usage_error(_positive)  # click callback for --pixel-size, --scale (exit 2 when invalid)
