"""Fine-tune a chat model with hand-written LoRA: no Trainer, no TRL, no PEFT.

    python train.py                                   # cpu preset: embedded SmolLM2 + embedded data
    python train.py --data ../shared/data/medical_meadow_wikidoc_patient_info.json --num-examples 400 --max-steps 12
    python train.py --preset t4                       # the reference run: TinyLlama-1.1B-Chat, fp16, GPU
    python train.py --resume auto --output-dir runs/cpu

The loop, per optimizer step: set the learning rate; run the step's micro-batches (forward under
autocast, loss = summed answer-token NLL / the step's target-token count, backward through the
GradScaler); unscale; clip; step; update the scale; zero the gradients; log. Validation at step 0,
every --eval-every steps and at the end keeps the best adapter; checkpoints every --save-every.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from base_model import (
    PRECISIONS,
    TORCH_DTYPES,
    ModelLoadError,
    choose_device,
    load_model_and_tokenizer,
    model_display_name,
    model_skeleton,
    resolve_precision,
)
from data import collate, epoch_steps, micro_batches, padding_fraction, prepare_data, save_length_histogram
from lora import inject_lora, lora_parameters, save_adapter
from training import (
    PRESETS,
    TrainConfig,
    config_from_preset,
    TrainState,
    answer_nll,
    autocast_for,
    cosine_with_warmup,
    list_checkpoints,
    load_checkpoint,
    optimizer_step,
    peak_memory_gb,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    validate_config,
    verify_checkpoint,
)


def test_hook(point: str, step: int) -> str | None:
    """Fault injection for tests/test_reliability.py; does nothing unless these are set:

    MEDLORA_TEST_PAUSE="step:5", "eval:4" or "save:4": print a marker and sleep there (mid-step,
        mid-evaluation, mid-checkpoint-write), so a test can kill -9 the process at that point.
    MEDLORA_TEST_FAULT="inf_grad:2,3" or "nan_loss:2,3,4": returns the fault for those steps.
    """
    if point == "fault":
        kind, _, steps = os.environ.get("MEDLORA_TEST_FAULT", "").partition(":")
        return kind if str(step) in steps.split(",") else None
    if os.environ.get("MEDLORA_TEST_PAUSE") == f"{point}:{step}":
        print(f"[test-pause] {point} step {step}", flush=True)
        time.sleep(600)
    return None


class TrainingStopped(Exception):
    """The run stopped on purpose (diverged, interrupted); the message says why and what was kept."""


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop records logged after `step` by an interrupted run, so a resumed log has no duplicates."""
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


@torch.no_grad()
def validation_loss(model, examples, pad_id, config, device, autocast) -> tuple[float, int]:
    """Answer-token NLL summed over the whole split, divided by its target-token count."""
    model.eval()
    lengths = [len(e.input_ids) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: lengths[i])
    nll_sum, count = 0.0, 0
    for batch_indices in micro_batches(order, lengths, config.batch_size, config.max_batch_tokens):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in batch_indices], pad_id).items()}
        with autocast():
            nll, n = answer_nll(model, batch)
        nll_sum, count = nll_sum + nll.item(), count + n
    model.train()
    return nll_sum / count, count


