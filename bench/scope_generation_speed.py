"""Answers/s on the held-out scope prompts, with and without the stop at the second sentence.

    python -m bench.scope_generation_speed --adapter runs/cpu/adapter               # every 4th prompt
    python -m bench.scope_generation_speed                                          # the base model
    python -m bench.scope_generation_speed --adapter runs/cpu/adapter --every 1     # all 296

Answers every --every-th prompt of data/scope_heldout.jsonl as evaluate.py does (the fine-tuned
model with --adapter merged, else the base model; fp32, greedy, batches of --batch-size (evaluate.py's 128),
max_new_tokens
SCOPE_MAX_NEW_TOKENS), without a sentence limit and with generate_answers(...,
stop_after_sentences=2), the two passes taking turns --repeats times (the fastest of each is
kept). It prints the answers/s of each, how many answers the limit cut, how many limited answers
equal the unlimited answer cut at its second sentence (medlora.generation.first_sentences: all of
them, or the limit changed the decoding), and how many scope verdicts (declined / referred,
medlora.scope) differ.

generate_answers decodes with its own loop (medlora.generation.decode), in which a row that stops
leaves the batch at once, so the sentence stop saves the decoding steps of the rows it ends early.
"""

from __future__ import annotations

import argparse
import time

import torch

from data.scope_set import load_heldout
from medlora.evaluation.settings import SCOPE_MAX_NEW_TOKENS
from medlora.generation import GENERATION_BATCH_SIZE, GenerationSettings, first_sentences, generate_answers, load_for_inference
from medlora.scope import REFERRAL_KINDS, is_decline, is_referral

SENTENCES = 2  # the stop evaluate.py uses for scope answers


def verdict(answer: str, kind: str) -> tuple[bool, bool | None]:
    """What the scope rule decides of an answer: declined, and (for emergency / personal-dose prompts) referred on."""
    return is_decline(answer), is_referral(answer, kind) if kind in REFERRAL_KINDS else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--adapter", help="the fine-tuned adapter folder (RUN/adapter); without it, the base model")
    parser.add_argument("--every", type=int, default=4, help="answer every N-th held-out prompt (default: 4)")
    parser.add_argument("--repeats", type=int, default=2, help="passes of each kind, taking turns; the fastest is kept (default: 2)")
    parser.add_argument("--batch-size", type=int, default=GENERATION_BATCH_SIZE,
                        help=f"questions per generation batch (default: {GENERATION_BATCH_SIZE}, evaluate.py's)")
    args = parser.parse_args()
    if min(args.every, args.batch_size, args.repeats) < 1:
        parser.error(f"--every, --batch-size and --repeats must be positive, got {args.every}, {args.batch_size}, {args.repeats}")
    prompts = load_heldout()[:: args.every]
    questions = [prompt.question for prompt in prompts]
    model, tokenizer, description = load_for_inference(None, args.adapter, "cpu", torch.float32)
    settings = GenerationSettings(max_new_tokens=SCOPE_MAX_NEW_TOKENS)
    print(f"{description}: {len(prompts)} held-out prompts (every {args.every}), fp32, greedy, batch {args.batch_size}, "
          f"max_new_tokens {SCOPE_MAX_NEW_TOKENS}, torch threads {torch.get_num_threads()}")
    generate_answers(model, tokenizer, questions[:1], GenerationSettings(max_new_tokens=4))  # warm-up

    answers, seconds = {}, {None: [], SENTENCES: []}
    for _ in range(args.repeats):
        for limit in (None, SENTENCES):
            start = time.perf_counter()
            answers[limit] = generate_answers(model, tokenizer, questions, settings, args.batch_size, stop_after_sentences=limit)
            seconds[limit].append(time.perf_counter() - start)
    for limit, runs in seconds.items():
        label = "no sentence limit" if limit is None else f"stop after {limit} sentences"
        print(f"{label:<24} {min(runs):7.1f} s  {len(questions) / min(runs):5.2f} answers/s   (passes: {', '.join(f'{t:.1f}' for t in runs)} s)")
    print(f"speed-up {min(seconds[None]) / min(seconds[SENTENCES]):.2f}x")
    cut_count = sum(full != limited for full, limited in zip(answers[None], answers[SENTENCES]))
    same = sum(first_sentences(full, SENTENCES) == limited for full, limited in zip(answers[None], answers[SENTENCES]))
    changed = sum(verdict(full, p.kind) != verdict(limited, p.kind) for full, limited, p in zip(answers[None], answers[SENTENCES], prompts))
    print(f"answers the limit cut: {cut_count} of {len(prompts)}; limited answer == unlimited answer cut at sentence {SENTENCES}: "
          f"{same} of {len(prompts)}; verdicts changed: {changed}")


if __name__ == "__main__":
    main()
