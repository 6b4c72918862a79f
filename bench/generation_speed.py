"""Greedy decoding speed of the embedded base model, with and without a merged r=16 LoRA adapter.

    python -m bench.generation_speed                          # 3 prompts, 64 new tokens, 3 repeats
    python -m bench.generation_speed --new-tokens 128 --repeats 5

Each prompt is answered on its own (batch 1, as in chat) with the KV cache, and every answer is
forced to exactly --new-tokens tokens (min_new_tokens = max_new_tokens), so all variants do the
same work; the variants take turns within each timed pass. The adapter (q_proj and v_proj, r=16,
alpha=32) gets random non-zero B, so it really changes the model. Merged, it is folded into the
base weights and should cost nothing; the unmerged row shows what merging saves (two extra small
matmuls per adapted layer and token).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from base_model import load_model_and_tokenizer
from data.format import prompt_ids
from inference import GenerationSettings, generation_kwargs
from lora import inject_lora, lora_layers, merge_lora, unmerge_lora

PROMPTS = [
    "What is the mechanism of action of metformin?",
    "What are the classic symptoms of diabetic ketoacidosis?",
    "How does aspirin reduce the risk of a heart attack?",
]


def generate(model, tokenizer, ids: list[int], new_tokens: int) -> torch.Tensor:
    """Exactly `new_tokens` greedy tokens after the prompt `ids`, as a 1-D tensor."""
    kwargs = generation_kwargs(model, tokenizer, GenerationSettings(max_new_tokens=new_tokens))
    input_ids = torch.tensor([ids])  # [1, prompt]
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), min_new_tokens=new_tokens, **kwargs
        )
    generated = output[0, input_ids.shape[1]:]
    assert generated.numel() == new_tokens, "min_new_tokens did not hold the length"
    return generated


def timed_run(model, tokenizer, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[torch.Tensor]]:
    """Tokens per second over one pass through all prompts, and the generated tokens."""
    start = time.perf_counter()
    outputs = [generate(model, tokenizer, ids, new_tokens) for ids in prompts]
    return len(prompts) * new_tokens / (time.perf_counter() - start), outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per variant (the median is reported)")
    args = parser.parse_args()

    base, tokenizer = load_model_and_tokenizer(None, dtype=torch.float32, device="cpu")
    adapted = copy.deepcopy(base)
    inject_lora(adapted, targets=("q_proj", "v_proj"), rank=16, alpha=32, dropout=0.0)
    torch.manual_seed(0)
    for _, layer in lora_layers(adapted):
        torch.nn.init.normal_(layer.lora_B, std=0.02)  # non-zero B: the adapter changes the model
    prompts = [prompt_ids(tokenizer, question) for question in PROMPTS]
    print(
        f"SmolLM2-135M-Instruct, fp32 on CPU ({torch.get_num_threads()} threads), {len(prompts)} prompts of "
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
