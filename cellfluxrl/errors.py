"""The one exception type a user can cause.

Every error a user can trigger (missing file, corrupt image, unknown reward name, bad weight
string, NaN loss, incompatible checkpoint) is raised as :class:`CellfluxError` with a one-line
message that names the offending thing. The CLI prints it as ``error: <message>`` on stderr and
exits with status 1; ``cellfluxrl --debug`` shows the traceback instead.
"""


class CellfluxError(Exception):
    """A user-facing error whose message is one line naming the problem."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # keep it on one line


def finite_float(text: str, what: str) -> float:
    """Parse a finite float from user text, or raise the one-line error naming it.

    Args:
        text: the text as the user wrote it (a CSV cell, an option value).
        what: where it stands, e.g. ``"file.csv line 3: DOSE"``; the message is
            ``"{what} {text!r} is not a number"`` or ``"... is not finite"``.
    """
    import math

    try:
        value = float(text)
    except ValueError:
        raise CellfluxError(f"{what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise CellfluxError(f"{what} {text!r} is not finite")
    return value
