"""The one owner of progress bars: a tqdm bar on a terminal, a plain line every few percent otherwise.

Commands draw progress with :func:`progress` instead of ``tqdm(...)``. When stderr is a terminal it
returns a tqdm bar. When stderr is redirected to a file (a batch job's log, ``2> log.txt``), a bar's
redraws would flood the log with carriage returns, so it returns a :class:`LineProgress` that
prints one plain line when another ``every_percent`` of the total is done (or ``every_seconds``
have passed, for long steps or an unknown total) and one at the end::

    pretrain: 500/10000 steps (5%), 0:01:40 elapsed, about 0:31:40 left; loss=0.0312

``CELLFLUXRL_PROGRESS=bar|lines|off`` overrides the choice. Both kinds share the small part of
tqdm's interface the commands use: ``update``, ``n`` (assignable), ``refresh``, ``set_postfix``,
``set_description``, ``reset``, ``close`` and the context manager; :func:`progress_iter` wraps an
iterable as ``tqdm(items)`` does.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")

ENV = "CELLFLUXRL_PROGRESS"
MODES = ("bar", "lines", "off")


def format_duration(seconds: float) -> str:
    """A human duration: ``"42 s"``, ``"12 min"``, ``"3.5 h"``, ``"47 days"``."""
    seconds = max(float(seconds), 0.0)
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def _clock(seconds: float) -> str:
    """``H:MM:SS``."""
    seconds = int(round(max(seconds, 0)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _plural(unit: str) -> str:
    """``step`` -> ``steps``, ``batch`` -> ``batches``; ``B/s``-like units stay."""
    if not unit[-1:].isalpha():
        return unit
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


def choose_mode(file: TextIO) -> str:
    """``"bar"`` on a terminal, ``"lines"`` otherwise; ``CELLFLUXRL_PROGRESS`` wins when set."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in MODES:
        return forced
    isatty = getattr(file, "isatty", None)
    try:
        return "bar" if isatty is not None and isatty() else "lines"
    except (ValueError, OSError):  # a closed stream
        return "lines"


class LineProgress:
    """Progress as plain lines, for logs: one line per ``every_percent`` of the total (or per
    ``every_seconds`` when that comes first or the total is unknown), and one at the end.

    Args:
        total: the amount of work (``None``: unknown; lines then come by time only).
        desc, unit: the line's prefix and unit, as tqdm's.
        initial: work already done (a resumed run).
        every_percent, every_seconds: the line intervals.
        file: where lines go (default: stderr at the time of writing).
        disable: print nothing.
        clock: seconds since an arbitrary origin (tests pass a fake one).
    """

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it", *, initial: int = 0,
                 every_percent: float = 5.0, every_seconds: float = 60.0, file: TextIO | None = None,
                 disable: bool = False, clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit, self.n = total, desc, unit, int(initial)
        self.every_percent, self.every_seconds = float(every_percent), float(every_seconds)
        self.file, self.disable, self.clock = file, disable, clock
        self.postfix = ""
        self._start_n, self._start = self.n, clock()
        self._shown_n, self._shown_at, self._closed = self.n, self._start, False

    # tqdm's interface ---------------------------------------------------------------------------
    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done (and print a line if one is due)."""
        self.n += int(n)
        self.refresh()

    def refresh(self) -> None:
        """Print a line if another ``every_percent`` is done or ``every_seconds`` passed since the last."""
        if self.disable or self._closed or self.n == self._shown_n:
            return
        now = self.clock()
        step = self.total * self.every_percent / 100.0 if self.total else None
        if (step is not None and self.n - self._shown_n >= step) or now - self._shown_at >= self.every_seconds:
            self._write(now)

    def set_postfix(self, refresh: bool = True, **values) -> None:
        """Extra ``key=value`` items at the end of each line."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())
        if refresh:
            self.refresh()

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def reset(self, total: int | None = None) -> None:
        """Start over (a new stage) with a new total."""
        self.total, self.n, self.postfix = total, 0, ""
        self._start_n, self._start = 0, self.clock()
        self._shown_n, self._shown_at = 0, self._start

    def close(self) -> None:
        """Print the final line (if anything happened since the last one)."""
        if not self._closed and not self.disable and self.n != self._shown_n:
            self._write(self.clock())
        self._closed = True

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:  # an error ends the stage: its one-line message is all that is printed
            self._closed = True
        self.close()

    # ---------------------------------------------------------------------------------------------
    def line(self, now: float) -> str:
        """The text of one progress line at time ``now``."""
        elapsed = now - self._start
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        text = f"{self.desc}: {done} {_plural(self.unit)}"
        if self.total:
            text += f" ({100.0 * self.n / self.total:.0f}%)"
        text += f", {_clock(elapsed)} elapsed"
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        if self.total and rate > 0 and self.n < self.total:
            text += f", about {_clock((self.total - self.n) / rate)} left"
        return text + (f"; {self.postfix}" if self.postfix else "")

    def _write(self, now: float) -> None:
        file = self.file if self.file is not None else sys.stderr
        print(self.line(now), file=file, flush=True)
        self._shown_n, self._shown_at = self.n, now


def progress(total: int | None = None, desc: str = "", unit: str = "it", *, initial: int = 0, leave: bool = True,
             disable: bool = False, file: TextIO | None = None, every_percent: float = 5.0,
             every_seconds: float = 60.0):
    """A progress bar for a command: tqdm on a terminal, :class:`LineProgress` in a log.

    Args:
        total: the amount of work (``None``: unknown).
        desc, unit: label and unit.
        initial: work already done (a resumed run).
        leave: keep the finished bar on screen (terminal only).
        disable: draw nothing (e.g. on non-main ranks).
        file: the stream (default: stderr).
        every_percent, every_seconds: line intervals of the log form.
    """
    stream = sys.stderr if file is None else file
    mode = "off" if disable else choose_mode(stream)
    if mode == "bar":
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave, file=file, dynamic_ncols=True)
    return LineProgress(total, desc, unit, initial=initial, every_percent=every_percent, every_seconds=every_seconds,
                        file=file, disable=mode == "off")


def progress_iter(items: Iterable[T], desc: str = "", unit: str = "it", *, total: int | None = None,
                  leave: bool = True, disable: bool = False) -> Iterator[T]:
    """``for x in progress_iter(items, ...)``: :func:`progress` around an iterable (tqdm's ``tqdm(items)``)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with progress(total=total, desc=desc, unit=unit, leave=leave, disable=disable) as bar:
        for item in items:
            yield item
            bar.update(1)
