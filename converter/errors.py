"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class RespinError(Exception):
    """A user-facing error: bad input, unsupported model or option, failed check.

    The message is shown as is, on one line, without a traceback (unless `--debug`).
    """
