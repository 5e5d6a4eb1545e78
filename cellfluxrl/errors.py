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
