"""The LoRA layer: the whole idea of low-rank adaptation in one screen."""

from __future__ import annotations

import math

import torch
from torch import nn


def check_hyperparameters(rank: int, alpha: float, dropout: float) -> None:
    """Raise ValueError naming the first bad value: rank >= 1, alpha > 0, 0 <= dropout < 1."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (Hu et al., 2021).

        h = W0 x + (alpha / r) * B A dropout(x)

    Shapes, for a base layer `nn.Linear(in, out)`:
        W0: [out, in]  frozen, any float dtype (float32 or bfloat16 on CPU, float16/bfloat16 on a GPU)
        A:  [r, in]    trainable, float32, Kaiming-uniform
        B:  [out, r]   trainable, float32, zeros
        x:  [..., in]  ->  h: [..., out]

    `alpha / r` keeps the update's scale the same when r changes, so a learning rate tuned at one
    rank carries over to another. A and B stay float32 whatever W0's dtype, so mixed-precision
    training unscales float32 gradients (PEFT users otherwise hit "Attempting to unscale FP16
    gradients").

    `merge()` folds the update into W0 (computed in float32, cast back to W0's dtype) so inference
    costs nothing extra; `unmerge()` takes it out again. Both are explicit and idempotent: a second
    call does nothing, and `.eval()` never merges.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        check_hyperparameters(rank, alpha, dropout)
        self.base = base
        self.base.requires_grad_(False)
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, device=device, dtype=torch.float32))
        self.merged = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # B = 0 makes B A = 0: the adapted model starts exactly equal to the base model.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """The update (alpha / r) B A as a float32 [out, in] matrix."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged:
            return result
        # [..., in] -> [..., r] -> [..., out]; under autocast the matmuls run in the autocast dtype.
        update = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T
        return result + (update * self.scaling).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + (alpha / r) B A, in float32 then cast to W0's dtype. Idempotent."""
        if self.merged:
            return
        weight = self.base.weight
        weight.copy_((weight.float() + self.delta_weight()).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W0 - (alpha / r) B A, restoring the base weight. Idempotent."""
        if not self.merged:
            return
        weight = self.base.weight
        weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in={self.base.in_features}, out={self.base.out_features}, rank={self.rank}, "
            f"alpha={self.alpha}, merged={self.merged}"
        )
