"""The LoRA layer and its two variants, rsLoRA and DoRA: the whole idea in one module."""

from __future__ import annotations

import math

import torch
from torch import nn

VARIANTS = ("lora", "rslora", "dora")


def check_hyperparameters(rank: int, alpha: float, dropout: float, variant: str = "lora") -> None:
    """Raise ValueError naming the first bad value: rank >= 1, alpha > 0, 0 <= dropout < 1, a known variant."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")


def check_rank_fits(base: nn.Linear, rank: int, name: str = "layer") -> None:
    """Raise ValueError if `rank` exceeds min(in, out) of `base`: B A could not have that rank."""
    largest = min(base.in_features, base.out_features)
    if rank > largest:
        raise ValueError(
            f"rank {rank} is too large for {name} ({base.in_features} -> {base.out_features}): "
            f"B A has rank at most min(in, out) = {largest}"
        )


def lora_scaling(alpha: float, rank: int, variant: str) -> float:
    """The factor in front of B A: alpha / r (LoRA, DoRA) or alpha / sqrt(r) (rsLoRA)."""
    return alpha / math.sqrt(rank) if variant == "rslora" else alpha / rank


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """The L2 norm of every output row of an [out, in] matrix, as a float32 [out] vector."""
    return torch.linalg.vector_norm(weight.float(), dim=1)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (Hu et al., 2021), in three variants.

        lora:    h = W0 x + (alpha / r) B A dropout(x)
        rslora:  h = W0 x + (alpha / sqrt r) B A dropout(x)                    (Kalajdzievski, 2023)
        dora:    h = m / ||W0 + dW||_row * (W0 + dW) x,   dW = (alpha / r) B A  (Liu et al., 2024)
                 (the bias is added after, unscaled; with dropout d in training,
                  h = W0 x + (m/n - 1) W0 d(x) + (m/n) dW d(x),  n = ||W0 + dW||_row)

    Shapes, for a base layer `nn.Linear(in, out)`:
        W0: [out, in]  frozen, any float dtype (float32 or bfloat16 on CPU, float16/bfloat16 on a GPU)
        A:  [r, in]    trainable, float32, Kaiming-uniform
        B:  [out, r]   trainable, float32, zeros
        m:  [out]      trainable, float32, DoRA only: the row norms of W0 at init
        x:  [..., in]  ->  h: [..., out]

    `alpha / r` keeps the update's scale the same when r changes, so a learning rate tuned at one
    rank carries over to another. rsLoRA's `alpha / sqrt(r)` instead keeps the update's gradient
    from collapsing at large r. DoRA splits each output row of the weight into a length m and a
    direction (W0 + dW) / ||W0 + dW||: LoRA moves the direction, m the length. The row norm n is
    a constant to autograd (DoRA paper, section 4.3), as PEFT does. A, B and m stay float32
    whatever W0's dtype, so mixed-precision training unscales float32 gradients.

    `merge()` folds the update into W0 (computed in float32, cast back to W0's dtype) so inference
    costs nothing extra; `unmerge()` takes it out again. Both are explicit and idempotent: a second
    call does nothing, and `.eval()` never merges.
    """

    def __init__(
        self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, variant: str = "lora"
    ) -> None:
        super().__init__()
        check_hyperparameters(rank, alpha, dropout, variant)
        check_rank_fits(base, rank)
        self.base = base
        self.base.requires_grad_(False)
        self.rank = rank
        self.alpha = alpha
        self.variant = variant
        self.scaling = lora_scaling(alpha, rank, variant)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, device=device, dtype=torch.float32))
        if variant == "dora":
            self.lora_magnitude_vector = nn.Parameter(torch.empty(base.out_features, device=device, dtype=torch.float32))
            self.register_buffer("merged_dora_factor", None, persistent=False)  # set by merge, used by unmerge
        self.merged = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # B = 0 makes B A = 0, and m = ||W0||_row makes m / ||W0 + 0||_row = 1: the adapted model
        # starts exactly equal to the base model.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.variant == "dora":
            self.lora_magnitude_vector.copy_(row_norms(self.base.weight))

    def adapter_parameters(self) -> tuple[nn.Parameter, ...]:
        """What training updates: (A, B), plus m for DoRA."""
        if self.variant == "dora":
            return self.lora_A, self.lora_B, self.lora_magnitude_vector
        return self.lora_A, self.lora_B

    def delta_weight(self) -> torch.Tensor:
        """The update scaling * B A as a float32 [out, in] matrix."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def dora_factor(self) -> torch.Tensor:
        """m / ||W0 + dW||_row as a float32 [out] vector; the norm is detached and taken in float32.

        Only valid while unmerged (W0 must be the base weight).
        """
        with torch.no_grad(), torch.autocast(self.base.weight.device.type, enabled=False):
            norm = row_norms(self.base.weight.float() + self.delta_weight())
        return self.lora_magnitude_vector / norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged:
            return result
        dropped = self.dropout(x)
        # [..., in] -> [..., r] -> [..., out]; under autocast the matmuls run in the autocast dtype.
        update = dropped.to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T * self.scaling
        if self.variant != "dora":
            return result + update.to(result.dtype)
        factor = self.dora_factor()  # [out]
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base_out = result if self.base.bias is None else result - self.base.bias  # W0 x, reused
        else:
            base_out = nn.functional.linear(dropped, self.base.weight)  # W0 dropout(x)
        return result + ((factor - 1) * base_out + factor * update).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + dW (LoRA, rsLoRA) or m / ||W0 + dW||_row * (W0 + dW) (DoRA). Idempotent."""
        if self.merged:
            return
        weight = self.base.weight
        merged = weight.float() + self.delta_weight()
        if self.variant == "dora":
            self.merged_dora_factor = self.dora_factor()  # unmerge needs it: W0 is gone after the merge
            merged = self.merged_dora_factor[:, None] * merged
        weight.copy_(merged.to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`, restoring the base weight (up to rounding in W0's dtype). Idempotent."""
        if not self.merged:
            return
        weight = self.base.weight
        restored = weight.float()
        if self.variant == "dora":
            restored = restored / self.merged_dora_factor[:, None]
            self.merged_dora_factor = None
        weight.copy_((restored - self.delta_weight()).to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in={self.base.in_features}, out={self.base.out_features}, rank={self.rank}, "
            f"alpha={self.alpha}, variant={self.variant}, merged={self.merged}"
        )
