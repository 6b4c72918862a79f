"""Hand-written LoRA: the layer, injection into a model, merging, and PEFT-format adapter files.

    from lora import inject_lora, save_adapter, load_adapter, merge_lora
    summary = inject_lora(model, targets=("q_proj", "v_proj"), rank=16, alpha=32, dropout=0.05, variant="lora")
    print(summary)  # trainable params: ... of ... (...%)

`variant` is "lora" (LoRALinear), "rslora" (LoRALinear scaled by alpha/sqrt(r)), "dora"
(DoRALinear: a learned magnitude per output row) or "pissa" (PiSSALinear: A and B start from W0's
top singular directions, saved as a plain rank-2r LoRA of the original base). `python -m lora.inspect ADAPTER` shows what a trained adapter learned.

This package imports only torch, safetensors and json: it knows nothing of transformers.
"""

from lora.adapter_files import AdapterError, load_adapter, read_adapter, read_adapter_config, save_adapter
from lora.inject import (
    DEFAULT_TARGETS,
    LoRASummary,
    adapters_off,
    count_parameters,
    inject_lora,
    lora_layers,
    lora_parameters,
    merge_lora,
    unload_lora,
    unmerge_lora,
)
from lora.layer import VARIANTS, DoRALinear, LoRALinear, PiSSALinear, check_hyperparameters

__all__ = [
    "AdapterError",
    "DEFAULT_TARGETS",
    "DoRALinear",
    "LoRALinear",
    "LoRASummary",
    "PiSSALinear",
    "VARIANTS",
    "adapters_off",
    "check_hyperparameters",
    "count_parameters",
    "inject_lora",
    "load_adapter",
    "lora_layers",
    "lora_parameters",
    "merge_lora",
    "read_adapter",
    "read_adapter_config",
    "save_adapter",
    "unload_lora",
    "unmerge_lora",
]
