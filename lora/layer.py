"""The LoRA layer, and DoRA and PiSSA as subclasses that override what differs: the whole idea in one module."""

from __future__ import annotations

import math

import torch
from torch import nn

VARIANTS = ("lora", "rslora", "dora", "pissa")


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


def check_rank_fits(base: nn.Linear, rank: int, name: str = "layer", variant: str = "lora") -> None:
    """Raise ValueError if `rank` exceeds min(in, out) of `base`: B A could not have that rank.

    PiSSA needs 2r <= min(in, out): its adapter file is a LoRA of rank 2r (PiSSALinear), which
    `load_adapter` injects as such.
    """
    largest = min(base.in_features, base.out_features)
    if rank > largest:
        raise ValueError(
            f"rank {rank} is too large for {name} ({base.in_features} -> {base.out_features}): "
            f"B A has rank at most min(in, out) = {largest}"
        )
    if variant == "pissa" and 2 * rank > largest:
        raise ValueError(
            f"rank {rank} is too large for PiSSA on {name} ({base.in_features} -> {base.out_features}): "
            f"its adapter file is a LoRA of rank 2r = {2 * rank}, at most min(in, out) = {largest}"
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
        self.enabled = True  # False: the layer is its base (lora.adapters_off), e.g. to hear the base model

    @property
    def variant(self) -> str:
        """"lora" or "rslora" (as adapter files name it); the subclasses return "dora" and "pissa"."""
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
        if self.merged or not self.enabled:
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
        if self.merged or not self.enabled:
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


class PiSSALinear(LoRALinear):
    """PiSSA (Meng et al., 2024): A and B start as the top-r singular directions of W0, and the
    frozen weight becomes the residual, what is left of W0 without them:

        W0 = U S V^T (SVD, S descending),   s = alpha / r
        B0 = U_r sqrt(S_r / s)   [out, r],    A0 = sqrt(S_r / s) V_r^T   [r, in]
        W_res = W0 - s B0 A0                                (frozen, in W0's dtype)
        h = W_res x + s B A dropout(x),   A = A0 and B = B0 at step 0

    At step 0 (without dropout) h = W0 x, up to the rounding of W_res in W0's dtype; but the
    trained factors now hold W0's principal part instead of zero. S is divided by s before the
    sqrt split, as PEFT's init_lora_weights="pissa" does, so that s B0 A0 = U_r S_r V_r^T whatever
    alpha is.

    What changes on disk: W_res is no model anyone else has, so the layer is saved as a plain LoRA
    of the ORIGINAL W0 that computes the same function (`plain_lora_factors`):

        W_res + s B A = W0 + s (B A - B0 A0) = W0 + s B' A',   A' = [A; A0] [2r, in],  B' = [B, -B0] [out, 2r]

    a LoRA of rank 2r with alpha' = 2 alpha, so that alpha' / 2r = alpha / r = s: what PEFT's
    save_pretrained(path_initial_model_for_weight_conversion=...) writes. B0 and A0 stay in the layer
    as buffers for it; `load_plain_lora` reads such a file back. Merging folds s B A into W_res,
    which gives W0 + s B' A': the same merged model as the plain LoRA of the file.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base, rank, alpha, dropout)
        check_rank_fits(base, rank, variant="pissa")
        weight = base.weight.detach().float()  # [out, in]
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)  # [out, k], [k], [k, in]; k = min(in, out)
        root = torch.sqrt(S[:rank] / self.scaling)  # [r]
        with torch.no_grad():
            self.lora_A.copy_(root[:, None] * Vh[:rank])  # A0 = sqrt(S_r / s) V_r^T
            self.lora_B.copy_(U[:, :rank] * root)  # B0 = U_r sqrt(S_r / s)
            self.base.weight.copy_((weight - self.delta_weight()).to(base.weight.dtype))  # W_res
        self.register_buffer("lora_A0", self.lora_A.detach().clone(), persistent=False)
        self.register_buffer("lora_B0", self.lora_B.detach().clone(), persistent=False)

    @property
    def variant(self) -> str:
        return "pissa"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled or self.merged:
            return super().forward(x)
        result = self.base(x)  # W_res x: turned off, the layer is W0 = W_res + s B0 A0 again
        return result + (x.to(self.lora_A0.dtype) @ self.lora_A0.T @ self.lora_B0.T * self.scaling).to(result.dtype)

    def plain_lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', B') = ([A; A0] [2r, in], [B, -B0] [out, 2r]): the plain LoRA of the original W0, with
        the same scale s, that this layer computes (s B' A' = s B A - s B0 A0)."""
        return torch.cat([self.lora_A, self.lora_A0]), torch.cat([self.lora_B, -self.lora_B0], dim=1)

    @torch.no_grad()
    def load_plain_lora(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        """Set A, B, A0 and B0 from a plain rank-2r LoRA ([2r, in], [out, 2r], same scale s), as
        `plain_lora_factors` gives it: A = A'[:r], A0 = A'[r:], B = B'[:, :r], B0 = -B'[:, r:].

        When its A0, B0 are not this layer's (another SVD, or any other rank-2r LoRA), the residual
        is rebuilt for them, W_res <- W_res + s B0 A0 - s B0' A0', so the layer computes
        W0 + s B' A' either way. Only valid while unmerged.
        """
        lora_A, lora_B = (t.to(self.lora_A.device, torch.float32) for t in (lora_A, lora_B))  # a file's are on the CPU
        new_A0, new_B0 = lora_A[self.rank :], -lora_B[:, self.rank :]
        if not (torch.equal(new_A0, self.lora_A0) and torch.equal(new_B0, self.lora_B0)):
            old_part, new_part = self.lora_B0 @ self.lora_A0, new_B0 @ new_A0  # [out, in] each
            weight = self.base.weight.float() + self.scaling * (old_part - new_part)
            self.base.weight.copy_(weight.to(self.base.weight.dtype))
            self.lora_A0.copy_(new_A0)
            self.lora_B0.copy_(new_B0)
        self.lora_A.copy_(lora_A[: self.rank])
        self.lora_B.copy_(lora_B[:, : self.rank])


def lora_layer(base: nn.Linear, rank: int, alpha: float, dropout: float, variant: str) -> LoRALinear:
    """The layer for `variant`: LoRALinear ("lora"), LoRALinear with rsLoRA's scale, DoRALinear or PiSSALinear."""
    check_hyperparameters(rank, alpha, dropout, variant)
    if variant == "dora":
        return DoRALinear(base, rank, alpha, dropout)
    if variant == "pissa":
        return PiSSALinear(base, rank, alpha, dropout)
    return LoRALinear(base, rank, alpha, dropout, rslora=variant == "rslora")
