"""Fine-tune a chat model with hand-written LoRA: no Trainer, no TRL, no PEFT.

    python train.py                                   # cpu preset: embedded SmolLM2 + embedded data
    python train.py --data ../shared/data/medical_meadow_wikidoc_patient_info.json --num-examples 400 --max-steps 12
    python train.py --preset t4                       # the reference run: TinyLlama-1.1B-Chat, fp16, GPU
    python train.py --dpo-epochs 0 --output-dir runs/sft-only                   # stage 1 (SFT) alone
    python train.py --resume auto --output-dir runs/cpu
    python train.py --config runs/cpu/config.json --output-dir runs/cpu-again --overwrite
    torchrun --nproc_per_node 2 train.py --output-dir runs/cpu-2ranks    # 2 ranks; docs/distributed.md

The loop, per optimizer step: set the learning rate; run the step's micro-batches (forward under
autocast, loss = summed answer-token NLL / the step's target-token count, backward through the
GradScaler); unscale; clip; step, or skip a step whose loss or gradients are not finite; zero the
gradients; log. Validation at step 0, every --eval-every steps and at the end keeps the best
adapter; checkpoints every --save-every. Everything lands in the run folder (medlora/run_folder.py).

Two stages run through that one loop (run_stage). Stage 1 is SFT on the answers. Stage 2, when
--dpo-epochs > 0, is preference training (DPO, or ORPO with --preference-loss orpo;
medlora/preference.py): pairs built from the training rows with the best SFT adapter's own answers
as the rejected side, for DPO that adapter's log-probabilities taken once as the reference, then
the same loop with the preference loss in place of the NLL. Steps count on across the stages, so
a checkpoint and --resume land inside either.

Under torchrun every rank cuts the same global step into the same micro-batches and runs its own
share of them; one all-reduce per step sums the gradients (medlora/distributed.py), so the ranks
take identical optimizer steps and rank 0 alone prints and writes the run folder.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from data import SCOPE_TOPICS, epoch_steps, micro_batches, padding_fraction, prepare_data, repeat_scope_rows, save_length_histogram
from lora import VARIANTS, LoRASummary, inject_lora, load_adapter, lora_parameters, save_adapter
from medlora.answer import opening_declines
from medlora.checkpoint import TrainState, load_checkpoint, rng_state, save_checkpoint
from medlora.config import PRESETS, TrainConfig, check_preset, config_from_preset
from medlora.distributed import SINGLE_PROCESS, World, leave, start_ranks
from medlora.errors import EXIT_DIVERGED, EXIT_INTERRUPTED, USER_FAILURES, TrainingStopped, report_failure
from medlora.flags import add_shared_flags
from medlora.loss import AnswerLoss, validation_loss
from medlora.model import (
    TORCH_DTYPES,
    autocast_for,
    choose_device,
    load_model_and_tokenizer,
    model_display_name,
    model_skeleton,
    peak_memory_gb,
    resolve_precision,
    use_shape_agnostic_attention,
)
from medlora.optimizer_step import StepLoss, adamw, optimizer_step, parameter_groups
from medlora.preference import (
    DECLINE_REJECTED,
    PREFERENCE_SUMMARY,
    EncodedPair,
    PreferenceLoss,
    build_pairs,
    encode_pairs,
    load_pairs,
    pair_counts,
    save_pairs,
    with_reference_logps,
)
from medlora.run_folder import (
    ADAPTER,
    append_metrics,
    open_run_dir,
    save_loss_curve,
    truncate_metrics,
    write_config,
    write_summary,
)
from medlora.schedule import cosine_with_warmup, schedule_lengths
from medlora.scope_gate import fit_gate


def load_base_model(config: TrainConfig, world: World):
    """The base model and tokenizer on this rank's device and the chosen precision, after a check of --targets.

    The targets are first matched on a weightless (meta-device) copy, so a bad --targets fails
    before the slow load. The seed is set before loading, so the LoRA init is reproducible. Rank 0
    loads first, so only it builds the embedded model's cache on first use.
    """
    inject_lora(model_skeleton(config.model), config.targets, config.rank, config.alpha, config.dropout, config.lora_variant)
    precision = resolve_precision(config.precision, world.device)
    torch.manual_seed(config.seed)
    with world.main_first("loading the base model"):
        model, tokenizer = load_model_and_tokenizer(config.model, dtype=TORCH_DTYPES[precision], device=world.device)
    return model, tokenizer, world.device, precision


def resume_or_start(checkpoint: Path | None, config: TrainConfig, data, model, optimizer, scaler, world: World) -> TrainState:
    """Restore adapter, optimizer, scaler, this rank's RNG and counters from `checkpoint`, or start a new run folder."""
    run_dir = Path(config.output_dir)
    if checkpoint is None:
        if world.is_main:
            write_config(run_dir, config)
            save_length_histogram(data.token_lengths(), str(run_dir / "token_lengths.png"), config.max_length)
        return TrainState()
    state = load_checkpoint(checkpoint, model, optimizer, scaler, rank=world.rank)
    if world.is_main:
        truncate_metrics(run_dir, state.step)
    print(f"[resume] continuing from {checkpoint.name} (step {state.step})")
    return state


