"""The LoRA layer, and DoRA as a subclass that overrides what differs: the whole idea in one module."""

from __future__ import annotations

import math

import torch
from torch import nn

VARIANTS = ("lora", "rslora", "dora")


def check_hyperparameters(rank: int, alpha: float, dropout: float, variant: str = "lora") -> None:
    """The one check of the LoRA hyperparameters (the layer, injection and TrainConfig.validate call it).

    Raises:
        ValueError: naming the first bad value and what is allowed: rank an integer >= 1,
            alpha > 0, 0 <= dropout < 1, variant one of VARIANTS.
    """
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


def lora_scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """The factor s in front of B A: alpha / r, or alpha / sqrt(r) for rsLoRA (Kalajdzievski, 2023).

    alpha / r keeps the update's size the same when r changes, so a learning rate tuned at one rank
    carries over to another; alpha / sqrt(r) instead keeps its gradient from collapsing at large r.
    """
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """The L2 norm of every output row of an [out, in] matrix, as a float32 [out] vector."""
    return torch.linalg.vector_norm(weight.float(), dim=1)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (Hu et al., 2021):

        h = W0 x + s B A dropout(x),   s = alpha / r   (rsLoRA: s = alpha / sqrt(r), lora_scaling)

    Shapes, for a base layer `nn.Linear(in, out)`:
        W0: [out, in]  frozen, any float dtype (float32 or bfloat16 on CPU, float16/bfloat16 on a GPU)
        A:  [r, in]    trainable, float32, Kaiming-uniform
        B:  [out, r]   trainable, float32, zeros
        x:  [..., in]  ->  h: [..., out]

    A and B stay float32 whatever W0's dtype, so mixed-precision training unscales float32
    gradients. `merge()` folds s B A into W0 (in float32, cast back to W0's dtype) so inference
    costs nothing extra; `unmerge()` takes it out again. Both are explicit and idempotent: a second
    call does nothing, and `.eval()` never merges.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        super().__init__()
        check_hyperparameters(rank, alpha, dropout)
        check_rank_fits(base, rank)
        self.base = base
        self.base.requires_grad_(False)
        self.rank = rank
        self.alpha = alpha
        self.rslora = rslora
        self.scaling = lora_scaling(alpha, rank, rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, device=device, dtype=torch.float32))
        # B = 0 makes B A = 0: the adapted model starts exactly equal to the base model. A is random
        # (nn.Linear's own init, U(+-1/sqrt(in))) so that B gets a non-zero gradient at the first step.
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        self.merged = False

    @property
    def variant(self) -> str:
        """"lora" or "rslora" (as adapter files name it)."""
        return "rslora" if self.rslora else "lora"

    def adapter_parameters(self) -> tuple[nn.Parameter, ...]:
        """What training updates, in a stable order: (A, B)."""
        return self.lora_A, self.lora_B

    def delta_weight(self) -> torch.Tensor:
        """The update s B A as a float32 [out, in] matrix."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def update(self, dropped: torch.Tensor) -> torch.Tensor:
        """s B A applied to the (dropped-out) input: [..., in] -> [..., r] -> [..., out], float32 factors."""
        return dropped.to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged:
            return result
        return result + self.update(self.dropout(x)).to(result.dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The merged weight W0 + s B A, given W0 in float32."""
        return weight + self.delta_weight()

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W0 again, given the merged weight in float32 (the inverse of `merged_weight`)."""
        return weight - self.delta_weight()

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- the merged weight, so the forward pass is the base layer alone. Idempotent."""
        if not self.merged:
            self.base.weight.copy_(self.merged_weight(self.base.weight.float()).to(self.base.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`, restoring W0 (up to rounding in W0's dtype). Idempotent."""
        if self.merged:
            self.base.weight.copy_(self.unmerged_weight(self.base.weight.float()).to(self.base.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in={self.base.in_features}, out={self.base.out_features}, rank={self.rank}, "
            f"alpha={self.alpha}, variant={self.variant}, merged={self.merged}"
        )


class DoRALinear(LoRALinear):
    """DoRA (Liu et al., 2024): LoRA moves the direction of each output row of the weight, a
    learned length m sets its size:

        h = m / ||W0 + dW||_row * (W0 + dW) x + bias,   dW = s B A,  s = alpha / r

    With dropout d in training the update sees d(x), as in PEFT:
        h = W0 x + (m/n - 1) W0 d(x) + (m/n) dW d(x),  n = ||W0 + dW||_row

    m: [out], trainable, float32, starts at ||W0||_row so that m / ||W0 + 0||_row = 1 and the
    adapted model starts equal to the base. The row norm n is a constant to autograd (DoRA
    paper, section 4.3), as PEFT does.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base, rank, alpha, dropout)
        self.lora_magnitude_vector = nn.Parameter(row_norms(base.weight))  # m = ||W0||_row
        self.register_buffer("merged_factor", None, persistent=False)  # m / n at merge time; W0 is gone after

    @property
    def variant(self) -> str:
        return "dora"

    def adapter_parameters(self) -> tuple[nn.Parameter, ...]:
        """(A, B, m)."""
        return self.lora_A, self.lora_B, self.lora_magnitude_vector

    def magnitude_factor(self) -> torch.Tensor:
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
        factor = self.magnitude_factor()  # [out]
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base_out = result if self.base.bias is None else result - self.base.bias  # W0 x, reused
        else:
            base_out = nn.functional.linear(dropped, self.base.weight)  # W0 d(x)
        return result + ((factor - 1) * base_out + factor * self.update(dropped)).to(result.dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """m / ||W0 + dW||_row * (W0 + dW); remembers the factor, which `unmerged_weight` divides out."""
        self.merged_factor = self.magnitude_factor()
        return self.merged_factor[:, None] * super().merged_weight(weight)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        restored = super().unmerged_weight(weight / self.merged_factor[:, None])
        self.merged_factor = None
        return restored


def lora_layer(base: nn.Linear, rank: int, alpha: float, dropout: float, variant: str) -> LoRALinear:
    """The layer for `variant`: LoRALinear ("lora"), LoRALinear with rsLoRA's scale, or DoRALinear."""
    check_hyperparameters(rank, alpha, dropout, variant)
    if variant == "dora":
        return DoRALinear(base, rank, alpha, dropout)
    return LoRALinear(base, rank, alpha, dropout, rslora=variant == "rslora")
