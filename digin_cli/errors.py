"""The one error type that reaches users as a one-line ``Error: ...`` message, and the one warning."""


class DiginError(Exception):
    """A problem the user can fix: bad input, a missing model, an unknown class.

    The message must say what was wrong and how to fix it; the CLI prints it as
    ``Error: <message>`` and exits with a non-zero code, without a traceback.
    """


class NoSpaceError(DiginError):
    """A file could not be written for want of disk space or quota. No fault of the item being
    written: a folder run stops at it instead of recording it as that item's failure."""


class CompileFallbackWarning(UserWarning):
    """torch.compile of the UNet failed at run time; the engine went on with the eager UNet.
    The CLI shows it as one `Warning:` line (it silences the libraries' warnings)."""
