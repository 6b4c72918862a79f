"""Parity with PEFT (test-only reference): same forward, and each reads the other's files."""

import peft  # test-only reference implementation
import torch

from lora import inject_lora, load_adapter, lora_layers, save_adapter
from tests.conftest import make_tiny_model

IDS = torch.randint(0, 49152, (2, 11), generator=torch.Generator().manual_seed(3))


def peft_model():
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return peft.get_peft_model(make_tiny_model(), config).eval()


def ours():
    model = make_tiny_model()
    inject_lora(model, rank=4, alpha=8, dropout=0.0)
    torch.manual_seed(5)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_A)
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    return model.eval()


def copy_ours_into_peft(model, reference):
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(model):
            target = modules[f"base_model.model.{name}"]
            target.lora_A["default"].weight.copy_(layer.lora_A)
            target.lora_B["default"].weight.copy_(layer.lora_B)


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_same_A_B_same_forward_as_peft():
    model, reference = ours(), peft_model()
    copy_ours_into_peft(model, reference)
    assert (logits(model) - logits(reference)).abs().max() <= 1e-6


def test_peft_loads_our_adapter(tmp_path):
    model = ours()
    save_adapter(model, tmp_path, base_model="tiny")
    reference = peft.PeftModel.from_pretrained(make_tiny_model(), tmp_path).eval()
    assert (logits(model) - logits(reference)).abs().max() <= 1e-6


def test_we_load_peft_adapter(tmp_path):
    reference = peft_model()
    copy_ours_into_peft(ours(), reference)
    reference.save_pretrained(tmp_path)
    model = make_tiny_model()
    config = load_adapter(model, tmp_path)
    assert config["r"] == 4
    assert (logits(model) - logits(reference)).abs().max() <= 1e-6