def validate(model, data, pad_id: int, config: TrainConfig, autocast, state: TrainState, base_name: str, world: World, stage: str) -> None:
    """Log the validation loss at this step and save adapter/ when the stage's criterion keeps it.

    SFT keeps the lowest validation loss. DPO keeps its latest adapter whose validation answer-perplexity
    is at most --dpo-max-ppl-increase above the best SFT adapter's: the validation split holds medical
    answers beside the declines and referrals, so a model that learns to decline medicine loses on it
    and is not kept (the criterion does not simply reward declining). Every rank scores its shard of
    the split (the sums are all-reduced); rank 0 writes. Without validation rows nothing is logged and
    adapter/ simply holds the latest adapter.
    """
    run_dir = Path(config.output_dir)
    if not data.examples.validation:
        if world.is_main:
            save_adapter(model, run_dir / ADAPTER, base_model=base_name)
        return
    val_loss = validation_loss(model, data.examples.validation, pad_id, config.batch_size, config.max_batch_tokens, autocast, world)
    if world.is_main:
        append_metrics(run_dir, {"step": state.step, "val_loss": val_loss, "val_ppl": math.exp(val_loss)})
    if stage == "sft":
        kept = val_loss < state.best_val_loss
        state.best_val_loss = min(state.best_val_loss, val_loss)
    else:
        kept = val_loss <= dpo_val_loss_bound(state, config)
    tqdm.write(f"[eval] step {state.step:5d} | val loss {val_loss:.4f} | val answer-ppl {math.exp(val_loss):.3f}" + (" | kept" if kept else ""))
    if kept:
        state.kept_step, state.kept_val_loss = state.step, val_loss
        if world.is_main:
            save_adapter(model, run_dir / ADAPTER, base_model=base_name)


def dpo_val_loss_bound(state: TrainState, config: TrainConfig) -> float:
    """The highest validation loss a DPO adapter may have and be kept: the best SFT loss plus
    log(1 + --dpo-max-ppl-increase), i.e. answer-perplexity at most that fraction above SFT's."""
    return state.best_val_loss + math.log1p(config.dpo_max_ppl_increase)


