"""lora/inject.py: injection, freezing, parameter counts, merge/unmerge on a whole model."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lora import LoRALinear, adapters_off, inject_lora, lora_layers, lora_parameters, merge_lora, unload_lora, unmerge_lora


def randomize_B(model):
    torch.manual_seed(1)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.02)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_injected_model_with_zero_B_equals_base(tiny_model):
    ids = torch.randint(0, 49152, (2, 12))
    before = logits(tiny_model, ids)
    inject_lora(tiny_model, dropout=0.0)
    assert torch.equal(logits(tiny_model, ids), before)


def test_injects_only_targets_and_freezes_the_rest(tiny_model):
    summary = inject_lora(tiny_model, targets=("q_proj", "v_proj"), rank=4, alpha=8)
    names = [name for name, _ in lora_layers(tiny_model)]
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{m}" for n in names for m in "AB"}
    # q_proj 64->64 and v_proj 64->32 (2 KV heads of 16): r * (in + out) each.
    assert summary.trainable == 2 * (4 * (64 + 64) + 4 * (64 + 32))
    assert summary.replaced == tuple(names)


def test_merged_equals_unmerged_and_unmerge_restores(tiny_model):
    ids = torch.randint(0, 49152, (2, 10))
    w0 = tiny_model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    inject_lora(tiny_model, dropout=0.0)
    randomize_B(tiny_model)
    unmerged = logits(tiny_model, ids)
    merge_lora(tiny_model)
    merged = logits(tiny_model, ids)
    assert (merged - unmerged).abs().max() <= 1e-5
    once = tiny_model.model.layers[0].self_attn.q_proj.base.weight.detach().clone()
    merge_lora(tiny_model)
    assert torch.equal(tiny_model.model.layers[0].self_attn.q_proj.base.weight, once)
    unmerge_lora(tiny_model)
    assert (tiny_model.model.layers[0].self_attn.q_proj.base.weight - w0).abs().max() <= 1e-6


def test_unload_returns_plain_model_that_saves_and_reloads(tiny_model, tmp_path):
    ids = torch.randint(0, 49152, (1, 9))
    inject_lora(tiny_model, dropout=0.0)
    randomize_B(tiny_model)
    adapted = logits(tiny_model, ids)
    plain = unload_lora(tiny_model)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    plain.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert (logits(reloaded, ids) - adapted).abs().max() <= 1e-5


def test_one_optimizer_step_changes_only_A_and_B(tiny_model):
    inject_lora(tiny_model, dropout=0.0)
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    optimizer = torch.optim.AdamW(lora_parameters(tiny_model), lr=1e-2)
    ids = torch.randint(0, 49152, (2, 8))
    tiny_model.train()
    tiny_model(ids, labels=ids).loss.backward()
    optimizer.step()
    for name, param in tiny_model.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name


def test_gradient_checkpointing_gives_identical_gradients(tiny_model):
    inject_lora(tiny_model, dropout=0.0)
    randomize_B(tiny_model)
    ids = torch.randint(0, 49152, (2, 8))

    def grads():
        tiny_model.zero_grad()
        tiny_model(ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in lora_parameters(tiny_model)]

    tiny_model.train()
    plain = grads()
    tiny_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grads()
    assert all(g is not None for g in checkpointed)
    for a, b in zip(plain, checkpointed):
        assert torch.allclose(a, b, atol=1e-7)


def test_parameter_count_at_tinyllama_scale():
    # TinyLlama-1.1B-Chat-v1.0's architecture, built on the meta device: no weights are allocated.
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    summary = inject_lora(model, targets=("q_proj", "v_proj"), rank=16, alpha=32)
    # Per layer: q_proj 16 * (2048 + 2048) + v_proj 16 * (2048 + 256) = 65,536 + 36,864 = 102,400.
    assert summary.trainable == 22 * 102_400 == 2_252_800
    assert summary.total == 1_102_301_184
    assert f"{summary.percent:.4f}" == "0.2044"


def test_no_match_names_targets_and_existing_modules(tiny_model):
    with pytest.raises(ValueError, match=r"no linear layer matches targets \['qkv'\].*'q_proj'"):
        inject_lora(tiny_model, targets=("qkv",))


def test_inject_twice_is_refused(tiny_model):
    inject_lora(tiny_model)
    with pytest.raises(ValueError, match="inject_lora was called twice"):
        inject_lora(tiny_model)


def test_empty_targets_and_bad_rank_refused_before_any_change(tiny_model):
    with pytest.raises(ValueError, match="targets is empty"):
        inject_lora(tiny_model, targets=())
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        inject_lora(tiny_model, rank=0)
    assert not list(lora_layers(tiny_model))


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora", "pissa"])
def test_adapters_off_is_the_base_model_and_comes_back_on(tiny_model, variant):
    ids = torch.randint(0, 49152, (2, 10))
    base = logits(tiny_model, ids)
    inject_lora(tiny_model, targets=("q_proj", "v_proj", "down_proj"), dropout=0.0, variant=variant)
    randomize_B(tiny_model)
    adapted = logits(tiny_model, ids)
    assert (adapted - base).abs().max() > 1e-3  # the adapters change the model
    with adapters_off(tiny_model):
        off = logits(tiny_model, ids)
    tolerance = 1e-5 if variant == "pissa" else 0.0  # PiSSA's W_res + s B0 A0 is W0 up to rounding
    assert (off - base).abs().max() <= tolerance
    assert torch.equal(logits(tiny_model, ids), adapted)  # back on after the block


def test_adapters_off_refuses_merged_layers(tiny_model):
    inject_lora(tiny_model)
    merge_lora(tiny_model)
    with pytest.raises(ValueError, match="unmerged"):
        with adapters_off(tiny_model):
            pass
