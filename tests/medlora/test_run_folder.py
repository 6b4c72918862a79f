"""medlora/run_folder.py: creating or refusing a run folder, its config, metrics and summary files."""

import dataclasses
import json

import pytest

from medlora.config import TrainConfig
from medlora.run_folder import (
    append_metrics,
    centred_moving_average,
    finished_run_summary,
    prepare_run_dir,
    read_config,
    read_metrics,
    run_folder_of,
    save_loss_curve,
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
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["scope_repeats"]  # a run made before this setting existed: it had the default
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert finished_run_summary(config) == {"steps": 4}
    assert finished_run_summary(dataclasses.replace(config, scope_repeats=2)) is None


def test_centred_moving_average_by_hand():
    values = [4.0, 0.0, 2.0, 6.0, 3.0]
    # half width 1: [mean(4,0), mean(4,0,2), mean(0,2,6), mean(2,6,3), mean(6,3)]
    assert centred_moving_average(values, half_width=1) == [2.0, 2.0, 8 / 3, 11 / 3, 4.5]
    assert centred_moving_average(values, half_width=0) == values
    assert centred_moving_average(values, half_width=10) == [3.0] * 5  # every window holds all steps
    assert centred_moving_average([]) == []
    with pytest.raises(ValueError, match="half_width must be >= 0, got -1"):
        centred_moving_average(values, half_width=-1)


def test_loss_curve_draws_raw_and_smoothed_train_loss(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    for step, loss in enumerate([3.0, 2.0, 3.0, 2.0, 3.0, 2.0], start=1):
        append_metrics(tmp_path, {"step": step, "loss": loss})
    append_metrics(tmp_path, {"step": 6, "val_loss": 2.4})
    labels = []
    real_plot = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *args, **kwargs: labels.append(kwargs.get("label")) or real_plot(self, *args, **kwargs))
    save_loss_curve(tmp_path)
    assert labels == ["train loss (per step)", "train loss (9-step centred mean)", "validation loss"]
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