def train(config: TrainConfig, world: World = SINGLE_PROCESS, given: set[str] = frozenset(), resume: str | None = None,
          overwrite: bool = False) -> dict:
    """Run one training job end to end as this rank of `world`; returns the final summary (also printed and saved).

    `config` has passed config.validate(); `given`: the settings set on the command line (resume refuses changes).
    """
    config, checkpoint = open_run_dir(config, given, resume, overwrite, world)
    run_dir = Path(config.output_dir)
    print("[config] " + json.dumps(config.to_json()))
    print(f"[ranks] {world.describe()}")

    # ---- model, data, adapters ------------------------------------------------------------------
    model, tokenizer, device, precision = load_base_model(config, world)
    use_shape_agnostic_attention(device)  # CUDA: no per-shape cuDNN attention plans (docs/performance.md)
    base_name = model_display_name(config.model)
    data = prepare_data(tokenizer, config.data, config.num_examples, config.seed, config.max_length)
    print("\n".join(data.report_lines()))
    if not data.examples.validation:
        print("[eval] no validation rows: no validation loss is logged; adapter/ holds the latest adapter")
    train_examples, pad_id = repeat_scope_rows(data.examples.train, config.scope_repeats), tokenizer.pad_token_id
    lengths = [len(e.input_ids) for e in train_examples]
    lora = inject_lora(model, config.targets, config.rank, config.alpha, config.dropout, config.lora_variant)
    print(f"[lora] {lora}")
    params = lora_parameters(model)
    world.copy_from_main(params)  # every rank starts from rank 0's adapter ...
    world.seed_per_rank(config.seed)  # ... and draws its own dropout masks
    if config.grad_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    # ---- optimizer, schedule, mixed precision ---------------------------------------------------
    optimizer = adamw(parameter_groups(model, config.lora_plus_ratio), config.lr, config.weight_decay, device)  # fused on a GPU, foreach on a CPU
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # loss scaling for fp16 only
    autocast = autocast_for(device.type, precision)
    steps_per_epoch, total_steps, warmup_steps = schedule_lengths(len(train_examples), config)
    print(f"[train] {len(train_examples)} examples, {config.step_examples} per step, {steps_per_epoch} steps/epoch, "
          f"{total_steps} steps ({warmup_steps} warmup), precision {precision} on {device}")

    state = resume_or_start(checkpoint, config, data, model, optimizer, scaler, world)
    if state.step == 0:
        validate(model, data, pad_id, config, autocast, state, base_name, world, stage="sft")

    # ---- stage 1: supervised fine-tuning on the answers ------------------------------------------
    sft_loss = AnswerLoss(train_examples, pad_id, device, topic_weights=scope_weights(config.scope_weight, config.borderline_weight, config.safety_weight))
    padded_batches = []

    def sft_batches(step: int) -> list[list[int]]:
        epoch, position = divmod(step, steps_per_epoch)
        batches = micro_batches(epoch_steps(lengths, config.step_examples, config.seed, epoch)[position], lengths, config.batch_size,
                                config.max_batch_tokens)
        padded_batches.extend(batches)
        return batches

    sft = Stage("sft", sft_loss, sft_batches, first_step=0, steps=total_steps, warmup_steps=warmup_steps, peak_lr=config.lr,
                steps_per_epoch=steps_per_epoch)
    run_stage(sft, model, optimizer, scaler, data, pad_id, config, autocast, state, base_name, device, world)

    # ---- stage 2: preference training (DPO or ORPO) on pairs built from the training rows ---------
    pairs = preference_pairs(model, tokenizer, data, pad_id, config, autocast, state, total_steps, world) if config.dpo_epochs else []
    if pairs:
        pair_lengths = [p.length for p in pairs]
        pair_steps = math.ceil(len(pairs) / config.dpo_pairs_per_step)
        dpo_steps = math.ceil(config.dpo_epochs * pair_steps)

        def dpo_batches(step: int) -> list[list[int]]:
            epoch, position = divmod(step - total_steps, pair_steps)
            return micro_batches(epoch_steps(pair_lengths, config.dpo_pairs_per_step, config.seed, epoch)[position], pair_lengths,
                                 max(1, config.batch_size // 2), config.max_batch_tokens)

        if state.step == total_steps:
            optimizer.state.clear()  # a fresh AdamW for the stage: its moments start at zero
        dpo = Stage("dpo", PreferenceLoss(pairs, pad_id, device, config.dpo_beta, config.dpo_nll_weight, method=config.preference_loss), dpo_batches,
                    first_step=total_steps, steps=dpo_steps, warmup_steps=max(1, math.ceil(config.warmup_fraction * dpo_steps)),
                    peak_lr=config.dpo_lr, steps_per_epoch=pair_steps)
        weight = "beta" if config.preference_loss == "dpo" else "lambda"
        print(f"[dpo] {config.preference_loss} loss, {len(pairs)} pairs, {config.dpo_pairs_per_step} per step, {dpo_steps} steps, {weight} {config.dpo_beta}, "
              f"lr {config.dpo_lr:.1e}; adapter/ keeps the latest adapter with val answer-ppl <= {math.exp(dpo_val_loss_bound(state, config)):.3f}")
        run_stage(dpo, model, optimizer, scaler, data, pad_id, config, autocast, state, base_name, device, world)

    summary = run_summary(state, lora, peak_memory_gb(device), padding_fraction(padded_batches, lengths) if padded_batches else None)
    if world.is_main:
        fit_scope_gate_on_saved_adapter(model, tokenizer, data, run_dir / ADAPTER, autocast, summary)
        save_loss_curve(run_dir)
        write_summary(run_dir, summary)
    print(done_line(summary, lora, run_dir))
    return summary


@dataclass(frozen=True)
class Stage:
    """One stage of the run, as run_stage() loops over it: its loss, its micro-batches per step, its schedule.

    Steps are counted over the whole run (state.step): the SFT stage has steps [0, steps), the DPO
    stage [first_step, first_step + steps), so a checkpoint names one point of the run and resume
    lands inside the right stage.
    """

    name: str  # "sft" | "dpo"
    step_loss: StepLoss  # medlora.loss.AnswerLoss | medlora.preference.PreferenceLoss
    batches: Callable[[int], list[list[int]]]  # global step -> that step's micro-batches (indices into the loss's rows)
    first_step: int  # global step the stage starts at
    steps: int  # optimizer steps in the stage
    warmup_steps: int  # linear warmup steps at the stage's start
    peak_lr: float  # learning rate after warmup, decayed along a cosine to the stage's end
    steps_per_epoch: int  # for the "epoch" column of metrics.jsonl

    @property
    def end(self) -> int:
        return self.first_step + self.steps


def run_stage(stage: Stage, model, optimizer, scaler, data, pad_id: int, config: TrainConfig, autocast, state: TrainState,
              base_name: str, device, world: World) -> None:
    """THE LOOP of one stage, from state.step (a resumed run may start inside it) to the stage's end."""
    run_dir = Path(config.output_dir)
    start = time.perf_counter() - state.elapsed_s
    step_rng = None  # RNG state at the start of the current step, saved if Ctrl-C discards the step
    bar = tqdm(total=stage.steps, initial=max(0, state.step - stage.first_step), desc=stage.name, unit="step", dynamic_ncols=True,
               disable=not world.is_main or state.step >= stage.end)
    try:
        while state.step < stage.end:
            step_rng = rng_state()
            step_started = time.perf_counter()
            batches = stage.batches(state.step)
            # 1. learning rate of this step (LoRA+: B's group at --lora-plus-ratio times it)
            lr = cosine_with_warmup(state.step - stage.first_step, stage.steps, stage.warmup_steps, stage.peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_ratio"]
            # 2. forward and backward per micro-batch (the summed loss / the step's total: target tokens
            # or pairs), 3. sum the gradients over the ranks, 4. unscale, 5. clip, 6. step or skip a
            # non-finite one, 7. zero the gradients: medlora/optimizer_step.py, the very function
            # bench/train_speed.py times
            outcome = optimizer_step(model, optimizer, scaler, stage.step_loss, batches, autocast, config.max_grad_norm, world)

            # 8. log: one line and one metrics.jsonl record per step (rank 0)
            state.count_step(outcome.loss, outcome.skipped, elapsed_s=time.perf_counter() - start)
            tokens_per_s = outcome.tokens / (time.perf_counter() - step_started)
            record = {
                "step": state.step, "epoch": round((state.step - stage.first_step) / stage.steps_per_epoch, 4), "loss": outcome.loss,
                "lr": lr, "grad_norm": outcome.grad_norm, "tokens": outcome.tokens, "tokens_per_s": round(tokens_per_s, 1),
                "elapsed_s": round(state.elapsed_s, 2), "skipped": outcome.skipped,
            } | ({"loss_scale": scaler.get_scale()} if scaler.is_enabled() else {}) | preference_record(outcome, stage, batches)
            if world.is_main:
                append_metrics(run_dir, record)
            bar.update(1)
            tqdm.write(step_line(record, stage.end, peak_memory_gb(device)))
            if state.nan_streak >= config.max_nan_steps:
                raise TrainingStopped(
                    f"loss was NaN or infinite for {state.nan_streak} consecutive steps; stopped at step {state.step}. "
                    f"The last good checkpoint and the best adapter in {run_dir} are kept (try a lower --lr)",
                    EXIT_DIVERGED,
                )
            # 9. validate, 10. checkpoint (every rank's RNG state goes in it)
            if (state.step - stage.first_step) % config.eval_every == 0 or state.step == stage.end:
                validate(model, data, pad_id, config, autocast, state, base_name, world, stage.name)
            if state.step % config.save_every == 0 or state.step == stage.end:
                save_checkpoint(run_dir, model, optimizer, scaler, state, config, base_name, world=world)
    except KeyboardInterrupt:
        raise interrupted(config, model, optimizer, scaler, state, base_name, step_rng, world) from None
    finally:
        bar.close()  # before any message, so an error is printed on a line of its own


def preference_record(outcome, stage: Stage, batches: list[list[int]]) -> dict:
    """The DPO stage's diagnostics for metrics.jsonl: mean chosen and rejected rewards, their margin, and
    the share of pairs whose chosen reward is the higher (empty for the SFT stage)."""
    if stage.name != "dpo":
        return {}
    pairs = stage.step_loss.total(batches)
    chosen, rejected = outcome.stats["chosen_reward"] / pairs, outcome.stats["rejected_reward"] / pairs
    return {"stage": "dpo", "chosen_reward": chosen, "rejected_reward": rejected, "margin": chosen - rejected,
            "accuracy": outcome.stats["correct"] / pairs}


def scope_weights(weight: float, borderline: float | None = None, safety: float | None = None) -> dict[str, float]:
    """--scope-weight, --borderline-weight and --safety-weight as AnswerLoss's topic weights: the
    out-of-domain, borderline and safety rows (a row kind whose own flag is unset takes --scope-weight)."""
    own = {"borderline": borderline, "safety": safety}
    weights = {topic: weight if own.get(topic) is None else own[topic] for topic in SCOPE_TOPICS}
    return {topic: w for topic, w in weights.items() if w != 1}


def preference_pairs(model, tokenizer, data, pad_id: int, config: TrainConfig, autocast, state: TrainState, sft_steps: int,
                     world: World) -> list[EncodedPair]:
    """The DPO stage's pairs, with their reference log-probabilities under DPO (medlora/preference.py).

    When the stage starts, the best SFT adapter (adapter/) is loaded and is the reference: rank 0
    builds the pairs from the training rows with it, takes log pi_ref of both answers once (DPO
    only: ORPO has no reference, so the pass is skipped and the file holds nulls), and writes them
    to pairs.jsonl (and what the SFT model already did, to preference.json). Every rank,
    and a run resumed inside the stage, reads the pairs from that file, so all train on the same ones.
    """
    run_dir = Path(config.output_dir)
    started = time.perf_counter()
    if state.step == sft_steps:
        load_adapter(model, run_dir / ADAPTER)  # the stage starts from, and refers to, the best SFT adapter
        with world.main_first("building the preference pairs"):
            if world.is_main:
                with autocast():
                    pairs, counts = build_pairs(model, tokenizer, data.examples.train, config.dpo_answer_rows, config.seed,
                                                decline_rows=config.dpo_decline_rows, base_rejected=config.dpo_base_rejected,
                                                own_declines=config.dpo_own_declines, decline_rejected=config.dpo_decline_rejected,
                                                answered_pairs=config.dpo_answered_pairs)
                encoded = encode_pairs(tokenizer, pairs, config.max_length)
                if config.preference_loss == "dpo":
                    encoded = with_reference_logps(model, encoded, pad_id, config.batch_size, config.max_batch_tokens, autocast)
                save_pairs(run_dir, encoded)
                (run_dir / PREFERENCE_SUMMARY).write_text(json.dumps({"sft_model": counts, "pairs": pair_counts(encoded)}, indent=1) + "\n")
        state.elapsed_s += time.perf_counter() - started
    pairs = encode_pairs(tokenizer, load_pairs(run_dir), config.max_length)
    summary = json.loads((run_dir / PREFERENCE_SUMMARY).read_text())
    behaved = ", ".join(f"{kind} {c['behaved']}/{c['rows']}" for kind, c in summary["sft_model"].items())
    print(f"[dpo] the SFT model's own answers on its training rows already do what the row asks: {behaved}")
    reference = "reference pass included" if config.preference_loss == "dpo" else "no reference pass: orpo"
    print("[dpo] pairs: " + ", ".join(f"{kind} {count}" for kind, count in summary["pairs"].items())
          + f" (built in {time.perf_counter() - started:.1f} s, {reference})")
    return pairs


def fit_scope_gate_on_saved_adapter(model, tokenizer, data, adapter_dir: Path, autocast, summary: dict) -> None:
    """The scope gate (medlora/scope_gate.py), fitted on the adapter that was saved (the best by
    validation loss, which the in-memory weights are not when the best step was not the last) and
    written next to it. Its cost goes into `summary` as gate_time_s."""
    started = time.perf_counter()
    load_adapter(model, adapter_dir)
    with autocast():
        gate = fit_gate(model, tokenizer, data.examples.train, data.examples.validation, adapter_dir,
                        model_declines=opening_declines(model, tokenizer))
    if gate is None:
        print("[gate] the training answers hold no out-of-scope rows (answers that decline): no scope gate")
        summary["gate_time_s"] = 0.0
        return
    summary["gate_time_s"] = round(time.perf_counter() - started, 1)
    share = f" ({100 * summary['gate_time_s'] / summary['time_s']:.1f}% of the training loop's {summary['time_s']} s)" if summary["time_s"] else ""
    print(f"[gate] scope gate fitted in {summary['gate_time_s']} s{share}: decline threshold p >= {gate.decline_threshold}, "
          f"override at p(answer) >= {gate.override_confidence}, "
          f"validation accuracy {gate.info.get('validation_accuracy', float('nan')):.3f}; saved to {gate.save(adapter_dir)}")


def interrupted(config: TrainConfig, model, optimizer, scaler, state: TrainState, base_name: str, step_rng, world: World) -> TrainingStopped:
    """Ctrl-C: discard the interrupted step and checkpoint the state before it (RNG `step_rng`, taken
    at the step's start). Under torchrun the ranks stop at different points, so there is no common
    state to save: the last regular checkpoint is the one to resume from."""
    run_dir = Path(config.output_dir)
    if world.world_size > 1:
        return TrainingStopped(f"interrupted: continue from the last checkpoint with --resume auto --output-dir {run_dir}", EXIT_INTERRUPTED)
    optimizer.zero_grad(set_to_none=True)
    save_checkpoint(run_dir, model, optimizer, scaler, state, config, base_name, rng=step_rng)
    return TrainingStopped(f"interrupted: checkpoint saved at step {state.step}; continue with --resume auto --output-dir {run_dir}", EXIT_INTERRUPTED)


def step_line(record: dict, total_steps: int, memory_gb: float) -> str:
    """The fixed-format log line of one optimizer step, with units."""
    return (
        f"step {record['step']:5d}/{total_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
        f"grad-norm {record['grad_norm']:.3f} | tok/s {record['tokens_per_s']:6.0f} | mem {memory_gb:.2f} GB"
        + (f" | margin {record['margin']:.3f} | acc {record['accuracy']:.2f}" if "margin" in record else "")
        + (" | skipped (inf/NaN)" if record["skipped"] else "")
    )


def run_summary(state: TrainState, lora: LoRASummary, peak_gb: float, padding: float | None) -> dict:
    """summary.json: the last and best losses, counts, time and memory of the run."""
    has_val = math.isfinite(state.best_val_loss)
    return {
        "train_loss": state.last_loss,
        "best_val_loss": state.best_val_loss if has_val else None,
        "best_val_ppl": math.exp(state.best_val_loss) if has_val else None,
        "adapter_step": state.kept_step,  # the step whose adapter adapter/ holds (the DPO stage may keep one above the best SFT loss)
        "adapter_val_ppl": math.exp(state.kept_val_loss) if state.kept_val_loss is not None else None,
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "time_s": round(state.elapsed_s, 1),
        "peak_memory_gb": round(peak_gb, 3),
        "trainable_params": lora.trainable,
        "total_params": lora.total,
        "padding_fraction": round(padding, 4) if padding is not None else None,
    }


def done_line(summary: dict, lora: LoRASummary, run_dir: Path) -> str:
    """The last line a run prints."""
    train_loss = "n/a" if summary["train_loss"] is None else f"{summary['train_loss']:.4f}"
    val = "n/a (no validation rows)" if summary["best_val_loss"] is None else (
        f"{summary['best_val_loss']:.4f} (answer-ppl {summary['best_val_ppl']:.3f})"
    )
    return (
        f"[done] train loss {train_loss} | best val loss {val} | {summary['time_s']} s | peak mem {summary['peak_memory_gb']:.2f} GB | "
        f"trainable {lora.trainable:,} ({lora.percent:.4f}%) | skipped steps {summary['skipped_steps']} | adapter {run_dir / ADAPTER}"
    )


FLAG_FIELDS = (  # TrainConfig fields set by a flag of the same name
    "model", "data", "num_examples", "epochs", "max_steps", "batch_size", "grad_accum", "max_batch_tokens", "lr",
    "rank", "alpha", "dropout", "lora_variant", "lora_plus_ratio", "scope_repeats", "max_length", "precision", "grad_checkpointing", "eval_every", "save_every",
    "keep_last", "max_nan_steps", "seed", "device", "dist_timeout", "scope_weight", "borderline_weight", "safety_weight", "dpo_epochs", "preference_loss", "dpo_beta",
    "dpo_lr", "dpo_pairs_per_step", "dpo_nll_weight", "dpo_answer_rows", "dpo_decline_rows", "dpo_own_declines", "dpo_decline_rejected",
    "dpo_answered_pairs", "dpo_max_ppl_increase",
)


def preset_default(name: str, none: str = "none") -> str:
    """How --help words the default of a setting that --preset sets: each preset's value (`none` words None)."""
    values = ", ".join(f"{preset} {none if settings[name] is None else settings[name]}" for preset, settings in PRESETS.items())
    return f"preset: {values}"


def parse_args(argv: list[str] | None) -> tuple[TrainConfig, argparse.Namespace, set[str]]:
    """The config the flags ask for, the parsed flags, and the names of the settings they set."""
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    add = parser.add_argument
    add("--preset", choices=sorted(PRESETS), help=f"named defaults; any flag below overrides them (default: {defaults.preset})")
    add("--config", help="a config.json (a run folder's, or an experiment's) as the defaults instead of --preset; flags override it (default: none)")
    add_shared_flags(parser, {
        "model": preset_default("model", none="the embedded SmolLM2-135M-Instruct"),
        "data": preset_default("data", none="the embedded flashcards"),
        "num_examples": preset_default("num_examples", none="all"),
        "seed": f"{defaults.seed}; also the data order, LoRA init and dropout",
        "max_length": preset_default("max_length"),
        "precision": preset_default("precision") + "; auto: bf16 or fp16 on CUDA; bf16 on a CPU with native bf16 matmuls (AVX512-BF16/AMX) that measure >= 1.3x faster than fp32, else fp32",
        "device": "CUDA when available; under torchrun each rank takes cuda:LOCAL_RANK",
    })
    add("--output-dir", help=f"run folder (default: {defaults.output_dir})")
    add("--epochs", type=float, help=f"passes over the training split (default: {preset_default('epochs')})")
    add("--max-steps", type=int, help="stop after this many optimizer steps (default: none, --epochs decide)")
    add("--batch-size", type=int, help=f"rows per micro-batch (default: {preset_default('batch_size')})")
    add("--grad-accum", type=int, help=f"micro-batches per optimizer step (default: {preset_default('grad_accum')})")
    add("--max-batch-tokens", type=int, help=f"padded tokens per micro-batch; 0 = fixed --batch-size rows (default: {preset_default('max_batch_tokens', none='0')})")
    add("--lr", type=float, help=f"peak learning rate (default: {preset_default('lr')})")
    add("--rank", type=int, help=f"LoRA rank r (default: {preset_default('rank')})")
    add("--alpha", type=float, help=f"LoRA alpha (update scaled by alpha / r) (default: {preset_default('alpha')})")
    add("--dropout", type=float, help=f"dropout on the LoRA branch, in [0, 1) (default: {preset_default('dropout')})")
    add("--lora-variant", choices=VARIANTS, help=f"lora: update scaled by alpha/r; rslora: alpha/sqrt(r); dora: plus a learned per-row magnitude; "
        f"pissa: A and B start from W0's top-r singular directions, saved as a rank-2r LoRA of the original base (default: {defaults.lora_variant})")
    add("--lora-plus-ratio", type=float, help=f"LoRA+: B's learning rate is this times A's in both stages (and --lr's schedule) (default: {preset_default('lora_plus_ratio', none='off')})")
    targets_by_preset = ", ".join(f"{name} {','.join(settings['targets'])}" for name, settings in PRESETS.items())
    add("--targets", help=f"comma-separated module-name suffixes (default: preset: {targets_by_preset})")
    add("--scope-repeats", type=int, help=f"times each out-of-domain, borderline and safety training row is seen per epoch (default: {defaults.scope_repeats})")
    add("--scope-weight", type=float, help=f"SFT loss weight of each out-of-domain, borderline and safety row's tokens (default: {preset_default('scope_weight')})")
    add("--borderline-weight", type=float, help=f"SFT loss weight of each borderline row's tokens (default: {preset_default('borderline_weight', none='--scope-weight')})")
    add("--safety-weight", type=float, help=f"SFT loss weight of each safety row's tokens (default: {preset_default('safety_weight', none='--scope-weight')})")
    add("--dpo-epochs", type=float, help=f"stage 2, preference training (DPO): passes over the pairs; 0 = no stage 2 (default: {preset_default('dpo_epochs')})")
    add("--preference-loss", metavar="{dpo,orpo}", help="loss of the preference stage: dpo (against the SFT adapter's log-probabilities) or "
        f"orpo (odds ratio of mean token log-probabilities, arXiv:2403.07691; no reference pass; --dpo-beta is its lambda) (default: {defaults.preference_loss})")
    add("--dpo-beta", type=float, help=f"DPO beta: reward scale, how far the model may move from the SFT adapter; ORPO's lambda (default: {preset_default('dpo_beta')})")
    add("--dpo-lr", type=float, help=f"peak learning rate of the DPO stage; with LoRA+ A's, B's is --lora-plus-ratio times it (default: {preset_default('dpo_lr')})")
    add("--dpo-pairs-per-step", type=int, help=f"preference pairs per DPO optimizer step (default: {preset_default('dpo_pairs_per_step')})")
    add("--dpo-nll-weight", type=float, help=f"weight of the chosen answers' mean token NLL added to the preference loss; 0 = plain DPO, 1 = ORPO as published (default: {preset_default('dpo_nll_weight')})")
    add("--dpo-answer-rows", type=int, help=f"medical / borderline training rows paired against a decline (default: {preset_default('dpo_answer_rows')})")
    add("--dpo-decline-rows", type=int, help=f"out-of-domain training rows paired (a decline chosen), drawn by --seed (default: {preset_default('dpo_decline_rows', none='all')})")
    add("--dpo-base-rejected", help="comma-separated row kinds (decline, emergency, clinician) whose rows the SFT model already "
        f"handles get a pair against the base model's answer (default: {','.join(defaults.dpo_base_rejected)})")
    add("--dpo-own-declines", action=argparse.BooleanOptionalAction, default=None, help="pair a medical row the SFT model "
        f"answers against its own decline (its answer started with \"I can only answer\"), not a training row's (default: {defaults.dpo_own_declines})")
    add("--dpo-decline-rejected", metavar="{" + ",".join(DECLINE_REJECTED) + "}", help="the rejected side of an out-of-domain row the SFT model already declines: "
        "base (the base model's answer) or own (the SFT model's own answer with its decline openings banned, as the answer path's "
        f"override writes it) (default: {defaults.dpo_decline_rejected})")
    add("--dpo-answered-pairs", action=argparse.BooleanOptionalAction, default=None, help="pair a medical row the SFT model "
        f"already answers against a training row's decline or referral (default: {defaults.dpo_answered_pairs})")
    add("--dpo-max-ppl-increase", type=float, help=f"DPO adapters are kept while validation answer-ppl is at most this fraction above SFT's (default: {defaults.dpo_max_ppl_increase})")
    add("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None, help=f"recompute activations in backward (default: {preset_default('grad_checkpointing')})")
    add("--eval-every", type=int, help=f"optimizer steps between validation passes (default: {preset_default('eval_every')})")
    add("--save-every", type=int, help=f"optimizer steps between checkpoints (default: {preset_default('save_every')})")
    add("--keep-last", type=int, help=f"checkpoints kept (default: {defaults.keep_last})")
    add("--max-nan-steps", type=int, help=f"stop after this many consecutive NaN losses (default: {defaults.max_nan_steps})")
    add("--resume", nargs="?", const="auto", help="'auto' (newest complete checkpoint in --output-dir) or a checkpoint folder; "
        "a flag that differs from the resumed run's config is refused (default: a new run)")
    add("--overwrite", action="store_true", help="replace an existing run in --output-dir (default: refuse)")
    add("--dist-timeout", type=float, help=f"under torchrun: seconds a rank waits for the others before it stops with an error (default: {defaults.dist_timeout:.0f})")
    args = parser.parse_args(argv)

    overrides = {name: getattr(args, name) for name in FLAG_FIELDS if getattr(args, name) is not None}
    if args.targets is not None:
        overrides["targets"] = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.dpo_base_rejected is not None:
        overrides["dpo_base_rejected"] = [k.strip() for k in args.dpo_base_rejected.split(",") if k.strip()]
    if overrides.get("max_batch_tokens") == 0:
        overrides["max_batch_tokens"] = None
    if args.preset is not None:
        overrides["preset"] = args.preset
    given = set(overrides)
    if args.output_dir is not None:
        overrides["output_dir"] = args.output_dir
    if args.config is None:
        overrides.setdefault("output_dir", defaults.output_dir)
        return config_from_preset(overrides.pop("preset", "cpu"), **overrides), args, given
    if args.preset is not None:
        parser.error("--preset and --config both give the defaults: pass one of them")
    return config_from_file(args.config, overrides), args, given


def config_from_file(path: str, overrides: dict) -> TrainConfig:
    """--config FILE: the file's settings with the flags' `overrides` on top."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--config {path}: unreadable ({error})") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a JSON object of settings")
    config = TrainConfig.from_json({**values, **overrides}, source=f"--config {path}")
    check_preset(config.preset)
    return config


def main(argv: list[str] | None = None) -> int:
    """Train as one process, or as one rank of a torchrun job (rank 0 prints; every rank prints its errors)."""
    world = SINGLE_PROCESS
    try:
        config, args, given = parse_args(argv)
        config.validate()
        world = start_ranks(choose_device(config.device), config.dist_timeout)
        with world.printing_on_main():
            train(config, world, given, resume=args.resume, overwrite=args.overwrite)
        world.end()
    except USER_FAILURES as error:
        code = report_failure(error)
        if world.world_size > 1:
            leave(code)  # at once: the process group's teardown can wait on a hung peer
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
