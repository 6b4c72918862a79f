"""experiments/runner.py: experiment files, and the table."""

import json

import pytest

from experiments.runner import experiments_table, load_experiments


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


@pytest.mark.parametrize(
    "entries, message",
    [
        ([{"name": "EXP-X", "rank": 8, "learning_rate": 1e-3}], "EXP-X: unknown key 'learning_rate'"),
        ([{"name": "A"}, {"name": "A"}], 'experiment 1 needs a unique "name", got \'A\''),
        ([{"name": "EXP-P", "preset": "gpu"}], r"EXP-P: --preset must be one of \['cpu', 't4'\], got 'gpu'"),
        ([{"name": "EXP-R", "rank": 0}], "EXP-R: rank must be a positive integer, got 0"),  # refused before any training
        ({"name": "EXP-1"}, "expected a non-empty JSON list of objects"),
    ],
)
def test_experiment_file_errors_name_the_file_the_experiment_and_the_problem(tmp_path, entries, message):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=f"^{path}: {message}"):
        load_experiments(path)


def test_table_has_a_row_per_experiment_and_says_n_a_for_a_missing_value():
    row = {"name": "EXP-01", "r": 8, "lr": 0.001, "epochs": 0.1, "train_loss": 1.23456, "val_loss": None, "rouge1": 0.25,
           "bleu": 0.05, "perplexity": 12.345, "peak_memory_gb": 1.5, "time_min": 2.25, "n": 20}
    lines = experiments_table([row]).splitlines()
    assert lines[0].startswith("| Experiment | r | LR | Epochs | Train loss | Val loss |")
    assert lines[2] == "| EXP-01 | 8 | 0.001 | 0.1 | 1.2346 | n/a | 0.2500 | 0.0500 | 12.35 | 1.50 | 2.2 |"
    assert "on 20 held-out examples" in lines[-1]
