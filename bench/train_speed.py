"""Training speed on CPU: this project's LoRA loop next to TRL's SFTTrainer and PEFT in a plain loop.

    python -m bench.train_speed                                  # all six peers on 64 examples
    python -m bench.train_speed --examples 16 --peers ours,peft-loop
    python -m bench.train_speed --lever                          # ours only, one speed lever toggled per row
    python -m bench.train_speed --repeats 3                      # three rounds; each row is its median run

Every peer trains the embedded SmolLM2-135M-Instruct on the CPU with LoRA r=16, alpha=32,
dropout 0.05 on q_proj and v_proj for one epoch over the same rows: `--data` cleaned with
data.clean_rows, shuffled with random.Random(42), the first `--examples`, encoded once by
data.encode_example (chat template with the system prompt, completion-only labels, max length 512).
An optimizer step sees 16 examples; lr 2e-4, cosine with 3% warmup, AdamW weight decay 0.001,
gradients clipped to 1.0.

float32:
    ours        data.epoch_steps (length-grouped) -> data.micro_batches (padded-token budget
                --max-batch-tokens, or fixed --batch-size rows) -> one optimizer step by the function train.py's
                loop calls (medlora.optimizer_step.optimizer_step; answer-only lm_head and a shared system-prompt
                prefix via medlora.loss.answer_nll), foreach AdamW, medlora.schedule.cosine_with_warmup.
    trl         PEFT LoraConfig + TRL SFTTrainer: 2 rows x 8 accumulation, gradient checkpointing on
                (the reference notebook's setting), TRL's default optimizer and dataloader order.
    trl-nockpt  the same with gradient checkpointing off.
    peft-loop   get_peft_model in a hand-written loop: the same length-grouped steps, 2 rows x 8,
                model(input_ids, attention_mask, labels).loss (full-vocabulary logits), SDPA.
bfloat16 (CPUs with native bf16 matmuls; base weights stored in bf16, matmuls under autocast,
adapter weights and optimizer state float32, attention as medlora.model.attention_for picks):
    ours-ckpt   ours with gradient checkpointing (train.py --grad-checkpointing): less memory, more compute.
    ours-bf16   ours with --precision bf16.
    trl-bf16    trl-nockpt with the model loaded in bf16 and SFTConfig(bf16=True).

TRL gets the encoded examples as `input_ids` and `labels` columns, which SFTTrainer uses as they
are. Handing it the same conversations as prompt/completion messages instead would make TRL also
train on the newline the chat template writes after <|im_end|>: one more target token per example.

Each peer runs in its own subprocess, so its peak RSS (ru_maxrss, model and data included) is its
own. The clock covers only training (model loading and tokenization are outside it): our step
loop, the PEFT loop, and trainer.train() for TRL; torch.compile's time, in the lever rows that
use it, is on the clock.

Useful work per real (non-pad) token is 4 x P FLOPs, P = the base model's parameters (tied
embeddings counted once): 2P for the forward and 2P for the activation gradients. The frozen
weights need no weight gradients; attention scores and the LoRA matmuls are left out. It is
compared with the machine's matmul peak in the row's precision, measured here on a big
[2048, 2048] @ [2048, 2048] product (the model's own matmuls, [tokens, 576] @ [576, 576] and
[tokens, 576] @ [576, 1536], are smaller and reach less of it).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from data import IGNORE_INDEX, clean_rows, collate, encode_example, epoch_steps, load_rows, micro_batches
from lora import inject_lora, lora_parameters
from medlora.loss import AnswerLoss, row_nll
from medlora.model import autocast_for, peak_memory_gb
from medlora.optimizer_step import optimizer_step
from medlora.schedule import cosine_with_warmup

# transformers, peft, trl and datasets are imported inside the functions that run in the children:
# the parent process only measures the matmul peak and prints.

PEERS = ("ours", "ours-ckpt", "trl", "trl-nockpt", "peft-loop", "ours-bf16", "trl-bf16")
REFERENCE_PEERS = ("trl", "trl-nockpt", "peft-loop", "trl-bf16")  # the "vs" columns of the table
BF16_PEERS = ("ours-bf16", "trl-bf16")  # bfloat16 base weights; the rest are float32
DEFAULT_DATA = "../shared/data/medical_meadow_wikidoc_patient_info.json"
DEFAULT_OUTPUT = "bench/results/train_speed.json"
DEFAULT_LEVER_OUTPUT = "bench/results/train_speed_levers.json"
PROJECT_ROOT = Path(__file__).resolve().parent.parent

SEED = 42  # row shuffle, step order, LoRA init, dropout
MAX_LENGTH = 512  # tokens per example; the answer is cut, never the prompt
STEP_EXAMPLES = 16  # examples per optimizer step (the effective batch)
MICRO_BATCH = 2  # rows per micro-batch for trl and peft-loop ...
GRAD_ACCUM = 8  # ... times 8 accumulated micro-batches = STEP_EXAMPLES
RANK, ALPHA, DROPOUT = 16, 32, 0.05  # LoRA r, alpha (update scaled by alpha / r), dropout on its input
TARGETS = ("q_proj", "v_proj")  # modules that get adapters
LR = 2e-4  # peak learning rate
WARMUP_FRACTION = 0.03  # share of steps warming up linearly
WEIGHT_DECAY = 0.001  # AdamW weight decay
MAX_GRAD_NORM = 1.0  # global L2 clipping of the LoRA gradients
FLOPS_PER_TOKEN_PER_PARAM = 4  # forward (2) + activation gradients (2); frozen weights get no weight gradient
PEAK_MATMUL_SIZE = 2048  # the matmul peak is measured on a [2048, 2048] @ [2048, 2048] product


@dataclass(frozen=True)
class OursSettings:
    """The speed levers of our loop. The defaults are the choices train.py makes on this CPU (token-budget
    micro-batches of 1,024, length grouping, answer-only lm_head, shared prefix, foreach AdamW, fp32);
    the recipe around them (lr, 16 examples per step, LoRA settings) is this benchmark's, above.
    """

    max_batch_tokens: int | None = 1024  # padded tokens per micro-batch; None = fixed `batch_size` rows
    batch_size: int = MICRO_BATCH  # rows per micro-batch when max_batch_tokens is None
    length_grouped: bool = True  # data.epoch_steps groups similar lengths into a step; False = random steps
    answer_only_head: bool = True  # lm_head only where the next token is a target (medlora.loss.answer_nll)
    share_prefix: bool = True  # the system-prompt prefix runs once per micro-batch (medlora.loss.answer_nll)
    attention: str = "auto"  # "sdpa", "eager", or "auto": medlora.model.attention_for (eager for bf16 on CPU)
    adamw: str = "foreach"  # "foreach" (all tensors in batched calls), "fused" (one kernel), "for-loop"
    precision: str = "fp32"  # "fp32", or "bf16": bfloat16 base weights and autocast, LoRA A/B float32
    compile: str = "off"  # torch.compile: "off", "layers" (each decoder layer) or "mlp+norms"; compile time is on the clock
    threads: int | None = None  # torch threads (intra-op); None = torch's default, one per core
    grad_checkpointing: bool = False  # recompute each decoder layer in backward (train.py --grad-checkpointing)
    lora_dropout: float = DROPOUT  # dropout on the LoRA branch's input; 0.0 draws no masks

    def describe(self, attention: str) -> str:
        """The settings in words; `attention` is the kernel the model really ran."""
        batching = (
            f"token budget {self.max_batch_tokens}" if self.max_batch_tokens
            else f"{self.batch_size} rows x {math.ceil(STEP_EXAMPLES / self.batch_size)}"
        )
        return ", ".join([
            batching,
            "length-grouped" if self.length_grouped else "random steps",
            "answer-only lm_head" if self.answer_only_head else "full-vocabulary logits",
            "shared prefix" if self.share_prefix else "prefix per row",
            attention,
            f"{self.adamw} AdamW",
            self.precision,
        ] + ([f"torch.compile({self.compile})"] if self.compile != "off" else [])
          + ([f"{self.threads} thread(s)"] if self.threads else [])
          + (["gradient checkpointing"] if self.grad_checkpointing else [])
          + ([f"LoRA dropout {self.lora_dropout}"] if self.lora_dropout != DROPOUT else []))


# One row per lever: (lever, what it is switched to, the OursSettings fields that change).
LEVERS = [
    ("lm_head", "full-vocabulary logits, model(...).logits", {"answer_only_head": False}),
    ("micro-batches", f"fixed {MICRO_BATCH} rows x {GRAD_ACCUM}", {"max_batch_tokens": None, "batch_size": MICRO_BATCH}),
    ("length grouping", "off: random steps", {"length_grouped": False}),
    ("system-prompt prefix", "recomputed for every row", {"share_prefix": False}),
    ("attention", "eager", {"attention": "eager"}),
    ("AdamW", "for-loop (foreach=False)", {"adamw": "for-loop"}),
    ("AdamW", "fused (fused=True)", {"adamw": "fused"}),
    ("torch.compile", "each decoder layer, dynamic shapes, compile time counted", {"compile": "layers"}),
    ("torch.compile", "MLP and RMSNorms of each layer, dynamic shapes, compile time counted", {"compile": "mlp+norms"}),
    ("precision", "bf16 base weights + autocast (LoRA A/B and AdamW float32), eager attention", {"precision": "bf16"}),
    ("precision", "bf16 as above, but SDPA attention", {"precision": "bf16", "attention": "sdpa"}),
    ("precision", "fp32", {"precision": "fp32"}),
    ("micro-batches", "token budget 512", {"max_batch_tokens": 512}),
    ("micro-batches", "token budget 2048", {"max_batch_tokens": 2048}),
    ("threads", "1 thread", {"threads": 1}),
    ("gradient checkpointing", "on: each decoder layer recomputed in backward", {"grad_checkpointing": True}),
    ("LoRA dropout", "off (0.0): what drawing the dropout masks costs (a change of recipe, not a lever)", {"lora_dropout": 0.0}),
]  # with --lever, a row whose settings equal the baseline's is left out


# ----------------------------------------------------------------------------------------------
# Parent side: the matmul peak, one subprocess per run, the tables.


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, size: int = PEAK_MATMUL_SIZE, repeats: int = 10) -> float:
    """Best GFLOP/s of a [size, size] @ [size, size] matmul in `dtype` (all threads), after a warm-up:
    this CPU's matmul peak as torch reaches it, the ceiling the training rows are measured against."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def run_in_subprocess(spec: dict, module: str = "bench.train_speed") -> dict:
    """Run one training job (`python -m module --child SPEC`) in a fresh process; return its result dict."""
    with tempfile.TemporaryDirectory(prefix="train-speed-") as folder:
        result_file = Path(folder) / "result.json"
        command = [sys.executable, "-m", module, "--child", json.dumps({**spec, "result_file": str(result_file)})]
        finished = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
        if finished.returncode != 0 or not result_file.is_file():
            output = (finished.stdout + finished.stderr).strip().splitlines()
            raise RuntimeError(f"{spec['peer']} failed (exit {finished.returncode}):\n" + "\n".join(output[-25:]))
        return json.loads(result_file.read_text())


def with_rates(result: dict, peaks: dict[str, float]) -> dict:
    """Add tokens/s, useful GFLOP/s and % of the matmul peak in the row's precision to a child's result."""
    tokens_per_s = result["tokens"] / result["wall_s"]
    useful = FLOPS_PER_TOKEN_PER_PARAM * result["params"] * tokens_per_s / 1e9
    percent = 100 * useful / peaks[result["precision"]]
    return {**result, "tokens_per_s": tokens_per_s, "useful_gflops": useful, "percent_of_peak": percent}


def peer_table(rows: list[dict]) -> str:
    rate = {row["peer"]: row["tokens_per_s"] for row in rows}
    references = [peer for peer in REFERENCE_PEERS if peer in rate]
    header = ["implementation", "setting", "wall time (s)", "tokens/s", "useful GFLOP/s", "% of matmul peak", "peak RSS (GB)"]
    header += [f"vs {peer}" for peer in references]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row["peer"], row["setting"], f"{row['wall_s']:.1f}", f"{row['tokens_per_s']:.0f}",
            f"{row['useful_gflops']:.1f}", f"{row['percent_of_peak']:.1f}", f"{row['peak_rss_gb']:.2f}",
        ]
        cells += [f"{row['tokens_per_s'] / rate[peer]:.2f}x" for peer in references]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lever_table(rows: list[dict]) -> str:
    """One row per lever; the first row is the baseline the others are divided by."""
    baseline = rows[0]["tokens_per_s"]
    lines = ["| lever | setting | wall time (s) | tokens/s | vs baseline | mean loss | peak RSS (GB) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['lever']} | {row['setting']} | {row['wall_s']:.1f} | {row['tokens_per_s']:.0f} | "
            f"{row['tokens_per_s'] / baseline:.2f}x | {row['mean_loss']:.4f} | {row['peak_rss_gb']:.2f} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Child side: one model, one training run, one result file.


def load_examples(data_path: str, count: int, tokenizer) -> list:
    """The benchmark rows: cleaned, shuffled with Random(SEED), the first `count`, encoded."""
    raw = load_rows(data_path)
    pairs, _ = clean_rows(raw.rows, raw.source)
    random.Random(SEED).shuffle(pairs)
    encoded = [encode_example(tokenizer, pair.question, pair.answer, MAX_LENGTH) for pair in pairs[:count]]
    return [example for example in encoded if example is not None]  # None: the prompt alone is too long


def random_steps(count: int, step_examples: int, seed: int) -> list[list[int]]:
    """Optimizer steps without length grouping: shuffled indices cut into steps."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return [order[start : start + step_examples] for start in range(0, count, step_examples)]


def training_steps(lengths: list[int], length_grouped: bool) -> list[list[int]]:
    """Example indices of every optimizer step of the one epoch."""
    if length_grouped:
        return epoch_steps(lengths, STEP_EXAMPLES, SEED, epoch=0)
    return random_steps(len(lengths), STEP_EXAMPLES, SEED)


def full_vocabulary_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """medlora.loss.row_nll computed the usual way: lm_head at every position, then cross-entropy per row."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [batch, seq, vocab]
    targets = batch["labels"][:, 1:]  # [batch, seq - 1]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)  # [batch, seq - 1], 0 where ignored
    return nll.sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1)


def step_as_train_py(model, optimizer, scaler, examples, batches, pad_id, device, autocast, lr, loss_fn) -> tuple[float, int]:
    """One optimizer step the way train.py's loop takes it: set the learning rate (step 1), then
    medlora.optimizer_step.optimizer_step (steps 2-7), the same function train.py calls.

    `loss_fn(model, batch) -> ([batch] summed NLL, [batch] target tokens)`: medlora.loss.row_nll, or a lever's.
    Returns the step's mean answer-token loss and its real (non-pad) tokens.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    outcome = optimizer_step(model, optimizer, scaler, AnswerLoss(examples, pad_id, device, row_nll=loss_fn), batches, autocast, MAX_GRAD_NORM)
    return outcome.loss, outcome.tokens


def train_ours(model, tokenizer, examples, settings: OursSettings) -> dict:
    """This project's loop, as train.py runs it, without validation or checkpoints."""
    loss_fn = full_vocabulary_nll if not settings.answer_only_head else functools.partial(row_nll, share_prefix=settings.share_prefix)
    if settings.attention != "auto":
        model.set_attn_implementation(settings.attention)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(SEED)
    inject_lora(model, TARGETS, RANK, ALPHA, settings.lora_dropout)
    if settings.grad_checkpointing:  # as train.py does it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    start = time.perf_counter()  # torch.compile's time counts
    for layer in model.model.layers:
        if settings.compile == "layers":
            layer.compile(dynamic=True)
        elif settings.compile == "mlp+norms":  # the elementwise-heavy parts, without the KV cache objects
            for part in (layer.mlp, layer.input_layernorm, layer.post_attention_layernorm):
                part.compile(dynamic=True)
    optimizer = torch.optim.AdamW(
        lora_parameters(model), lr=LR, weight_decay=WEIGHT_DECAY,
        foreach=settings.adamw == "foreach", fused=settings.adamw == "fused",
    )
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # float32 and bfloat16 need no loss scaling
    autocast = autocast_for("cpu", settings.precision)
    lengths = [len(e.input_ids) for e in examples]

    steps = training_steps(lengths, settings.length_grouped)
    warmup_steps = max(1, math.ceil(WARMUP_FRACTION * len(steps)))
    tokens, losses = 0, []
    for step, step_indices in enumerate(steps):
        batches = micro_batches(step_indices, lengths, settings.batch_size, settings.max_batch_tokens)
        lr = cosine_with_warmup(step, len(steps), warmup_steps, LR)
        loss, step_tokens = step_as_train_py(
            model, optimizer, scaler, examples, batches, tokenizer.pad_token_id, "cpu", autocast, lr, loss_fn
        )
        tokens += step_tokens
        losses.append(loss)
    wall = time.perf_counter() - start
    setting = settings.describe(model.config._attn_implementation)
    return {"setting": setting, "wall_s": wall, "tokens": tokens, "steps": len(steps), "mean_loss": sum(losses) / len(losses)}


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=list(TARGETS), task_type="CAUSAL_LM")


