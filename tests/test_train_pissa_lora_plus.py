"""train.py with --lora-variant pissa and --lora-plus-ratio: the adapter on disk is the rank-2r LoRA
of the original base, the optimizer's two groups run at lr and lambda x lr, and resume is bit-exact
(the checkpoint's rank-2r file goes back into the PiSSA layers)."""

import json
import shutil

import torch
from safetensors.torch import load_file

from tests.test_train import records, run

PISSA_LORA_PLUS = ("--lora-variant", "pissa", "--lora-plus-ratio", "16", "--rank", "4", "--alpha", "8")


def test_pissa_with_lora_plus_saves_rank_2r_and_runs_b_at_lambda(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert run(tiny_model_dir, out, *PISSA_LORA_PLUS, "--max-steps", "2") == 0
    assert json.loads((out / "config.json").read_text())["lora_plus_ratio"] == 16.0
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["use_rslora"], adapter["use_dora"]) == (8, 16.0, False, False)
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 64)
    groups = json.loads((out / "checkpoints" / "step-000002" / "trainer_state.json").read_text())["optimizer"]["param_groups"]
    assert [group["lr_ratio"] for group in groups] == [1.0, 16.0]
    assert groups[1]["lr"] == 16 * groups[0]["lr"] > 0
    assert [len(group["params"]) for group in groups] == [4, 4]  # A of q_proj and v_proj in 2 layers; B of each


def test_pissa_with_lora_plus_resumes_bit_exactly(tiny_model_dir, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert run(tiny_model_dir, full, *PISSA_LORA_PLUS, "--max-steps", "4") == 0
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    assert run(tiny_model_dir, resumed, *PISSA_LORA_PLUS, "--max-steps", "4", "--resume", "auto") == 0
    keys = ("loss", "lr", "grad_norm", "val_loss")
    assert records(resumed, *keys) == records(full, *keys)
    a = load_file(full / "checkpoints" / "step-000004" / "adapter_model.safetensors")
    b = load_file(resumed / "checkpoints" / "step-000004" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
