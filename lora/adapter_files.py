"""Adapter files in PEFT's format: `adapter_model.safetensors` + `adapter_config.json`.

Keys are PEFT's: `base_model.model.<module name>.lora_A.weight` ([r, in]), `.lora_B.weight`
([out, r]) and, for DoRA, `.lora_magnitude_vector` ([out]); the config's `use_rslora` and
`use_dora` name the variant. So `peft.PeftModel.from_pretrained` reads what `save_adapter` writes
and `load_adapter` reads what PEFT writes. A PiSSA adapter is written as the plain LoRA of rank 2r
of the original base that computes the same function (lora.layer.PiSSALinear), so that PEFT, export
and llama.cpp read it without knowing PiSSA. Only safetensors and JSON are read: nothing is ever
unpickled.
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
from lora.layer import LoRALinear, PiSSALinear

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
KEY_PREFIX = "base_model.model."
MAX_RANK = 4096
CHECKSUM_KEY = "medlora_sha256"
MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# PEFT options that change what the adapter computes and that this project does not implement.
UNSUPPORTED_OPTIONS = (
    "lora_bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "layer_replication", "modules_to_save",
    "trainable_token_indices", "target_parameters", "alora_invocation_tokens", "use_qalora", "use_bdlora",
    "arrow_config", "kasa_config", "monteclora_config", "velora_config", "megatron_config",
)
# PEFT initialisations that change the base weight: a file saved after them without PEFT's conversion
# (save_pretrained(path_initial_model_for_weight_conversion=...)) is relative to that changed base.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
PARTS = {"lora_A": ".lora_A.weight", "lora_B": ".lora_B.weight", "lora_magnitude_vector": ".lora_magnitude_vector"}


class AdapterError(ValueError):
    """An adapter folder that cannot be used with this model; the message names the file."""


def saved_as(layer: LoRALinear) -> tuple[str, int, float]:
    """(variant, r, lora_alpha) of `layer` in a file: its own, except that a PiSSA layer of rank r
    is saved as the plain LoRA of rank 2r with alpha 2 alpha (the same scale alpha / r)."""
    if isinstance(layer, PiSSALinear):
        return "lora", 2 * layer.rank, 2 * layer.alpha
    return layer.variant, layer.rank, layer.alpha


def peft_keys(name: str, layer: LoRALinear) -> dict[str, torch.Tensor]:
    """PEFT's file key for each tensor the layer named `name` saves: A, B, and DoRA's m (the
    parameters themselves), or a PiSSA layer's rank-2r A' and B' (computed from A, B, A0, B0)."""
    if isinstance(layer, PiSSALinear):
        tensors = dict(zip(("lora_A", "lora_B"), layer.plain_lora_factors()))
    else:
        tensors = {"lora_A": layer.lora_A, "lora_B": layer.lora_B}
    if layer.variant == "dora":
        tensors["lora_magnitude_vector"] = layer.lora_magnitude_vector
    return {f"{KEY_PREFIX}{name}{PARTS[part]}": tensor for part, tensor in tensors.items()}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-named tensors of every LoRA layer in `model` (contiguous CPU copies)."""
    return {
        key: tensor.detach().cpu().contiguous().clone()
        for name, layer in lora_layers(model)
        for key, tensor in peft_keys(name, layer).items()
    }


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
    variant, rank, alpha = saved_as(first)
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name, _ in layers}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": variant == "rslora",
        "use_dora": variant == "dora",
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
    """Read and validate `adapter_config.json`: types, ranges, module names and the variant.

    Returns:
        The config, with `target_modules` sorted and "variant" ("lora", "rslora" or "dora") added.

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
    return {**config, "target_modules": sorted(targets), "variant": adapter_variant(config, file)}


def adapter_variant(config: dict, file: Path) -> str:
    """"lora", "rslora" or "dora" from PEFT's `use_rslora` and `use_dora` (absent means false).

    Raises:
        AdapterError: if a flag is not a boolean, both are set, or the config turns on a PEFT
            option that changes the computation and is not implemented here (see UNSUPPORTED_OPTIONS),
            or init_lora_weights names an initialisation that changed the base weight
            (BASE_CHANGING_INITS): such a file is only usable after PEFT's conversion to the
            original base, which sets init_lora_weights back to true.
    """
    supported = "supported variants are lora, rslora (use_rslora) and dora (use_dora)"
    for key in UNSUPPORTED_OPTIONS:
        if config.get(key):
            raise AdapterError(f"{file}: {key}={config[key]!r} is a PEFT option this project does not implement; {supported}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise AdapterError(
            f"{file}: init_lora_weights={init!r}: the adapter is relative to the base weight that {init} changed, not the "
            "original; save it from PEFT with path_initial_model_for_weight_conversion (a LoRA of rank 2r of the original base)"
        )
    flags = {key: config.get(key, False) for key in ("use_rslora", "use_dora")}
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise AdapterError(f"{file}: {key} must be true or false, got {value!r}")
    if flags["use_rslora"] and flags["use_dora"]:
        raise AdapterError(f"{file}: use_rslora and use_dora are both true (DoRA with rsLoRA's scale); {supported}")
    return "rslora" if flags["use_rslora"] else "dora" if flags["use_dora"] else "lora"