def train_peft_loop(model, tokenizer, examples) -> dict:
    """PEFT's LoRA layers in a plain loop: fixed 2-row micro-batches, HF's own full-logits loss."""
    from peft import get_peft_model

    model.set_attn_implementation("sdpa")
    torch.manual_seed(SEED)
    model = get_peft_model(model, lora_config())
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, foreach=True)
    lengths = [len(e.input_ids) for e in examples]

    start = time.perf_counter()
    steps = training_steps(lengths, length_grouped=True)
    warmup_steps = max(1, math.ceil(WARMUP_FRACTION * len(steps)))
    tokens, losses = 0, []
    for step, step_indices in enumerate(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_with_warmup(step, len(steps), warmup_steps, LR)
        batches = micro_batches(step_indices, lengths, MICRO_BATCH)
        step_loss = 0.0
        for batch_indices in batches:
            batch = collate([examples[i] for i in batch_indices], tokenizer.pad_token_id)
            loss = model(**batch).loss / len(batches)  # HF's mean over the micro-batch's target tokens
            loss.backward()
            step_loss += loss.item()
            tokens += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
    wall = time.perf_counter() - start
    setting = f"get_peft_model, {MICRO_BATCH} rows x {GRAD_ACCUM}, length-grouped, full-vocabulary logits (HF loss), sdpa"
    return {"setting": setting, "wall_s": wall, "tokens": tokens, "steps": len(steps), "mean_loss": sum(losses) / len(losses)}


def train_trl(
    model, tokenizer, examples, checkpointing: bool, bf16: bool, scratch_dir: str, fp16: bool = False,
    step_ends: list[float] | None = None,
) -> dict:
    """TRL's SFTTrainer with a PEFT LoraConfig; only trainer.train() is timed.

    step_ends: if given, the time.perf_counter() at the end of each optimizer step (after a CUDA
    synchronize on a GPU) is appended to it, so a caller can leave warm-up steps out.

    bf16: the model was loaded in bfloat16 (with the attention kernel medlora.model chose for it, as
    for ours-bf16) and the trainer autocasts to bfloat16; PEFT keeps the adapter weights float32.
    fp16: the same in float16 with a loss scaler, on the model's CUDA device (bench/t4_step.py).
    """
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available() and model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            step_ends.append(time.perf_counter())

    if not (bf16 or fp16):
        model.set_attn_implementation("sdpa")
    dataset = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    config = SFTConfig(
        output_dir=scratch_dir,
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=GRAD_ACCUM,
        gradient_checkpointing=checkpointing,
        num_train_epochs=1,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=WARMUP_FRACTION,  # transformers 5: a float below 1 is a fraction of the steps (was warmup_ratio)
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=MAX_GRAD_NORM,
        max_length=MAX_LENGTH,
        completion_only_loss=True,  # the labels column already holds -100 on every prompt token
        use_cpu=model.device.type == "cpu",
        bf16=bf16,  # TRL turns bf16 on by default; the float32 rows turn it off
        fp16=fp16,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        seed=SEED,
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora_config(),
        callbacks=[StepClock()] if step_ends is not None else None,
    )
    start = time.perf_counter()
    output = trainer.train()
    wall = time.perf_counter() - start
    setting = (
        f"SFTTrainer + LoraConfig, {MICRO_BATCH} rows x {GRAD_ACCUM}, gradient checkpointing "
        f"{'on' if checkpointing else 'off'}, {config.optim.value}, {'bf16' if bf16 else 'fp16' if fp16 else 'fp32'}"  # optim: TRL's default
    )
    return {
        "setting": setting, "wall_s": wall, "tokens": int(trainer.state.num_input_tokens_seen),
        "steps": trainer.state.global_step, "mean_loss": output.training_loss, "start": start,
    }


def child_main(spec: dict) -> None:
    """Load the model and rows, train one peer, write its result (with peak RSS) as JSON."""
    from medlora.model import load_model_and_tokenizer

    bf16 = spec["peer"] in BF16_PEERS or (spec["peer"] == "ours" and spec["ours"]["precision"] == "bf16")
    model, tokenizer = load_model_and_tokenizer(None, dtype=torch.bfloat16 if bf16 else torch.float32, device="cpu")
    params = sum(p.numel() for p in model.parameters())  # parameters() yields the tied embedding once
    examples = load_examples(spec["data"], spec["examples"], tokenizer)
    if spec["peer"] in ("ours", "ours-ckpt", "ours-bf16"):
        result = train_ours(model, tokenizer, examples, OursSettings(**spec["ours"]))
    elif spec["peer"] == "peft-loop":
        result = train_peft_loop(model, tokenizer, examples)
    else:
        with tempfile.TemporaryDirectory(prefix="trl-") as scratch_dir:
            result = train_trl(model, tokenizer, examples, spec["peer"] == "trl", bf16, scratch_dir)
    result.update(
        peer=spec["peer"], precision="bf16" if bf16 else "fp32", examples=len(examples), params=params,
        threads=torch.get_num_threads(),
        peak_rss_gb=peak_memory_gb(torch.device("cpu")),
    )
    Path(spec["result_file"]).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    parser.add_argument("--data", default=DEFAULT_DATA, help=f"Medical Meadow JSON file (default: {DEFAULT_DATA})")
    parser.add_argument("--examples", type=int, default=64, help="rows trained on, one epoch (default: 64)")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)} (default: all)")
    parser.add_argument("--max-batch-tokens", type=int, default=1024, help="ours: padded tokens per micro-batch (default: 1024)")
    parser.add_argument("--batch-size", type=int, help="ours: fixed rows per micro-batch instead of a token budget")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all jobs; each row is its median run (default: 1)")
    parser.add_argument("--lever", action="store_true", help="measure ours with each speed lever toggled, instead of the peers")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="--lever: the baseline's precision (default: fp32)")
    parser.add_argument("--only", help="--lever: comma-separated lever names to run (as the table's first column; default: all)")
    parser.add_argument("--output", help=f"results JSON (default: {DEFAULT_OUTPUT}, or {DEFAULT_LEVER_OUTPUT} with --lever)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one job, spec as JSON
    args = parser.parse_args(argv)
    if args.child:
        return args
    peers = [peer.strip() for peer in args.peers.split(",") if peer.strip()]
    unknown = [peer for peer in peers if peer not in PEERS]
    if unknown or not peers:
        parser.error(f"--peers {args.peers!r}: unknown {unknown or 'empty list'}; choose from {','.join(PEERS)}")
    args.peers = [peer for peer in PEERS if peer in peers]
    args.only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    unknown = [name for name in args.only or [] if name not in {lever for lever, _, _ in LEVERS}]
    if unknown:
        parser.error(f"--only {unknown}: no such lever; choose from {sorted({lever for lever, _, _ in LEVERS})}")
    if args.examples <= 0:
        parser.error(f"--examples must be positive, got {args.examples}")
    if args.repeats <= 0:
        parser.error(f"--repeats must be positive, got {args.repeats}")
    if args.max_batch_tokens <= 0:
        parser.error(f"--max-batch-tokens must be positive, got {args.max_batch_tokens}")
    if args.batch_size is not None and args.batch_size <= 0:
        parser.error(f"--batch-size must be positive, got {args.batch_size}")
    if not Path(args.data).is_file():
        parser.exit(2, f"error: --data {args.data} not found (the benchmark rows live in ../shared/data/)\n")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return

    data_path = str(Path(args.data).resolve())  # the children run in the project root
    ours = OursSettings(max_batch_tokens=None if args.batch_size else args.max_batch_tokens, batch_size=args.batch_size or MICRO_BATCH)
    if args.lever:
        ours = dataclasses.replace(ours, precision=args.precision)
    peaks = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}
    machine = {
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "matmul_peak_gflops": {k: round(v, 1) for k, v in peaks.items()},
    }
    print(
        f"SmolLM2-135M-Instruct on CPU ({machine['threads']} threads); matmul peak {peaks['fp32']:.1f} GFLOP/s "
        f"float32, {peaks['bf16']:.1f} bfloat16; {args.examples} examples from {args.data}, 1 epoch, "
        f"{STEP_EXAMPLES} examples/step"
    )

    def run(peer: str, settings: OursSettings | None = None, label: str | None = None) -> dict:
        spec = {"peer": peer, "data": data_path, "examples": args.examples, "ours": dataclasses.asdict(settings) if settings else None}
        result = with_rates(run_in_subprocess(spec), peaks)
        print(
            f"  {label or peer:<16} {result['wall_s']:7.1f} s  {result['tokens_per_s']:7.0f} tokens/s  "
            f"{result['tokens']} tokens in {result['steps']} steps  mean loss {result['mean_loss']:.3f}  "
            f"peak RSS {result['peak_rss_gb']:.2f} GB",
            flush=True,
        )
        return result

    # Each round runs every job once, so a slow spell of a shared machine hits all jobs alike; a
    # job's row is its median-time run, and every run's tokens/s is kept in the JSON.
    if args.lever:
        jobs = [("baseline", "ours", ours, None)] + [
            (lever, "ours", dataclasses.replace(ours, **change), setting) for lever, setting, change in LEVERS
            if dataclasses.replace(ours, **change) != ours and (args.only is None or lever in args.only)
        ]
    else:
        settings = {"ours": ours, "ours-ckpt": dataclasses.replace(ours, grad_checkpointing=True),
                    "ours-bf16": dataclasses.replace(ours, precision="bf16")}
        jobs = [(peer, peer, settings.get(peer), None) for peer in args.peers]
    runs: list[list[dict]] = [[] for _ in jobs]
    for round_number in range(args.repeats):
        if args.repeats > 1:
            print(f"round {round_number + 1} of {args.repeats}", flush=True)
        for job_runs, (label, peer, job_settings, _) in zip(runs, jobs):
            job_runs.append(run(peer, job_settings, label))
    rows = []
    for job_runs, (label, _, _, setting) in zip(runs, jobs):
        median = sorted(job_runs, key=lambda result: result["wall_s"])[len(job_runs) // 2]
        row = {**median, "tokens_per_s_runs": [round(result["tokens_per_s"], 1) for result in job_runs]}
        if args.lever:
            row = {"lever": label, **row, **({"setting": setting} if setting else {})}
        rows.append(row)
    table = lever_table(rows) if args.lever else peer_table(rows)
    output = Path(args.output or (DEFAULT_LEVER_OUTPUT if args.lever else DEFAULT_OUTPUT))
    record = {"machine": machine, "data": args.data, "examples": args.examples, "repeats": args.repeats}
    record["levers" if args.lever else "peers"] = rows
    print("\n" + table)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nresults written to {output}")


if __name__ == "__main__":
    main()
