"""lora/layer.py: the LoRA equation, its initialisation, merging and dtypes."""

import pytest
import torch
from torch import nn

from lora import LoRALinear


def make_layer(in_features=3, out_features=2, rank=2, alpha=4.0, dropout=0.0, dtype=torch.float32):
    torch.manual_seed(0)
    return LoRALinear(nn.Linear(in_features, out_features, bias=True).to(dtype), rank, alpha, dropout)


def test_init_shapes_and_zero_B():
    layer = make_layer(in_features=5, out_features=7, rank=3)
    assert layer.lora_A.shape == (3, 5)  # r x in
    assert layer.lora_B.shape == (7, 3)  # out x r
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.count_nonzero(layer.lora_A) > 0
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad


def test_kaiming_uniform_bound_on_A():
    # kaiming_uniform_(a=sqrt 5) draws from U(-b, b), b = sqrt(6 / ((1 + a^2) fan_in)) = 1 / sqrt(fan_in).
    layer = make_layer(in_features=400, out_features=8, rank=8)
    bound = 1 / 400**0.5
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.abs().max() > 0.9 * bound


def test_zero_B_leaves_output_unchanged():
    layer = make_layer()
    x = torch.randn(4, 3)
    assert torch.equal(layer(x), layer.base(x))


def test_forward_matches_hand_written_equation():
    layer = make_layer(in_features=3, out_features=2, rank=2, alpha=4.0)
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]))
        layer.lora_B.copy_(torch.tensor([[1.0, 2.0], [0.5, -1.0]]))
    x = torch.tensor([[1.0, 1.0, 1.0]])
    # A x = [3, 0]; B A x = [3, 1.5]; scaling = 4 / 2 = 2 -> update [6, 3].
    expected = layer.base(x) + torch.tensor([[6.0, 3.0]])
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_merge_on_hand_computed_2x3_weight():
    base = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    layer = LoRALinear(base, rank=1, alpha=2.0)
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 0.0, -1.0]]))  # [r=1, in=3]
        layer.lora_B.copy_(torch.tensor([[0.5], [2.0]]))  # [out=2, r=1]
    # (alpha / r) B A = 2 * [[0.5, 0, -0.5], [2, 0, -2]] = [[1, 0, -1], [4, 0, -4]]
    layer.merge()
    assert torch.equal(layer.base.weight, torch.tensor([[2.0, 2.0, 2.0], [8.0, 5.0, 2.0]]))


def test_merge_is_idempotent_and_unmerge_restores():
    layer = make_layer(in_features=8, out_features=6, rank=4)
    nn.init.normal_(layer.lora_B)
    w0 = layer.base.weight.detach().clone()
    x = torch.randn(5, 8)
    unmerged_out = layer(x)
    layer.merge()
    once = layer.base.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.base.weight, once)
    assert torch.allclose(layer(x), unmerged_out, atol=1e-5)
    layer.unmerge()
    layer.unmerge()
    assert torch.allclose(layer.base.weight, w0, atol=1e-6)
    assert not layer.merged


def test_eval_does_not_merge():
    layer = make_layer()
    nn.init.normal_(layer.lora_B)
    w0 = layer.base.weight.detach().clone()
    x = torch.randn(4, 3)
    layer.eval()
    # Merged, the weight would be W0 + s B A and the forward pass the base layer alone.
    assert not layer.merged and torch.equal(layer.base.weight, w0)
    assert not torch.allclose(layer(x), layer.base(x))
    assert torch.equal(layer.base.weight, w0)


def test_dropout_applies_to_adapter_branch_only():
    layer = make_layer(in_features=16, out_features=4, rank=2, dropout=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 16)
    layer.train()
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    dropped = nn.functional.dropout(x, 0.5, training=True)  # the same mask the layer drew
    # W0 x sees the whole input; only the branch s B A sees the dropped-out one.
    assert torch.allclose(out, layer.base(x) + dropped @ layer.lora_A.T @ layer.lora_B.T * layer.scaling, atol=1e-6)
    assert not torch.allclose(out, layer.base(x) + x @ layer.lora_A.T @ layer.lora_B.T * layer.scaling)
    layer.eval()  # no dropout at all
    assert torch.allclose(layer(x), layer.base(x) + x @ layer.lora_A.T @ layer.lora_B.T * layer.scaling, atol=1e-6)


def test_adapter_stays_float32_with_fp16_base():
    layer = make_layer(dtype=torch.float16)
    assert layer.base.weight.dtype == torch.float16
    assert layer.lora_A.dtype == torch.float32 and layer.lora_B.dtype == torch.float32
    nn.init.normal_(layer.lora_B)
    out = layer(torch.randn(2, 3, dtype=torch.float16))
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32


def test_merge_computed_in_float32_then_cast():
    layer = make_layer(dtype=torch.float16)
    nn.init.normal_(layer.lora_B)
    expected = (layer.base.weight.float() + layer.delta_weight()).half()
    layer.merge()
    assert torch.equal(layer.base.weight, expected)


@pytest.mark.parametrize(
    "rank, alpha, dropout, message",
    [
        (0, 1.0, 0.0, "rank must be a positive integer, got 0"),
        (-2, 1.0, 0.0, "rank must be a positive integer, got -2"),
        (2, 0.0, 0.0, "alpha must be a positive number, got 0.0"),
        (2, 1.0, 1.0, r"dropout must be in \[0, 1\), got 1.0"),
        (2, 1.0, -0.1, r"dropout must be in \[0, 1\), got -0.1"),
    ],
)
def test_bad_hyperparameters_raise(rank, alpha, dropout, message):
    with pytest.raises(ValueError, match=message):
        LoRALinear(nn.Linear(3, 2), rank, alpha, dropout)
