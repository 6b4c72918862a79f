"""medlora/checkpoint.py: a checkpoint reloads exactly, and damage is found before it is used."""

import torch

from lora import inject_lora, lora_parameters
from medlora.checkpoint import TrainState, load_checkpoint, rng_state, save_checkpoint, verify_checkpoint
from medlora.config import TrainConfig
from tests.conftest import make_tiny_model


def trained_once(seed: int):
    torch.manual_seed(seed)
    model = make_tiny_model()
    inject_lora(model, rank=4, alpha=8, dropout=0.0)
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    model(input_ids=torch.tensor([[1, 5, 9, 3]])).logits.sum().backward()
    optimizer.step()
    return model, optimizer


def test_save_then_load_restores_adapter_optimizer_rng_and_counters(tmp_path):
    model, optimizer = trained_once(0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = TrainState(step=3, best_val_loss=2.5, skipped_steps=1, elapsed_s=9.0, last_loss=2.75)
    config = TrainConfig(output_dir=str(tmp_path), keep_last=2)
    folder = save_checkpoint(tmp_path, model, optimizer, scaler, state, config, "base")
    assert folder.name == "step-000003" and verify_checkpoint(folder) is None
    expected_rng = rng_state()[0]["torch_cpu"]
    torch.rand(5)  # move the RNG on

    fresh, fresh_optimizer = trained_once(1)
    assert load_checkpoint(folder, fresh, fresh_optimizer, scaler) == state
    assert torch.equal(torch.get_rng_state(), expected_rng)
    for ours, saved in zip(lora_parameters(fresh), lora_parameters(model)):
        assert torch.equal(ours, saved)
    for ours, saved in zip(fresh_optimizer.state.values(), optimizer.state.values()):
        assert all(torch.equal(ours[key], saved[key]) for key in saved)


def test_damage_is_named_and_only_keep_last_checkpoints_stay(tmp_path):
    model, optimizer = trained_once(0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    config = TrainConfig(output_dir=str(tmp_path), keep_last=2)
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, model, optimizer, scaler, TrainState(step=step), config, "base")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000004", "step-000006"]
    weights = tmp_path / "checkpoints" / "step-000006" / "optimizer.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    assert verify_checkpoint(weights.parent) == f"{weights} has {weights.stat().st_size} bytes, expected {weights.stat().st_size + 1} (truncated?)"


def test_older_checkpoints_counters_load_without_the_ones_no_longer_kept():
    assert TrainState.from_json({"step": 5, "tokens_seen": 1234, "last_loss": 1.5}) == TrainState(step=5, last_loss=1.5)
