"""lora/layer.py PiSSALinear and its files: the SVD start, the residual, the rank-2r conversion on disk
and reading it back (PEFT parity is in test_peft_parity.py)."""

import json

import pytest
import torch
from torch import nn

from lora import AdapterError, PiSSALinear, inject_lora, load_adapter, lora_layers, merge_lora, read_adapter, save_adapter
from lora.layer import lora_layer
from tests.conftest import make_tiny_model

IDS = torch.randint(0, 49152, (2, 9), generator=torch.Generator().manual_seed(4))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def pissa_model(rank=4, alpha=8, dropout=0.0):
    model = make_tiny_model()
    inject_lora(model, rank=rank, alpha=alpha, dropout=dropout, variant="pissa")
    return model


def trained(model, steps=3, seed=7):
    """A few AdamW steps on a random batch, so that A and B have left A0 and B0."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_svd_start_and_residual_on_hand_example():
    # W0 = diag(3, 1): singular values 3 and 1 along e1 and e2. r = 1, alpha = 4: s = 4, S_1 / s = 3/4.
    base = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
    layer = PiSSALinear(base, rank=1, alpha=4.0)
    # up to the sign of the singular pair, which B A does not see
    assert torch.allclose(layer.lora_A.abs(), torch.tensor([[3**0.5 / 2, 0.0]]))  # sqrt(3/4) e1^T
    assert torch.allclose(layer.lora_B.abs(), torch.tensor([[3**0.5 / 2], [0.0]]))
    assert torch.allclose(layer.delta_weight(), torch.tensor([[3.0, 0.0], [0.0, 0.0]]))  # s B0 A0 = 3 e1 e1^T
    assert torch.allclose(layer.base.weight, torch.tensor([[0.0, 0.0], [0.0, 1.0]]), atol=1e-6)  # W_res
    assert torch.equal(layer.lora_A0, layer.lora_A) and torch.equal(layer.lora_B0, layer.lora_B)


def test_adapted_model_equals_base_at_step_zero():
    model, base = pissa_model(), make_tiny_model()
    assert (logits(model) - logits(base)).abs().max() <= 1e-5  # W_res + s B0 A0 = W0 up to fp32 rounding
    originals = dict(base.named_modules())
    for name, layer in lora_layers(model):
        w0 = originals[name].weight
        assert (layer.merged_weight(layer.base.weight) - w0).abs().max() <= 1e-6
        assert layer.lora_B.abs().sum() > 0  # B starts at W0's principal part, not at zero


def test_buffers_are_not_trained_and_not_in_the_state_dict():
    model = pissa_model()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(name.endswith(("lora_A", "lora_B")) for name in trainable)
    assert not [key for key in model.state_dict() if key.endswith(("lora_A0", "lora_B0"))]
    before = {name: layer.lora_A0.clone() for name, layer in lora_layers(model)}
    trained(model)
    for name, layer in lora_layers(model):
        assert torch.equal(layer.lora_A0, before[name])
        assert not torch.equal(layer.lora_A, before[name])


def test_merge_gives_the_plain_lora_of_the_original_base_and_unmerge_restores():
    model = trained(pissa_model())
    residuals = {name: layer.base.weight.clone() for name, layer in lora_layers(model)}
    originals = dict(make_tiny_model().named_modules())
    unmerged = logits(model)
    merge_lora(model)
    for name, layer in lora_layers(model):
        a, b = layer.plain_lora_factors()
        assert (layer.base.weight - (originals[name].weight + layer.scaling * b @ a)).abs().max() <= 1e-6
    assert (logits(model) - unmerged).abs().max() <= 1e-5
    merge_lora(model)
    model.get_submodule("model.layers.0.self_attn.q_proj").unmerge()
    model.get_submodule("model.layers.0.self_attn.q_proj").unmerge()
    restored = model.get_submodule("model.layers.0.self_attn.q_proj").base.weight
    assert (restored - residuals["model.layers.0.self_attn.q_proj"]).abs().max() <= 1e-6


def test_saved_file_is_a_plain_rank_2r_lora_of_the_original_base(tmp_path):
    model = trained(pissa_model(rank=4, alpha=8))
    save_adapter(model, tmp_path, base_model="tiny")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"], config["use_dora"]) == (8, 16, False, False)
    assert config["init_lora_weights"] is True
    read_config, modules = read_adapter(tmp_path)
    assert read_config["variant"] == "lora"
    layer = model.get_submodule("model.layers.1.self_attn.v_proj")
    saved = modules["model.layers.1.self_attn.v_proj"]
    assert saved["lora_A"].shape == (8, 64) and saved["lora_B"].shape == (32, 8)
    assert torch.equal(saved["lora_A"], torch.cat([layer.lora_A, layer.lora_A0]))
    assert torch.equal(saved["lora_B"], torch.cat([layer.lora_B, -layer.lora_B0], dim=1))
    fresh = make_tiny_model()
    load_adapter(fresh, tmp_path)  # no PiSSA here: a plain LoRA of rank 8 on the original base
    assert {(layer.variant, layer.rank, layer.scaling) for _, layer in lora_layers(fresh)} == {("lora", 8, 2.0)}
    assert (logits(fresh) - logits(model)).abs().max() <= 1e-5
    merge_lora(fresh)
    assert (logits(fresh) - logits(model)).abs().max() <= 1e-5


def test_pissa_model_reads_its_own_file_back_bit_identically(tmp_path):
    model = trained(pissa_model())
    save_adapter(model, tmp_path, base_model="tiny")
    resumed = pissa_model()  # as train.py's resume builds it: the same SVD start, then the file
    load_adapter(resumed, tmp_path)
    original = dict(lora_layers(model))
    for name, layer in lora_layers(resumed):
        for part in ("lora_A", "lora_B", "lora_A0", "lora_B0"):
            assert torch.equal(getattr(layer, part), getattr(original[name], part)), (name, part)
        assert torch.equal(layer.base.weight, original[name].base.weight)
    assert torch.equal(logits(resumed), logits(model))


def test_pissa_model_rebuilds_its_residual_for_another_rank_2r_lora(tmp_path):
    """Any plain LoRA of rank 2r with alpha 2 alpha: the layer computes W0 + s B' A' whatever its A0, B0."""
    plain = make_tiny_model()
    inject_lora(plain, rank=8, alpha=16, dropout=0.0)
    torch.manual_seed(2)
    for _, layer in lora_layers(plain):
        nn.init.normal_(layer.lora_B, std=0.05)
    save_adapter(plain, tmp_path, base_model="tiny")
    model = pissa_model(rank=4, alpha=8)
    load_adapter(model, tmp_path)
    assert (logits(model) - logits(plain)).abs().max() <= 1e-5


def test_file_of_another_scale_or_rank_is_refused_by_a_pissa_model(tmp_path):
    save_adapter(trained(pissa_model(rank=4, alpha=8)), tmp_path, base_model="tiny")
    with pytest.raises(AdapterError, match=r"lora_alpha 16 in the adapter, \[4\] in the model \(a PiSSA layer of rank r reads"):
        load_adapter(pissa_model(rank=4, alpha=4), tmp_path)
    with pytest.raises(AdapterError, match=r"adapter is lora with r=8 .* model has \['pissa'\] with r=\[2\]"):
        load_adapter(pissa_model(rank=2, alpha=4), tmp_path)


def test_peft_pissa_file_without_conversion_is_refused(tmp_path):
    save_adapter(pissa_model(), tmp_path, base_model="tiny")
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "init_lora_weights": "pissa_niter_4"}))
    with pytest.raises(AdapterError, match=r"init_lora_weights='pissa_niter_4': the adapter is relative to the base weight"):
        load_adapter(make_tiny_model(), tmp_path)


def test_rank_whose_2r_does_not_fit_is_refused_before_any_change():
    model = make_tiny_model()
    # v_proj is 64 -> 32: r = 17 fits a plain LoRA, but PiSSA's file would have rank 2r = 34 > 32; r = 16 fits.
    with pytest.raises(ValueError, match=r"rank 17 is too large for PiSSA on model\.layers\.0\.self_attn\.v_proj \(64 -> 32\): .* 2r = 34"):
        inject_lora(model, rank=17, alpha=8, variant="pissa")
    assert not list(lora_layers(model))
    inject_lora(model, rank=16, alpha=8, variant="pissa")


def test_bf16_base_starts_equal_to_base_within_bf16_rounding():
    torch.manual_seed(0)
    base = nn.Linear(32, 24).to(torch.bfloat16)
    reference = base.weight.detach().float().clone()
    layer = lora_layer(base, rank=4, alpha=8.0, dropout=0.0, variant="pissa")
    assert layer.base.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    residual_plus = layer.base.weight.float() + layer.delta_weight()
    assert (residual_plus - reference).abs().max() <= 2 ** -8 * reference.abs().max()
