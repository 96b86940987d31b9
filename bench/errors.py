"""The one exception the runner turns into a one-line error and exit status 1."""


class BenchError(Exception):
    """A failure the user can act on; ``str()`` is the one-line message.

    ``detail`` is optional extra text (e.g. the tail of the daemon's stderr)
    printed after the message.
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail
