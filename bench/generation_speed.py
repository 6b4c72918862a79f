"""Greedy decoding speed of the embedded base model, with and without a merged r=16 LoRA adapter.

    python -m bench.generation_speed                          # 3 prompts, 64 new tokens, 3 repeats
    python -m bench.generation_speed --new-tokens 128 --repeats 5
    python -m bench.generation_speed --batched                # evaluate.py's batches vs one at a time

Each prompt is answered on its own (batch 1, as in chat) with the KV cache by transformers'
`generate`, and every answer is forced to exactly --new-tokens tokens (min_new_tokens =
max_new_tokens, which the project's own loop has no use for), so all variants do the
same work; the variants take turns within each timed pass. The adapter (q_proj and v_proj, r=16,
alpha=32) gets random non-zero B, so it really changes the model. Merged, it is folded into the
base weights and should cost nothing; the unmerged row shows what merging saves (two extra small
matmuls per adapted layer and token).

--batched times what evaluate.py does instead: medlora.generation.generate_answers (greedy, its default
max_new_tokens, stopping at end of turn) over the first --questions questions of the embedded test
split at each of --batch-sizes (prompts sorted by length, left-padded; default 1, 8, 16 and 128,
evaluate.py's). It reports seconds per answer, and how many answers equal those of the first batch
size listed, against which the speed-up is taken.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from data.format import prompt_ids
from data import prepare_data
from lora import inject_lora, lora_layers, merge_lora, unmerge_lora
from medlora.generation import GENERATION_BATCH_SIZE, GenerationSettings, generate_answers, stop_token_ids
from medlora.model import PRECISIONS, TORCH_DTYPES, load_model_and_tokenizer, resolve_precision

PROMPTS = [
    "What is the mechanism of action of metformin?",
    "What are the classic symptoms of diabetic ketoacidosis?",
    "How does aspirin reduce the risk of a heart attack?",
]


def generate(model, tokenizer, ids: list[int], new_tokens: int) -> torch.Tensor:
    """Exactly `new_tokens` greedy tokens after the prompt `ids`, as a 1-D tensor."""
    settings = GenerationSettings(max_new_tokens=new_tokens)  # greedy, chat.py's repetition penalty
    input_ids = torch.tensor([ids])  # [1, prompt]
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, repetition_penalty=settings.repetition_penalty,
            eos_token_id=stop_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
        )
    generated = output[0, input_ids.shape[1]:]
    assert generated.numel() == new_tokens, "min_new_tokens did not hold the length"
    return generated


def timed_run(model, tokenizer, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[torch.Tensor]]:
    """Tokens per second over one pass through all prompts, and the generated tokens."""
    start = time.perf_counter()
    outputs = [generate(model, tokenizer, ids, new_tokens) for ids in prompts]
    return len(prompts) * new_tokens / (time.perf_counter() - start), outputs


def batched_vs_single(precision: str, questions_count: int, batch_sizes: list[int]) -> None:
    """Seconds per answer of evaluate.py's generation at each of `batch_sizes`, against the first."""
    model, tokenizer = load_model_and_tokenizer(None, dtype=TORCH_DTYPES[precision], device="cpu")
    questions = [e.question for e in prepare_data(tokenizer, None, None, 42, 512).examples.test][:questions_count]
    settings = GenerationSettings()  # greedy, the evaluate.py default
    print(
        f"SmolLM2-135M-Instruct, {precision} on CPU ({torch.get_num_threads()} threads), {len(questions)} test-split "
        f"questions, greedy, max_new_tokens={settings.max_new_tokens}, stopping at end of turn"
    )
    generate_answers(model, tokenizer, questions[:1], GenerationSettings(max_new_tokens=4), 1)  # warm-up
    rows = []
    for batch_size in batch_sizes:
        start = time.perf_counter()
        answers = generate_answers(model, tokenizer, questions, settings, batch_size)
        seconds = time.perf_counter() - start
        rows.append((batch_size, seconds, answers))
    single_seconds, single_answers = rows[0][1], rows[0][2]
    tokens = sum(len(tokenizer.encode(answer, add_special_tokens=False)) for answer in single_answers)
    print(f"mean answer length {tokens / len(questions):.0f} tokens (batch {batch_sizes[0]})\n")
    print(f"{'batch size':>10}{'total s':>10}{'s/answer':>10}{'speed-up':>10}{'same answers':>14}")
    for batch_size, seconds, answers in rows:
        same = sum(a == b for a, b in zip(answers, single_answers))
        print(
            f"{batch_size:>10}{seconds:>10.1f}{seconds / len(questions):>10.2f}"
            f"{single_seconds / seconds:>9.2f}x{same:>10} of {len(questions)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per variant (the median is reported)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="weight dtype (default: auto, as chat.py, or with --batched as evaluate.py)")
    parser.add_argument("--batched", action="store_true", help="time evaluate.py's batched generation against batch 1")
    parser.add_argument("--questions", type=int, default=16, help="--batched: test-split questions answered")
    parser.add_argument("--batch-sizes", default=f"1,8,16,{GENERATION_BATCH_SIZE}",
                        help="--batched: comma-separated batch sizes; the first is the reference")
    args = parser.parse_args()
    try:
        batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes must be comma-separated positive integers, got {args.batch_sizes!r}")
    if min(batch_sizes) < 1 or args.questions < 1 or args.repeats < 1 or args.new_tokens < 1:
        parser.error("--batch-sizes, --questions, --repeats and --new-tokens must be positive")
    precision = resolve_precision(args.precision, torch.device("cpu"), batch_invariant=args.batched)
    if args.batched:
        batched_vs_single(precision, args.questions, batch_sizes)
        return

    base, tokenizer = load_model_and_tokenizer(None, dtype=TORCH_DTYPES[precision], device="cpu")
    adapted = copy.deepcopy(base)
    inject_lora(adapted, targets=("q_proj", "v_proj"), rank=16, alpha=32, dropout=0.0)
    torch.manual_seed(0)
    for _, layer in lora_layers(adapted):
        torch.nn.init.normal_(layer.lora_B, std=0.02)  # non-zero B: the adapter changes the model
    prompts = [prompt_ids(tokenizer, question) for question in PROMPTS]
    print(
        f"SmolLM2-135M-Instruct, {precision} on CPU ({torch.get_num_threads()} threads), {len(prompts)} prompts of "
        f"{[len(ids) for ids in prompts]} tokens, {args.new_tokens} new tokens each, batch 1, "
        f"median of {args.repeats} passes"
    )

    # The variants take turns within each pass, so a busy machine slows them all alike.
    variants = {
        "base model": (base, lambda: None),
        "+ adapter, unmerged": (adapted, lambda: unmerge_lora(adapted)),
        "+ adapter, merged": (adapted, lambda: merge_lora(adapted)),
    }
    generate(base, tokenizer, prompts[0], 4)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in variants}
    outputs: dict[str, list[torch.Tensor]] = {}
    for _ in range(args.repeats):
        for name, (model, prepare) in variants.items():
            prepare()
            rate, outputs[name] = timed_run(model, tokenizer, prompts, args.new_tokens)
            rates[name].append(rate)

    medians = {name: statistics.median(values) for name, values in rates.items()}
    base_rate = medians["base model"]
    print(f"\n{'variant':<22}{'tokens/s':>10}{'vs base':>10}   passes (tokens/s)")
    for name, rate in medians.items():
        print(f"{name:<22}{rate:>10.1f}{rate / base_rate:>10.2f}   {', '.join(f'{r:.1f}' for r in rates[name])}")
    changed = sum(not torch.equal(a, b) for a, b in zip(outputs["base model"], outputs["+ adapter, merged"]))
    print(
        f"\nmerged / base = {medians['+ adapter, merged'] / base_rate:.2f}; "
        f"the adapter changed {changed} of {len(prompts)} greedy answers"
    )


if __name__ == "__main__":
    main()
