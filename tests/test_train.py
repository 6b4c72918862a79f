"""train.py: flags and presets, the run folder, the loop (gradient accumulation, fp16), resume, and the
two rules of resuming and of runs without validation rows."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

import train
from medlora.checkpoint import write_manifest


def test_bad_settings_fail_before_any_model_is_loaded(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))
    assert train.main(["--rank", "0", "--output-dir", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == "error: rank must be a positive integer, got 0"


def test_an_unknown_preference_loss_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))
    assert train.main(["--preference-loss", "ipo", "--output-dir", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == "error: --preference-loss must be one of dpo, orpo, got 'ipo'"
    assert not (tmp_path / "r").exists()


def test_target_that_matches_no_module_fails_before_the_weights_load(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))
    code = train.main(["--preset", "cpu-sft", "--model", str(tiny_model_dir), "--targets", "qkv", "--output-dir", str(tmp_path / "r")])
    assert code == 2
    assert capsys.readouterr().err.strip().startswith("error: no linear layer matches targets ['qkv']; linear layers in this model are named")


def test_presets_and_overrides():
    config, _, given = train.parse_args(["--preset", "t4", "--lr", "1e-4"])
    assert config.model == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert (config.rank, config.alpha, config.batch_size, config.grad_accum, config.epochs) == (16, 32.0, 2, 8, 2.0)
    assert (config.precision, config.grad_checkpointing, config.num_examples, config.max_length) == ("fp16", True, 3000, 512)
    assert config.lr == 1e-4
    assert given == {"preset", "lr"}
    default, _, given = train.parse_args([])
    assert (default.preset, default.output_dir, given) == ("cpu", "runs/cpu", set())


def test_scope_borderline_and_safety_weights_become_the_losss_topic_weights():
    assert train.scope_weights(1.0) == {}  # nothing weighted
    assert train.scope_weights(2.0) == {"out_of_domain": 2.0, "borderline": 2.0, "safety": 2.0}
    assert train.scope_weights(1.0, 3.0) == {"borderline": 3.0}  # --borderline-weight alone
    assert train.scope_weights(2.0, 1.0) == {"out_of_domain": 2.0, "safety": 2.0}  # borderline rows back at 1
    assert train.scope_weights(1.0, 3.0, 2.0) == {"borderline": 3.0, "safety": 2.0}
    config, _, given = train.parse_args(["--borderline-weight", "3", "--safety-weight", "2"])
    assert (config.borderline_weight, config.safety_weight, given) == (3.0, 2.0, {"borderline_weight", "safety_weight"})


def test_config_file_gives_the_defaults_and_flags_override_it(tmp_path, capsys):
    saved, _, _ = train.parse_args(["--preset", "t4", "--rank", "4"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved.to_json()))
    config, _, given = train.parse_args(["--config", str(path), "--lr", "3e-4"])
    assert (config.preset, config.rank, config.lr, config.batch_size) == ("t4", 4, 3e-4, 2)
    assert given == {"lr"}
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(path), "--preset", "cpu"])
    assert "--preset and --config both give the defaults" in capsys.readouterr().err
    path.write_text(json.dumps({**saved.to_json(), "learning_rate": 1}))
    assert train.main(["--config", str(path)]) == 2
    assert f"--config {path}: unknown setting 'learning_rate'" in capsys.readouterr().err


# ---- end to end on the tiny model ---------------------------------------------------------------

def run(tiny_model_dir, out, *extra):
    args = ["--preset", "cpu-sft", "--model", str(tiny_model_dir), "--num-examples", "120", "--output-dir", str(out), "--max-steps", "6",
            "--batch-size", "4", "--grad-accum", "2", "--eval-every", "2", "--save-every", "2", "--keep-last", "10",
            "--lr", "5e-3", *extra]
    return train.main(args)


def test_the_scope_gate_is_fitted_on_the_saved_adapter_or_not_at_all(tiny_model_dir, tmp_path, capsys):
    from pathlib import Path

    from lora.adapter_files import WEIGHTS_NAME
    from medlora.checkpoint import file_sha256
    from medlora.scope_gate import GATE_FILE, ScopeGate

    out = tmp_path / "run"
    assert run(tiny_model_dir, out) == 0  # the embedded rows hold declines: a gate
    gate = ScopeGate.load(out / "adapter")  # refused unless bound to this very adapter file
    assert gate.adapter_sha256 == file_sha256(out / "adapter" / WEIGHTS_NAME)
    assert json.loads((out / "summary.json").read_text())["gate_time_s"] > 0
    assert "[gate] scope gate fitted in" in capsys.readouterr().out

    fixture = Path(__file__).resolve().parent / "fixtures" / "golden_rows.jsonl"
    medical = [line for line in fixture.read_text().splitlines() if '"out_of_domain"' not in line]
    data = tmp_path / "medical.jsonl"
    data.write_text("\n".join(medical) + "\n")
    args = ["--preset", "cpu-sft", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / "medical"), "--max-steps", "1",
            "--batch-size", "4", "--eval-every", "1", "--save-every", "1"]
    assert train.main(args) == 0
    assert not (tmp_path / "medical" / "adapter" / GATE_FILE).exists()
    assert "no out-of-scope rows" in capsys.readouterr().out
    assert json.loads((tmp_path / "medical" / "summary.json").read_text())["gate_time_s"] == 0.0


def records(run_dir, *keys):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in keys if k in r} | {"step": r["step"]} for r in lines]


def test_run_folder_contents(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert run(tiny_model_dir, out) == 0
    assert {p.name for p in out.iterdir()} >= {"config.json", "metrics.jsonl", "adapter", "checkpoints", "loss_curve.png", "summary.json"}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004", "step-000006"]
    assert {p.name for p in (out / "checkpoints" / "step-000006").iterdir()} == {
        "adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors", "rng.safetensors",
        "trainer_state.json", "config.json", "manifest.json",
    }
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "val_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6] and [r["step"] for r in evals] == [0, 2, 4, 6]
    assert set(steps[0]) >= {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"}
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]  # it learns
    assert math.isclose(evals[0]["val_ppl"], math.exp(evals[0]["val_loss"]))


def test_existing_run_folder_is_refused_without_resume_or_overwrite(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert run(tiny_model_dir, out) == 2
    assert "already holds a run; pass --resume auto" in capsys.readouterr().err


def test_resume_is_bit_exact(tiny_model_dir, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert run(tiny_model_dir, full) == 0
    shutil.copytree(full, resumed)
    for later in ("step-000004", "step-000006"):
        shutil.rmtree(resumed / "checkpoints" / later)
    assert run(tiny_model_dir, resumed, "--resume", "auto") == 0
    keys = ("loss", "lr", "grad_norm", "tokens", "val_loss")
    assert records(resumed, *keys) == records(full, *keys)
    for name in ("adapter_model.safetensors",):
        a = load_file(full / "checkpoints" / "step-000006" / name)
        b = load_file(resumed / "checkpoints" / "step-000006" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_a_finished_run_changes_nothing_and_exits_0(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert run(tiny_model_dir, out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert run(tiny_model_dir, out, "--resume", "auto") == 0  # the loop has no step left to run
    again = json.loads((out / "summary.json").read_text())
    assert again["train_loss"] == summary["train_loss"] is not None
    assert again["steps"] == summary["steps"] == 6


def test_fp16_amp_on_cpu_saves_and_restores_scaler(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "fp16"
    assert run(tiny_model_dir, out, "--precision", "fp16", "--max-steps", "4") == 0
    losses = [r["loss"] for r in records(out, "loss") if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    state = json.loads((out / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["scaler"]["scale"] > 0 and "_growth_tracker" in state["scaler"]
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in adapter.values())
    # Give the step-2 checkpoint a distinctive scaler state, then resume from it.
    shutil.rmtree(out / "checkpoints" / "step-000004")
    step2 = out / "checkpoints" / "step-000002"
    state = json.loads((step2 / "trainer_state.json").read_text())
    state["scaler"].update(scale=512.0, _growth_tracker=7)
    (step2 / "trainer_state.json").write_text(json.dumps(state))
    write_manifest(step2)
    captured = {}
    original = train.load_checkpoint

    def spy(folder, model, optimizer, scaler, **kwargs):
        result = original(folder, model, optimizer, scaler, **kwargs)
        captured.update(scaler.state_dict())
        return result

    monkeypatch.setattr(train, "load_checkpoint", spy)
    assert run(tiny_model_dir, out, "--precision", "fp16", "--max-steps", "4", "--resume", "auto") == 0
    assert (captured["scale"], captured["_growth_tracker"]) == (512.0, 7)


def test_gradient_accumulation_2x8_equals_one_batch_of_16(tiny_model_dir, tmp_path):
    """The loop divides each micro-batch's summed NLL by the whole step's target tokens, so cutting a
    step into micro-batches changes neither its loss nor its gradient (a mean of per-micro-batch
    means would: these steps mix answers of different lengths)."""
    def first_step(out, batch_size, grad_accum):
        argv = ["--preset", "cpu-sft", "--model", str(tiny_model_dir), "--num-examples", "40", "--output-dir", str(out), "--max-steps", "1",
                "--batch-size", str(batch_size), "--grad-accum", str(grad_accum), "--max-batch-tokens", "0",
                "--dropout", "0", "--precision", "fp32"]
        assert train.main(argv) == 0
        return next(r for r in records(out, "loss", "grad_norm", "tokens") if "loss" in r)

    whole, accumulated = first_step(tmp_path / "16x1", 16, 1), first_step(tmp_path / "2x8", 2, 8)
    assert whole["tokens"] == accumulated["tokens"]
    assert accumulated["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert accumulated["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)


def test_without_validation_rows_no_val_numbers_are_logged(tiny_model_dir, tmp_path, capsys):
    rows = tmp_path / "one.jsonl"
    rows.write_text(json.dumps({"question": "What does insulin do?", "answer": "It lowers blood glucose by moving it into cells."}) + "\n")
    out = tmp_path / "run"
    argv = ["--preset", "cpu-sft", "--model", str(tiny_model_dir), "--data", str(rows), "--output-dir", str(out), "--epochs", "2", "--eval-every", "1"]
    assert train.main(argv) == 0
    printed = capsys.readouterr().out
    assert "[eval] no validation rows: no validation loss is logged" in printed
    assert "val loss" not in printed.replace("best val loss n/a (no validation rows)", "")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and not any("val_loss" in r for r in lines)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_val_loss"] is None and summary["best_val_ppl"] is None and summary["steps"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()  # the latest adapter, for evaluate.py and chat.py


def test_resume_refuses_a_flag_that_differs_from_the_run(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(tiny_model_dir, out, "--max-steps", "2") == 0
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert run(tiny_model_dir, out, "--max-steps", "2", "--resume", "auto", "--lr", "1e-2") == 2
    [error] = capsys.readouterr().err.strip().splitlines()
    assert error.startswith("error: --lr 0.01 differs from the resumed run's 0.005 (") and "config.json" in error
    assert (out / "metrics.jsonl").read_text() == before  # nothing was touched
    assert run(tiny_model_dir, out, "--max-steps", "2", "--resume", "auto") == 0  # the same flags resume


@pytest.mark.parametrize("variant, flags", [("rslora", {"use_rslora": True, "use_dora": False}), ("dora", {"use_rslora": False, "use_dora": True})])
def test_lora_variant_flag_trains_and_is_written_to_the_adapter(tiny_model_dir, tmp_path, variant, flags):
    out = tmp_path / "run"
    assert run(tiny_model_dir, out, "--lora-variant", variant, "--max-steps", "2", "--eval-every", "2") == 0
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert {key: adapter_config[key] for key in flags} == flags
    assert json.loads((out / "config.json").read_text())["lora_variant"] == variant
    magnitudes = [key for key in load_file(out / "adapter" / "adapter_model.safetensors") if "lora_magnitude_vector" in key]
    assert bool(magnitudes) == (variant == "dora")


DPO = ("--dpo-epochs", "1", "--dpo-pairs-per-step", "6", "--dpo-answer-rows", "6", "--dpo-lr", "5e-3", "--dpo-max-ppl-increase", "10")


def test_the_preference_stage_follows_sft_and_logs_its_rewards(tiny_model_dir, tmp_path, capsys):
    from medlora.preference import load_pairs

    out = tmp_path / "run"
    assert run(tiny_model_dir, out, *DPO) == 0
    printed = capsys.readouterr().out
    assert "[dpo] the SFT model's own answers on its training rows already do what the row asks: decline 0/" in printed
    pairs = load_pairs(out)
    assert pairs and all(p.reference_chosen_logp < 0 and p.reference_rejected_logp < 0 for p in pairs)
    assert {p.kind for p in pairs} >= {"decline", "answer"} and all(p.rejected_from in ("model", "base", "decline", "referral") for p in pairs)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    dpo = [r for r in lines if r.get("stage") == "dpo"]
    assert [r["step"] for r in dpo] == list(range(7, 7 + math.ceil(len(pairs) / 6)))  # after the 6 SFT steps
    for r in dpo:
        assert r["margin"] == pytest.approx(r["chosen_reward"] - r["rejected_reward"]) and 0 <= r["accuracy"] <= 1
    assert dpo[0]["lr"] == pytest.approx(5e-3) and dpo[-1]["lr"] < dpo[0]["lr"]  # its own schedule, from --dpo-lr (1 warmup step)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == dpo[-1]["step"] and summary["adapter_step"] == dpo[-1]["step"]  # kept: within the (loose) bound
    preference = json.loads((out / "preference.json").read_text())
    assert sum(preference["pairs"][kind] for kind in ("decline", "answer", "emergency", "clinician")) == len(pairs)


def test_resume_inside_the_preference_stage_is_bit_exact(tiny_model_dir, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert run(tiny_model_dir, full, *DPO, "--save-every", "1", "--keep-last", "40") == 0
    steps = json.loads((full / "summary.json").read_text())["steps"]
    assert steps >= 9
    shutil.copytree(full, resumed)
    for later in range(8, steps + 1):  # keep step 7, the stage's first step: resume inside the stage
        shutil.rmtree(resumed / "checkpoints" / f"step-{later:06d}")
    assert run(tiny_model_dir, resumed, *DPO, "--save-every", "1", "--keep-last", "40", "--resume", "auto") == 0
    keys = ("loss", "lr", "grad_norm", "tokens", "val_loss", "chosen_reward", "rejected_reward")
    assert records(resumed, *keys) == records(full, *keys)
    last = f"step-{steps:06d}"
    a = load_file(full / "checkpoints" / last / "adapter_model.safetensors")
    b = load_file(resumed / "checkpoints" / last / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_orpo_skips_the_reference_pass_logs_the_preference_metrics_and_resumes(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from medlora.preference import load_pairs

    monkeypatch.setattr(train, "with_reference_logps", lambda *a, **k: pytest.fail("ORPO ran the reference pass"))
    orpo = (*DPO, "--preference-loss", "orpo", "--save-every", "1", "--keep-last", "40")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert run(tiny_model_dir, full, *orpo) == 0
    printed = capsys.readouterr().out
    assert "[dpo] orpo loss, " in printed and ", lambda 0.1, " in printed and "no reference pass: orpo)" in printed
    assert json.loads((full / "config.json").read_text())["preference_loss"] == "orpo"
    pairs = load_pairs(full)
    assert pairs and all(p.reference_chosen_logp is None and p.reference_rejected_logp is None for p in pairs)  # null in pairs.jsonl
    dpo = [r for r in records(full, "stage", "loss", "chosen_reward", "rejected_reward", "margin", "accuracy") if r.get("stage") == "dpo"]
    assert [r["step"] for r in dpo] == list(range(7, 7 + math.ceil(len(pairs) / 6)))  # after the 6 SFT steps
    for r in dpo:
        assert math.isfinite(r["loss"]) and r["chosen_reward"] < 0 and r["rejected_reward"] < 0  # lambda * mean log-probability
        assert r["margin"] == pytest.approx(r["chosen_reward"] - r["rejected_reward"]) and 0 <= r["accuracy"] <= 1

    steps = json.loads((full / "summary.json").read_text())["steps"]
    shutil.copytree(full, resumed)
    for later in range(8, steps + 1):  # keep step 7, the stage's first step: resume inside the stage
        shutil.rmtree(resumed / "checkpoints" / f"step-{later:06d}")
    before = (resumed / "metrics.jsonl").read_text()
    assert run(tiny_model_dir, resumed, *DPO, "--save-every", "1", "--keep-last", "40", "--resume", "auto", "--preference-loss", "dpo") == 2
    [error] = capsys.readouterr().err.strip().splitlines()
    assert error.startswith("error: --preference-loss 'dpo' differs from the resumed run's 'orpo' (")
    assert (resumed / "metrics.jsonl").read_text() == before  # nothing was touched
    assert run(tiny_model_dir, resumed, *DPO, "--save-every", "1", "--keep-last", "40", "--resume", "auto") == 0  # config.json says orpo
    keys = ("loss", "lr", "grad_norm", "tokens", "val_loss", "chosen_reward", "rejected_reward")
    assert records(resumed, *keys) == records(full, *keys)
