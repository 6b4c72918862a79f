"""DPO step speed on CPU: this project's preference step next to TRL's DPOTrainer, on the same pairs.

    python -m bench.dpo_speed                                     # 64 pairs from the embedded rows, fp32
    python -m bench.dpo_speed --pairs runs/cpu/pairs.jsonl        # the pairs a run's DPO stage trained on
    python -m bench.dpo_speed --precision bf16 --peers ours,trl   # bfloat16 base weights, no trl-ckpt row

Every peer trains the embedded SmolLM2-135M-Instruct with LoRA r=16, alpha=32, dropout 0.05 on q_proj
and v_proj (the settings of bench/train_speed.py) on the same preference pairs, 8 pairs per optimizer
step, DPO beta 0.1, lr 2e-4 on a cosine, AdamW weight decay 0.001, gradients clipped to 1.0, each with
the reference log-probabilities computed once before the first step (outside the clock). Only the steps
are timed: --warmup-steps steps first, then --steps steps (default: one pass over the pairs), and the
table gives seconds per timed step.

    ours       what train.py's stage 2 runs: lora.inject_lora, medlora.preference.encode_pairs and
               with_reference_logps, then per step data.epoch_steps over the pair lengths (length-grouped)
               -> data.micro_batches (the cpu preset's 1,024-token budget, at most 8 pairs) ->
               medlora.optimizer_step.optimizer_step with medlora.preference.PreferenceLoss (chosen and
               rejected rows in one forward pass, answer-only lm_head, shared system-prompt prefix).
    trl        PEFT LoraConfig + TRL DPOTrainer, precompute_ref_log_probs=True, one batch of 8 pairs per
               step, gradient checkpointing off, TRL's default optimizer and dataloader order.
    trl-ckpt   the same with gradient checkpointing on (DPOConfig's default).

Both keep LoRA dropout on (DPOConfig(disable_dropout=False); TRL's default would zero it, ours keeps it,
as train.py does). TRL gets each pair as text: the prompt rendered by data.format.prompt_text (system
prompt and chat template, as ours) and each answer followed by <|im_end|>, which TRL tokenizes into the
same ids as data.encode_example; the bench counts the pairs whose ids are identical and prints it.

The pairs: with --pairs, a run's pairs.jsonl (medlora.preference.load_pairs). Without it, --count pairs
built from the embedded training split (data.prepare_data) by a fixed rule, with no generation: an
out-of-domain row's decline is chosen against the answer of a random medical row, a medical or borderline
row's answer against a random decline. These pairs teach nothing useful; they are for timing only, with
the lengths and the shared system prompt of real pairs.

The machine (CPU model, whether it has AVX512-BF16), torch's version and threads, and the load average
are printed at the start. Each peer runs in its own subprocess, so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path

import torch

from bench.train_speed import ALPHA, DROPOUT, MAX_GRAD_NORM, RANK, SEED, TARGETS, WEIGHT_DECAY, lora_config, run_in_subprocess
from data import epoch_steps, micro_batches, prepare_data
from data.format import prompt_text
from lora import inject_lora, lora_parameters
from medlora.config import PRESETS
from medlora.model import TORCH_DTYPES, autocast_for, peak_memory_gb
from medlora.optimizer_step import adamw, optimizer_step
from medlora.preference import PreferenceLoss, PreferencePair, encode_pairs, load_pairs, row_kind, with_reference_logps
from medlora.schedule import cosine_with_warmup

# transformers, peft, trl and datasets are imported inside the functions that run in the children.

PEERS = ("ours", "trl", "trl-ckpt")
DEFAULT_OUTPUT = "bench/results/dpo_speed.json"
CPU_PRESET = PRESETS["cpu"]  # the stage as `make run` would run it
PAIRS_PER_STEP = CPU_PRESET["dpo_pairs_per_step"]  # 8 preference pairs (16 sequences) per optimizer step
BETA = CPU_PRESET["dpo_beta"]  # 0.1
LR = CPU_PRESET["dpo_lr"]  # 2e-4, peak of the cosine
MAX_BATCH_TOKENS = CPU_PRESET["max_batch_tokens"]  # ours: padded tokens per micro-batch (both answers of a pair count)
PAIRS_PER_MICRO_BATCH = max(1, CPU_PRESET["batch_size"] // 2)  # ours: at most 8 pairs per micro-batch, as train.py
MAX_LENGTH = 512  # tokens per sequence; the answer is cut, never the prompt
WARMUP_FRACTION = 0.03  # share of the steps warming up linearly (at least one step)


# ----------------------------------------------------------------------------------------------
# The pairs and the machine (parent and children).


def timing_pairs(tokenizer, count: int, seed: int = SEED) -> list[PreferencePair]:
    """`count` pairs from the embedded training split by a fixed rule, without generation (timing only).

    Out-of-domain rows (about a third): chosen = the row's decline, rejected = a random medical row's
    answer. Medical and borderline rows: chosen = the row's answer, rejected = a random decline.
    """
    train = prepare_data(tokenizer, seed=seed, max_length=MAX_LENGTH).examples.train
    declines = [e for e in train if row_kind(e) == "decline"]
    answers = [e for e in train if row_kind(e) == "answer"]
    rng = random.Random(seed)
    out_of_domain = rng.sample(declines, count // 3)
    medical = rng.sample(answers, count - len(out_of_domain))
    pairs = [PreferencePair(e.question, e.answer, rng.choice(answers).answer, "decline", "answer") for e in out_of_domain]
    pairs += [PreferencePair(e.question, e.answer, rng.choice(declines).answer, "answer", "decline") for e in medical]
    rng.shuffle(pairs)
    return pairs


def bench_pairs(tokenizer, pairs_path: str | None, count: int) -> list[PreferencePair]:
    """A run's pairs.jsonl (or its run folder) when given, else `count` timing pairs."""
    if pairs_path is None:
        return timing_pairs(tokenizer, count)
    path = Path(pairs_path)
    return load_pairs(path if path.is_dir() else path.parent)


