"""Put LoRA layers into a model, freeze the rest, merge them in and take them out."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

from torch import nn

from lora.layer import LoRALinear, check_hyperparameters, check_rank_fits, lora_layer

DEFAULT_TARGETS = ("q_proj", "v_proj")


@dataclass(frozen=True)
class LoRASummary:
    """What `inject_lora` did: how many parameters train, out of how many."""

    trainable: int
    total: int
    replaced: tuple[str, ...]

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} of {self.total:,} ({self.percent:.4f}%) "
            f"in {len(self.replaced)} LoRA layers"
        )


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(qualified name, layer) for every LoRALinear in `model`, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable A, B (and DoRA's m) of every layer, in a stable order (what the optimizer gets)."""
    return [p for _, layer in lora_layers(model) for p in layer.adapter_parameters()]


def count_parameters(model: nn.Module) -> LoRASummary:
    """Trainable and total parameter counts (shared tensors counted once, as PEFT does)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return LoRASummary(trainable, total, tuple(name for name, _ in lora_layers(model)))


def inject_lora(
    model: nn.Module,
    targets: Sequence[str] = DEFAULT_TARGETS,
    rank: int = 16,
    alpha: float = 32,
    dropout: float = 0.05,
    variant: str = "lora",
) -> LoRASummary:
    """Replace every `nn.Linear` whose name ends with a target by a LoRALinear; freeze the rest.

    A module matches a target when its qualified name is the target or ends with "." + target,
    so "q_proj" matches "model.layers.0.self_attn.q_proj". `variant` is "lora", "rslora",
    "dora" or "pissa" (see lora.layer: LoRALinear, DoRALinear, PiSSALinear). DoRA's m and PiSSA's
    A, B and residual are taken from the weights at injection: inject after loading.

    Raises:
        ValueError: if the model already holds LoRA layers, no linear layer matches, a
            hyperparameter is bad, or the rank exceeds a matched layer's min(in, out); the model is
            unchanged.
    """
    if any(True for _ in lora_layers(model)):
        raise ValueError("model already has LoRA layers: inject_lora was called twice")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets:
        raise ValueError("targets is empty: name at least one module, e.g. ('q_proj', 'v_proj')")
    matches = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
    ]
    if not matches:
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"no linear layer matches targets {list(targets)}; linear layers in this model "
            f"are named {linear_names[:8]}"
        )
    check_hyperparameters(rank, alpha, dropout, variant)
    for name in matches:
        check_rank_fits(model.get_submodule(name), rank, name, variant)
    model.requires_grad_(False)
    for name in matches:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, lora_layer(getattr(parent, child), rank, alpha, dropout, variant))
    return count_parameters(model)


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (idempotent)."""
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take every adapter back out of its base weight (idempotent)."""
    for _, layer in lora_layers(model):
        layer.unmerge()


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every LoRA layer computes its base layer alone (PiSSA's: the original W0):
    the model before fine-tuning, without a second copy of it in memory. Needs unmerged layers.

        with adapters_off(model):
            base_answers = generate(model, ...)
    """
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged for layer in layers):
        raise ValueError("adapters_off needs unmerged LoRA layers: call unmerge_lora first")
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


def unload_lora(model: nn.Module) -> nn.Module:
    """Merge, then put the plain base `nn.Linear` layers back: a model with no LoRA code in it.

    The result can be saved with `save_pretrained` and run without this project.
    """
    for name, layer in list(lora_layers(model)):
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base)
    return model
