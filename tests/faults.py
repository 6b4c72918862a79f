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

import os
import sys
import time

import train
from medlora import checkpoint

PAUSE_MARKER = "[test-pause]"


def track_steps(patch) -> dict:
    """Wrap train.cosine_with_warmup, which the loop calls once at the start of each optimizer step,
    so that `tracker["step"]` is the 1-based step being taken (None before the first)."""
    tracker = {"step": None}
    schedule = train.cosine_with_warmup

    def noting_schedule(step: int, *args):
        tracker["step"] = step + 1
        return schedule(step, *args)

    patch(train, "cosine_with_warmup", noting_schedule)
    return tracker


def corrupt_loss(patch, kind: str, steps: set[int]) -> None:
    """During the optimizer steps `steps`, wrap train.answer_nll so that:

    inf_grad: the loss stays finite and every gradient becomes infinite (a hook on the loss);
    nan_loss: the loss and every gradient become NaN.
    """
    tracker = track_steps(patch)
    loss = train.answer_nll

    def faulty_loss(model, batch, *args, **kwargs):
        nll, count = loss(model, batch, *args, **kwargs)
        if tracker["step"] in steps:
            if kind == "inf_grad":
                nll.register_hook(lambda grad: grad * float("inf"))
            elif kind == "nan_loss":
                nll = nll * float("nan")
            else:
                raise ValueError(f"unknown fault {kind!r}")
        return nll, count

    patch(train, "answer_nll", faulty_loss)


def pause(where: str) -> None:
    print(f"{PAUSE_MARKER} {where} pid {os.getpid()}", file=sys.__stdout__, flush=True)
    time.sleep(600)


def install_pause(patch, point: str, step: int) -> None:
    """Pause inside optimizer step `step` ("step", after its first forward), in the validation pass
    at step `step` ("eval"), or while checkpoint `step` is written ("save", before its RNG file);
    or raise a RuntimeError inside optimizer step `step` ("raise", after its first forward)."""
    tracker = track_steps(patch)
    if point in ("step", "raise"):
        loss = train.answer_nll

        def pausing_loss(*args, **kwargs):
            result = loss(*args, **kwargs)
            if tracker["step"] == step and point == "raise":
                raise RuntimeError(f"fault injected by tests/faults.py in step {step}")
            if tracker["step"] == step:
                pause(f"step {step}")
            return result

        patch(train, "answer_nll", pausing_loss)
    elif point == "eval":
        validation_loss = train.validation_loss

        def pausing_validation(*args, **kwargs):
            if tracker["step"] == step:
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
