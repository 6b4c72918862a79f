"""bench/train_speed.py and bench/dpo_speed.py: the arithmetic behind their tables, and real runs on small inputs."""

import json
import math
import subprocess
from pathlib import Path

import pytest

from bench import train_speed
from bench.train_speed import lever_table, peer_table, with_rates


def child_result(peer: str, tokens: int, wall_s: float, precision: str = "fp32", **extra) -> dict:
    return {
        "peer": peer, "setting": f"{peer} setting", "tokens": tokens, "wall_s": wall_s, "params": 100_000_000,
        "precision": precision, "steps": 1, "mean_loss": 2.5, "peak_rss_gb": 1.0, **extra,
    }


def test_rates_use_four_flops_per_parameter_and_the_peak_of_the_rows_precision():
    peaks = {"fp32": 200.0, "bf16": 400.0}
    row = with_rates(child_result("ours", tokens=1000, wall_s=10.0), peaks)
    assert row["tokens_per_s"] == 100.0
    assert row["useful_gflops"] == pytest.approx(4 * 1e8 * 100 / 1e9)  # 40 GFLOP/s
    assert row["percent_of_peak"] == pytest.approx(20.0)
    bf16 = with_rates(child_result("ours-bf16", tokens=1000, wall_s=10.0, precision="bf16"), peaks)
    assert bf16["percent_of_peak"] == pytest.approx(10.0)


def test_peer_table_divides_by_each_reference_row():
    peaks = {"fp32": 200.0, "bf16": 400.0}
    rows = [with_rates(child_result(peer, 1000, wall), peaks) for peer, wall in [("ours", 2.0), ("trl", 10.0), ("peft-loop", 4.0)]]
    lines = peer_table(rows).splitlines()
    assert lines[0].endswith("| vs trl | vs peft-loop |")
    assert lines[2].endswith("| 5.00x | 2.00x |")  # ours: 500 tokens/s vs 100 and 250
    assert lines[3].endswith("| 1.00x | 0.40x |")


def test_lever_table_divides_by_the_first_row():
    rows = [
        {"lever": "baseline", **child_result("ours", 1000, 10.0), "tokens_per_s": 100.0},
        {"lever": "attention", **child_result("ours", 1000, 12.5), "tokens_per_s": 80.0},
    ]
    lines = lever_table(rows).splitlines()
    assert "| 1.00x |" in lines[2] and "| 0.80x |" in lines[3]


@pytest.mark.slow
def test_ours_in_fp32_and_bf16_train_the_same_rows_to_nearly_the_same_loss(tmp_path, capsys):
    output = tmp_path / "speed.json"
    train_speed.main([
        "--data", "data/medical_flashcards.jsonl", "--examples", "4", "--peers", "ours,ours-bf16",
        "--repeats", "2", "--output", str(output),
    ])
    record = json.loads(output.read_text())
    ours, bf16 = record["peers"]
    assert (ours["peer"], ours["precision"], bf16["peer"], bf16["precision"]) == ("ours", "fp32", "ours-bf16", "bf16")
    assert ours["tokens"] == bf16["tokens"] > 0 and ours["steps"] == bf16["steps"] == 1
    assert len(ours["tokens_per_s_runs"]) == 2
    assert abs(ours["mean_loss"] - bf16["mean_loss"]) < 0.05  # bf16 rounding, not a different computation
    assert 0 < ours["percent_of_peak"] < 100
    assert "| ours-bf16 |" in capsys.readouterr().out


@pytest.mark.slow
def test_t4_step_smoke_run_on_one_layer_of_tinyllama(tmp_path):
    from bench import t4_step

    output = tmp_path / "t4.json"
    t4_step.main([
        "--device", "cpu", "--layers", "1", "--examples", "32", "--warmup-steps", "1", "--precision", "fp32", "--output", str(output),
    ])
    record = json.loads(output.read_text())
    assert [row["impl"] for row in record["rows"]] == ["ours", "trl"]
    for row in record["rows"]:
        assert row["steps"] == 2 and row["s_per_step"] > 0 and row["peak_gb"] > 0 and row["memory"] == "peak RSS"
        assert 0 < row["warmup_s"] < row["wall_s"]
        assert 9.0 < row["mean_loss"] < 12.0  # random weights: about ln(32000) = 10.4


@pytest.mark.slow
def test_t4_step_single_micro_batch_without_checkpointing(tmp_path):
    from bench import t4_step

    output = tmp_path / "t4.json"
    t4_step.main([
        "--device", "cpu", "--layers", "1", "--examples", "32", "--warmup-steps", "1", "--precision", "fp32", "--impls", "ours",
        "--batch-size", "16", "--no-grad-checkpointing", "--output", str(output),
    ])
    (row,) = json.loads(output.read_text())["rows"]
    assert "16 rows x 1" in row["setting"] and "checkpointing off" in row["setting"]


