"""Parity with PEFT (test-only reference), for LoRA, rsLoRA, DoRA and PiSSA: same forward, same gradients
in training with dropout, same merge, and each reads the other's files; PiSSA's start equals PEFT's
init_lora_weights="pissa", and its rank-2r file is the plain LoRA PEFT's conversion writes."""

import peft  # test-only reference implementation
import pytest
import torch

from lora import inject_lora, load_adapter, lora_layers, lora_parameters, merge_lora, read_adapter, save_adapter
from tests.conftest import make_tiny_model

IDS = torch.randint(0, 49152, (2, 11), generator=torch.Generator().manual_seed(3))
VARIANTS = ["lora", "rslora", "dora", "pissa"]
PEFT_FLAGS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}, "pissa": {"init_lora_weights": "pissa"}}


def peft_model(variant, dropout=0.0):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
        **PEFT_FLAGS[variant],
    )
    return peft.get_peft_model(make_tiny_model(), config).eval()


def ours_at_init(variant, dropout=0.0):
    model = make_tiny_model()
    inject_lora(model, rank=4, alpha=8, dropout=dropout, variant=variant)
    return model


def ours(variant, dropout=0.0):
    """Our model with trained-looking A, B and (DoRA) m moved away from its initial row norms."""
    model = ours_at_init(variant, dropout)
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


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])  # PEFT's own PiSSA file: the tests below
def test_we_load_peft_adapter(tmp_path, variant):
    reference = peft_model(variant)
    copy_ours_into_peft(ours(variant), reference)
    reference.save_pretrained(tmp_path)
    model = make_tiny_model()
    config = load_adapter(model, tmp_path)
    assert (config["r"], config["variant"]) == (4, variant)
    assert {layer.variant for _, layer in lora_layers(model)} == {variant}
    assert (logits(model) - logits(reference)).abs().max() <= 1e-5


def test_pissa_start_equals_peft_init_lora_weights_pissa():
    """A0, B0 and the residual W0 - s B0 A0 within 1e-5 of PEFT's. Both call torch.linalg.svd on the
    same float32 W0, so the singular vectors come out with the same signs and the comparison needs
    no sign fix per direction (another SVD routine could flip a pair u_i, v_i, which B A does not see)."""
    model, reference = ours_at_init("pissa"), peft_model("pissa")
    for name, layer in lora_layers(model):
        theirs_A, theirs_B = peft_parameters(reference, name)
        residual = dict(reference.named_modules())[f"base_model.model.{name}"].base_layer.weight
        assert (theirs_A - layer.lora_A).abs().max() <= 1e-5, name
        assert (theirs_B - layer.lora_B).abs().max() <= 1e-5, name
        assert (residual - layer.base.weight).abs().max() <= 1e-5, name


def trained_pissa():
    """Our PiSSA model after three AdamW steps, so that A and B have moved away from A0 and B0."""
    model = ours_at_init("pissa")
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    model.train()
    for _ in range(3):
        model(IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_peft_reads_our_trained_pissa_as_rank_2r_lora_of_the_original_base(tmp_path):
    model = trained_pissa()
    save_adapter(model, tmp_path, base_model="tiny")
    reference = peft.PeftModel.from_pretrained(make_tiny_model(), tmp_path).eval()  # the original W0
    config = reference.peft_config["default"]
    assert (config.r, config.lora_alpha, config.init_lora_weights, config.use_rslora) == (8, 16, True, False)
    assert (logits(model) - logits(reference)).abs().max() <= 1e-5


def test_we_read_peft_converted_pissa_and_it_equals_our_file(tmp_path):
    """PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) of the same trained PiSSA
    weights writes our file: same config numbers, same tensors."""
    model, reference = trained_pissa(), peft_model("pissa")
    reference.save_pretrained(tmp_path / "initial")  # PEFT keeps A0, B0 in a file of their own
    copy_ours_into_peft(model, reference)
    reference.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    save_adapter(model, tmp_path / "ours", base_model="tiny")
    theirs_config, theirs = read_adapter(tmp_path / "peft")
    our_config, our_modules = read_adapter(tmp_path / "ours")
    assert (theirs_config["r"], theirs_config["lora_alpha"], theirs_config["variant"]) == (8, 16, "lora")
    assert theirs.keys() == our_modules.keys()
    for name, parts in theirs.items():
        for part, tensor in parts.items():
            assert (tensor - our_modules[name][part]).abs().max() <= 1e-6, (name, part)
    fresh = make_tiny_model()
    load_adapter(fresh, tmp_path / "peft")
    assert (logits(fresh) - logits(model)).abs().max() <= 1e-5