def save_loss_curve(run_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    figure, axes = plt.subplots(figsize=(7, 4))
    if train:
        axes.plot(*zip(*train), label="train loss", color="#4477aa")
    if val:
        axes.plot(*zip(*val), "o-", label="validation loss", color="#cc3311")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("answer-token loss (nats)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(run_dir / "loss_curve.png", dpi=100)
    plt.close(figure)


def prepare_run_dir(config: TrainConfig, resume: str | None, overwrite: bool) -> tuple[Path, Path | None]:
    """Create or check the run folder; return it and the checkpoint to resume from (or None)."""
    run_dir = Path(config.output_dir)
    if resume:
        candidates = [Path(resume)] if resume != "auto" else list_checkpoints(run_dir)
        for folder in candidates:
            problem = verify_checkpoint(folder)
            if problem is None:
                return run_dir, folder
            print(f"[resume] skipping {folder.name}: {problem}; falling back to the previous checkpoint")
        if resume != "auto":
            raise ValueError(f"--resume {resume}: not a usable checkpoint")
        print(f"[resume] no complete checkpoint in {run_dir}; starting from step 0")
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise ValueError(f"--output-dir {run_dir} already holds a run; pass --resume auto to continue it or --overwrite to replace it")
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"--output-dir {run_dir} is not writable ({error.strerror})") from None
    return run_dir, None


def train(config: TrainConfig, resume: str | None = None, overwrite: bool = False) -> dict:
    """Run one training job end to end; returns the final summary (also printed)."""
    validate_config(config)
    run_dir, checkpoint = prepare_run_dir(config, resume, overwrite)
    if checkpoint is not None:
        saved = json.loads((checkpoint / "config.json").read_text())
        saved["targets"] = tuple(saved["targets"])
        config = TrainConfig(**{**saved, "output_dir": config.output_dir})
    print("[config] " + json.dumps(config.to_json()))

    # ---- model, data, adapters ------------------------------------------------------------------
    inject_lora(model_skeleton(config.model), config.targets, config.rank, config.alpha, config.dropout)  # bad --targets fail before the weights load
    device = choose_device(config.device)
    precision = resolve_precision(config.precision, device)
    torch.manual_seed(config.seed)
    model, tokenizer = load_model_and_tokenizer(config.model, dtype=TORCH_DTYPES[precision], device=device)
    base_name = model_display_name(config.model)
    data = prepare_data(tokenizer, config.data, config.num_examples, config.seed, config.max_length)
    print("\n".join(data.report_lines()))
    train_examples = data.examples.train
    lengths = [len(e.input_ids) for e in train_examples]
    summary = inject_lora(model, config.targets, config.rank, config.alpha, config.dropout)
    print(f"[lora] {summary}")
    if config.grad_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    # ---- optimizer, schedule, mixed precision ---------------------------------------------------
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    autocast = autocast_for(device.type, precision)

    steps_per_epoch = math.ceil(len(train_examples) / config.step_examples)
    total_steps = math.ceil(config.epochs * steps_per_epoch)
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    warmup_steps = max(1, math.ceil(config.warmup_fraction * total_steps))
    print(
        f"[train] {len(train_examples)} examples, {config.step_examples} per step, {steps_per_epoch} steps/epoch, "
        f"{total_steps} steps ({warmup_steps} warmup), precision {precision} on {device}"
    )

    state = TrainState()
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scaler)
        truncate_metrics(run_dir, state.step)
        print(f"[resume] continuing from {checkpoint.name} (step {state.step})")
    else:
        (run_dir / "config.json").write_text(json.dumps(config.to_json(), indent=2) + "\n")
        save_length_histogram(data.token_lengths(), str(run_dir / "token_lengths.png"), config.max_length)

    def evaluate_and_keep_best() -> None:
        test_hook("eval", state.step)
        val_loss, _ = validation_loss(model, data.examples.validation or train_examples[:32], tokenizer.pad_token_id, config, device, autocast)
        append_metrics(run_dir, {"step": state.step, "val_loss": val_loss, "val_ppl": math.exp(val_loss)})
        tqdm.write(f"[eval] step {state.step:5d} | val loss {val_loss:.4f} | val answer-ppl {math.exp(val_loss):.3f}")
        if val_loss < state.best_val_loss:
            state.best_val_loss = val_loss
            save_adapter(model, run_dir / "adapter", base_model=base_name)

    def checkpoint_now(rng=None) -> None:
        save_checkpoint(run_dir, model, optimizer, scaler, state, config, base_name, lambda: test_hook("save", state.step), rng)
        prune_checkpoints(run_dir, config.keep_last)

    def inject_test_faults(params, nll_sum: float) -> float:
        test_hook("step", state.step + 1)
        fault = test_hook("fault", state.step + 1)
        if fault == "inf_grad":
            params[0].grad[0, 0] = float("inf")
        elif fault == "nan_loss":
            for param in params:
                param.grad.fill_(float("nan"))
            return float("nan")
        return nll_sum

    if state.step == 0:
        evaluate_and_keep_best()

    # ---- the loop -------------------------------------------------------------------------------
    start = time.perf_counter() - state.elapsed_s
    padded_batches = []
    step_rng = None  # RNG state at the start of the current step
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True)
    try:
        while state.step < total_steps:
            step_rng = rng_state()  # restored into a checkpoint written on Ctrl-C mid-step
            epoch, position = divmod(state.step, steps_per_epoch)
            step_indices = epoch_steps(lengths, config.step_examples, config.seed, epoch)[position]
            lr = cosine_with_warmup(state.step, total_steps, warmup_steps, config.lr)
            step_started = time.perf_counter()
            batches = micro_batches(step_indices, lengths, config.batch_size, config.max_batch_tokens)
            padded_batches += batches
            result = optimizer_step(
                model, optimizer, scaler, train_examples, batches, tokenizer.pad_token_id, device, autocast,
                lr, config.max_grad_norm, after_backward=inject_test_faults,
            )
            loss, grad_norm, step_tokens, skipped = result.loss, result.grad_norm, result.tokens, result.skipped
            state.last_loss = loss
            state.nan_streak = 0 if math.isfinite(loss) else state.nan_streak + 1
            state.skipped_steps += int(skipped)
            state.step += 1
            state.tokens_seen += step_tokens
            state.elapsed_s = time.perf_counter() - start
            tokens_per_s = step_tokens / (time.perf_counter() - step_started)

            record = {
                "step": state.step, "epoch": round(state.step / steps_per_epoch, 4), "loss": loss, "lr": lr,
                "grad_norm": grad_norm, "tokens": step_tokens, "tokens_per_s": round(tokens_per_s, 1),
                "elapsed_s": round(state.elapsed_s, 2), "skipped": skipped,
            }
            if scaler.is_enabled():
                record["loss_scale"] = scaler.get_scale()
            append_metrics(run_dir, record)
            bar.update(1)
            tqdm.write(
                f"step {state.step:5d}/{total_steps} | loss {loss:.4f} | lr {lr:.2e} | grad-norm {grad_norm:.3f} | "
                f"tok/s {tokens_per_s:6.0f} | mem {peak_memory_gb(device):.2f} GB" + (" | skipped (inf/NaN)" if skipped else "")
            )
            if state.nan_streak >= config.max_nan_steps:
                raise TrainingStopped(
                    f"loss was NaN or infinite for {state.nan_streak} consecutive steps; stopped at step {state.step}. "
                    f"The last good checkpoint and the best adapter in {run_dir} are kept (try a lower --lr)"
                )
            if state.step % config.eval_every == 0 or state.step == total_steps:
                evaluate_and_keep_best()
            if state.step % config.save_every == 0 or state.step == total_steps:
                checkpoint_now()
    except KeyboardInterrupt:
        bar.close()
        optimizer.zero_grad(set_to_none=True)
        checkpoint_now(rng=step_rng)
        raise TrainingStopped(f"interrupted: checkpoint saved at step {state.step}; continue with --resume auto --output-dir {run_dir}") from None
    finally:
        bar.close()  # before any message, so an error is printed on a line of its own

    save_loss_curve(run_dir)
    final = {
        "train_loss": state.last_loss,
        "best_val_loss": state.best_val_loss,
        "best_val_ppl": math.exp(state.best_val_loss),
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "time_s": round(state.elapsed_s, 1),
        "peak_memory_gb": round(peak_memory_gb(device), 3),
        "trainable_params": summary.trainable,
        "total_params": summary.total,
        "padding_fraction": round(padding_fraction(padded_batches, lengths), 4) if padded_batches else None,
    }
    (run_dir / "summary.json").write_text(json.dumps(final, indent=2) + "\n")
    print(
        f"[done] train loss {'n/a' if state.last_loss is None else f'{state.last_loss:.4f}'} | best val loss {final['best_val_loss']:.4f} "
        f"(answer-ppl {final['best_val_ppl']:.3f}) | {final['time_s']} s | peak mem {final['peak_memory_gb']:.2f} GB | "
        f"trainable {summary.trainable:,} ({summary.percent:.4f}%) | skipped steps {state.skipped_steps} | adapter {run_dir / 'adapter'}"
    )
    return final


