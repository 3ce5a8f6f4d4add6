"""Errors that are the user's to fix: printed as one line, never as a traceback."""


class LmtrainError(Exception):
    """A problem with the user's input or environment.

    The CLI prints ``error: <message>`` and exits with ``exit_code``
    (2 for usage and input errors, as click does for bad arguments).
    """

    def __init__(self, message, exit_code=2):
        super().__init__(message)
        self.exit_code = exit_code


class ConfigError(LmtrainError):
    """The configuration file or an override is invalid."""


class DataError(LmtrainError):
    """A corpus is missing, empty or unreadable."""


class CheckpointError(LmtrainError):
    """A checkpoint is missing, truncated or not an lmtrain checkpoint."""


def require_file(path, what, error=LmtrainError):
    """``path`` as a string, or ``error`` saying it is missing or a directory."""
    import os

    path = os.fspath(path)
    if not os.path.exists(path):
        raise error(f"{what} not found: {path}")
    if os.path.isdir(path):
        raise error(f"{what} is a directory, not a file: {path}")
    return path
