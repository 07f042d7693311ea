"""The one error type that reaches users as a one-line ``Error: ...`` message."""


class DiginError(Exception):
    """A problem the user can fix: bad input, a missing model, an unknown class.

    The message must say what was wrong and how to fix it; the CLI prints it as
    ``Error: <message>`` and exits with a non-zero code, without a traceback.
    """
