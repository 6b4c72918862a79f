"""Failures the user can act on, and the one place that turns them into a line and an exit code.

Bad input of any kind is a `ValueError`: the one base class of every error a user can fix, whatever
layer raises it (data.DataError, lora.AdapterError, medlora.model.ModelLoadError, and the plain
ValueErrors of the settings checks), each with a one-line message naming the value and what is
allowed. Files the system refuses to read or write are `OSError`s. A script that ends itself on
purpose raises a `Stopped`, which carries its exit code: `TrainingStopped` when a run diverged or
Ctrl-C saved a checkpoint, `Interrupted` when Ctrl-C stopped any other work (an export). Every
script catches USER_FAILURES around its work and returns `report_failure(error)`.
"""

from __future__ import annotations

import sys

EXIT_OK = 0
EXIT_BAD_INPUT = 2  # bad flags, data, model or adapter; unreadable or unwritable files
EXIT_DIVERGED = 3  # training stopped itself: the loss was NaN or infinite for too many steps
EXIT_RANK_FAILED = 4  # under torchrun: another rank died, raised or stopped answering, so this one stopped too
EXIT_INTERRUPTED = 130  # Ctrl-C, after a checkpoint was saved (128 + SIGINT, as a shell reports it)


class Stopped(Exception):
    """A script stopped on purpose; the message says why and what was kept."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class TrainingStopped(Stopped):
    """A training run stopped on purpose: it diverged, another rank failed, or Ctrl-C saved a checkpoint."""


class Interrupted(Stopped):
    """Ctrl-C stopped the work of a script that keeps nothing half-done (the message says what was kept)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_INTERRUPTED)


USER_FAILURES = (Stopped, ValueError, OSError)


def report_failure(error: BaseException) -> int:
    """Print one line for a failure the user can act on (no traceback) and return the exit code."""
    if isinstance(error, Stopped):
        print(f"stopped: {' '.join(str(error).split())}", file=sys.stderr)
        return error.exit_code
    if isinstance(error, OSError):
        print(f"error: {error.strerror or error} ({error.filename or 'file system'})", file=sys.stderr)
    else:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)  # always one line
    return EXIT_BAD_INPUT
