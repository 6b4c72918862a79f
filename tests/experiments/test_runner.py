"""experiments/runner.py: experiment files, and the table."""

import dataclasses
import json

import pytest

from experiments.runner import adapter_means, experiments_table, load_experiments, saved_evaluation
from lora.inspect import inspect_adapter
from medlora.evaluation.settings import resolve_settings
from tests.conftest import make_tiny_model, save_tiny_adapter


def test_shipped_experiment_files_hold_the_reference_four():
    for path, preset in (("experiments/reference_t4.json", "t4"), ("experiments/cpu.json", "cpu-sft")):
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


@pytest.mark.parametrize(
    "entries, message",
    [
        ([{"name": "EXP-X", "rank": 8, "learning_rate": 1e-3}], "EXP-X: unknown key 'learning_rate'"),
        ([{"name": "A"}, {"name": "A"}], 'experiment 1 needs a unique "name", got \'A\''),
        ([{"name": "EXP-P", "preset": "gpu"}], r"EXP-P: --preset must be one of \['cpu', 'cpu-sft', 't4'\], got 'gpu'"),
        ([{"name": "EXP-R", "rank": 0}], "EXP-R: rank must be a positive integer, got 0"),  # refused before any training
        ({"name": "EXP-1"}, "expected a non-empty JSON list of objects"),
    ],
)
def test_experiment_file_errors_name_the_file_the_experiment_and_the_problem(tmp_path, entries, message):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=f"^{path}: {message}"):
        load_experiments(path)


def test_rank_study_pins_every_setting_and_repeats_one_cell_with_two_seeds():
    experiments = load_experiments("experiments/rank.json")
    cells = {(c.rank, c.lora_variant, c.seed) for _, c in experiments}
    assert cells == {(r, v, 42) for r in (4, 16, 64) for v in ("lora", "rslora", "dora")} | {(16, "lora", 43), (16, "lora", 44)}
    entries = json.loads(open("experiments/rank.json").read())
    pinned = set.intersection(*(set(entry) for entry in entries))
    assert {"model", "data", "epochs", "batch_size", "max_batch_tokens", "lr", "alpha", "dropout", "targets", "precision", "device"} <= pinned
    assert {(c.lr, c.alpha, c.dropout, c.targets, c.epochs) for _, c in experiments} == {(1e-3, 32.0, 0.05, ("q_proj", "v_proj"), 0.5)}


def test_rank_study_round_two_pins_round_one_settings_and_adds_pissa_and_lora_plus():
    experiments = load_experiments("experiments/rank2.json")
    cells = {(c.rank, c.lora_variant, c.lora_plus_ratio, c.seed) for _, c in experiments}
    r16 = {("lora", None), ("pissa", None), ("lora", 16.0), ("pissa", 16.0), ("rslora", 16.0), ("dora", 16.0)}
    seeds = {(16, "lora", None, s) for s in (43, 44)} | {(16, "lora", 16.0, s) for s in (43, 44)}
    assert cells == {(16, v, lp, 42) for v, lp in r16} | {(64, "rslora", 16.0, 42)} | seeds
    round_one = dict(load_experiments("experiments/rank.json"))["RANK-r16-lora"]
    for name, config in experiments:
        assert config.output_dir == f"runs/experiments/rank2/{name}"
        assert config.eval_every == 9, name  # validation at steps 0, 9, 18 and 27: the curve of the study's plot
        same = dataclasses.replace(config, rank=16, lora_variant="lora", lora_plus_ratio=None, seed=42, output_dir=round_one.output_dir,
                                   eval_every=round_one.eval_every)
        assert same == round_one, name  # everything else as round one: data, epochs, lr, alpha, fp32, ...


def test_table_has_a_row_per_experiment_and_says_n_a_for_a_missing_value():
    row = {"name": "EXP-01", "r": 8, "variant": "lora", "lora_plus_ratio": None, "seed": 42, "lr": 0.001, "epochs": 0.1, "train_loss": 1.23456,
           "val_ppl": None, "perplexity": 12.345, "rouge1": 0.25, "rougeL": 0.2, "bleu": 0.05, "s_per_step": 7.891,
           "trainable_params": 460800, "stable_rank": 1.234, "relative_norm": 0.01234, "magnitude_change": None,
           "peak_memory_gb": 1.5, "time_min": 2.25, "n": 20}
    lines = experiments_table([row]).splitlines()
    assert lines[0].startswith("| Experiment | r | Variant | LoRA+ λ | Seed | LR | Epochs | Train loss | Val ppl | Test ppl |")
    assert lines[2] == ("| EXP-01 | 8 | lora | n/a | 42 | 0.001 | 0.1 | 1.2346 | n/a | 12.345 | 0.2500 | 0.2000 | 0.0500 | 7.89 | "
                        "460,800 | 1.23 | 0.0123 | n/a | 1.50 | 2.2 |")
    assert "on 20 held-out examples" in lines[-1]


def test_an_evaluation_is_reused_only_with_the_same_settings(tmp_path):
    output = tmp_path / "eval.json"
    settings = resolve_settings({"output": str(output), "max_new_tokens": 64})
    assert saved_evaluation(settings) is None  # nothing saved yet
    output.write_text(json.dumps({"settings": settings.to_json(), "finetuned": {"perplexity": 9.0}}))
    assert saved_evaluation(settings)["finetuned"] == {"perplexity": 9.0}
    same_values_other_sources = resolve_settings({"output": str(output), "max_new_tokens": 64, "limit": None})
    same_values_other_sources.sources["generation"] = "another call"
    assert saved_evaluation(same_values_other_sources) is not None
    assert saved_evaluation(resolve_settings({"output": str(output), "max_new_tokens": 200})) is None
    output.write_text("{not json")
    assert saved_evaluation(settings) is None


def test_adapter_means_average_the_inspector_over_modules(tmp_path):
    base = tmp_path / "base"
    make_tiny_model().save_pretrained(base, safe_serialization=True)
    save_tiny_adapter(base, tmp_path / "adapter")
    means = adapter_means(tmp_path / "adapter", str(base))
    modules = inspect_adapter(tmp_path / "adapter", base)["modules"]
    assert means["stable_rank"] == pytest.approx(sum(m["stable_rank"] for m in modules) / len(modules))
    assert means["relative_norm"] == pytest.approx(sum(m["relative_norm"] for m in modules) / len(modules))
    assert means["magnitude_change"] is None  # plain LoRA has no magnitude vector


def test_median_step_seconds_ignores_a_burst_and_validation_records(tmp_path):
    from experiments.runner import median_step_seconds

    records = [{"step": 0, "val_loss": 2.0, "val_ppl": 7.4}]  # a validation record: no step time
    for step, elapsed in enumerate([4.0, 8.0, 12.0, 30.0, 34.0, 38.0]):  # one slow step (18 s): a burst of other work
        records.append({"step": step, "loss": 1.0, "elapsed_s": elapsed})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    assert median_step_seconds(tmp_path) == 4.0  # durations 4, 4, 18, 4, 4; the mean would say 6.8
    (tmp_path / "metrics.jsonl").write_text(json.dumps(records[1]) + "\n")
    assert median_step_seconds(tmp_path) is None
