"""A Hugging Face Llama model as one GGUF file for llama.cpp (and Ollama), written with `gguf.GGUFWriter`.

    write_model_gguf(model.state_dict(), model.config, tokenizer, "model.gguf", dtype="f16", name="...")

What llama.cpp needs, and where each piece is made:
  * hyperparameters as `llama.*` keys (`llama_hyperparameters`);
  * tensors under llama.cpp's names (`gguf_tensor_name`), q and k rows in llama.cpp's rotary
    order (`rotary.rotary_permute`), in f32, f16 or q8_0 (`encode_tensor`; 1-D tensors, i.e. the
    RMS norms, always f32). With tied embeddings there is no `output.weight`: llama.cpp then uses
    `token_embd.weight` for the output layer too;
  * the tokenizer and chat template (`gguf_tokenizer`).
"""

from __future__ import annotations

import os
import re
from typing import Mapping

import gguf
import numpy as np
import torch

from medlora.export.gguf_tokenizer import gguf_tokenizer
from medlora.export.rotary import rotary_permute

GGUF_DTYPES = ("f32", "f16", "q8_0")
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}

# Hugging Face Llama parameter name (per layer: after "model.layers.N.") -> llama.cpp tensor.
LAYER_TENSORS = {
    "input_layernorm.weight": gguf.MODEL_TENSOR.ATTN_NORM,
    "self_attn.q_proj.weight": gguf.MODEL_TENSOR.ATTN_Q,
    "self_attn.k_proj.weight": gguf.MODEL_TENSOR.ATTN_K,
    "self_attn.v_proj.weight": gguf.MODEL_TENSOR.ATTN_V,
    "self_attn.o_proj.weight": gguf.MODEL_TENSOR.ATTN_OUT,
    "post_attention_layernorm.weight": gguf.MODEL_TENSOR.FFN_NORM,
    "mlp.gate_proj.weight": gguf.MODEL_TENSOR.FFN_GATE,
    "mlp.up_proj.weight": gguf.MODEL_TENSOR.FFN_UP,
    "mlp.down_proj.weight": gguf.MODEL_TENSOR.FFN_DOWN,
}
MODEL_TENSORS = {
    "model.embed_tokens.weight": gguf.MODEL_TENSOR.TOKEN_EMBD,
    "model.norm.weight": gguf.MODEL_TENSOR.OUTPUT_NORM,
    "lm_head.weight": gguf.MODEL_TENSOR.OUTPUT,
}
LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class NotLlamaError(ValueError):
    """The model is not a plain Llama-architecture model that llama.cpp's `llama` graph runs."""


def check_llama(config) -> None:
    """Refuse, in one line, a config that llama.cpp's `llama` architecture would run wrongly."""
    if getattr(config, "model_type", None) != "llama":
        raise NotLlamaError(
            f"model type {getattr(config, 'model_type', None)!r} is not Llama: GGUF export supports Llama-architecture models only"
        )
    unsupported = [
        f"{name}={getattr(config, name)!r}"
        for name, allowed in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu"))
        if getattr(config, name, allowed) != allowed
    ]
    rope_type = (rope_parameters(config) or {}).get("rope_type", "default")
    if rope_type != "default":
        unsupported.append(f"rope_type={rope_type!r}")
    if unsupported:
        raise NotLlamaError(f"this Llama variant ({', '.join(unsupported)}) is not supported by the GGUF writer")


def rope_parameters(config) -> dict:
    """RoPE settings across transformers versions (`rope_parameters` in 5.x, `rope_theta` before)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if "rope_theta" not in params and hasattr(config, "rope_theta"):
        params = {**params, "rope_theta": config.rope_theta}
    return params


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def llama_hyperparameters(writer: gguf.GGUFWriter, config) -> None:
    """The `llama.*` keys llama.cpp builds its graph from."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(float(rope_parameters(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp's name for a Hugging Face Llama parameter, e.g. model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight."""
    match = LAYER_NAME.match(hf_name)
    if match and match.group(2) in LAYER_TENSORS:
        return gguf.TENSOR_NAMES[LAYER_TENSORS[match.group(2)]].format(bid=int(match.group(1))) + ".weight"
    if hf_name in MODEL_TENSORS:
        return gguf.TENSOR_NAMES[MODEL_TENSORS[hf_name]] + ".weight"
    raise NotLlamaError(f"parameter {hf_name} has no llama.cpp counterpart (not a plain Llama model?)")


def gguf_order(hf_name: str, weight: torch.Tensor, config) -> torch.Tensor:
    """`weight` with q and k rows put in llama.cpp's rotary order; other tensors unchanged."""
    if hf_name.endswith("self_attn.q_proj.weight"):
        return rotary_permute(weight, config.num_attention_heads)
    if hf_name.endswith("self_attn.k_proj.weight"):
        return rotary_permute(weight, config.num_key_value_heads or config.num_attention_heads)
    return weight


def encode_tensor(weight: torch.Tensor, dtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """The tensor's bytes as stored: 1-D tensors (norms) always f32; q8_0 needs rows that are a multiple of 32 (else f16)."""
    values = weight.detach().to(torch.float32).cpu().numpy()
    if values.ndim == 1 or dtype == "f32":
        return values, gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    if dtype == "q8_0" and values.shape[-1] % block == 0:
        return gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return values.astype(np.float16), gguf.GGMLQuantizationType.F16


def add_tensor(writer: gguf.GGUFWriter, name: str, weight: torch.Tensor, dtype: str) -> None:
    data, kind = encode_tensor(weight, dtype)
    writer.add_tensor(name, data, raw_dtype=kind if kind == gguf.GGMLQuantizationType.Q8_0 else None)


def write_gguf(writer: gguf.GGUFWriter) -> None:
    """Header, metadata, tensors, in that order; then close the file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_model_gguf(
    state_dict: Mapping[str, torch.Tensor],
    config,
    tokenizer,
    path: str | os.PathLike,
    dtype: str = "f16",
    name: str = "model",
) -> None:
    """Write a Llama model (Hugging Face parameter names, no LoRA layers in it) as one GGUF file.

    Raises:
        NotLlamaError, UnknownTokenizerError: (ValueErrors) before anything is written.
    """
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"dtype must be one of {GGUF_DTYPES}, got {dtype!r}")
    check_llama(config)
    described = gguf_tokenizer(tokenizer, config.vocab_size)
    tensors = {}
    for hf_name, weight in state_dict.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: llama.cpp reuses token_embd.weight when output.weight is absent
        tensors[gguf_tensor_name(hf_name)] = gguf_order(hf_name, weight, config)
    writer = gguf.GGUFWriter(os.fspath(path), arch="llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    llama_hyperparameters(writer, config)
    writer.add_file_type(FILE_TYPES[dtype])
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    described.add_to(writer)
    for gguf_name, weight in tensors.items():
        add_tensor(writer, gguf_name, weight, dtype)
    write_gguf(writer)
