"""SIGINT and SIGTERM for the long commands: the only place that installs signal handlers.

Libraries never touch signals; they take a ``should_stop`` callable polled between steps. A command
wraps its work in :class:`StopSignals`, which installs handlers for the block and restores the
previous ones after it:

* ``graceful`` (``pretrain``, ``posttrain``, ``demo``): the first signal only sets the request
  (``stop()`` turns True) and says so on stderr; the library finishes its step, writes a
  checkpoint and returns; a second SIGINT/SIGTERM aborts at once (``KeyboardInterrupt``).
* ``immediate`` (``prepare``, ``evaluate``: no step to finish): the signal raises
  ``KeyboardInterrupt`` at once, so SIGTERM too unwinds through ``finally`` blocks and the
  command can say what it kept.

The exit status is ``128 + signal number``: 130 for SIGINT, 143 for SIGTERM (:attr:`exit_code`).
"""

from __future__ import annotations

import signal
import threading

import click

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """A stop request set by SIGINT/SIGTERM while the ``with`` block runs (see the module docstring).

    Attributes:
        signum: the first signal received, or ``None``.
        graceful: whether the first signal waits for the current step (else it interrupts at once).
    """

    def __init__(self, graceful: bool = True):
        self.graceful = graceful
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __call__(self) -> bool:
        """Whether a stop was requested (pass the object itself as ``should_stop``)."""
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """``128 + signum`` (130 SIGINT, 143 SIGTERM); 130 when interrupted otherwise (Ctrl-C in a library)."""
        return 128 + (self.signum or signal.SIGINT)

    @property
    def name(self) -> str:
        """``"SIGINT"``/``"SIGTERM"`` (``"SIGINT"`` when none was recorded)."""
        return signal.Signals(self.signum or signal.SIGINT).name

    def _handle(self, signum: int, frame) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if not self.graceful or not first:
            raise KeyboardInterrupt
        click.echo(f"\n{signal.Signals(signum).name}: stopping after the current step and writing a checkpoint "
                   f"(send it again to abort at once, losing the work since the last checkpoint)", err=True)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False

    def exit(self, line: str | None) -> None:
        """Print ``line`` (if any: other ranks print nothing) on stderr and exit with :attr:`exit_code`."""
        if line:
            click.echo(line, err=True)
        raise SystemExit(self.exit_code)