def parse_args(argv: list[str] | None) -> tuple[TrainConfig, argparse.Namespace]:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    add = parser.add_argument
    add("--preset", choices=sorted(PRESETS), default="cpu", help="named defaults; any flag below overrides them (default: cpu)")
    add("--model", help="base model: local folder or hub id (default: the embedded SmolLM2-135M-Instruct)")
    add("--data", help="dataset file (.json/.jsonl/.csv/.parquet) or hub id (default: embedded flashcards)")
    add("--num-examples", type=int, help="rows sampled after cleaning, split 85/10/5 (default: all)")
    add("--output-dir", default=defaults.output_dir, help=f"run folder (default: {defaults.output_dir})")
    add("--epochs", type=float, help="passes over the training split")
    add("--max-steps", type=int, help="stop after this many optimizer steps")
    add("--batch-size", type=int, help="rows per micro-batch")
    add("--grad-accum", type=int, help="micro-batches per optimizer step")
    add("--max-batch-tokens", type=int, help="padded tokens per micro-batch; 0 = fixed --batch-size rows")
    add("--lr", type=float, help="peak learning rate")
    add("--rank", type=int, help="LoRA rank r")
    add("--alpha", type=float, help="LoRA alpha (update scaled by alpha / r)")
    add("--dropout", type=float, help="dropout on the LoRA branch, in [0, 1)")
    add("--targets", help="comma-separated module-name suffixes (default: q_proj,v_proj)")
    add("--max-length", type=int, help="tokens per example (default: 512)")
    add("--precision", choices=PRECISIONS, help="auto: bf16 or fp16 on CUDA; bf16 on a CPU with native bf16 matmuls (AVX512-BF16/AMX), else fp32")
    add("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None, help="recompute activations in backward")
    add("--eval-every", type=int, help="optimizer steps between validation passes")
    add("--save-every", type=int, help="optimizer steps between checkpoints")
    add("--keep-last", type=int, help=f"checkpoints kept (default: {defaults.keep_last})")
    add("--max-nan-steps", type=int, help=f"stop after this many consecutive NaN losses (default: {defaults.max_nan_steps})")
    add("--resume", nargs="?", const="auto", help="'auto' (newest complete checkpoint in --output-dir) or a checkpoint folder")
    add("--overwrite", action="store_true", help="replace an existing run in --output-dir")
    add("--seed", type=int, help=f"seed for sampling, split, order, init, dropout (default: {defaults.seed})")
    add("--device", help="cpu, cuda or cuda:N (default: CUDA when available)")
    args = parser.parse_args(argv)

    overrides = {"output_dir": args.output_dir}
    for name in (
        "model", "data", "num_examples", "epochs", "max_steps", "batch_size", "grad_accum", "max_batch_tokens", "lr",
        "rank", "alpha", "dropout", "max_length", "precision", "grad_checkpointing", "eval_every", "save_every",
        "keep_last", "max_nan_steps", "seed", "device",
    ):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.targets is not None:
        overrides["targets"] = [t.strip() for t in args.targets.split(",") if t.strip()]
    if overrides.get("max_batch_tokens") == 0:
        overrides["max_batch_tokens"] = None
    return config_from_preset(args.preset, **overrides), args


USER_FAILURES = (TrainingStopped, ValueError, ModelLoadError, OSError)  # DataError and AdapterError are ValueErrors


def report_failure(error: BaseException) -> int:
    """Print one line for a failure the user can act on (no traceback) and return the exit code.

    2: bad input or settings, unreadable or unwritable files; 3: the run stopped itself (NaN);
    130: interrupted, with a checkpoint saved.
    """
    if isinstance(error, TrainingStopped):
        print(f"stopped: {' '.join(str(error).split())}", file=sys.stderr)
        return 130 if "interrupted" in str(error) else 3
    if isinstance(error, OSError):
        print(f"error: {error.strerror or error} ({error.filename or 'file system'})", file=sys.stderr)
    else:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)  # always one line
    return 2


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    try:
        train(config, resume=args.resume, overwrite=args.overwrite)
    except USER_FAILURES as error:
        return report_failure(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
