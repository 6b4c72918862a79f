"""medlora/run_folder.py: creating or refusing a run folder, its config, metrics and summary files."""

import json

import pytest

from medlora.config import TrainConfig
from medlora.run_folder import (
    append_metrics,
    finished_run_summary,
    prepare_run_dir,
    read_config,
    read_metrics,
    run_folder_of,
    truncate_metrics,
    write_config,
    write_summary,
)


def test_a_folder_holding_a_run_is_refused_unless_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    assert prepare_run_dir(run_dir, resume=None, overwrite=False) is None and run_dir.is_dir()
    (run_dir / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match=f"--output-dir {run_dir} already holds a run; pass --resume auto"):
        prepare_run_dir(run_dir, resume=None, overwrite=False)
    assert prepare_run_dir(run_dir, resume=None, overwrite=True) is None
    assert list(run_dir.iterdir()) == []  # replaced


def test_resume_without_a_checkpoint_starts_from_step_0_or_names_the_bad_folder(tmp_path, capsys):
    assert prepare_run_dir(tmp_path / "run", resume="auto", overwrite=False) is None
    assert "no complete checkpoint" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--resume nowhere: not a usable checkpoint"):
        prepare_run_dir(tmp_path / "run", resume="nowhere", overwrite=False)


def test_config_round_trip_and_the_adapter_s_run_folder(tmp_path):
    config = TrainConfig(model="m", num_examples=50, seed=3, output_dir=str(tmp_path))
    write_config(tmp_path, config)
    assert read_config(tmp_path) == config
    assert run_folder_of(tmp_path / "adapter") == tmp_path and run_folder_of(tmp_path / "x" / "adapter") is None
    (tmp_path / "config.json").write_text(json.dumps({"model": "m"}))
    with pytest.raises(ValueError, match="not a train.py run config \\(needs the keys model, data, num_examples, seed, max_length\\)"):
        read_config(tmp_path)


def test_truncating_metrics_drops_what_an_interrupted_run_logged_after_the_checkpoint(tmp_path):
    for step in (0, 1, 2, 2, 3):
        append_metrics(tmp_path, {"step": step})
    truncate_metrics(tmp_path, 2)
    assert [record["step"] for record in read_metrics(tmp_path)] == [0, 1, 2, 2]


def test_a_finished_run_is_recognised_only_for_the_same_config(tmp_path):
    config = TrainConfig(output_dir=str(tmp_path), rank=8)
    write_config(tmp_path, config)
    write_summary(tmp_path, {"steps": 4})
    assert finished_run_summary(config) is None  # no adapter yet
    (tmp_path / "adapter").mkdir()
    assert finished_run_summary(config) == {"steps": 4}
    assert finished_run_summary(TrainConfig(output_dir=str(tmp_path), rank=16)) is None
