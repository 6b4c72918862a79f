"""data/split.py and data/batching.py: a pure split, length grouping, padding, collation."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data import IGNORE_INDEX, collate, encode_example, epoch_steps, micro_batches, padding_fraction, sample_and_split

SHARED_FILE = Path(__file__).resolve().parents[3] / "shared" / "data" / "medical_meadow_wikidoc_patient_info.json"


def test_split_sizes_match_the_reference():
    sizes = sample_and_split(list(range(34_000)), num_examples=3000, seed=42).sizes()
    assert sizes == {"train": 2550, "validation": 300, "test": 150}


def test_split_is_a_pure_function_of_rows_and_seed():
    rows = [f"row {i}" for i in range(500)]
    first, again = sample_and_split(rows, 300, seed=42), sample_and_split(list(rows), 300, seed=42)
    assert first == again
    assert set(first.train).isdisjoint(first.test) and set(first.train).isdisjoint(first.validation)
    assert sample_and_split(rows, 300, seed=7).test != first.test


def test_epoch_steps_cover_every_example_once_and_are_deterministic():
    lengths = [(i * 37) % 101 + 5 for i in range(100)]
    steps = epoch_steps(lengths, step_examples=16, seed=42, epoch=0)
    assert sorted(i for s in steps for i in s) == list(range(100))
    assert steps == epoch_steps(lengths, 16, seed=42, epoch=0)
    assert steps != epoch_steps(lengths, 16, seed=42, epoch=1)


def test_length_grouping_reduces_padding():
    lengths = [(i * 37) % 401 + 20 for i in range(256)]
    grouped = [b for s in epoch_steps(lengths, 16, 0, 0) for b in micro_batches(s, lengths, 4)]
    random_order = [list(range(i, i + 4)) for i in range(0, 256, 4)]
    assert padding_fraction(grouped, lengths) < 0.5 * padding_fraction(random_order, lengths)


def test_token_budget_micro_batches():
    lengths = {0: 100, 1: 90, 2: 50, 3: 40, 4: 30, 5: 600}
    batches = micro_batches(list(lengths), lengths, batch_size=2, max_tokens=200)
    # Longest first: [600] alone (over budget), [100, 90] (2 x 100), [50, 40, 30] (3 x 50 = 150).
    assert batches == [[5], [0, 1], [2, 3, 4]]
    assert micro_batches([0, 1, 2], lengths, batch_size=2) == [[0, 1], [2]]


def test_padding_fraction_by_hand():
    # Rows of 2 and 4 tokens padded to 4: 6 real of 8 positions.
    assert padding_fraction([[0, 1]], [2, 4]) == pytest.approx(0.25)


def test_collate_right_pads_and_masks(tokenizer):
    short = encode_example(tokenizer, "What is ATP?", "The energy currency of the cell.", 512)
    long = encode_example(tokenizer, "What is the function of the loop of Henle?", "It concentrates urine by countercurrent multiplication.", 512)
    batch = collate([short, long], pad_id=tokenizer.pad_token_id)
    n = len(short.input_ids)
    assert batch["input_ids"].shape == (2, len(long.input_ids))
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(long.input_ids) - n)
    assert torch.all(batch["labels"][0, n:] == IGNORE_INDEX)
    assert batch["labels"][1].tolist() == long.labels


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "data", *args], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])


def test_cli_json_on_embedded_data():
    result = run_cli("--json", "--num-examples", "200")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["splits"] == {"train": 170, "validation": 20, "test": 10}
    assert set(report["token_lengths"]) == {"p50", "p95", "max"}
    assert report["rows_read"] == report["kept"] + sum(report["dropped"].values())


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"question": 1}\n{oops\n')
    result = run_cli("--data", str(bad))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "line 2: invalid JSON row" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(not SHARED_FILE.is_file(), reason=f"external data file absent: {SHARED_FILE}")
def test_cli_on_the_real_external_file(tmp_path):
    histogram = tmp_path / "lengths.png"
    result = run_cli("--data", str(SHARED_FILE), "--json", "--histogram", str(histogram))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["rows_read"] == 5942
    assert report["dropped"]["duplicate"] > 0 and 5500 < report["kept"] < 5942
    assert sum(report["splits"].values()) == report["kept"] - report["prompt_too_long"]
    assert report["token_lengths"]["max"] <= 512 < report["token_lengths"]["p95"] * 4
    assert histogram.stat().st_size > 1000