def test_t4_step_refuses_a_batch_size_that_does_not_divide_the_step(capsys):
    from bench import t4_step

    with pytest.raises(SystemExit) as exit_info:
        t4_step.main(["--device", "cpu", "--batch-size", "3"])
    assert exit_info.value.code == 2
    assert "--batch-size must divide" in capsys.readouterr().err


def test_t4_step_without_a_gpu_says_so_in_one_line(capsys):
    from bench import t4_step

    if t4_step.torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as exit_info:
        t4_step.main([])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_only_names_levers_that_exist(capsys):
    args = train_speed.parse_args(["--data", "data/medical_flashcards.jsonl", "--lever", "--only", "LoRA dropout, AdamW"])
    assert args.only == ["LoRA dropout", "AdamW"]
    with pytest.raises(SystemExit):
        train_speed.parse_args(["--data", "data/medical_flashcards.jsonl", "--lever", "--only", "warp drive"])
    assert "no such lever" in capsys.readouterr().err


def test_activation_memory_puts_what_backward_keeps_on_the_module_saving_it(tokenizer):
    from bench.activation_memory import saved_bytes_by_module
    from data import clean_rows, collate, encode_example, load_rows
    from lora import inject_lora
    from tests.conftest import make_tiny_model

    pairs, _ = clean_rows(load_rows(None).rows[:10], "embedded")
    batch = collate([encode_example(tokenizer, p.question, p.answer, 512) for p in pairs[:3]], tokenizer.pad_token_id)
    saved = {}
    for dropout in (0.05, 0.0):
        model = make_tiny_model()
        inject_lora(model, dropout=dropout)
        saved[dropout] = saved_bytes_by_module(model.train(), batch)
    assert {"LlamaMLP", "LlamaAttention", "LoRALinear", "Dropout"} <= set(saved[0.05])
    assert "Dropout" not in saved[0.0]  # no dropout, no mask kept
    assert all(size > 0 for size in saved[0.05].values())


def test_dpo_speed_table_divides_each_peers_step_time_by_ours():
    from bench.dpo_speed import speed_table

    rows = [{"peer": peer, "setting": f"{peer} setting", "s_per_step": s, "tokens_per_s": 1000 / s, "timed_steps": 8, "peak_rss_gb": 1.0}
            for peer, s in [("ours", 2.0), ("trl", 5.0)]]
    lines = speed_table(rows).splitlines()
    assert lines[2].startswith("| ours |") and lines[2].endswith("| 1.00x |")
    assert lines[3].endswith("| 2.50x |")  # TRL takes 2.5 times our step


def test_dpo_timing_pairs_put_a_decline_against_an_answer(tokenizer):
    from bench.dpo_speed import timing_pairs
    from medlora.scope import is_decline

    pairs = timing_pairs(tokenizer, 12)
    assert len(pairs) == 12 and [p.kind for p in pairs].count("decline") == 4
    for pair in pairs:
        declined, answered = (pair.chosen, pair.rejected) if pair.kind == "decline" else (pair.rejected, pair.chosen)
        assert is_decline(declined) and not is_decline(answered)


def test_dpo_speed_needs_ours_among_the_peers(capsys):
    from bench import dpo_speed

    with pytest.raises(SystemExit):
        dpo_speed.parse_args(["--peers", "trl"])
    assert "ours is missing" in capsys.readouterr().err


@pytest.mark.slow
def test_dpo_speed_times_ours_and_trl_on_the_same_token_ids(tokenizer, tmp_path):
    from bench.dpo_speed import time_ours, time_trl, timing_pairs
    from tests.conftest import make_tiny_model

    pairs = timing_pairs(tokenizer, 8)
    ours = time_ours(make_tiny_model(), tokenizer, pairs, "fp32", warmup_steps=1, steps=1)
    trl = time_trl(make_tiny_model(), tokenizer, pairs, "fp32", warmup_steps=1, steps=1, checkpointing=False, scratch_dir=str(tmp_path))
    assert trl["same_ids_as_ours"] == trl["pairs"] == ours["pairs"] == 8  # TRL read the very token ids ours trains on
    assert ours["tokens"] == trl["tokens"] > 0  # one step holds all 8 pairs: the same real tokens on both sides
    for row in (ours, trl):
        assert row["timed_steps"] == 1 and row["s_per_step"] > 0 and 0 < row["warmup_s"]
        assert row["mean_loss"] == pytest.approx(math.log(2), abs=0.01)  # the first steps barely move a tiny random model


@pytest.mark.parametrize("argv", [[], ["--cpu"], ["--verbose", "--", "true"]])
def test_avx2_guest_refuses_a_missing_command_or_an_unknown_flag_in_one_line(argv):
    """bench/avx2_guest.sh checks its arguments before it installs or boots anything."""
    script = Path(__file__).resolve().parents[2] / "bench" / "avx2_guest.sh"
    done = subprocess.run(["bash", str(script), *argv], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "bench/avx2_guest.sh" in done.stderr
