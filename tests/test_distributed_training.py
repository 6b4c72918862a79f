"""train.py under torchrun: 2 ranks on CPU (gloo) with the tiny model of conftest.

1. Two ranks log the same losses and end with the same adapter as one process on the same global
   batches (within 1e-6 relative, fp32; dropout off, since each rank draws its own masks).
2. kill -9 of one rank ends the job with a clear error within 60 s, and `--resume auto` under
   torchrun then ends with the adapter of an uninterrupted 2-rank run, bit for bit (dropout on,
   so every rank's RNG state must come back from the checkpoint).
3. (the shard function: tests/medlora/test_distributed.py)
4. An exception on one rank makes every rank exit non-zero within a bounded time: two processes
   started by hand with torchrun's variables, so no torchrun agent stops the survivor for us.
The faults are injected by tests/faults.py (`python -m tests.faults POINT:STEP@RANK -- flags`).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train as train_script
from tests.faults import PAUSE_MARKER

pytestmark = pytest.mark.slow  # torchrun jobs and a kill -9: `make test-all`

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def args(model_dir, out, *extra):
    return ["--preset", "cpu-sft", "--model", str(model_dir), "--num-examples", "80", "--output-dir", str(out), "--max-steps", "4",
            "--batch-size", "4", "--grad-accum", "2", "--max-batch-tokens", "0", "--eval-every", "2", "--save-every", "2",
            "--keep-last", "10", "--lr", "5e-3", "--precision", "fp32", *extra]


def torchrun(*command):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *command]


def run_two_ranks(model_dir, out, *extra):
    done = subprocess.run(torchrun("train.py", *args(model_dir, out, *extra)), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def step_records(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r or "val_loss" in r]


def adapter(run_dir, step=4):
    return load_file(run_dir / "checkpoints" / f"step-{step:06d}" / "adapter_model.safetensors")


def test_two_ranks_match_one_process_on_the_same_global_batches(tiny_model_dir, tmp_path):
    printed = run_two_ranks(tiny_model_dir, tmp_path / "two", "--dropout", "0")
    assert "[ranks] 2 ranks, backend gloo, this is rank 0 on cpu" in printed
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    assert train_script.main(args(tiny_model_dir, tmp_path / "one", "--dropout", "0")) == 0
    two, one = step_records(tmp_path / "two"), step_records(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one] and len(two) == 7  # 3 validations, 4 steps
    for ours, theirs in zip(two, one):
        assert ours.get("tokens") == theirs.get("tokens")
        for key in ("loss", "grad_norm", "val_loss"):
            if key in theirs:
                assert ours[key] == pytest.approx(theirs[key], rel=1e-6, abs=0), key
    a, b = adapter(tmp_path / "two"), adapter(tmp_path / "one")
    assert a.keys() == b.keys()
    # The ranks sum their gradients in another order than one process does, so the gradients agree to
    # float32 rounding (the losses and gradient norms above, to 1e-6), not bit for bit, and AdamW divides
    # each gradient by its own running magnitude: an element whose gradient is near 0 can take a step of
    # about lr on either side of a rounding error. So single elements may differ by far more than rounding
    # (2.0e-5 of 0.13 on the Intel Xeon, 2026-11-30, after the embedded data grew), while each tensor as a
    # whole agrees: compare ||two - one|| / ||one|| per tensor (at most 8.7e-6 there).
    for name in a:
        relative = float(torch.linalg.vector_norm(a[name] - b[name]) / torch.linalg.vector_norm(b[name]))
        print(f"{name}: relative difference {relative:.2e}")
        assert relative < 1e-4, name
    # and a 2-rank run cannot be resumed by one process
    assert train_script.main(args(tiny_model_dir, tmp_path / "two", "--dropout", "0", "--resume", "auto")) == 2


def test_kill_9_of_one_rank_then_resume_under_torchrun_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    out = tmp_path / "killed"
    job = subprocess.Popen(torchrun("-m", "tests.faults", "step:3@1", "--", *args(tiny_model_dir, out)), cwd=ROOT, env=ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in job.stdout:
            if line.startswith(PAUSE_MARKER):
                break
        else:
            pytest.fail("the job ended before rank 1 reached step 3")
        killed_at = time.monotonic()
        os.kill(int(line.split()[-1]), signal.SIGKILL)
        errors = job.communicate(timeout=60)[1]
        ended_after = time.monotonic() - killed_at
    finally:
        job.kill()
    assert job.returncode != 0 and ended_after < 60
    assert "stopped: rank 0 of 2: another rank died or stopped answering during" in errors or "Signal 9 (SIGKILL)" in errors
    run_two_ranks(tiny_model_dir, out, "--resume", "auto")
    run_two_ranks(tiny_model_dir, tmp_path / "uninterrupted")
    resumed, reference = adapter(out), adapter(tmp_path / "uninterrupted")
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in resumed)
    assert logged_numbers(out) == logged_numbers(tmp_path / "uninterrupted")


def logged_numbers(run_dir):
    keys = ("step", "loss", "lr", "grad_norm", "tokens", "val_loss")
    return [{k: r[k] for k in keys if k in r} for r in step_records(run_dir)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_exception_on_one_rank_makes_every_rank_exit_non_zero(tiny_model_dir, tmp_path):
    port, logs = free_port(), [tmp_path / "rank0.err", tmp_path / "rank1.err"]
    ranks = [
        subprocess.Popen([sys.executable, "-m", "tests.faults", "raise:2@1", "--", *args(tiny_model_dir, tmp_path / "run")], cwd=ROOT,
                         env={**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank),
                              "LOCAL_RANK": str(rank)},
                         stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        for rank, log in enumerate(logs)
    ]
    ended = [None, None]
    deadline = time.monotonic() + 180
    while None in ended and time.monotonic() < deadline:
        ended = [end or (time.monotonic() if rank.poll() is not None else None) for end, rank in zip(ended, ranks)]
        time.sleep(0.1)
    for rank in ranks:
        rank.kill()
    errors = [log.read_text() for log in logs]
    assert None not in ended, errors
    assert "RuntimeError: fault injected by tests/faults.py in step 2" in errors[1] and ranks[1].returncode == 1
    assert "stopped: rank 0 of 2: another rank died or stopped answering during the all-reduce of the LoRA gradients" in errors[0]
    assert ranks[0].returncode == 4 and ended[0] - ended[1] < 20  # the survivor stops within seconds, by itself
