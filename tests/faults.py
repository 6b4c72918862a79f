"""Fault injection for tests/test_reliability.py: wrappers around train.py's functions, installed from the tests.

Nothing here is in product code. `patch(owner, name, value)` is `monkeypatch.setattr` in-process, or
plain `setattr` in the subprocess that `python -m tests.faults` runs:

    python -m tests.faults step:5 -- --model DIR --output-dir RUN ...   # train.py's flags after --
    torchrun --standalone --nproc_per_node 2 -m tests.faults step:5@1 -- ...   # only on rank 1

which trains with a pause installed at the given point: it prints a "[test-pause] ... pid N" line
there (on the real standard output, which train.py silences on ranks > 0) and sleeps, so the test
can kill -9 that process at that moment. `raise:3@1` makes rank 1 raise a RuntimeError in step 3.
"""

from __future__ import annotations

import inspect
import os
import sys
import time

import train
from medlora import checkpoint

PAUSE_MARKER = "[test-pause]"


class StepTracker:
    """The loop's TrainState, caught as train.run_stage starts a stage: `step` is the 1-based global
    step being taken (None before the loop starts), in either stage."""

    def __init__(self) -> None:
        self.state = None

    @property
    def step(self) -> int | None:
        return None if self.state is None else self.state.step + 1


def track_steps(patch) -> StepTracker:
    """Wrap train.run_stage so that the tracker holds the TrainState the loop counts steps in."""
    tracker = StepTracker()
    run_stage = train.run_stage

    def tracking_run_stage(*args, **kwargs):
        tracker.state = inspect.signature(run_stage).bind(*args, **kwargs).arguments["state"]
        return run_stage(*args, **kwargs)

    patch(train, "run_stage", tracking_run_stage)
    return tracker


class WrappedLoss:
    """A step loss (medlora.loss.AnswerLoss or medlora.preference.PreferenceLoss) whose micro-batch
    result passes through `after(loss, tokens, stats)` before the optimizer step sees it."""

    def __init__(self, step_loss, after) -> None:
        self.step_loss, self.after, self.stat_names = step_loss, after, step_loss.stat_names

    def total(self, batches):
        return self.step_loss.total(batches)

    def __call__(self, model, rows):
        return self.after(*self.step_loss(model, rows))


def wrap_step_loss(patch, after) -> None:
    """Make train.optimizer_step see every stage's loss through `after`."""
    optimizer_step = train.optimizer_step

    def wrapped_step(model, optimizer, scaler, step_loss, *args, **kwargs):
        return optimizer_step(model, optimizer, scaler, WrappedLoss(step_loss, after), *args, **kwargs)

    patch(train, "optimizer_step", wrapped_step)


def corrupt_loss(patch, kind: str, steps: set[int]) -> None:
    """During the optimizer steps `steps`, change each micro-batch's loss so that:

    inf_grad: the loss stays finite and every gradient becomes infinite (a hook on the loss);
    nan_loss: the loss and every gradient become NaN.
    """
    tracker = track_steps(patch)

    def faulty(loss, tokens, stats):
        if tracker.step in steps:
            if kind == "inf_grad":
                loss.register_hook(lambda grad: grad * float("inf"))
            elif kind == "nan_loss":
                loss = loss * float("nan")
            else:
                raise ValueError(f"unknown fault {kind!r}")
        return loss, tokens, stats

    wrap_step_loss(patch, faulty)


def pause(where: str) -> None:
    print(f"{PAUSE_MARKER} {where} pid {os.getpid()}", file=sys.__stdout__, flush=True)
    time.sleep(600)


def install_pause(patch, point: str, step: int) -> None:
    """Pause inside optimizer step `step` ("step", after its first forward), in the validation pass
    at step `step` ("eval"), or while checkpoint `step` is written ("save", before its RNG file);
    or raise a RuntimeError inside optimizer step `step` ("raise", after its first forward)."""
    tracker = track_steps(patch)
    if point in ("step", "raise"):

        def pausing(loss, tokens, stats):
            if tracker.step == step and point == "raise":
                raise RuntimeError(f"fault injected by tests/faults.py in step {step}")
            if tracker.step == step:
                pause(f"step {step}")
            return loss, tokens, stats

        wrap_step_loss(patch, pausing)
    elif point == "eval":
        validation_loss = train.validation_loss

        def pausing_validation(*args, **kwargs):
            if tracker.state is not None and tracker.state.step == step:  # validation after step `step` was counted
                pause(f"eval {step}")
            return validation_loss(*args, **kwargs)

        patch(train, "validation_loss", pausing_validation)
    elif point == "save":
        save_file = checkpoint.save_file

        def pausing_save_file(tensors, path, *args, **kwargs):
            if f"step-{step:06d}" in path and path.endswith("rng.safetensors"):
                pause(f"save {step}")
            return save_file(tensors, path, *args, **kwargs)

        patch(checkpoint, "save_file", pausing_save_file)
    else:
        raise ValueError(f"unknown pause point {point!r}")


if __name__ == "__main__":
    where, separator, *train_args = sys.argv[1:]
    assert separator == "--", "usage: python -m tests.faults POINT:STEP[@RANK] -- <train.py flags>"
    point, _, step_and_rank = where.partition(":")
    step, _, rank = step_and_rank.partition("@")
    if not rank or rank == os.environ.get("RANK", "0"):
        install_pause(setattr, point, int(step))
    sys.exit(train.main(train_args))
