"""Parity with PEFT (test-only reference), for LoRA, rsLoRA and DoRA: same forward, same gradients
in training with dropout, same merge, and each reads the other's files."""

import peft  # test-only reference implementation
import pytest
import torch

from lora import inject_lora, load_adapter, lora_layers, merge_lora, save_adapter
from tests.conftest import make_tiny_model

IDS = torch.randint(0, 49152, (2, 11), generator=torch.Generator().manual_seed(3))
VARIANTS = ["lora", "rslora", "dora"]
PEFT_FLAGS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


def peft_model(variant, dropout=0.0):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
        **PEFT_FLAGS[variant],
    )
    return peft.get_peft_model(make_tiny_model(), config).eval()


def ours(variant, dropout=0.0):
    """Our model with trained-looking A, B and (DoRA) m moved away from its initial row norms."""
    model = make_tiny_model()
    inject_lora(model, rank=4, alpha=8, dropout=dropout, variant=variant)
    torch.manual_seed(5)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            torch.nn.init.normal_(layer.lora_A)
            torch.nn.init.normal_(layer.lora_B, std=0.05)
            if variant == "dora":
                layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn_like(layer.lora_magnitude_vector))
    return model.eval()


def peft_parameters(reference, name):
    """PEFT's A, B (and m) tensors for our layer `name`, in LoRALinear.adapter_parameters() order."""
    target = dict(reference.named_modules())[f"base_model.model.{name}"]
    found = [target.lora_A["default"].weight, target.lora_B["default"].weight]
    if "default" in target.lora_magnitude_vector:
        found.append(target.lora_magnitude_vector["default"].weight)
    return found


def copy_ours_into_peft(model, reference):
    with torch.no_grad():
        for name, layer in lora_layers(model):
            for theirs, mine in zip(peft_parameters(reference, name), layer.adapter_parameters(), strict=True):
                theirs.copy_(mine)


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("variant", VARIANTS)
def test_same_weights_same_forward_as_peft(variant):
    model, reference = ours(variant), peft_model(variant)
    copy_ours_into_peft(model, reference)
    assert (logits(model) - logits(reference)).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_same_loss_and_gradients_as_peft_in_training_with_dropout(variant):
    """Dropout masks match when both draw them in the same order from the same seed."""
    model, reference = ours(variant, dropout=0.3), peft_model(variant, dropout=0.3)
    copy_ours_into_peft(model, reference)
    losses = []
    for net in (model.train(), reference.train()):
        torch.manual_seed(11)
        loss = net(IDS, labels=IDS).loss
        loss.backward()
        losses.append(loss.detach())
    assert (losses[0] - losses[1]).abs() <= 1e-5
    for name, layer in lora_layers(model):
        for theirs, mine in zip(peft_parameters(reference, name), layer.adapter_parameters(), strict=True):
            assert (theirs.grad - mine.grad).abs().max() <= 1e-5, name


@pytest.mark.parametrize("variant", VARIANTS)
def test_same_merged_model_as_peft(variant):
    model, reference = ours(variant), peft_model(variant)
    copy_ours_into_peft(model, reference)
    merge_lora(model)
    assert (logits(model) - logits(reference.merge_and_unload())).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_peft_loads_our_adapter(tmp_path, variant):
    model = ours(variant)
    save_adapter(model, tmp_path, base_model="tiny")
    reference = peft.PeftModel.from_pretrained(make_tiny_model(), tmp_path).eval()
    assert reference.peft_config["default"].use_rslora == (variant == "rslora")
    assert reference.peft_config["default"].use_dora == (variant == "dora")
    assert (logits(model) - logits(reference)).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_we_load_peft_adapter(tmp_path, variant):
    reference = peft_model(variant)
    copy_ours_into_peft(ours(variant), reference)
    reference.save_pretrained(tmp_path)
    model = make_tiny_model()
    config = load_adapter(model, tmp_path)
    assert (config["r"], config["variant"]) == (4, variant)
    assert {layer.variant for _, layer in lora_layers(model)} == {variant}
    assert (logits(model) - logits(reference)).abs().max() <= 1e-5
