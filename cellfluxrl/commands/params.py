"""Click parameter types shared by the commands: folders vs files, devices, and values that must
exit with status 2 (a usage error, via :class:`click.BadParameter`) when invalid.

Only click is imported here, so ``cellfluxrl --help`` stays fast (a ``--device`` value imports torch
when it is checked, which ``--help`` never does).
"""

from __future__ import annotations

from pathlib import Path

import click


def _a(word: str) -> str:
    """``"a dataset"``, ``"an Inception weights"``: the indefinite article and the word."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


class Folder(click.ParamType):
    """A folder path (need not exist yet); an existing *file* is refused as such (exit 2).

    Every folder option shows the one metavar ``DIR`` in ``--help`` (an option's own ``metavar=``,
    like ``--out RUN``, still wins; an argument keeps its name, ``DATASET``).

    Args:
        what: what the folder holds, for the message (``"dataset"``, ``"run"``, ``"output"``).
        exists: the folder must already exist (a missing one is a usage error naming it).
    """

    name = "folder"

    def __init__(self, what: str, exists: bool = False):
        self.what = what
        self.exists = exists

    def get_metavar(self, param, ctx=None) -> str | None:
        return "DIR" if isinstance(param, click.Option) else None

    def convert(self, value, param, ctx) -> Path:
        path = Path(value)
        if path.is_file():
            self.fail(f"{path} is a file; give {_a(self.what)} folder", param, ctx)
        if self.exists and not path.is_dir():
            self.fail(f"{path} does not exist; give {_a(self.what)} folder", param, ctx)
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
    """``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``; ``gpu`` and ``gpu:N`` mean CUDA.

    Resolved and checked on this machine when the command line is parsed, before any work, by the
    one resolver :func:`cellfluxrl.distributed.pick_device`: ``auto`` becomes ``cuda`` or ``cpu``, and a
    device the machine lacks is a usage error (exit 2) naming what was asked, e.g. ``--device cuda:3:
    this machine has no CUDA device 3 (it has none)``. Converts to the canonical string (a bare
    ``cuda`` stays bare: under torchrun each process takes its ``LOCAL_RANK``).
    """

    name = "device"

    def get_metavar(self, param, ctx=None) -> str:
        return "auto|cpu|cuda[:N]|gpu"

    def convert(self, value, param, ctx) -> str:
        from cellfluxrl.distributed import (DEVICE_WORDS, device_unavailable, env_local_rank, normalise_device,
                                            pick_device)
        from cellfluxrl.errors import CellfluxError

        try:
            device = normalise_device(value)
        except CellfluxError:
            self.fail(f"{value!r} is not a device; use {DEVICE_WORDS}", param, ctx)
        if device == "auto":
            return pick_device("auto")
        problem = device_unavailable(device, env_local_rank())
        if problem:
            option = param.opts[0] if param is not None and param.opts else "--device"
            raise click.UsageError(f"{option} {value}: {problem}", ctx)
        return device


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
