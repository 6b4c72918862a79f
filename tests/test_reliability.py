"""Faults tried: kill -9 anywhere, corrupted checkpoints, inf/NaN, disk errors, fuzzed input.

Each test injects the fault for real (a killed subprocess, a truncated file, ...) and checks that
nothing is lost: the resumed run logs the same losses and ends with the same adapter as a run that
was never interrupted. The faults are injected from here, by wrapping train.py's functions
(tests/faults.py); the product code has no hook for them.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import train
from data import DataError, clean_rows, load_rows
from medlora import checkpoint
from medlora.checkpoint import verify_checkpoint
from tests.faults import PAUSE_MARKER, corrupt_loss

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("loss", "lr", "grad_norm", "tokens", "val_loss")


def args(tiny_model_dir, out, *extra):
    return ["--preset", "cpu-sft", "--model", str(tiny_model_dir), "--num-examples", "120", "--output-dir", str(out), "--max-steps", "6",
            "--batch-size", "4", "--grad-accum", "2", "--eval-every", "2", "--save-every", "2", "--keep-last", "10",
            "--lr", "5e-3", *extra]


def records(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in KEYS if k in r} | {"step": r["step"]} for r in lines]


def final_adapter(run_dir):
    return load_file(run_dir / "checkpoints" / "step-000006" / "adapter_model.safetensors")


def assert_same_run(run_dir, reference):
    assert records(run_dir) == records(reference)
    a, b = final_adapter(run_dir), final_adapter(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train.main(args(tiny_model_dir, out)) == 0
    return out


def kill_at(tiny_model_dir, out, pause, *extra):
    """Train in a subprocess paused at `pause` (tests/faults.py), wait until it gets there, then kill -9 it."""
    process = subprocess.Popen([sys.executable, "-m", "tests.faults", pause, "--", *args(tiny_model_dir, out, *extra)], cwd=ROOT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in process.stdout:
            if line.startswith(PAUSE_MARKER):
                break
        else:
            pytest.fail(f"train.py ended before reaching {pause}")
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
        process.stdout.close()
    assert process.returncode == -signal.SIGKILL


@pytest.mark.slow  # a training subprocess killed three times: `make test-all`
@pytest.mark.parametrize("pause, resumes_from", [("step:5", 4), ("eval:4", 2), ("save:4", 2)])
def test_kill_9_then_resume_matches_uninterrupted_run(tiny_model_dir, tmp_path, reference_run, pause, resumes_from, capsys):
    out = tmp_path / "run"
    kill_at(tiny_model_dir, out, pause)
    assert train.main(args(tiny_model_dir, out, "--resume", "auto")) == 0
    assert f"continuing from step-{resumes_from:06d}" in capsys.readouterr().out
    assert_same_run(out, reference_run)
    assert not list((out / "checkpoints").glob(".tmp-*"))


DPO = ("--dpo-epochs", "1", "--dpo-pairs-per-step", "6", "--dpo-answer-rows", "6", "--dpo-lr", "5e-3", "--dpo-max-ppl-increase", "10")


@pytest.mark.slow  # two more training subprocesses: `make test-all`
def test_kill_9_inside_the_preference_stage_then_resume_matches_uninterrupted_run(tiny_model_dir, tmp_path, capsys):
    reference = tmp_path / "reference"
    assert train.main(args(tiny_model_dir, reference, *DPO)) == 0
    steps = json.loads((reference / "summary.json").read_text())["steps"]
    assert steps >= 9  # 6 SFT steps, then the DPO stage
    out = tmp_path / "run"
    kill_at(tiny_model_dir, out, "step:9", *DPO)  # inside DPO step 9: the last checkpoint is step 8, in the stage
    capsys.readouterr()
    assert train.main(args(tiny_model_dir, out, *DPO, "--resume", "auto")) == 0
    assert "continuing from step-000008" in capsys.readouterr().out
    assert records(out) == records(reference)
    a = load_file(out / "checkpoints" / f"step-{steps:06d}" / "adapter_model.safetensors")
    b = load_file(reference / "checkpoints" / f"step-{steps:06d}" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("damage", ["truncate", "bit-flip", "delete"])
def test_corrupted_checkpoint_falls_back_to_the_previous_one(tiny_model_dir, tmp_path, reference_run, damage, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    target = out / "checkpoints" / "step-000006" / "optimizer.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        target.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "bit-flip":
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    else:
        target.unlink()
    assert verify_checkpoint(target.parent) is not None
    assert train.main(args(tiny_model_dir, out, "--resume", "auto")) == 0
    printed = capsys.readouterr().out
    assert "skipping step-000006: " in printed and "falling back to the previous checkpoint" in printed
    assert "continuing from step-000004" in printed
    assert_same_run(out, reference_run)


def test_inf_gradients_under_fp16_skip_the_step_and_halve_the_scale(tiny_model_dir, tmp_path, monkeypatch):
    corrupt_loss(monkeypatch.setattr, "inf_grad", {2})
    out = tmp_path / "run"
    assert train.main(args(tiny_model_dir, out, "--precision", "fp16", "--max-steps", "3")) == 0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [s["skipped"] for s in steps] == [False, True, False]
    assert steps[1]["loss_scale"] == steps[0]["loss_scale"] / 2
    assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 1


def test_nan_loss_for_k_steps_stops_and_keeps_last_good_checkpoint(tiny_model_dir, tmp_path, monkeypatch, capsys):
    corrupt_loss(monkeypatch.setattr, "nan_loss", {3, 4, 5})
    out = tmp_path / "run"
    assert train.main(args(tiny_model_dir, out, "--max-nan-steps", "3")) == 3
    err = capsys.readouterr().err
    assert "loss was NaN or infinite for 3 consecutive steps; stopped at step 5" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert verify_checkpoint(out / "checkpoints" / "step-000004") is None
    # Steps 3 and 4 were skipped, so checkpoint 4 holds exactly the adapter of step 2: no garbage.
    before = load_file(out / "checkpoints" / "step-000002" / "adapter_model.safetensors")
    after = load_file(out / "checkpoints" / "step-000004" / "adapter_model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(t).all() for t in after.values())


def test_unwritable_output_folder_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert train.main(args(tiny_model_dir, blocker / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "a-file/run" in err and "\n" not in err


def test_full_disk_during_checkpoint_keeps_previous_checkpoints(tiny_model_dir, tmp_path, monkeypatch, capsys):
    original = checkpoint.save_file

    def failing_save_file(tensors, path, metadata=None):
        if "step-000004" in path:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return original(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", failing_save_file)
    out = tmp_path / "run"
    assert train.main(args(tiny_model_dir, out)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: No space left on device") and "step-000004" in errors[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert verify_checkpoint(out / "checkpoints" / "step-000002") is None


# ---- fuzzed input: a clear DataError or a counted skip, never an uncaught exception -------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
rows_strategy = st.lists(
    st.dictionaries(st.sampled_from(["instruction", "input", "output", "question", "answer", "messages", "topic", "x"]), json_values, max_size=5),
    max_size=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=rows_strategy)
def test_fuzzed_rows_are_cleaned_or_refused(rows):
    try:
        pairs, report = clean_rows(rows, "fuzz")
    except DataError:
        return
    assert report.kept == len(pairs) and report.rows_read == len(rows)
    assert report.kept + sum(report.dropped.values()) == len(rows)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=300) | st.text(max_size=300).map(str.encode), suffix=st.sampled_from([".json", ".jsonl", ".csv"]))
def test_fuzzed_files_load_or_fail_clearly(tmp_path_factory, content, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"input{suffix}"
    path.write_bytes(content)
    for skip in (False, True):
        try:
            raw = load_rows(str(path), skip_bad_rows=skip)
            clean_rows(raw.rows, str(path))
        except DataError as error:
            # Clearly: one line that names the file first, then says what is wrong with it.
            message = str(error)
            assert "\n" not in message and message.startswith(f"{path}: ")
            problem = message[len(f"{path}: "):]
            assert len(problem.split()) >= 2, message


@pytest.mark.parametrize("script", ["chat.py", "evaluate.py"])
def test_corrupted_adapter_is_one_clear_line_naming_the_file(script, tiny_adapter_dir, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_dir, adapter)
    weights = adapter / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40  # a bit flip inside the weights
    weights.write_bytes(bytes(data))
    extra = ["--prompt", "What is insulin?"] if script == "chat.py" else ["--limit", "2", "--output", str(tmp_path / "e.json")]
    result = subprocess.run([sys.executable, script, "--adapter", str(adapter), *extra], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(errors) == 1 and f"{weights}: checksum mismatch" in errors[0]
