"""Do the scope verdicts change when scope answers are capped at 64 new tokens instead of 200?

    python -m bench.scope_answer_length --adapter runs/cpu/adapter            # every 4th held-out prompt
    python -m bench.scope_answer_length --adapter runs/cpu/adapter --every 1  # all 296

Answers a sample of data/scope_heldout.jsonl (every --every-th prompt, so every kind is in it) with
the fine-tuned model (adapter merged, fp32, greedy) twice: with max_new_tokens 200 (evaluate.py's
default for split questions) and with SCOPE_MAX_NEW_TOKENS (64), and counts how many answers and
how many verdicts (declined / referred, medlora.scope) differ, per kind, with the time of each pass.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch

from data.scope_set import load_heldout
from medlora.evaluation.settings import SCOPE_MAX_NEW_TOKENS
from medlora.generation import GenerationSettings, generate_answers, load_for_inference
from medlora.scope import REFERRAL_KINDS, is_decline, is_referral


def verdict(answer: str, kind: str) -> tuple[bool, bool | None]:
    return is_decline(answer), is_referral(answer, kind) if kind in REFERRAL_KINDS else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, help="the fine-tuned adapter folder (RUN/adapter)")
    parser.add_argument("--every", type=int, default=4, help="answer every N-th held-out prompt (default: 4)")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per generation batch (default: 16)")
    args = parser.parse_args()
    prompts = load_heldout()[:: args.every]
    model, tokenizer, description = load_for_inference(None, args.adapter, "cpu", torch.float32)
    print(f"{description}: {len(prompts)} held-out prompts (every {args.every}th), torch threads {torch.get_num_threads()}")
    answers = {}
    for tokens in (200, SCOPE_MAX_NEW_TOKENS):
        started = time.perf_counter()
        answers[tokens] = generate_answers(model, tokenizer, [p.question for p in prompts], GenerationSettings(max_new_tokens=tokens), args.batch_size)
        print(f"max_new_tokens {tokens:>3}: {time.perf_counter() - started:6.1f} s")
    texts, verdicts, totals = Counter(), Counter(), Counter()
    for index, prompt in enumerate(prompts):
        long, short = answers[200][index], answers[SCOPE_MAX_NEW_TOKENS][index]
        totals[prompt.kind] += 1
        texts[prompt.kind] += long != short
        if verdict(long, prompt.kind) != verdict(short, prompt.kind):
            verdicts[prompt.kind] += 1
            print(f"  verdict changed ({prompt.kind}): {prompt.question!r}\n    200: {long!r}\n     64: {short!r}")
    for kind in totals:
        print(f"{kind:<14} {totals[kind]:>3} prompts: {texts[kind]:>3} answers cut short, {verdicts[kind]:>3} verdicts changed")
    print(f"all            {sum(totals.values()):>3} prompts: {sum(texts.values()):>3} answers cut short, "
          f"{sum(verdicts.values()):>3} verdicts changed")


if __name__ == "__main__":
    main()
