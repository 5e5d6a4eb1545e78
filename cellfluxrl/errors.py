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


def did_you_mean(name: str, choices) -> str:
    """``"did you mean 'taxol'? available: ..."`` for an unknown ``name`` (the tail of a one-line error).

    Args:
        name: what the user typed.
        choices: the valid names.

    Returns:
        ``"did you mean 'x'? available: a, b, c"`` (the hint only when a close match exists, case
        ignored; at most 30 names listed, then how many more).
    """
    import difflib

    choices = sorted(str(c) for c in choices)
    lookup = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(str(name).lower(), list(lookup), n=1, cutoff=0.6)
    hint = f"did you mean {lookup[close[0]]!r}? " if close else ""
    listed = ", ".join(choices[:30]) + (f" and {len(choices) - 30} more" if len(choices) > 30 else "")
    return f"{hint}available: {listed}"
