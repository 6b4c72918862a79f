"""The t4 preset's architecture on a GPU: step time and peak memory of our loop and of PEFT + TRL.

    python -m bench.t4_step                                   # CUDA, fp16 AMP, TinyLlama-1.1B shape
    python -m bench.t4_step --impls ours --compile            # ours with each decoder layer compiled
    python -m bench.t4_step --impls ours --compile --batch-size 16 --grad-accum 1   # one micro-batch per step
    python -m bench.t4_step --device cpu --layers 1 --examples 16 --precision fp32  # a smoke run

TinyLlama-1.1B-Chat-v1.0's weights cannot be downloaded here, so the model is its architecture
(22 layers, hidden 2048, 32 query / 4 KV heads, vocabulary 32,000) with random weights: the
speed and memory of a step do not depend on the weights' values. The rows are the embedded
flashcards, encoded with the embedded model's tokenizer and their ids folded into TinyLlama's
vocabulary (id mod 32,000): real lengths, a real shared system-prompt prefix, meaningless text.
Both implementations run the t4 preset: LoRA r=16, alpha=32, dropout 0.05 on q_proj and v_proj,
2 rows x 8 accumulation, gradient checkpointing on, lr 2e-4, fp16 AMP with a loss scaler.

    ours   bench.train_speed.step_as_train_py over data.epoch_steps / data.micro_batches.
    trl    PEFT LoraConfig + TRL SFTTrainer (bench.train_speed.train_trl) with fp16=True.

Both use the same attention backend: PyTorch SDPA, with cuDNN's kernel off unless --cudnn-sdpa
(medlora.model.use_shape_agnostic_attention, what train.py does on CUDA). --compile,
--batch-size, --grad-accum and --no-grad-checkpointing change ours only; TRL always runs the
reference's 2 x 8 with checkpointing.

Each runs in its own process. The table gives seconds per optimizer step after --warmup-steps
(compilation and first-shape costs stay out of it; the wall time of all steps is in the JSON),
and peak memory (torch.cuda.max_memory_allocated on a GPU, peak RSS on a CPU) next to the
reference notebook's T4 figures: 3.51 GB, and about 10 minutes for 2 epochs x 2,550 rows = 319
steps of 16 (1.9 s/step).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from bench.train_speed import (
    MICRO_BATCH,
    SEED,
    STEP_EXAMPLES,
    TARGETS,
    step_as_train_py,
    run_in_subprocess,
    train_trl,
)
from data import EncodedExample, clean_rows, encode_example, epoch_steps, load_rows, micro_batches
from lora import inject_lora, lora_parameters
from medlora.loss import row_nll
from medlora.optimizer_step import adamw
from medlora.model import (
    TORCH_DTYPES,
    autocast_for,
    load_tokenizer,
    peak_memory_gb,
    use_shape_agnostic_attention,
)
from medlora.schedule import cosine_with_warmup

TINYLLAMA_VOCAB = 32_000
REFERENCE_PEAK_GB = 3.51  # the reference notebook on a T4
REFERENCE_STEPS = math.ceil(2 * 2550 / STEP_EXAMPLES)  # 2 epochs of 2,550 training rows: 319 steps
REFERENCE_MINUTES = 10.0
IMPLEMENTATIONS = ("ours", "trl")


def tinyllama_model(layers: int, dtype: torch.dtype, device: str):
    """TinyLlama-1.1B-Chat-v1.0's architecture with random weights (`layers` of its 22)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=TINYLLAMA_VOCAB, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    torch.manual_seed(SEED)
    with torch.device(device):  # random initialisation on the GPU takes a second, on the CPU a minute
        model = LlamaForCausalLM(config).to(dtype)
    model.set_attn_implementation("sdpa")
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()  # the float32 copy is gone; only the `dtype` weights stay allocated
    return model


def folded_examples(tokenizer, count: int) -> list[EncodedExample]:
    """The first `count` embedded flashcards, encoded, ids folded into TinyLlama's vocabulary."""
    raw = load_rows(None)
    pairs, _ = clean_rows(raw.rows, raw.source)
    examples = [encode_example(tokenizer, p.question, p.answer, 512) for p in pairs[:count]]
    return [
        EncodedExample(
            [i % TINYLLAMA_VOCAB for i in e.input_ids], [l if l < 0 else l % TINYLLAMA_VOCAB for l in e.labels],
            e.prompt_length, e.question, e.answer,
        )
        for e in examples if e is not None
    ]


