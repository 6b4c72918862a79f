"""medlora/config.py: one check per setting with one message, presets, JSON round trip, resuming."""

import dataclasses

import pytest

from medlora.config import PRESETS, TrainConfig, config_from_preset, resumed_config


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rank": 0}, "rank must be a positive integer, got 0"),  # the LoRA layer's own check
        ({"alpha": -1.0}, "alpha must be a positive number, got -1.0"),  # likewise
        ({"lr": 0.0}, "--lr must be positive, got 0.0"),
        ({"batch_size": 0}, "--batch-size must be positive, got 0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),  # likewise
        ({"max_length": 8}, "--max-length must be at least 16 tokens, got 8"),  # the data pipeline's own check
        ({"num_examples": 0}, "--num-examples must be positive, got 0"),  # likewise
        ({"precision": "fp8"}, "--precision must be one of auto, fp32, fp16, bf16, got 'fp8'"),
        ({"preset": "gpu"}, r"--preset must be one of \['cpu', 'cpu-sft', 't4'\], got 'gpu'"),
        ({"targets": ()}, "--targets must name at least one module"),
        ({"preference_loss": "ipo"}, "--preference-loss must be one of dpo, orpo, got 'ipo'"),
        ({"lora_variant": "qlora"}, "variant must be one of lora, rslora, dora, pissa; got 'qlora'"),  # likewise
    ],
)
def test_invalid_settings_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**change).validate()


def test_every_preset_is_valid_and_flags_override_it():
    for name in PRESETS:
        config_from_preset(name).validate()
        assert config_from_preset(name).preference_loss == "dpo"
    config = config_from_preset("t4", lr=1e-4, targets=["q_proj"])
    assert (config.preset, config.lr, config.targets, config.rank) == ("t4", 1e-4, ("q_proj",), 16)
    with pytest.raises(ValueError, match=r"--preset must be one of \['cpu', 'cpu-sft', 't4'\], got 'gpu'"):
        config_from_preset("gpu")


def test_json_round_trip_and_unknown_keys():
    config = config_from_preset("t4", targets=["q_proj", "k_proj"], max_steps=7)
    assert TrainConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="runs/x/config.json: unknown setting 'learning_rate'"):
        TrainConfig.from_json({**config.to_json(), "learning_rate": 1e-3}, source="runs/x/config.json")


def test_resuming_keeps_the_saved_config_and_refuses_a_differing_flag():
    saved = TrainConfig(lr=5e-3, max_steps=6, output_dir="old")
    requested = TrainConfig(lr=5e-3, max_steps=6, output_dir="new", rank=8)  # rank not given: the run's stays
    resumed = resumed_config(saved, requested, given={"lr", "max_steps", "output_dir"}, source="ckpt/config.json")
    assert resumed == dataclasses.replace(saved, output_dir="new")
    with pytest.raises(ValueError, match=r"--rank 8 differs from the resumed run's 16 \(ckpt/config.json\)"):
        resumed_config(saved, requested, given={"rank"}, source="ckpt/config.json")
