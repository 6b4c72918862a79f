"""Adapter files in PEFT's format: `adapter_model.safetensors` + `adapter_config.json`.

Keys are PEFT's: `base_model.model.<module name>.lora_A.weight` ([r, in]) and `.lora_B.weight`
([out, r]), so `peft.PeftModel.from_pretrained` reads what `save_adapter` writes and `load_adapter`
reads what PEFT writes. Only safetensors and JSON are read: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lora.inject import inject_lora, lora_layers

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
KEY_PREFIX = "base_model.model."
MAX_RANK = 4096
CHECKSUM_KEY = "medlora_sha256"
MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class AdapterError(ValueError):
    """An adapter folder that cannot be used with this model; the message names the file."""


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-named A and B tensors of every LoRA layer in `model` (contiguous CPU copies)."""
    state = {}
    for name, layer in lora_layers(model):
        state[f"{KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().cpu().contiguous().clone()
        state[f"{KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().cpu().contiguous().clone()
    return state


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, shape, dtype and bytes, in key order.

    Stored in the safetensors header metadata by `save_adapter` and checked by `load_adapter`, so a
    bit flip inside the weights is caught; files without it (PEFT's) load unchecked.
    """
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].contiguous()
        digest.update(f"{key}|{list(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def adapter_config(model: nn.Module, base_model: str) -> dict:
    """The adapter_config.json content for the LoRA layers in `model`."""
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("model has no LoRA layers: call inject_lora first")
    first = layers[0][1]
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": dropout,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name, _ in layers}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "base_model_name_or_path": base_model,
    }


def save_adapter(model: nn.Module, path: str | os.PathLike, base_model: str) -> Path:
    """Write `adapter_model.safetensors` and `adapter_config.json` into folder `path`.

    Each file is written to a temporary name and renamed in, so a crash never leaves a
    half-written file under the real name.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = adapter_config(model, base_model)
    weights_tmp = folder / (WEIGHTS_NAME + ".tmp")
    tensors = adapter_state_dict(model)
    save_file(tensors, str(weights_tmp), metadata={"format": "pt", CHECKSUM_KEY: tensors_digest(tensors)})
    config_tmp = folder / (CONFIG_NAME + ".tmp")
    config_tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(weights_tmp, folder / WEIGHTS_NAME)
    os.replace(config_tmp, folder / CONFIG_NAME)
    return folder


def read_adapter_config(path: str | os.PathLike) -> dict:
    """Read and validate `adapter_config.json`: types, ranges and module names.

    Raises:
        AdapterError: naming the file and the first bad field.
    """
    file = Path(path) / CONFIG_NAME
    if not Path(path).is_dir():
        raise AdapterError(f"{path}: adapter folder not found")
    if not file.is_file():
        raise AdapterError(f"{file}: missing (an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterError(f"{file}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{file}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{file}: peft_type is {config.get('peft_type')!r}, only 'LORA' is supported")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise AdapterError(f"{file}: r must be an integer in [1, {MAX_RANK}], got {rank!r}")
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1e6:
        raise AdapterError(f"{file}: lora_alpha must be a positive number, got {alpha!r}")
    dropout = config.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise AdapterError(f"{file}: lora_dropout must be in [0, 1), got {dropout!r}")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if (
        not isinstance(targets, list)
        or not targets
        or not all(isinstance(t, str) and MODULE_NAME.match(t) for t in targets)
    ):
        raise AdapterError(
            f"{file}: target_modules must be a non-empty list of module names like 'q_proj', got {targets!r}"
        )
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{file}: bias={config.get('bias')!r} is not supported (only 'none')")
    return {**config, "target_modules": sorted(targets)}


def load_adapter(model: nn.Module, path: str | os.PathLike) -> dict:
    """Load a PEFT-format LoRA adapter into `model`, injecting LoRA layers first if needed.

    Every check happens before any weight is touched: rank, targets, then every key and shape.

    Returns:
        The validated adapter config.

    Raises:
        AdapterError: naming the file and the first offending key, with both shapes.
        ValueError: the model's LoRA layers are merged (call unmerge_lora first).
    """
    config = read_adapter_config(path)
    weights = Path(path) / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterError(f"{weights}: missing")
    layers = dict(lora_layers(model))
    if not layers:
        inject_lora(model, config["target_modules"], config["r"], config["lora_alpha"], config["lora_dropout"])
        layers = dict(lora_layers(model))
    elif any(layer.merged for layer in layers.values()):
        raise ValueError("cannot load an adapter into merged LoRA layers: call unmerge_lora first")
    else:
        ranks = {layer.rank for layer in layers.values()}
        targets = sorted({name.rsplit(".", 1)[-1] for name in layers})
        if ranks != {config["r"]} or targets != config["target_modules"]:
            raise AdapterError(
                f"{Path(path) / CONFIG_NAME}: adapter has r={config['r']} on {config['target_modules']}, "
                f"model has r={sorted(ranks)} on {targets}"
            )
    expected = {}
    for name, layer in layers.items():
        expected[f"{KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A
        expected[f"{KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B
    try:
        with safe_open(str(weights), framework="pt") as handle:
            keys = list(handle.keys())
            for key in keys:
                if key not in expected:
                    raise AdapterError(f"{weights}: unexpected key {key} (not a LoRA layer of this model)")
                file_shape = tuple(handle.get_slice(key).get_shape())
                model_shape = tuple(expected[key].shape)
                if file_shape != model_shape:
                    raise AdapterError(
                        f"{weights}: key {key} has shape {list(file_shape)} in the adapter "
                        f"but {list(model_shape)} in the model (adapter made for another base model?)"
                    )
            missing = [key for key in expected if key not in keys]
            if missing:
                raise AdapterError(f"{weights}: missing key {missing[0]} ({len(missing)} missing in all)")
            tensors = {key: handle.get_tensor(key) for key in keys}
            checksum = (handle.metadata() or {}).get(CHECKSUM_KEY)
    except (SafetensorError, OSError, RuntimeError) as error:
        raise AdapterError(f"{weights}: not a readable safetensors file ({error})") from None
    if checksum is not None and checksum != tensors_digest(tensors):
        raise AdapterError(f"{weights}: checksum mismatch, the weights are corrupted")
    with torch.no_grad():
        for key, tensor in tensors.items():
            if not torch.isfinite(tensor).all():
                raise AdapterError(f"{weights}: key {key} holds NaN or infinite values")
        for key, tensor in tensors.items():
            expected[key].copy_(tensor.to(expected[key].dtype))
    return config
