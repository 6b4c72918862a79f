"""The pieces of the training loop that tests reach: config, presets, schedule, loss, checkpoints.

train.py wires these together into the loop itself, which reads top to bottom.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import resource
import shutil
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from base_model import PRECISIONS, TORCH_DTYPES
from data.batching import collate
from data.format import IGNORE_INDEX
from lora import load_adapter, save_adapter


@dataclass
class TrainConfig:
    """Every setting of a training run; saved as config.json in the run folder and each checkpoint."""

    model: str | None = None  # base model: None = embedded SmolLM2-135M-Instruct, a local folder, or a hub id
    data: str | None = None  # dataset: None = embedded flashcards, a local file, or a hub id
    num_examples: int | None = None  # rows sampled after cleaning before the 85/10/5 split (None = all)
    output_dir: str = "runs/cpu"  # run folder: config.json, metrics.jsonl, adapter/, checkpoints/
    preset: str = "cpu"  # named defaults (see PRESETS); explicit flags override them
    epochs: float = 1.0  # passes over the training split
    max_steps: int | None = None  # stop after this many optimizer steps (None = epochs decide)
    batch_size: int = 16  # rows per micro-batch (ignored for splitting when max_batch_tokens is set)
    grad_accum: int = 1  # micro-batches per optimizer step; a step sees batch_size x grad_accum rows
    max_batch_tokens: int | None = 1024  # padded tokens per micro-batch (rows x longest row); None = fixed rows
    lr: float = 1e-3  # peak learning rate after warmup
    warmup_fraction: float = 0.03  # share of optimizer steps spent warming up linearly from 0
    weight_decay: float = 0.001  # AdamW weight decay, as the reference
    max_grad_norm: float = 1.0  # gradients are clipped to this global L2 norm
    rank: int = 16  # LoRA rank r
    alpha: float = 32.0  # LoRA alpha; the update is scaled by alpha / r
    dropout: float = 0.05  # dropout on the LoRA branch input
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # module-name suffixes that get adapters
    max_length: int = 512  # tokens per example; the answer is cut, never the prompt
    precision: str = "auto"  # auto | fp32 | fp16 | bf16 (auto: base_model.resolve_precision)
    grad_checkpointing: bool = False  # recompute activations in backward to save memory
    eval_every: int = 10  # optimizer steps between validation passes (also at step 0 and the end)
    save_every: int = 10  # optimizer steps between checkpoints (also at the end)
    keep_last: int = 2  # checkpoints kept on disk
    seed: int = 42  # sampling, split, data order, LoRA init and dropout
    max_nan_steps: int = 3  # stop after this many consecutive steps with a non-finite loss
    device: str | None = None  # cpu | cuda | cuda:N (None = CUDA when available)

    @property
    def step_examples(self) -> int:
        return self.batch_size * self.grad_accum

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


PRESETS: dict[str, dict] = {
    # The default: the embedded model and dataset, sized so `make run` (train + evaluate) takes
    # well under 10 minutes on a 2-core CPU.
    "cpu": dict(
        model=None, data=None, num_examples=None, epochs=1.0, batch_size=16, grad_accum=1,
        max_batch_tokens=1024, lr=1e-3, rank=16, alpha=32.0, dropout=0.05, max_length=512,
        precision="auto", grad_checkpointing=False, eval_every=10, save_every=10,
    ),
    # The reference notebook's run on a T4: TinyLlama-1.1B-Chat, 3,000 flashcards, fp16 AMP.
    "t4": dict(
        model="TinyLlama/TinyLlama-1.1B-Chat-v1.0", data="medalpaca/medical_meadow_medical_flashcards",
        num_examples=3000, epochs=2.0, batch_size=2, grad_accum=8, max_batch_tokens=None, lr=2e-4,
        rank=16, alpha=32.0, dropout=0.05, max_length=512, precision="fp16", grad_checkpointing=True,
        eval_every=50, save_every=50,
    ),
}


def config_from_preset(preset: str, **overrides) -> TrainConfig:
    """A preset's values with `overrides` on top (what the command line and experiment files do)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    values = {**PRESETS[preset], "preset": preset, **overrides}
    if "targets" in values:
        values["targets"] = tuple(values["targets"])
    return TrainConfig(**values)