def read_adapter_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of `adapter_model.safetensors`, checked: readable, checksum (if any), finite.

    Raises:
        AdapterError: naming the file and what is wrong with it.
    """
    weights = Path(path) / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterError(f"{weights}: missing")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            checksum = (handle.metadata() or {}).get(CHECKSUM_KEY)
    except (SafetensorError, OSError, RuntimeError) as error:
        raise AdapterError(f"{weights}: not a readable safetensors file ({error})") from None
    if checksum is not None and checksum != tensors_digest(tensors):
        raise AdapterError(f"{weights}: checksum mismatch, the weights are corrupted")
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"{weights}: key {key} holds NaN or infinite values")
    return tensors


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """Read an adapter folder without a model: its config and, per adapted module, its tensors.

    Returns:
        (config from `read_adapter_config`, {module name: {"lora_A": [r, in], "lora_B": [out, r],
        and for DoRA "lora_magnitude_vector": [out]}}), modules in layer order (layers.2 before
        layers.10, although safetensors stores keys sorted as text).

    Raises:
        AdapterError: naming the file and the first key that is unexpected, missing or misshapen.
    """
    config = read_adapter_config(path)
    tensors = read_adapter_weights(path)
    weights = Path(path) / WEIGHTS_NAME
    parts = [part for part in PARTS if config["variant"] == "dora" or part != "lora_magnitude_vector"]
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        part = next((p for p in parts if key.startswith(KEY_PREFIX) and key.endswith(PARTS[p])), None)
        if part is None:
            raise AdapterError(f"{weights}: unexpected key {key} (not a {config['variant']} adapter tensor)")
        modules.setdefault(key[len(KEY_PREFIX) : -len(PARTS[part])], {})[part] = tensor
    for name, found in modules.items():
        missing = [part for part in parts if part not in found]
        if missing:
            raise AdapterError(f"{weights}: missing key {KEY_PREFIX}{name}{PARTS[missing[0]]}")
        a, b = found["lora_A"], found["lora_B"]
        expected_m = [b.shape[0]] if config["variant"] == "dora" else None
        m_shape = list(found["lora_magnitude_vector"].shape) if expected_m else None
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != config["r"] or b.shape[1] != config["r"] or m_shape != expected_m:
            raise AdapterError(
                f"{weights}: module {name} has lora_A {list(a.shape)}, lora_B {list(b.shape)}"
                + (f", lora_magnitude_vector {m_shape}" if expected_m else "")
                + f"; r={config['r']} needs [r, in], [out, r]" + (", [out]" if expected_m else "")
            )
    def layer_order(name: str) -> list[tuple[int, int | str]]:
        return [(0, int(part)) if part.isdigit() else (1, part) for part in name.split(".")]

    return config, {name: modules[name] for name in sorted(modules, key=layer_order)}


def load_adapter(model: nn.Module, path: str | os.PathLike) -> dict:
    """Load a PEFT-format LoRA, rsLoRA or DoRA adapter into `model`, injecting layers first if needed.

    A model without LoRA layers gets the layers the file describes: a saved PiSSA adapter becomes
    the plain LoRA of rank 2r on the original base that it is. A model whose layers are PiSSA of
    rank r takes a LoRA of rank 2r with alpha 2 alpha (what its save wrote) back into A, B, A0 and
    B0 (PiSSALinear.load_plain_lora), so training resumes as PiSSA.

    Every check happens before any weight is touched: variant, rank, alpha, targets, the file, then
    every key and shape.

    Returns:
        The validated adapter config (with "variant" added).

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
        inject_lora(
            model, config["target_modules"], config["r"], config["lora_alpha"], config["lora_dropout"], config["variant"]
        )
        layers = dict(lora_layers(model))
    elif any(layer.merged for layer in layers.values()):
        raise ValueError("cannot load an adapter into merged LoRA layers: call unmerge_lora first")
    else:
        wanted = {saved_as(layer) for layer in layers.values()}
        targets = sorted({name.rsplit(".", 1)[-1] for name in layers})
        if wanted != {(config["variant"], config["r"], config["lora_alpha"])} or targets != config["target_modules"]:
            have = (sorted({layer.variant for layer in layers.values()}), sorted({layer.rank for layer in layers.values()}))
            pissa = " (a PiSSA layer of rank r reads a lora file of rank 2r and alpha 2 alpha)" if "pissa" in have[0] else ""
            raise AdapterError(
                f"{Path(path) / CONFIG_NAME}: adapter is {config['variant']} with r={config['r']} on "
                f"{config['target_modules']}, model has {have[0]} with r={have[1]} on {targets}; lora_alpha "
                f"{config['lora_alpha']} in the adapter, {sorted({layer.alpha for layer in layers.values()})} in the model{pissa}"
            )
    layer_keys = {name: peft_keys(name, layer) for name, layer in layers.items()}
    expected = {key: tensor for keys in layer_keys.values() for key, tensor in keys.items()}
    tensors = read_adapter_weights(path)
    for key, tensor in tensors.items():
        if key not in expected:
            raise AdapterError(f"{weights}: unexpected key {key} (not a LoRA layer of this model)")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise AdapterError(
                f"{weights}: key {key} has shape {list(tensor.shape)} in the adapter "
                f"but {list(expected[key].shape)} in the model (adapter made for another base model?)"
            )
    missing = [key for key in expected if key not in tensors]
    if missing:
        raise AdapterError(f"{weights}: missing key {missing[0]} ({len(missing)} missing in all)")
    with torch.no_grad():
        for name, keys in layer_keys.items():
            layer = layers[name]
            if isinstance(layer, PiSSALinear):
                layer.load_plain_lora(*(tensors[key] for key in keys))  # A', B'
            else:
                for key, parameter in keys.items():
                    parameter.copy_(tensors[key].to(parameter.dtype))
    return config
