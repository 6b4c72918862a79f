"""medlora/errors.py: one line on stderr and the exit code for every kind of failure a user can act on."""

import errno

import pytest

from data import DataError
from lora import AdapterError
from medlora.errors import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED, USER_FAILURES, Interrupted, TrainingStopped, report_failure
from medlora.model import ModelLoadError


@pytest.mark.parametrize(
    "error, code, line",
    [
        (ValueError("--rank must be a positive integer,\n  got 0"), EXIT_BAD_INPUT, "error: --rank must be a positive integer, got 0"),
        (DataError("rows.jsonl: file is empty"), EXIT_BAD_INPUT, "error: rows.jsonl: file is empty"),
        (AdapterError("a/adapter_config.json: missing"), EXIT_BAD_INPUT, "error: a/adapter_config.json: missing"),
        (ModelLoadError("--model x: no such folder"), EXIT_BAD_INPUT, "error: --model x: no such folder"),
        (OSError(errno.ENOSPC, "No space left on device", "runs/cpu/x"), EXIT_BAD_INPUT, "error: No space left on device (runs/cpu/x)"),
        (TrainingStopped("loss was NaN", EXIT_DIVERGED), 3, "stopped: loss was NaN"),
        (TrainingStopped("interrupted: checkpoint saved", EXIT_INTERRUPTED), 130, "stopped: interrupted: checkpoint saved"),
        (Interrupted("interrupted; nothing was written under --out"), 130, "stopped: interrupted; nothing was written under --out"),
    ],
)
def test_each_failure_is_one_line_and_its_exit_code(error, code, line, capsys):
    assert isinstance(error, USER_FAILURES)  # every script catches these, and only these
    assert report_failure(error) == code
    captured = capsys.readouterr()
    assert captured.err == line + "\n" and captured.out == ""


def test_every_input_error_is_a_value_error():
    assert all(issubclass(kind, ValueError) for kind in (DataError, AdapterError, ModelLoadError))
