"""User-facing errors: each one names the problem and how to fix it.

The CLI prints these as one clear message (no traceback) and exits with status 2. Anything else is a bug and
keeps its traceback.
"""


def error_message(err: BaseException) -> str:
    """The error's own sentence: an error re-raised from a DataLoader worker carries the worker's traceback first,
    and its last line is ``module.Type: sentence``."""
    text = str(err).strip()
    return text.splitlines()[-1].split(": ", 1)[-1] if "Original Traceback" in text else text


def printable(text: object) -> str:
    """``text`` as it can stand in a one-line message: itself when printable, else its repr (a name read from a file
    may hold a newline or a control character)."""
    text = str(text)
    return text if text.isprintable() else repr(text)


class MgrqError(Exception):
    """Base class of the errors a user can fix by changing the command, the config or the data."""


class ConfigError(MgrqError):
    """A config value is invalid (unknown model, bits out of range, inconsistent settings)."""


class DataError(MgrqError):
    """The data set is missing, malformed or holds a corrupt file."""


class ModelError(MgrqError):
    """The model cannot be built or its weights cannot be loaded."""


class NumericalError(MgrqError):
    """A loss or an output became NaN or infinite."""


class DiskFullError(MgrqError):
    """A file could not be written for lack of space (or quota): what was written before it is kept."""


class OutputError(MgrqError):
    """A file the run writes cannot take its place (a folder, a mount point there)."""


class Interrupted(BaseException):
    """The run received a termination signal (SIGTERM); like KeyboardInterrupt, not an error of the user's."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum
