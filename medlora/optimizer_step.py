"""One optimizer step of LoRA training, from its micro-batches to zeroed gradients.

    lr = cosine_with_warmup(step, total_steps, warmup_steps, peak_lr)      # 1. (the caller sets it)
    for group in optimizer.param_groups:
        group["lr"] = lr
    outcome = optimizer_step(model, optimizer, scaler, answer_nll, examples, batches, pad_id, device, autocast, max_grad_norm)
    outcome.loss, outcome.grad_norm, outcome.tokens, outcome.skipped

train.py's loop calls this once per step, and bench/train_speed.py times this same function, so
the benchmark measures the step a user's run takes. Steps 2 to 7 of the loop live here, in order.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from data import EncodedExample
from medlora.distributed import SINGLE_PROCESS, World
from medlora.loss import batch_on_device

LossFunction = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int]]  # -> (summed NLL, targets)


@dataclass(frozen=True)
class StepOutcome:
    """What one optimizer step did, summed over the ranks."""

    loss: float  # mean answer-token NLL of the step (nats): summed NLL / the step's target tokens
    grad_norm: float  # global L2 norm of the gradients before clipping
    tokens: int  # real (non-pad) tokens the step read
    skipped: bool  # True: the loss or the gradients were not finite and the weights were left as they were


def adamw(params, lr: float, weight_decay: float, device: torch.device | str) -> torch.optim.AdamW:
    """AdamW as train.py builds it: one fused kernel per step on a GPU, foreach on a CPU.

    On CUDA the fused kernel launches once and keeps no per-step temporaries (TRL's default there
    too); on a CPU fused measured 1.02x foreach (bench/results/train_speed_levers_xeon.log), within
    noise, and foreach is what the golden per-step losses were recorded with.
    """
    if torch.device(device).type == "cuda":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loss_fn: LossFunction,
    examples: Sequence[EncodedExample],
    batches: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device | str,
    autocast: Callable[[], AbstractContextManager],
    max_grad_norm: float,
    world: World = SINGLE_PROCESS,
) -> StepOutcome:
    """Take one optimizer step over the micro-batches `batches` (lists of indices into `examples`).

    Every rank passes the same `batches` (the whole global step) and runs its own share of them.
    The learning rate is the caller's to set before the call. `loss_fn(model, batch)` returns the
    batch's summed answer-token NLL and its target count: medlora.loss.answer_nll, or a benchmark's
    alternative. The optimizer's parameters are the ones clipped and summed over the ranks.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # 2. forward and backward per micro-batch of this rank's shard. Each micro-batch's summed NLL
    # is divided by the target tokens of the WHOLE global step, so the gradient is that of the
    # step's mean token loss however the step is cut (a mean of per-micro-batch means would
    # weight short answers more). Every rank knows the whole step, so it counts them itself.
    target_tokens = sum(examples[i].answer_token_count for batch in batches for i in batch)
    nll_sum, step_tokens = 0.0, 0
    for batch_indices in world.shard(batches):
        batch = batch_on_device(examples, batch_indices, pad_id, device)
        with autocast():
            nll, _ = loss_fn(model, batch)
        scaler.scale(nll / target_tokens).backward()
        nll_sum += nll.item()
        step_tokens += int(batch["attention_mask"].sum())
    # 3. sum the gradients (once, after the last micro-batch) and the logged numbers over the ranks
    world.sum_gradients(params)
    nll_sum, step_tokens = world.sum(nll_sum, step_tokens)
    loss = nll_sum / target_tokens
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
    return StepOutcome(loss=loss, grad_norm=grad_norm, tokens=step_tokens, skipped=skipped)