def machine() -> dict:
    """The CPU model and whether it has AVX512-BF16 (/proc/cpuinfo), torch's version and threads, the load average."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {
        "cpu": model, "avx512_bf16": "avx512_bf16" in flags, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "load_average": [round(load, 2) for load in os.getloadavg()],
    }


def machine_line(info: dict) -> str:
    load = ", ".join(f"{value:.2f}" for value in info["load_average"])
    bf16 = "with" if info["avx512_bf16"] else "without"
    return f"{info['cpu']} ({bf16} AVX512-BF16), torch {info['torch']}, {info['threads']} threads, load average {load} (1, 5, 15 min)"


def timed(step_ends: list[float], started: float, tokens: list[int], warmup_steps: int) -> dict:
    """Seconds per step and tokens/s over the steps after the first `warmup_steps`.

    step_ends: time.perf_counter() at the end of every step; tokens: real tokens each step read.
    """
    first = step_ends[warmup_steps - 1] if warmup_steps else started
    steps = len(step_ends) - warmup_steps
    wall = step_ends[-1] - first
    return {
        "s_per_step": wall / steps, "timed_steps": steps, "timed_s": wall, "warmup_s": first - started,
        "tokens": sum(tokens[warmup_steps:]), "tokens_per_s": sum(tokens[warmup_steps:]) / wall,
    }


# ----------------------------------------------------------------------------------------------
# The peers. Each takes the loaded base model and returns its timings.


def time_ours(model, tokenizer, pairs: list[PreferencePair], precision: str, warmup_steps: int, steps: int) -> dict:
    """train.py's DPO stage on `pairs`: reference log-probs once (not timed), then warmup_steps + steps steps."""
    torch.manual_seed(SEED)
    inject_lora(model, TARGETS, RANK, ALPHA, DROPOUT)
    autocast = autocast_for("cpu", precision)
    pad_id = tokenizer.pad_token_id
    encoded = encode_pairs(tokenizer, pairs, MAX_LENGTH)
    encoded = with_reference_logps(model, encoded, pad_id, CPU_PRESET["batch_size"], MAX_BATCH_TOKENS, autocast)
    model.train()
    optimizer = adamw(lora_parameters(model), LR, WEIGHT_DECAY, "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # float32 and bfloat16 need no loss scaling
    step_loss = PreferenceLoss(encoded, pad_id, "cpu", BETA)
    lengths = [p.length for p in encoded]
    steps_per_epoch = math.ceil(len(encoded) / PAIRS_PER_STEP)
    total = warmup_steps + steps
    warmup = max(1, math.ceil(WARMUP_FRACTION * total))
    step_ends, tokens, losses = [], [], []
    started = time.perf_counter()
    for step in range(total):
        epoch, position = divmod(step, steps_per_epoch)
        batches = micro_batches(epoch_steps(lengths, PAIRS_PER_STEP, SEED, epoch)[position], lengths, PAIRS_PER_MICRO_BATCH,
                                MAX_BATCH_TOKENS)
        for group in optimizer.param_groups:
            group["lr"] = cosine_with_warmup(step, total, warmup, LR) * group["lr_ratio"]
        outcome = optimizer_step(model, optimizer, scaler, step_loss, batches, autocast, MAX_GRAD_NORM)
        step_ends.append(time.perf_counter())
        tokens.append(outcome.tokens)
        losses.append(outcome.loss)
    setting = (f"optimizer_step + PreferenceLoss, length-grouped, token budget {MAX_BATCH_TOKENS} "
               f"(<= {PAIRS_PER_MICRO_BATCH} pairs), {model.config._attn_implementation}, foreach AdamW, {precision}")
    return {"setting": setting, "pairs": len(encoded), "mean_loss": sum(losses) / len(losses),
            **timed(step_ends, started, tokens, warmup_steps)}


def trl_rows(tokenizer, pairs: list[PreferencePair]) -> list[dict]:
    """The pairs as TRL's text format: the chat-template prompt, and each answer closed by the end-of-turn token."""
    eos = tokenizer.eos_token
    return [{"prompt": prompt_text(tokenizer, p.question), "chosen": p.chosen + eos, "rejected": p.rejected + eos} for p in pairs]


def same_ids_as_ours(tokenizer, pairs: list[PreferencePair], dataset) -> int:
    """How many of TRL's tokenized pairs hold exactly the ids data.encode_example gives both answers."""
    ours = encode_pairs(tokenizer, pairs, MAX_LENGTH)
    return sum(
        row["prompt_ids"] + row["chosen_ids"] == p.chosen.input_ids and row["prompt_ids"] + row["rejected_ids"] == p.rejected.input_ids
        for row, p in zip(dataset, ours)
    )


def time_trl(model, tokenizer, pairs: list[PreferencePair], precision: str, warmup_steps: int, steps: int, checkpointing: bool,
             scratch_dir: str) -> dict:
    """TRL's DPOTrainer with a PEFT LoraConfig; its reference pass runs in the constructor (not timed)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    step_ends, tokens_seen = [], []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())
            tokens_seen.append(int(state.num_input_tokens_seen))

    config = DPOConfig(
        output_dir=scratch_dir,
        per_device_train_batch_size=PAIRS_PER_STEP,
        gradient_accumulation_steps=1,
        gradient_checkpointing=checkpointing,
        max_steps=warmup_steps + steps,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=WARMUP_FRACTION,  # transformers 5: a float below 1 is a fraction of the steps
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=MAX_GRAD_NORM,
        beta=BETA,
        max_length=MAX_LENGTH,
        precompute_ref_log_probs=True,  # the reference pass once, before training, as ours
        disable_dropout=False,  # keep LoRA dropout 0.05, as ours
        use_cpu=True,
        bf16=precision == "bf16",  # DPOConfig turns bf16 on by default; the fp32 rows turn it off
        save_strategy="no",
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        seed=SEED,
    )
    torch.manual_seed(SEED)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(trl_rows(tokenizer, pairs)),
                         processing_class=tokenizer, peft_config=lora_config(), callbacks=[StepClock()])
    identical = same_ids_as_ours(tokenizer, pairs, trainer.train_dataset)
    started = time.perf_counter()
    output = trainer.train()
    tokens = [b - a for a, b in zip([0] + tokens_seen, tokens_seen)]
    setting = (f"DPOTrainer + LoraConfig, {PAIRS_PER_STEP} pairs x 1, gradient checkpointing {'on' if checkpointing else 'off'}, "
               f"{model.config._attn_implementation}, {config.optim.value}, {precision}")
    return {"setting": setting, "pairs": len(trainer.train_dataset), "same_ids_as_ours": identical, "mean_loss": output.training_loss,
            **timed(step_ends, started, tokens, warmup_steps)}


def child_main(spec: dict) -> None:
    """Load the model, the pairs, time one peer, write its result (with peak RSS) as JSON."""
    from medlora.model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(None, dtype=TORCH_DTYPES[spec["precision"]], device="cpu")
    pairs = bench_pairs(tokenizer, spec["pairs"], spec["count"])
    if spec["peer"] == "ours":
        result = time_ours(model, tokenizer, pairs, spec["precision"], spec["warmup_steps"], spec["steps"])
    else:
        with tempfile.TemporaryDirectory(prefix="trl-dpo-") as scratch_dir:
            result = time_trl(model, tokenizer, pairs, spec["precision"], spec["warmup_steps"], spec["steps"],
                              spec["peer"] == "trl-ckpt", scratch_dir)
    result.update(peer=spec["peer"], precision=spec["precision"], peak_rss_gb=peak_memory_gb(torch.device("cpu")))
    Path(spec["result_file"]).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------


def speed_table(rows: list[dict]) -> str:
    """One row per peer; "TRL / ours" is the peer's s/step over ours (ours = the first row): above 1, ours is faster."""
    ours = rows[0]["s_per_step"]
    lines = ["| implementation | setting | s/step | tokens/s | timed steps | peak RSS (GB) | s/step / ours |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['peer']} | {row['setting']} | {row['s_per_step']:.2f} | {row['tokens_per_s']:.0f} | {row['timed_steps']} | "
            f"{row['peak_rss_gb']:.2f} | {row['s_per_step'] / ours:.2f}x |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    parser.add_argument("--pairs", help="a run's pairs.jsonl (or its run folder); default: --count timing pairs from the embedded rows")
    parser.add_argument("--count", type=int, default=64, help="timing pairs built without --pairs (default: 64)")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}; ours comes first (default: all)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="base weights and matmuls (default: fp32)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps run before the clock starts (default: 2)")
    parser.add_argument("--steps", type=int, help="timed steps (default: one pass over the pairs, 8 pairs a step)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help=f"results JSON (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one peer, spec as JSON
    args = parser.parse_args(argv)
    if args.child:
        return args
    peers = [peer.strip() for peer in args.peers.split(",") if peer.strip()]
    unknown = [peer for peer in peers if peer not in PEERS]
    if unknown or "ours" not in peers:
        parser.error(f"--peers {args.peers!r}: {'unknown ' + str(unknown) if unknown else 'ours is missing'}; choose from {','.join(PEERS)}, ours included")
    args.peers = [peer for peer in PEERS if peer in peers]
    if args.count < PAIRS_PER_STEP:
        parser.error(f"--count must be at least {PAIRS_PER_STEP} (one step), got {args.count}")
    if args.warmup_steps < 0:
        parser.error(f"--warmup-steps must be 0 or more, got {args.warmup_steps}")
    if args.steps is not None and args.steps <= 0:
        parser.error(f"--steps must be positive, got {args.steps}")
    if args.pairs and not Path(args.pairs).exists():
        parser.exit(2, f"error: --pairs {args.pairs} not found (a run with a DPO stage writes RUN/pairs.jsonl)\n")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return
    info = machine()
    print(machine_line(info), flush=True)
    pairs_path = str(Path(args.pairs).resolve()) if args.pairs else None  # the children run in the project root
    if args.steps is None:
        from medlora.model import load_tokenizer

        args.steps = math.ceil(len(bench_pairs(load_tokenizer(None), pairs_path, args.count)) / PAIRS_PER_STEP)
    print(f"SmolLM2-135M-Instruct, {args.precision}, pairs from {args.pairs or f'{args.count} timing pairs of the embedded rows'}; "
          f"{PAIRS_PER_STEP} pairs/step, {args.warmup_steps} warm-up steps, then {args.steps} timed steps", flush=True)
    rows = []
    for peer in args.peers:
        spec = {"peer": peer, "pairs": pairs_path, "count": args.count, "precision": args.precision,
                "warmup_steps": args.warmup_steps, "steps": args.steps}
        row = run_in_subprocess(spec, module="bench.dpo_speed")
        same = f"  {row['same_ids_as_ours']}/{row['pairs']} pairs tokenized as ours" if "same_ids_as_ours" in row else ""
        print(f"  {peer:<9} {row['s_per_step']:6.2f} s/step  {row['tokens_per_s']:5.0f} tokens/s  {row['tokens']} tokens in "
              f"{row['timed_steps']} timed steps (warm-up {row['warmup_s']:.1f} s)  mean loss {row['mean_loss']:.4f}  "
              f"peak RSS {row['peak_rss_gb']:.2f} GB{same}", flush=True)
        rows.append(row)
    print("\n" + speed_table(rows))
    for row in rows[1:]:
        print(f"ours vs {row['peer']}: {row['s_per_step'] / rows[0]['s_per_step']:.2f}x per step "
              f"({rows[0]['tokens_per_s'] / row['tokens_per_s']:.2f}x in tokens/s)")
    info["load_average_end"] = [round(load, 2) for load in os.getloadavg()]
    record = {"machine": info, "pairs": args.pairs, "count": args.count, "precision": args.precision,
              "warmup_steps": args.warmup_steps, "steps": args.steps, "peers": rows}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"load average at the end {', '.join(f'{v:.2f}' for v in info['load_average_end'])}; results written to {output}")


if __name__ == "__main__":
    main()
