"""One optimizer step of LoRA training, from its micro-batches to zeroed gradients.

    lr = cosine_with_warmup(step, total_steps, warmup_steps, peak_lr)      # 1. (the caller sets it)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_ratio"]                               # LoRA+: B's group at lambda
    loss = AnswerLoss(examples, pad_id, device)                           # or PreferenceLoss(...) in the DPO stage
    outcome = optimizer_step(model, optimizer, scaler, loss, batches, autocast, max_grad_norm)
    outcome.loss, outcome.grad_norm, outcome.tokens, outcome.skipped

train.py's loop calls this once per step, and bench/train_speed.py times this same function, so
the benchmark measures the step a user's run takes. Steps 2 to 7 of the loop live here, in order.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from lora import lora_layers, lora_parameters
from medlora.distributed import SINGLE_PROCESS, World


@dataclass(frozen=True)
class StepOutcome:
    """What one optimizer step did, summed over the ranks."""

    loss: float  # mean loss of the step: its summed loss / StepLoss.total (SFT: mean answer-token NLL, nats)
    grad_norm: float  # global L2 norm of the gradients before clipping
    tokens: int  # real (non-pad) tokens the step read
    skipped: bool  # True: the loss or the gradients were not finite and the weights were left as they were
    stats: dict[str, float] = field(default_factory=dict)  # the loss's own sums over the step (the DPO stage's rewards)


class StepLoss(Protocol):
    """What optimizer_step needs of a loss: a micro-batch's summed loss, and the step's divisor."""

    stat_names: tuple[str, ...]  # the sums __call__ returns beside the loss, the same on every rank

    def total(self, batches: Sequence[Sequence[int]]) -> float:
        """The step's summed loss is divided by this (target tokens, or pairs, of every micro-batch)."""

    def __call__(self, model: torch.nn.Module, rows: Sequence[int]) -> tuple[torch.Tensor, int, dict[str, float]]:
        """(summed loss of the micro-batch `rows`, the real tokens it read, sums to log beside it)."""


def parameter_groups(model: torch.nn.Module, lora_plus_ratio: float | None = None) -> list[dict]:
    """The optimizer's parameter groups over the LoRA layers of `model`; each carries "lr_ratio",
    the factor its learning rate is the schedule's learning rate times.

    Without LoRA+ (None): one group, every A, B (and DoRA's m) at ratio 1. LoRA+ (Hayou et al.,
    2024): A at ratio 1 and B at `lora_plus_ratio` (lambda, 16 in the paper): with one learning
    rate, B, which multiplies A's features and starts at zero, learns too slowly as the width grows.
    DoRA's magnitude m goes with B, as in PEFT's create_loraplus_optimizer, which puts B and every
    1-D parameter in the group at lambda.
    """
    if lora_plus_ratio is None:
        return [{"params": lora_parameters(model), "lr_ratio": 1.0}]
    layers = [layer for _, layer in lora_layers(model)]
    return [
        {"params": [layer.lora_A for layer in layers], "lr_ratio": 1.0},
        {"params": [p for layer in layers for p in layer.adapter_parameters() if p is not layer.lora_A], "lr_ratio": lora_plus_ratio},
    ]


def adamw(params, lr: float, weight_decay: float, device: torch.device | str) -> torch.optim.AdamW:
    """AdamW as train.py builds it: one fused kernel per step on a GPU, foreach on a CPU.

    `params` is a list of parameters (one group, ratio 1) or `parameter_groups(...)`; a group's
    learning rate is lr times its "lr_ratio", here and in train.py's schedule.
    On CUDA the fused kernel launches once and keeps no per-step temporaries (TRL's default there
    too); on a CPU fused measured 1.02x foreach (bench/results/train_speed_levers_xeon.log), within
    noise, and foreach is what the golden per-step losses were recorded with.
    """
    kernel = {"fused": True} if torch.device(device).type == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kernel)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.setdefault("lr_ratio", 1.0)
    return optimizer


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    step_loss: StepLoss,
    batches: Sequence[Sequence[int]],
    autocast: Callable[[], AbstractContextManager],
    max_grad_norm: float,
    world: World = SINGLE_PROCESS,
) -> StepOutcome:
    """Take one optimizer step over the micro-batches `batches` (lists of indices into the loss's rows).

    Every rank passes the same `batches` (the whole global step) and runs its own share of them.
    The learning rate is the caller's to set before the call. `step_loss` says what a micro-batch
    costs and what the step's sum is divided by: medlora.loss.AnswerLoss (the SFT stage: answer
    tokens) or medlora.preference.PreferenceLoss (the DPO stage: pairs). The optimizer's parameters
    are the ones clipped and summed over the ranks.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # 2. forward and backward per micro-batch of this rank's shard. Each micro-batch's summed loss
    # is divided by the total of the WHOLE global step (its target tokens, or its pairs), so the
    # gradient is that of the step's mean however the step is cut (a mean of per-micro-batch means
    # would weight short answers more). Every rank knows the whole step, so it counts it itself.
    step_total = step_loss.total(batches)
    loss_sum, step_tokens, stats = 0.0, 0, dict.fromkeys(step_loss.stat_names, 0.0)
    for rows in world.shard(batches):
        with autocast():
            loss, tokens, micro_stats = step_loss(model, rows)
        scaler.scale(loss / step_total).backward()
        loss_sum += loss.item()
        step_tokens += tokens
        stats = {name: stats[name] + micro_stats[name] for name in stats}
    # 3. sum the gradients (once, after the last micro-batch) and the logged numbers over the ranks
    world.sum_gradients(params)
    loss_sum, step_tokens, *stat_sums = world.sum(loss_sum, step_tokens, *stats.values())
    loss = loss_sum / step_total
    # 4. unscale (a no-op without fp16), 5. clip to the global norm
    scaler.unscale_(optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    # 6. step, or skip it: the weights never take an inf/NaN update (all ranks agree: same gradients)
    if scaler.is_enabled():
        scale_before = scaler.get_scale()
        scaler.step(optimizer)  # a no-op when the unscaled gradients hold inf/NaN ...
        scaler.update()  # ... in which case the scale is halved
        skipped = scaler.get_scale() < scale_before
    else:
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if not skipped:
            optimizer.step()
    # 7. zero the gradients
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(loss=loss, grad_norm=grad_norm, tokens=int(step_tokens), skipped=skipped, stats=dict(zip(stats, stat_sums)))