def validate_config(config: TrainConfig) -> None:
    """Raise ValueError naming the first invalid setting (before any model is loaded)."""
    checks = [
        (config.rank > 0, f"--rank must be a positive integer, got {config.rank}"),
        (config.alpha > 0, f"--alpha must be positive, got {config.alpha}"),
        (config.lr > 0, f"--lr must be positive, got {config.lr}"),
        (0.0 <= config.dropout < 1.0, f"--dropout must be in [0, 1), got {config.dropout}"),
        (config.batch_size > 0, f"--batch-size must be positive, got {config.batch_size}"),
        (config.grad_accum > 0, f"--grad-accum must be positive, got {config.grad_accum}"),
        (config.epochs > 0, f"--epochs must be positive, got {config.epochs}"),
        (config.max_steps is None or config.max_steps > 0, f"--max-steps must be positive, got {config.max_steps}"),
        (config.max_batch_tokens is None or config.max_batch_tokens > 0, f"--max-batch-tokens must be positive, got {config.max_batch_tokens}"),
        (config.max_length >= 16, f"--max-length must be at least 16, got {config.max_length}"),
        (config.eval_every > 0 and config.save_every > 0, "--eval-every and --save-every must be positive"),
        (config.keep_last > 0, f"--keep-last must be positive, got {config.keep_last}"),
        (config.num_examples is None or config.num_examples > 0, f"--num-examples must be positive, got {config.num_examples}"),
        (config.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, got {config.precision!r}"),
        (config.preset in PRESETS, f"--preset must be one of {sorted(PRESETS)}, got {config.preset!r}"),
        (len(config.targets) > 0, "--targets must name at least one module"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Learning rate for optimizer step `step` (0-based).

    warmup:  step < warmup_steps          lr = peak * (step + 1) / warmup_steps
    decay:   warmup_steps <= step < total lr = peak * 0.5 * (1 + cos(pi * progress)),
             progress = (step - warmup_steps) / (total_steps - warmup_steps), from 0 towards 1
    floor:   step >= total_steps          lr = 0
    """
    if step >= total_steps:
        return 0.0
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def shared_prefix_length(batch: dict[str, torch.Tensor]) -> int:
    """Length of the token prefix shared by every row that no target is predicted from.

    Every example starts with the same system prompt (and chat-template header), so rows share a
    prefix. It stops one token before the earliest target, so no prediction comes from it.
    """
    ids, labels = batch["input_ids"], batch["labels"]
    same_as_first = (ids == ids[:1]).all(dim=0)  # [seq]
    common = int(same_as_first.int().cumprod(dim=0).sum())
    first_target = int((labels != IGNORE_INDEX).int().argmax(dim=1).min())  # earliest target position
    return max(0, min(common, first_target - 1))


def row_nll(model, batch: dict[str, torch.Tensor], share_prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed next-token NLL over target (answer + EOS) tokens, and each row's target count.

    Returns ([batch] float32 NLL in nats, differentiable; [batch] int64 counts). A row's sums do not
    depend on the other rows of the batch (padding is masked), which lets evaluation batch examples.

    Two savings that leave the math unchanged (tests/test_training.py compares both against plain
    full-logits cross-entropy):
      * The shared prompt prefix (system prompt + template header, about half of a short example's
        tokens) runs through the model once per batch instead of once per row: its keys and values
        are computed for one row, expanded to the batch, and the rest of each row attends to them.
        Gradients flow back through the expansion into the single prefix pass.
      * The 49,152-way lm_head runs only at positions whose next token is a target: the hidden
        state at position t predicts token t + 1. Prompt and padding positions never reach it.
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    prefix = shared_prefix_length(batch) if share_prefix and ids.shape[0] > 1 else 0
    cache = None
    if prefix >= 8 and not model.is_activation_checkpointing:
        cache = model.model(input_ids=ids[:1, :prefix], use_cache=True).cache
        for layer in cache.layers:  # [1, kv_heads, prefix, head_dim] -> [batch, ...], no copy
            layer.keys = layer.keys.expand(ids.shape[0], -1, -1, -1)
            layer.values = layer.values.expand(ids.shape[0], -1, -1, -1)
    else:
        prefix = 0
    hidden = model.model(input_ids=ids[:, prefix:], attention_mask=mask, cache=cache, use_cache=cache is not None).last_hidden_state
    targets = labels[:, prefix + 1 :]  # [batch, seq - prefix - 1]: the token each position predicts
    is_target = targets != IGNORE_INDEX
    logits = model.lm_head(hidden[:, :-1][is_target])  # [targets, vocab]
    token_nll = torch.nn.functional.cross_entropy(logits.float(), targets[is_target], reduction="none")  # [targets]
    row_of_target = is_target.nonzero()[:, 0]  # [targets], row-major like the boolean index above
    sums = torch.zeros(ids.shape[0], dtype=token_nll.dtype, device=token_nll.device).index_add(0, row_of_target, token_nll)
    return sums, is_target.sum(dim=1)


def answer_nll(model, batch: dict[str, torch.Tensor], share_prefix: bool = True) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over every target token of the batch (a scalar), and how many there are."""
    sums, counts = row_nll(model, batch, share_prefix)
    return sums.sum(), int(counts.sum())


def autocast_for(device_type: str, precision: str) -> Callable[[], AbstractContextManager]:
    """A zero-argument factory of the context each forward runs in.

    fp16/bf16: torch.autocast, so the matmuls run in half precision while LoRA A and B stay
    float32. fp32: no autocast at all.
    """
    if precision == "fp32":
        return nullcontext
    return functools.partial(torch.autocast, device_type, dtype=TORCH_DTYPES[precision])


def peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA allocation on a GPU; on a CPU the process's peak resident memory (it never goes down)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def accumulate_gradients(model, examples, batches, pad_id, device, autocast, scaler) -> tuple[float, int]:
    """Forward and backward every micro-batch of one optimizer step; return (summed NLL, real tokens).

    Each micro-batch's summed NLL is divided by the target-token count of the WHOLE step before
    backward, so the accumulated gradient is that of the step's mean token loss however the step is
    cut into micro-batches (a mean of per-micro-batch means would weight short answers more).
    """
    target_tokens = sum(examples[i].answer_token_count for batch in batches for i in batch)
    nll_sum, real_tokens = 0.0, 0
    for batch_indices in batches:
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in batch_indices], pad_id).items()}
        with autocast():
            nll, _ = answer_nll(model, batch)
        scaler.scale(nll / target_tokens).backward()
        nll_sum += nll.item()
        real_tokens += int(batch["attention_mask"].sum())
    return nll_sum, real_tokens


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean answer-token NLL of the step (nats)
    grad_norm: float  # global L2 norm of the LoRA gradients before clipping
    tokens: int  # real (non-pad) tokens processed
    skipped: bool  # True when inf/NaN gradients or loss made the step a no-op