def compile_decoder_layers(model: torch.nn.Module) -> None:
    """torch.compile each decoder layer, with dynamic sequence lengths ("regional" compilation).

    The layers share one class and one code path, so the compiled code is built once (tens of
    seconds, on the clock) and reused by every layer and every micro-batch length. On a GPU this
    fuses the norms, rotary embedding, activation and LoRA elementwise work into few kernels,
    which pays where a step is bound by kernel launches. On the H200 with torch 2.11 it failed under
    activation checkpointing (inductor's partitioner: "Node add_403 was invalid, but is output"),
    and without checkpointing it cost 69 s to compile for 0.147 vs 0.186 s/step, so train.py does
    not use it (docs/performance.md).
    """
    for layer in model.model.layers:
        layer.compile(dynamic=True)


def synchronize(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter()


def train_ours(model, examples, spec: dict) -> dict:
    device, precision = spec["device"], spec["precision"]
    torch.manual_seed(SEED)
    inject_lora(model, TARGETS, rank=16, alpha=32, dropout=0.05)
    if spec["checkpointing"]:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if spec["compile"]:
        compile_decoder_layers(model)
    model.train()
    optimizer = adamw(lora_parameters(model), 2e-4, 0.001, device)  # as train.py: fused on a GPU
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")
    autocast = autocast_for(torch.device(device).type, precision)

    lengths = [len(e.input_ids) for e in examples]
    steps = epoch_steps(lengths, STEP_EXAMPLES, SEED, epoch=0)
    start = synchronize(device)
    losses, step_ends, peaks, steady = [], [], [], []
    for step, indices in enumerate(steps):
        lr = cosine_with_warmup(step, len(steps), 1, 2e-4)
        batches = micro_batches(indices, lengths, spec["batch_size"])
        loss, _ = step_as_train_py(model, optimizer, scaler, examples, batches, 2, device, autocast, lr, row_nll)
        losses.append(loss)
        step_ends.append(synchronize(device))
        if device.startswith("cuda"):  # where the peak falls: a step's backward, or the optimizer's state
            peaks.append(torch.cuda.max_memory_allocated(device) / 1e9)
            steady.append(torch.cuda.memory_allocated(device) / 1e9)
    setting = (
        f"train.py's optimizer step, {spec['batch_size']} rows x {STEP_EXAMPLES // spec['batch_size']}, "
        f"checkpointing {'on' if spec['checkpointing'] else 'off'}{', layers compiled' if spec['compile'] else ''}, "
        f"{'fused' if device.startswith('cuda') else 'foreach'} AdamW, {precision}"
    )
    return {
        "setting": setting, "start": start, "step_ends": step_ends, "mean_loss": sum(losses) / len(losses),
        "peak_gb_after_step": peaks, "allocated_gb_between_steps": steady,
    }


def child_main(spec: dict) -> None:
    device, precision = spec["device"], spec["precision"]
    if not spec["cudnn_sdpa"]:
        use_shape_agnostic_attention(torch.device(device))
    tokenizer = load_tokenizer(spec["tokenizer"])
    examples = folded_examples(tokenizer, spec["examples"])
    model = tinyllama_model(spec["layers"], TORCH_DTYPES[precision], device)
    weights_gb = torch.cuda.memory_allocated(device) / 1e9 if device.startswith("cuda") else None
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()  # from here on; the weights stay allocated, so they count
    if spec["impl"] == "ours":
        result = train_ours(model, examples, spec)
    else:
        step_ends: list[float] = []
        with tempfile.TemporaryDirectory(prefix="trl-") as scratch:
            result = train_trl(
                model, tokenizer, examples, True, precision == "bf16", scratch, fp16=precision == "fp16", step_ends=step_ends,
            )
        result["step_ends"] = step_ends
    ends, warmup, start = result.pop("step_ends"), spec["warmup_steps"], result.pop("start")
    timed_from = ends[warmup - 1] if warmup else start  # the end of the last warm-up step
    result.update(
        wall_s=ends[-1] - start, steps=len(ends), warmup_s=timed_from - start,
        s_per_step=(ends[-1] - timed_from) / (len(ends) - warmup),
    )
    memory = "torch.cuda.max_memory_allocated" if device.startswith("cuda") else "peak RSS"
    result.update(
        impl=spec["impl"], layers=spec["layers"], examples=len(examples), peak_gb=peak_memory_gb(torch.device(device)),
        weights_gb=weights_gb, memory=memory, cudnn_sdpa=spec["cudnn_sdpa"],
    )
    Path(spec["result_file"]).write_text(json.dumps(result))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--precision", default="fp16", choices=("fp16", "bf16", "fp32"), help="AMP dtype (default: fp16, the t4 preset)")
    parser.add_argument("--layers", type=int, default=22, help="decoder layers of the 22 (default: 22)")
    parser.add_argument("--examples", type=int, default=160, help="embedded rows trained on, one epoch (default: 160: 10 steps)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of s/step: compilation, first shapes (default: 2)")
    parser.add_argument("--impls", default="ours,trl", help="comma-separated subset of ours,trl (default: ours,trl)")
    parser.add_argument("--cudnn-sdpa", action="store_true", help="both: let SDPA use cuDNN's kernel (default: off, as train.py)")
    parser.add_argument("--compile", action="store_true", help="ours: torch.compile each decoder layer (default: off)")
    parser.add_argument("--batch-size", type=int, default=MICRO_BATCH, help=f"ours: rows per micro-batch (default: {MICRO_BATCH}, the t4 preset)")
    parser.add_argument("--no-grad-checkpointing", action="store_true", help="ours: keep activations (default: checkpointing on)")
    parser.add_argument("--tokenizer", help="tokenizer folder whose ids are folded (default: the embedded model's)")
    parser.add_argument("--output", default="bench/results/t4_step.json", help="results JSON (default: bench/results/t4_step.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return args
    args.impls = [name.strip() for name in args.impls.split(",") if name.strip()]
    if not args.impls or any(name not in IMPLEMENTATIONS for name in args.impls):
        parser.error(f"--impls must be a subset of {','.join(IMPLEMENTATIONS)}")
    if not 1 <= args.layers <= 22 or args.examples < STEP_EXAMPLES:
        parser.error(f"--layers must be 1..22 and --examples at least {STEP_EXAMPLES} (one optimizer step)")
    if args.batch_size < 1 or STEP_EXAMPLES % args.batch_size:
        parser.error(f"--batch-size must divide the {STEP_EXAMPLES} rows of a step, got {args.batch_size}")
    if not 0 <= args.warmup_steps < args.examples // STEP_EXAMPLES:
        parser.error(f"--warmup-steps must leave at least one of the {args.examples // STEP_EXAMPLES} steps timed")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.exit(2, "error: no CUDA device here; this benchmark is for a GPU (a smoke run: --device cpu --layers 1 --examples 32 --warmup-steps 1 --precision fp32)\n")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return
    name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "CPU"
    attention = "SDPA with cuDNN" if args.cudnn_sdpa else "SDPA without cuDNN (flash / memory-efficient)"
    print(f"TinyLlama-1.1B architecture ({args.layers} layers, random weights), {args.precision}, {name}, {args.examples} rows, {attention}")
    rows = []
    for impl in args.impls:
        spec = {
            "impl": impl, "peer": impl, "device": args.device, "precision": args.precision, "layers": args.layers,
            "examples": args.examples, "warmup_steps": args.warmup_steps, "cudnn_sdpa": args.cudnn_sdpa,
            "compile": args.compile, "batch_size": args.batch_size, "checkpointing": not args.no_grad_checkpointing,
            "tokenizer": args.tokenizer,
        }
        result = run_in_subprocess(spec, module="bench.t4_step")
        result["reference_run_min"] = result["s_per_step"] * REFERENCE_STEPS / 60
        rows.append(result)
    print(f"\n| implementation | setting | s/step (after {args.warmup_steps}) | first {args.warmup_steps} steps (s) | {REFERENCE_STEPS} steps (min) | peak memory (GB) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['impl']} | {row['setting']} | {row['s_per_step']:.3f} | {row['warmup_s']:.1f} | {row['reference_run_min']:.1f} "
            f"| {row['peak_gb']:.2f} ({row['memory']}) |"
        )
    print(f"| reference notebook, T4 | PEFT + TRL, fp16, checkpointing on | {REFERENCE_MINUTES * 60 / REFERENCE_STEPS:.2f} | | {REFERENCE_MINUTES:.0f} | {REFERENCE_PEAK_GB} |")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    record = {"device": name, "torch": torch.__version__, "precision": args.precision, "layers": args.layers, "attention": attention, "rows": rows}
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nresults written to {output}")


if __name__ == "__main__":
    main()
