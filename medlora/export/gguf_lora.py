"""A LoRA adapter alone as a llama.cpp adapter GGUF (`llama-cli --lora`, Ollama's ADAPTER).

llama.cpp reads, per adapted weight W (GGUF name such as blk.0.attn_q.weight), two tensors:
`<name>.lora_a` = A ([r, in]) and `<name>.lora_b` = B ([out, r]), the same shapes as PEFT's, and
adds scale * (alpha / r) * B A x to W x, with r read from A's shape, alpha from `adapter.lora.alpha`
and scale given at load time (1 by default). The file also says `general.type = adapter`,
`adapter.type = lora` and the base model's architecture, which llama.cpp checks.

q and k weights are stored in llama.cpp's rotary row order (see `rotary`); their deltas must be
too. The rows of B A are the rows of B, so B is permuted and A is not.
"""

from __future__ import annotations

import os

import gguf
from torch import nn

from lora import lora_layers
from medlora.export.gguf_model import add_tensor, check_llama, gguf_order, gguf_tensor_name, write_gguf


def write_lora_gguf(model: nn.Module, config, path: str | os.PathLike, name: str = "adapter") -> int:
    """Write the LoRA layers of `model` (loaded, not merged) as a llama.cpp LoRA GGUF (A and B in f32).

    Returns:
        The number of adapted weights written.

    Raises:
        ValueError: no LoRA layers, layers that are merged, or ranks/alphas that differ between layers.
    """
    check_llama(config)
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("the model holds no LoRA layers: load an adapter first")
    if any(layer.merged for _, layer in layers):
        raise ValueError("the LoRA layers are merged: a LoRA GGUF needs A and B apart (call unmerge_lora)")
    alphas = {layer.alpha for _, layer in layers}
    if len(alphas) != 1:
        raise ValueError(f"llama.cpp stores one alpha per adapter; the layers have {sorted(alphas)}")
    writer = gguf.GGUFWriter(os.fspath(path), arch="llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alphas.pop()))
    for module_name, layer in layers:
        hf_name = f"{module_name}.weight"
        target = gguf_tensor_name(hf_name)
        add_tensor(writer, f"{target}.lora_a", layer.lora_A, "f32")  # [r, in]
        add_tensor(writer, f"{target}.lora_b", gguf_order(hf_name, layer.lora_B, config), "f32")  # [out, r], rotary rows
    write_gguf(writer)
    return len(layers)
