"""The rotary permutation between Hugging Face Llama weights and llama.cpp's GGUF layout.

Rotary position embedding turns pairs of query/key dimensions by a position-dependent angle.
Hugging Face's Llama pairs dimension i with i + head_dim/2 of each head (`rotate_half`);
llama.cpp's Llama graph pairs neighbours 2i and 2i+1. Reordering the output rows of the q and k
projections, head by head, from [first halves | second halves] to [interleaved pairs] makes the
two implementations compute the same attention scores. The v and output projections are not
rotated and keep their order.

For a LoRA delta (alpha/r) B A on q or k, only B's rows are outputs: B is permuted, A is not.
"""

from __future__ import annotations

import torch


def _check_rows(weight: torch.Tensor, heads: int) -> int:
    rows = weight.shape[0]
    if rows % heads or (rows // heads) % 2:
        raise ValueError(f"{rows} rows do not split into {heads} heads of an even size")
    return rows // heads


def rotary_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face row order -> GGUF row order, for a [heads * head_dim, columns] q or k weight (or LoRA B)."""
    head_dim = _check_rows(weight, heads)
    columns = weight.shape[1:]
    # [heads, 2 halves, head_dim/2, ...] -> [heads, head_dim/2, 2 (pair), ...]: row j of half h goes to 2j + h
    return weight.reshape(heads, 2, head_dim // 2, *columns).transpose(1, 2).reshape(weight.shape)


def rotary_unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """GGUF row order -> Hugging Face row order: the inverse of `rotary_permute`."""
    head_dim = _check_rows(weight, heads)
    columns = weight.shape[1:]
    return weight.reshape(heads, head_dim // 2, 2, *columns).transpose(1, 2).reshape(weight.shape)
