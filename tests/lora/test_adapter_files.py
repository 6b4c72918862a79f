"""lora/adapter_files.py: PEFT-format files, bit-identical round trips, and refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from lora import AdapterError, inject_lora, load_adapter, lora_layers, merge_lora, read_adapter, save_adapter
from tests.conftest import make_tiny_model, tiny_llama_config


def trained_like(model, seed=1):
    torch.manual_seed(seed)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_A)
        torch.nn.init.normal_(layer.lora_B, std=0.02)
    return model


@pytest.fixture
def saved_adapter(tmp_path):
    model = make_tiny_model()
    inject_lora(model, rank=4, alpha=8, dropout=0.0)
    trained_like(model)
    save_adapter(model, tmp_path / "adapter", base_model="tiny")
    return model, tmp_path / "adapter"


def test_file_layout_matches_peft(saved_adapter):
    _, folder = saved_adapter
    tensors = load_file(folder / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert tensors[key].shape == (32, 4)  # [out, r]
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)  # [r, in]
    assert len(tensors) == 8
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["bias"]) == (4, 8, "none")
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == "tiny"


def test_save_then_load_is_bit_identical(saved_adapter):
    model, folder = saved_adapter
    fresh = make_tiny_model()
    load_adapter(fresh, folder)
    original = dict(lora_layers(model))
    for name, layer in lora_layers(fresh):
        assert torch.equal(layer.lora_A, original[name].lora_A)
        assert torch.equal(layer.lora_B, original[name].lora_B)
    ids = torch.randint(0, 49152, (1, 7))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_shape_mismatch_names_key_and_both_shapes(saved_adapter):
    _, folder = saved_adapter
    other = make_tiny_model()
    inject_lora(other, rank=4, alpha=8)
    tensors = load_file(folder / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, 48)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"key .*layers\.0\.self_attn\.q_proj\.lora_A\.weight has shape \[4, 48\] in the adapter but \[4, 64\] in the model"):
        load_adapter(other, folder)


def test_missing_and_unexpected_keys(saved_adapter):
    _, folder = saved_adapter
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors.pop("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight")
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"missing key .*layers\.1\.self_attn\.q_proj\.lora_B\.weight"):
        load_adapter(make_tiny_model(), folder)
    tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 4)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"unexpected key .*layers\.9"):
        load_adapter(make_tiny_model(), folder)


def test_rank_or_target_mismatch_with_injected_model(saved_adapter):
    _, folder = saved_adapter
    model = make_tiny_model()
    inject_lora(model, rank=8, alpha=16)
    with pytest.raises(AdapterError, match=r"adapter is lora with r=4 on \['q_proj', 'v_proj'\], model has \['lora'\] with r=\[8\]"):
        load_adapter(model, folder)


def test_alpha_mismatch_with_injected_model_is_refused(saved_adapter):
    """Another alpha is another scale s = alpha / r: the adapter would compute something else."""
    _, folder = saved_adapter
    model = make_tiny_model()
    inject_lora(model, rank=4, alpha=16)
    with pytest.raises(AdapterError, match=r"model has \['lora'\] with r=\[4\] .*; lora_alpha 8 in the adapter, \[16\] in the model$"):
        load_adapter(model, folder)


def test_refuses_to_load_into_merged_layers(saved_adapter):
    model, folder = saved_adapter
    merge_lora(model)
    with pytest.raises(ValueError, match="call unmerge_lora first"):
        load_adapter(model, folder)


def write_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"r": 10**9}, r"r must be an integer in \[1, 4096\], got 1000000000"),
        ({"r": "16"}, r"r must be an integer .* got '16'"),
        ({"lora_alpha": -1}, "lora_alpha must be a positive number, got -1"),
        ({"lora_dropout": 2}, r"lora_dropout must be in \[0, 1\), got 2"),
        ({"target_modules": ["../../etc/passwd"]}, "target_modules must be a non-empty list of module names"),
        ({"target_modules": [{"a": 1}]}, "target_modules must be a non-empty list"),
        ({"peft_type": "IA3"}, "only 'LORA' is supported"),
        ({"bias": "all"}, "only 'none'"),
    ],
)
def test_crafted_config_is_refused(saved_adapter, changes, message):
    _, folder = saved_adapter
    write_config(folder, **changes)
    with pytest.raises(AdapterError, match=message):
        load_adapter(make_tiny_model(), folder)


def test_missing_folder_and_files(tmp_path, saved_adapter):
    with pytest.raises(AdapterError, match="adapter folder not found"):
        load_adapter(make_tiny_model(), tmp_path / "nope")
    _, folder = saved_adapter
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: missing"):
        load_adapter(make_tiny_model(), folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match=r"adapter_config\.json: not valid JSON"):
        load_adapter(make_tiny_model(), folder)


def test_truncated_weights_file_is_refused(saved_adapter):
    _, folder = saved_adapter
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: not a readable safetensors file"):
        load_adapter(make_tiny_model(), folder)


def test_non_finite_weights_are_refused(saved_adapter):
    _, folder = saved_adapter
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"][0, 0] = float("nan")
    save_file(tensors, path)
    with pytest.raises(AdapterError, match="holds NaN or infinite values"):
        load_adapter(make_tiny_model(), folder)


def test_bit_flip_in_weights_is_caught_by_the_header_checksum(saved_adapter):
    _, folder = saved_adapter
    path = folder / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: checksum mismatch"):
        load_adapter(make_tiny_model(), folder)


@pytest.mark.parametrize("variant", ["rslora", "dora"])
def test_variant_round_trips_through_peft_flags(tmp_path, variant):
    model = make_tiny_model()
    inject_lora(model, rank=4, alpha=8, dropout=0.0, variant=variant)
    trained_like(model)
    save_adapter(model, tmp_path, base_model="tiny")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["use_rslora"], config["use_dora"]) == (variant == "rslora", variant == "dora")
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    magnitude = "base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector"
    assert (magnitude in keys) == (variant == "dora") and len(keys) == (12 if variant == "dora" else 8)
    fresh = make_tiny_model()
    assert load_adapter(fresh, tmp_path)["variant"] == variant
    ids = torch.randint(0, 49152, (1, 7))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"use_dora": "yes"}, "use_dora must be true or false, got 'yes'"),
        ({"use_rslora": 1}, "use_rslora must be true or false, got 1"),
        ({"use_rslora": True, "use_dora": True}, r"use_rslora and use_dora are both true .* supported variants are lora, rslora"),
        ({"lora_bias": True}, "lora_bias=True is a PEFT option this project does not implement"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern=.* is a PEFT option this project does not implement"),
    ],
)
def test_unknown_or_contradictory_variant_in_config_is_refused(saved_adapter, changes, message):
    _, folder = saved_adapter
    write_config(folder, **changes)
    with pytest.raises(AdapterError, match=message):
        load_adapter(make_tiny_model(), folder)


def test_variant_mismatch_with_injected_model_and_missing_magnitude(saved_adapter):
    _, folder = saved_adapter
    model = make_tiny_model()
    inject_lora(model, rank=4, alpha=8, variant="dora")
    with pytest.raises(AdapterError, match=r"adapter is lora with r=4 .* model has \['dora'\] with r=\[4\]"):
        load_adapter(model, folder)
    write_config(folder, use_dora=True)  # a DoRA config over files that lack m
    with pytest.raises(AdapterError, match=r"missing key .*q_proj\.lora_magnitude_vector"):
        load_adapter(make_tiny_model(), folder)
    with pytest.raises(AdapterError, match=r"missing key .*q_proj\.lora_magnitude_vector"):
        read_adapter(folder)


def test_read_adapter_without_a_model_groups_tensors_and_checks_shapes(saved_adapter):
    model, folder = saved_adapter
    config, modules = read_adapter(folder)
    assert list(modules) == [name for name, _ in lora_layers(model)]
    assert set(modules["model.layers.0.self_attn.v_proj"]) == {"lora_A", "lora_B"}
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(3, 64)
    save_file(tensors, path)
    with pytest.raises(AdapterError, match=r"module model\.layers\.0\.self_attn\.q_proj has lora_A \[3, 64\], lora_B \[64, 4\]; r=4"):
        read_adapter(folder)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_E"] = torch.zeros(4)
    save_file(tensors, path)
    with pytest.raises(AdapterError, match=r"unexpected key .*q_proj\.lora_E \(not a lora adapter tensor\)"):
        read_adapter(folder)


def test_read_adapter_lists_modules_in_layer_order_not_text_order(tmp_path):
    config = tiny_llama_config()
    config.num_hidden_layers = 11
    model = LlamaForCausalLM(config)
    inject_lora(model, targets=("v_proj",), rank=2, alpha=4)
    save_adapter(model, tmp_path, base_model="tiny")
    _, modules = read_adapter(tmp_path)
    assert list(modules) == [f"model.layers.{i}.self_attn.v_proj" for i in range(11)]