def optimizer_step(
    model, optimizer, scaler, examples, batches, pad_id, device, autocast, lr: float, max_grad_norm: float,
    after_backward: Callable[[list[torch.nn.Parameter], float], float] | None = None,
) -> StepResult:
    """One optimizer step: set lr; forward/backward every micro-batch; unscale; clip; step; zero grads.

    With fp16 the GradScaler skips the step and halves its scale when gradients hold inf/NaN;
    without a scaler a non-finite loss or gradient norm skips the step the same way, so the
    weights never take garbage. `after_backward(params, nll_sum) -> nll_sum` is a test hook.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for group in optimizer.param_groups:
        group["lr"] = lr
    nll_sum, tokens = accumulate_gradients(model, examples, batches, pad_id, device, autocast, scaler)
    if after_backward is not None:
        nll_sum = after_backward(params, nll_sum)
    loss = nll_sum / sum(examples[i].answer_token_count for batch in batches for i in batch)
    scaler.unscale_(optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    if scaler.is_enabled():
        scale_before = scaler.get_scale()
        scaler.step(optimizer)  # a no-op when the unscaled gradients hold inf/NaN
        scaler.update()  # ... in which case the scale is halved
        skipped = scaler.get_scale() < scale_before
    else:
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if not skipped:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, tokens, skipped)


# ----------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary folder, checksummed, renamed into place.

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class TrainState:
    """Loop counters that a checkpoint carries besides the tensors."""

    step: int = 0  # optimizer steps completed
    best_val_loss: float = float("inf")
    skipped_steps: int = 0  # steps skipped for inf/NaN gradients or loss
    nan_streak: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    last_loss: float | None = None  # mean answer-token loss of the last step (None before the first)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into safetensors-ready tensors and JSON-ready hyperparameters."""
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value.detach().cpu().contiguous()
        for index, slots in state["state"].items()
        for name, value in slots.items()
    }
    return tensors, {"param_groups": state["param_groups"]}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every RNG the run uses: python and numpy as JSON, torch (and CUDA) as tensors."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, value in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = value
    version, keys, gauss = random.getstate()
    np_state = np.random.get_state()
    json_state = {
        "python": [version, list(keys), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, json_state


def restore_rng(tensors: dict[str, torch.Tensor], json_state: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, keys, gauss = json_state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = json_state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    run_dir: Path,
    model,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    config: TrainConfig,
    base_model: str,
    pause_hook=None,
    rng: tuple[dict, dict] | None = None,
) -> Path:
    """Write checkpoints/step-XXXXXX atomically: temp folder, files, manifest, then rename.

    A kill at any moment leaves either the complete checkpoint or a `.tmp-*` folder that resume
    ignores. `pause_hook` lets tests stop the process in the middle of a save. `rng` replaces the
    current RNG state (used when an interrupted step is discarded).
    """
    folder = run_dir / "checkpoints" / f"step-{state.step:06d}"
    staging = run_dir / "checkpoints" / f".tmp-step-{state.step:06d}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        save_adapter(model, staging, base_model=base_model)
        opt_tensors, opt_groups = optimizer_tensors(optimizer)
        save_file(opt_tensors, str(staging / "optimizer.safetensors"))
        if pause_hook:
            pause_hook()
        rng_tensors, rng_json = rng or rng_state()
        save_file(rng_tensors, str(staging / "rng.safetensors"))
        trainer_state = {
            "train_state": dataclasses.asdict(state),
            "optimizer": opt_groups,
            "scaler": scaler.state_dict(),
            "rng": rng_json,
        }
        (staging / "trainer_state.json").write_text(json.dumps(trainer_state))
        (staging / "config.json").write_text(json.dumps(config.to_json(), indent=2))
        write_manifest(staging)
        for path in staging.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # never leave a half-written checkpoint behind
        raise
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    return folder


def write_manifest(folder: Path) -> None:
    """manifest.json: size and sha256 of every other file in the checkpoint folder."""
    files = sorted(p for p in folder.iterdir() if p.name != MANIFEST)
    manifest = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def verify_checkpoint(folder: Path) -> str | None:
    """None when every file matches the manifest, else the reason (naming the file)."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return f"{manifest_path} is missing"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return f"{manifest_path} is unreadable"
    for name, expected in manifest.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, expected {expected['bytes']} (truncated?)"
        if _sha256(path) != expected["sha256"]:
            return f"{path} fails its sha256 check (corrupted)"
    return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete-looking checkpoint folders, newest first (temporary folders are ignored)."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-")), reverse=True)


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    for old in list_checkpoints(run_dir)[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, model, optimizer, scaler) -> TrainState:
    """Restore adapter, optimizer, scaler and RNG state from a verified checkpoint."""
    load_adapter(model, folder)
    saved = json.loads((folder / "trainer_state.json").read_text())
    restore_optimizer(optimizer, load_file(str(folder / "optimizer.safetensors")), saved["optimizer"])
    if saved["scaler"]:
        scaler.load_state_dict(saved["scaler"])
    restore_rng(load_file(str(folder / "rng.safetensors")), saved["rng"])
    return TrainState(**saved["train_state"])
