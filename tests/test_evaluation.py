"""evaluation.py and evaluate.py: perplexity, run-folder defaults, reports, errors, experiments."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evaluate as evaluate_script
from data import EncodedExample, clean_rows, collate, encode_example, load_rows, prepare_data
from evaluation import (
    HELDOUT_OOD_QUESTIONS,
    METRICS,
    EvalSettings,
    ModelOutputs,
    evaluation_examples,
    example_nlls,
    generation_settings,
    load_experiments,
    paired_deltas,
    resolve_settings,
)
from lora import inject_lora, lora_layers, save_adapter
from metrics import token_nll
from tests.conftest import make_tiny_model
from training import TrainConfig, answer_nll

PAD = 2
TRANSITIONS = [  # P[current token][next token]; token 2 is padding
    [0.5, 0.25, 0.25],
    [0.25, 0.5, 0.25],
    [1 / 3, 1 / 3, 1 / 3],
]


class BigramModel(torch.nn.Module):
    """A stub with the `.model(...)` / `.lm_head` shape answer_nll expects: logits at t = log P[token_t].

    The hidden state is the one-hot of the current token and lm_head's weight is log P transposed,
    so the NLL of token b after token a is exactly -log P[a][b].
    """

    def __init__(self):
        super().__init__()
        self.lm_head = torch.nn.Linear(3, 3, bias=False)
        self.lm_head.weight.data = torch.log(torch.tensor(TRANSITIONS)).T.contiguous()

    def model(self, input_ids, attention_mask=None, **cache_arguments):
        return SimpleNamespace(last_hidden_state=torch.nn.functional.one_hot(input_ids, 3).float())


def toy_example(ids: list[int], prompt_length: int) -> EncodedExample:
    labels = [-100] * prompt_length + ids[prompt_length:]
    return EncodedExample(ids, labels, prompt_length, question="q", answer="a")


def outputs_with(nll: np.ndarray, answers=("",), references=("",), declines=()) -> ModelOutputs:
    answers, references = list(answers) * (len(nll) // len(answers)), list(references) * (len(nll) // len(references))
    rouge = {name: np.zeros(len(nll)) for name in ("rouge1", "rouge2", "rougeL")}
    return ModelOutputs(answers, references, nll, rouge, ["x"] * len(declines), np.array(declines, dtype=float))


# ---- perplexity -------------------------------------------------------------------------------

def test_answer_only_and_full_perplexity_count_what_they_should():
    # A = [0, 0 | 1, 1]: answer targets 1|0 (P .25) and 1|1 (P .5); full adds 0|0 (P .5).
    # B = [1 | 0]: one target, 0|1 (P .25), the same for both.
    examples = [toy_example([0, 0, 1, 1], 2), toy_example([1, 0], 1)]
    table = example_nlls(BigramModel(), examples, PAD)
    expected = [[math.log(8), 2, math.log(16), 3], [math.log(4), 1, math.log(4), 1]]
    np.testing.assert_allclose(table, expected, rtol=1e-6)
    outputs = outputs_with(table)
    both = np.arange(2)
    # exp(sum NLL / sum tokens), not the mean of per-example perplexities (sqrt(8)+4)/2 = 3.41.
    assert METRICS["perplexity"].of_indices(outputs, both) == pytest.approx(32 ** (1 / 3))
    assert METRICS["perplexity_full"].of_indices(outputs, both) == pytest.approx(64 ** (1 / 4))


@pytest.fixture(scope="module")
def real_examples(tokenizer):
    pairs, _ = clean_rows(load_rows(None).rows[:30], "embedded")
    return [encode_example(tokenizer, p.question, p.answer, 512) for p in pairs[:6]]


def test_batched_perplexity_keeps_each_example_apart(real_examples, tokenizer):
    model = make_tiny_model()
    one_at_a_time = example_nlls(model, real_examples, tokenizer.pad_token_id, max_batch_tokens=1)  # a batch per example
    batched = example_nlls(model, real_examples, tokenizer.pad_token_id, max_batch_tokens=10_000)  # one padded batch
    assert len({len(e.input_ids) for e in real_examples}) > 1  # so the batch really is padded
    np.testing.assert_array_equal(batched[:, [1, 3]], one_at_a_time[:, [1, 3]])
    np.testing.assert_allclose(batched[:, [0, 2]], one_at_a_time[:, [0, 2]], rtol=1e-5)


def test_perplexity_pooled_over_examples_equals_one_padded_batch(real_examples, tokenizer):
    model = make_tiny_model()
    table = example_nlls(model, real_examples, tokenizer.pad_token_id)
    batch = collate(real_examples, tokenizer.pad_token_id)
    assert len({len(e.input_ids) for e in real_examples}) > 1  # the one batch really is padded
    with torch.no_grad():
        answer_sum, answer_count = answer_nll(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # The reference notebook's labels: input_ids, -100 on padding.
    full_sum, full_count = token_nll(logits, batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    assert table[:, 1].sum() == answer_count == sum(e.answer_token_count for e in real_examples)
    assert table[:, 3].sum() == full_count == sum(len(e.input_ids) - 1 for e in real_examples)
    assert table[:, 0].sum() == pytest.approx(answer_sum.item(), rel=1e-5)
    assert table[:, 2].sum() == pytest.approx(full_sum, rel=1e-5)


def test_paired_delta_of_a_model_with_itself_is_exactly_zero():
    outputs = outputs_with(np.array([[3.0, 2, 5.0, 4]] * 3), ["the drug blocks the channel"], ["a drug blocks a channel"], [1, 0])
    deltas = paired_deltas(outputs, outputs)
    for name in METRICS:
        assert deltas[name]["value"] == 0.0 and deltas[name]["interval"] == [0.0, 0.0]
        assert not deltas[name]["excludes_zero"]


# ---- settings -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    """A train.py-shaped run folder: config.json and adapter/ (random B, so fine-tuned != base)."""
    folder = tmp_path_factory.mktemp("run")
    config = TrainConfig(model=str(tiny_model_dir), num_examples=100, seed=7, max_length=256, output_dir=str(folder))
    (folder / "config.json").write_text(json.dumps(config.to_json()))
    model = make_tiny_model()
    inject_lora(model, rank=4, alpha=8, dropout=0.0)
    torch.manual_seed(1)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    save_adapter(model, folder / "adapter", base_model="an/adapter-config-name")
    return folder


def test_run_folder_config_gives_the_defaults_and_flags_override_it(run_dir, tiny_model_dir, tokenizer):
    settings = resolve_settings({"adapter": str(run_dir / "adapter")})
    assert (settings.model, settings.data, settings.num_examples, settings.seed, settings.max_length) == (
        str(tiny_model_dir), None, 100, 7, 256)
    assert settings.sources["seed"] == str(run_dir / "config.json")
    assert settings.output == str(run_dir / "eval.json")
    assert settings.model_keys == ["finetuned"]
    # The same split as training: prepare_data with the run's arguments.
    expected = prepare_data(tokenizer, None, 100, 7, 256).examples.test
    assert [e.question for e in evaluation_examples(tokenizer, settings)] == [e.question for e in expected]

    override = resolve_settings({"adapter": str(run_dir / "adapter"), "seed": 3, "compare_base": True})
    assert override.seed == 3
    assert override.sources["seed"] == "--seed; the run used 7, so this split may hold training rows"
    assert override.model_keys == ["finetuned", "base"]


def test_without_a_run_folder_the_model_comes_from_the_adapter_config(run_dir, tmp_path):
    lone = tmp_path / "lone-adapter"
    lone.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (lone / name).write_bytes((run_dir / "adapter" / name).read_bytes())
    settings = resolve_settings({"adapter": str(lone)})
    assert settings.model == "an/adapter-config-name" and settings.seed == TrainConfig().seed
    assert settings.output == "eval.json"
    assert resolve_settings({}).model_keys == ["base"]


def test_sampling_flags_need_sample_and_default_to_the_split_seed():
    with pytest.raises(ValueError, match="--temperature only apply with --sample"):
        generation_settings({"temperature": 0.5}, seed=42)
    sampled = generation_settings({"sample": True, "max_new_tokens": 50}, seed=42)
    assert (sampled.temperature, sampled.top_p, sampled.seed, sampled.max_new_tokens) == (0.7, 0.9, 42, 50)
    assert generation_settings({}, seed=42).greedy


def test_heldout_ood_questions_are_new_to_the_embedded_dataset():
    asked = {" ".join(str(row.get("input", "")).lower().split()) for row in load_rows(None).rows}
    assert len(set(HELDOUT_OOD_QUESTIONS)) == len(HELDOUT_OOD_QUESTIONS) >= 15
    assert not [q for q in HELDOUT_OOD_QUESTIONS if " ".join(q.lower().split()) in asked]


# ---- the script -------------------------------------------------------------------------------

MODEL_KEYS = {"perplexity", "perplexity_full", "bleu", "rouge1", "rouge2", "rougeL", "ood_decline_rate", "n", "intervals"}


def test_compare_base_writes_json_predictions_chart_and_table(run_dir, capsys):
    argv = ["--adapter", str(run_dir / "adapter"), "--compare-base", "--limit", "4", "--max-new-tokens", "8"]
    assert evaluate_script.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| Metric | Base | Fine-tuned | Delta (fine-tuned - base) |" in printed
    report = json.loads((run_dir / "eval.json").read_text())
    assert set(report) == {"settings", "base", "finetuned", "delta"}
    for key in ("base", "finetuned"):
        assert MODEL_KEYS <= set(report[key]) and report[key]["n"] == 4
        assert set(report[key]["intervals"]) == set(METRICS)
        low, high = report[key]["intervals"]["perplexity"]
        assert low <= report[key]["perplexity"] <= high
    assert report["base"]["perplexity"] != report["finetuned"]["perplexity"]  # the adapter was merged
    assert report["settings"]["seed"] == 7 and report["settings"]["limit"] == 4
    assert set(report["delta"]["bleu"]) == {"value", "interval", "excludes_zero"}
    rows = [json.loads(line) for line in (run_dir / "eval_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 + len(HELDOUT_OOD_QUESTIONS)
    assert {"question", "reference", "base", "finetuned"} <= set(rows[0])
    assert (run_dir / "eval_metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "eval.md").read_text().startswith("| Metric |")


def test_without_an_adapter_only_the_base_model_is_evaluated(tiny_model_dir, tmp_path):
    output = tmp_path / "base.json"
    argv = ["--model", str(tiny_model_dir), "--num-examples", "60", "--limit", "2", "--max-new-tokens", "4", "--output", str(output)]
    assert evaluate_script.main(argv) == 0
    assert set(json.loads(output.read_text())) == {"settings", "base"}


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
    assert evaluate_script.main(make_argv(run_dir, tmp_path)) == 2
    stderr = capsys.readouterr().err
    [error] = stderr.strip().splitlines()  # exactly one line
    assert error.startswith("error: ") and message in error
    assert "Traceback" not in stderr


def test_experiments_train_evaluate_and_write_the_table(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "EXP-T"
    experiment = {
        "name": "EXP-T", "preset": "cpu", "model": str(tiny_model_dir), "num_examples": 60, "max_steps": 2,
        "batch_size": 4, "rank": 4, "lr": 1e-3, "epochs": 1, "eval_every": 2, "save_every": 2, "output_dir": str(run),
    }
    plan = tmp_path / "tiny.json"
    plan.write_text(json.dumps([experiment]))
    argv = ["--experiments", str(plan), "--limit", "2", "--max-new-tokens", "4", "--output", str(tmp_path / "table.json")]
    assert evaluate_script.main(argv) == 0
    table = (tmp_path / "table.md").read_text()
    header = table.splitlines()[0]
    for column in ("r", "LR", "Epochs", "Train loss", "Val loss", "ROUGE-1", "BLEU", "Perplexity", "Peak memory (GB)", "Time (min)"):
        assert f"| {column} |" in header
    row = json.loads((tmp_path / "table.json").read_text())["experiments"][0]
    assert row["name"] == "EXP-T" and row["r"] == 4 and row["steps"] == 2 and row["n"] == 2
    assert all(row[key] is not None for key in ("train_loss", "val_loss", "rouge1", "bleu", "perplexity", "peak_memory_gb", "time_min"))
    assert set(json.loads((run / "eval.json").read_text())) == {"settings", "finetuned"}

    capsys.readouterr()
    assert evaluate_script.main(argv) == 0  # a finished run of the same config is evaluated, not retrained
    assert "reusing the finished run" in capsys.readouterr().out


def test_experiments_file_errors_name_the_experiment_and_key(tmp_path, capsys):
    plan = tmp_path / "bad.json"
    plan.write_text(json.dumps([{"name": "EXP-X", "rank": 8, "learning_rate": 1e-3}]))
    assert evaluate_script.main(["--experiments", str(plan)]) == 2
    assert "EXP-X: unknown key 'learning_rate'" in capsys.readouterr().err
    assert evaluate_script.main(["--experiments", str(plan), "--adapter", "x"]) == 2
    assert "--adapter cannot be combined with --experiments" in capsys.readouterr().err


def test_settings_are_json_serializable():
    settings = EvalSettings(model=None, adapter=None, data=None, num_examples=None, seed=1, max_length=64)
    assert json.loads(json.dumps(settings.to_json()))["generation"]["max_new_tokens"] == 200


def test_shipped_experiment_files_hold_the_reference_four():
    for path, preset in (("experiments/reference_t4.json", "t4"), ("experiments/cpu.json", "cpu")):
        experiments = load_experiments(path)
        assert [name for name, _ in experiments] == ["EXP-01", "EXP-02", "EXP-03", "EXP-04"]
        assert [c.rank for _, c in experiments] == [8, 16, 16, 16]
        assert all(c.preset == preset for _, c in experiments)
        epochs = [c.epochs for _, c in experiments]
        assert epochs == pytest.approx([epochs[0], 2 * epochs[0], 2 * epochs[0], 3 * epochs[0]])  # 1 : 2 : 2 : 3
        lrs = [c.lr for _, c in experiments]
        assert lrs == pytest.approx([4 * lrs[2], 4 * lrs[2], lrs[2], 4 * lrs[2]])  # EXP-03: a 4x lower learning rate
    t4 = load_experiments("experiments/reference_t4.json")
    assert [(c.lr, c.epochs, c.output_dir) for _, c in t4][0] == (2e-4, 1, "runs/experiments/EXP-01")
