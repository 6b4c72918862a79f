"""evaluate.py: reports on disk, base-only runs, one-line errors, and --experiments end to end."""

import json

import pytest

import evaluate
from medlora.evaluation.scores import METRICS
from data.scope_set import load_heldout
from tests.conftest import SCOPE_PROMPTS, save_run_folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    """A train.py-shaped run folder: config.json and adapter/ (random B, so fine-tuned != base)."""
    return save_run_folder(tmp_path_factory.mktemp("run"), tiny_model_dir)


MODEL_KEYS = {
    "perplexity", "perplexity_full", "bleu", "rouge1", "rouge2", "rougeL", "n", "intervals", "scope",
    "ood_decline_rate", "medical_false_decline_rate", "emergency_or_dose_referral_rate",
}


def test_compare_base_writes_json_predictions_chart_and_table(run_dir, capsys):
    argv = ["--adapter", str(run_dir / "adapter"), "--compare-base", "--limit", "4", "--max-new-tokens", "8", "--scope-set", str(SCOPE_PROMPTS)]
    assert evaluate.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| Metric | Base | Fine-tuned | Delta (fine-tuned - base) |" in printed
    report = json.loads((run_dir / "eval.json").read_text())
    assert set(report) == {"settings", "base", "finetuned", "delta", "grounding", "scope_confusion"}  # the tiny adapter has no gate
    assert "| Fine-tuned + cards in prompt |" in printed and "| Top-1 card alone |" in printed
    for key in ("base", "finetuned"):
        assert MODEL_KEYS <= set(report[key]) and report[key]["n"] == 4
        assert set(report[key]["intervals"]) == set(METRICS)
        low, high = report[key]["intervals"]["perplexity"]
        assert low <= report[key]["perplexity"] <= high
    assert report["base"]["perplexity"] != report["finetuned"]["perplexity"]  # the adapter was merged
    assert report["settings"]["seed"] == 7 and report["settings"]["limit"] == 4
    assert set(report["delta"]["bleu"]) == {"value", "interval", "excludes_zero"}
    rows = [json.loads(line) for line in (run_dir / "eval_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 + 4  # --limit 4 bounds the scope prompts too: one of each kind
    assert sorted(row["kind"] for row in rows if row["source"] == "scope_heldout") == sorted({p.kind for p in load_heldout(SCOPE_PROMPTS)})
    assert "| Scope rate | Base | Fine-tuned (model only) |" in printed
    assert sum(report["scope_confusion"]["finetuned"]["medical"].values()) == 1
    for name in ("ood_decline_rate", "medical_false_decline_rate", "emergency_or_dose_referral_rate"):
        assert report["finetuned"]["scope"][name]["total"] > 0 and name in report["delta"]
    for label in ("Out-of-domain decline rate", "Medical false-decline rate", "Emergency/dose referral rate"):
        assert f"| {label} |" in printed
    assert {"question", "reference", "base", "finetuned"} <= set(rows[0])
    assert (run_dir / "eval_metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "eval.md").read_text().startswith("| Metric |")


def test_without_an_adapter_only_the_base_model_is_evaluated(tiny_model_dir, tmp_path):
    output = tmp_path / "base.json"
    argv = ["--model", str(tiny_model_dir), "--num-examples", "60", "--limit", "2", "--max-new-tokens", "4", "--output", str(output),
            "--scope-set", str(SCOPE_PROMPTS)]
    assert evaluate.main(argv) == 0
    assert set(json.loads(output.read_text())) == {"settings", "base", "scope_confusion"}


def corrupt_adapter(run_dir, tmp_path):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = json.loads((run_dir / "config.json").read_text())["model"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(b"not safetensors at all")
    return ["--adapter", str(folder)]


@pytest.mark.parametrize(
    "make_argv, message",
    [
        (lambda run_dir, tmp: ["--adapter", str(tmp / "missing")], "adapter folder not found"),
        (corrupt_adapter, "not a readable safetensors file"),
        (lambda run_dir, tmp: ["--adapter", str(run_dir / "adapter"), "--data", str(tmp / "none.jsonl")], "file not found"),
        (lambda run_dir, tmp: ["--model", str(tmp / "no-model")], "no such folder"),
        (lambda run_dir, tmp: ["--adapter", str(run_dir / "adapter"), "--limit", "0"], "--limit must be a positive integer"),
    ],
    ids=["missing-adapter", "corrupt-adapter", "bad-data", "bad-model", "bad-limit"],
)
def test_user_errors_exit_2_with_one_line(make_argv, message, run_dir, tmp_path, capsys):
    assert evaluate.main(make_argv(run_dir, tmp_path)) == 2
    stderr = capsys.readouterr().err
    [error] = stderr.strip().splitlines()  # exactly one line
    assert error.startswith("error: ") and message in error
    assert "Traceback" not in stderr


def test_experiments_train_evaluate_and_write_the_table(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "EXP-T"
    experiment = {
        "name": "EXP-T", "preset": "cpu-sft", "model": str(tiny_model_dir), "num_examples": 60, "max_steps": 2,
        "batch_size": 4, "rank": 4, "lr": 1e-3, "epochs": 1, "eval_every": 2, "save_every": 2, "output_dir": str(run),
    }
    plan = tmp_path / "tiny.json"
    plan.write_text(json.dumps([experiment]))
    argv = ["--experiments", str(plan), "--limit", "2", "--max-new-tokens", "4", "--output", str(tmp_path / "table.json")]
    assert evaluate.main(argv) == 0
    table = (tmp_path / "table.md").read_text()
    header = table.splitlines()[0]
    for column in ("r", "Variant", "LR", "Epochs", "Train loss", "Val ppl", "Test ppl", "ROUGE-1", "ROUGE-L", "BLEU", "Peak memory (GB)", "Time (min)"):
        assert f"| {column} |" in header
    row = json.loads((tmp_path / "table.json").read_text())["experiments"][0]
    assert row["name"] == "EXP-T" and row["r"] == 4 and row["steps"] == 2 and row["n"] == 2
    assert all(row[key] is not None for key in ("train_loss", "val_ppl", "rouge1", "rougeL", "bleu", "perplexity", "peak_memory_gb", "time_min"))
    report = set(json.loads((run / "eval.json").read_text()))
    assert {"settings", "finetuned"} <= report and not report & {"base", "delta"}  # each experiment: its adapter alone

    capsys.readouterr()
    assert evaluate.main(argv) == 0  # a finished run of the same config is evaluated, not retrained
    assert "reusing the finished run" in capsys.readouterr().out


def test_experiments_file_errors_name_the_experiment_and_key(tmp_path, capsys):
    plan = tmp_path / "bad.json"
    plan.write_text(json.dumps([{"name": "EXP-X", "rank": 8, "learning_rate": 1e-3}]))
    assert evaluate.main(["--experiments", str(plan)]) == 2
    assert "EXP-X: unknown key 'learning_rate'" in capsys.readouterr().err
    assert evaluate.main(["--experiments", str(plan), "--adapter", "x"]) == 2
    assert "--adapter cannot be combined with --experiments" in capsys.readouterr().err


