"""lora/layer.py variants: rsLoRA's scale, DoRALinear's magnitude and direction, merging, dtypes, refusals
(PiSSALinear's own tests: test_pissa.py)."""

import math

import pytest
import torch
from torch import nn

from lora import DoRALinear, LoRALinear, check_hyperparameters, inject_lora, lora_layers, lora_parameters
from lora.layer import lora_layer
from tests.conftest import make_tiny_model


def randomized(layer: LoRALinear, seed: int = 0) -> LoRALinear:
    """Give A, B (and m) trained-looking values: B non-zero, m moved away from ||W0||_row."""
    torch.manual_seed(seed)
    with torch.no_grad():
        nn.init.normal_(layer.lora_B, std=0.3)
        if layer.variant == "dora":
            layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn_like(layer.lora_magnitude_vector))
    return layer


def test_rslora_scale_is_alpha_over_sqrt_r_on_hand_example():
    base = nn.Linear(4, 4, bias=False)
    nn.init.zeros_(base.weight)
    layer = LoRALinear(base, rank=4, alpha=6.0, rslora=True)
    with torch.no_grad():
        layer.lora_A.copy_(torch.eye(4))
        layer.lora_B.copy_(torch.diag(torch.tensor([1.0, 2.0, 0.0, 0.0])))
    # scaling = 6 / sqrt(4) = 3 (plain LoRA: 6 / 4 = 1.5); B A x = [1, 0, 0, 0] for x = e_1.
    assert layer.scaling == 3.0
    assert torch.equal(layer(torch.tensor([[1.0, 0.0, 0.0, 0.0]])), torch.tensor([[3.0, 0.0, 0.0, 0.0]]))
    assert LoRALinear(nn.Linear(4, 4), rank=4, alpha=6.0).scaling == 1.5


def dora_hand_layer() -> DoRALinear:
    base = nn.Linear(2, 2, bias=True)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
        base.bias.copy_(torch.tensor([1.0, -1.0]))
    return DoRALinear(base, rank=1, alpha=1.0)


def test_dora_magnitude_starts_at_row_norms_and_output_equals_base():
    layer = dora_hand_layer()
    assert torch.equal(layer.lora_magnitude_vector, torch.tensor([5.0, 2.0]))  # ||[3, 4]||, ||[0, 2]||
    nn.init.normal_(layer.lora_A)
    x = torch.randn(3, 2)
    assert torch.equal(layer(x), layer.base(x))


def test_dora_forward_on_hand_example():
    layer = dora_hand_layer()
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 0.0]]))  # [r=1, in=2]
        layer.lora_B.copy_(torch.tensor([[0.0], [2.0]]))  # [out=2, r=1]
        layer.lora_magnitude_vector.copy_(torch.tensor([10.0, 4.0]))
    # W0 + dW = [[3, 4], [2, 2]], row norms [5, 2 sqrt 2]; m / norm = [2, sqrt 2]
    # W' = [[6, 8], [2 sqrt 2, 2 sqrt 2]]; W' [1, 1] + b = [14 + 1, 4 sqrt 2 - 1].
    expected = torch.tensor([[15.0, 4 * math.sqrt(2) - 1]])
    assert torch.allclose(layer(torch.tensor([[1.0, 1.0]])), expected, atol=1e-6)
    layer.merge()
    assert torch.allclose(layer.base.weight, torch.tensor([[6.0, 8.0], [2 * math.sqrt(2)] * 2]), atol=1e-6)


def test_dora_row_norm_is_a_constant_to_autograd():
    layer = dora_hand_layer()
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 0.0]]))
        layer.lora_B.copy_(torch.tensor([[0.0], [2.0]]))
    x = torch.tensor([[1.0, 1.0]])
    layer(x).sum().backward()
    # h_i = m_i / n_i * (W0 + dW)_i x + b_i with n_i fixed: dh/dm_i = (W0 + dW)_i x / n_i.
    assert torch.allclose(layer.lora_magnitude_vector.grad, torch.tensor([7 / 5, 4 / (2 * math.sqrt(2))]), atol=1e-6)
    # dh_2/dB_2 = (m_2 / n_2) * scaling * (A x) = (2 / 2 sqrt 2) * 1 * 1; no term through n_2.
    assert torch.allclose(layer.lora_B.grad, torch.tensor([[1.0], [1 / math.sqrt(2)]]), atol=1e-6)


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora", "pissa"])
def test_merge_then_unmerge_round_trips(variant):
    torch.manual_seed(0)
    layer = randomized(lora_layer(nn.Linear(16, 12), rank=4, alpha=8.0, dropout=0.0, variant=variant))
    w0 = layer.base.weight.detach().clone()
    x = torch.randn(5, 16)
    unmerged = layer(x)
    layer.merge()
    once = layer.base.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.base.weight, once)
    assert (layer(x) - unmerged).abs().max() <= 1e-5
    layer.unmerge()
    layer.unmerge()
    assert (layer.base.weight - w0).abs().max() <= 1e-6
    assert torch.allclose(layer(x), unmerged, atol=1e-6)


@pytest.mark.parametrize("variant", ["rslora", "dora", "pissa"])
def test_adapter_stays_float32_under_bf16_autocast(variant):
    torch.manual_seed(0)
    layer = randomized(lora_layer(nn.Linear(8, 6).to(torch.bfloat16), rank=2, alpha=4.0, dropout=0.0, variant=variant))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(3, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    for parameter in layer.adapter_parameters():
        assert parameter.dtype == torch.float32 and parameter.grad.dtype == torch.float32


def test_dora_trains_A_B_and_m_and_nothing_else():
    model = make_tiny_model()
    inject_lora(model, rank=4, alpha=8, dropout=0.0, variant="dora")
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    layer_names = [name for name, _ in lora_layers(model)]
    assert names == {f"{n}.{p}" for n in layer_names for p in ("lora_A", "lora_B", "lora_magnitude_vector")}
    assert len(lora_parameters(model)) == 3 * len(layer_names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    ids = torch.randint(0, 49152, (2, 8))
    model.train()
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == names


def test_unknown_variant_is_refused_by_the_check_and_injection():
    with pytest.raises(ValueError, match=r"variant must be one of lora, rslora, dora, pissa; got 'qlora'"):
        check_hyperparameters(2, 4.0, 0.0, "qlora")
    model = make_tiny_model()
    with pytest.raises(ValueError, match=r"got 'DoRA'"):
        inject_lora(model, variant="DoRA")
    assert not list(lora_layers(model))


def test_rank_above_min_in_out_is_refused_before_any_change():
    model = make_tiny_model()
    # v_proj is 64 -> 32 (2 KV heads of 16): r = 48 cannot fit, q_proj (64 -> 64) could.
    with pytest.raises(ValueError, match=r"rank 48 is too large for model\.layers\.0\.self_attn\.v_proj \(64 -> 32\)"):
        inject_lora(model, rank=48, alpha=8, variant="dora")
    assert not list(lora_layers(model))
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match=r"B A has rank at most min\(in, out\) = 2"):
        DoRALinear(nn.Linear(5, 2), rank=3, alpha=1.0)
