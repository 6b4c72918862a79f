"""The scope gate's rates on the held-out scope set, beside the fine-tuned model's own.

    python -m bench.scope_gate --adapter runs/cpu/adapter

Loads the base model with the adapter merged, answers every held-out scope prompt greedily (at
most 64 new tokens, as the evaluation), fits the gate on the training split's prompts (labels from
the training answers through medlora.scope's rule; the same as train.py does), routes each answer
through it (medlora.scope_gate.route) and prints both sets of rates with Wilson 95% intervals.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import torch

from data import prepare_data
from data.scope_set import load_heldout
from medlora.evaluation.scores import scope_rates
from medlora.evaluation.settings import SCOPE_MAX_NEW_TOKENS
from medlora.generation import GenerationSettings, generate_answers, load_for_inference
from medlora.scope_gate import fit_gate_on_examples, prompt_features, route


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, help="adapter folder of a run trained on the embedded data")
    parser.add_argument("--output", help="JSON file for the rates, decisions and answers")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    model, tokenizer, description = load_for_inference(None, args.adapter, "cpu", torch.float32)
    train_examples = prepare_data(tokenizer, None, None, 42, 512).examples.train
    gate = fit_gate_on_examples(model, tokenizer, train_examples)
    fitted = time.perf_counter()
    prompts = load_heldout()
    questions = [prompt.question for prompt in prompts]
    answers = generate_answers(model, tokenizer, questions, GenerationSettings(max_new_tokens=SCOPE_MAX_NEW_TOKENS), 16)
    decisions = gate.predict(prompt_features(model, tokenizer, questions))
    routed = [route(decision, answer) for decision, answer in zip(decisions, answers)]
    report = {
        "model": description,
        "model_rates": scope_rates(prompts, answers),
        "gate_rates": scope_rates(prompts, routed),
        "decisions": {f"{kind} -> {decision}": n for (kind, decision), n in Counter((p.kind, d) for p, d in zip(prompts, decisions)).items()},
        "fit_s": round(fitted - started, 1),
        "heldout_s": round(time.perf_counter() - fitted, 1),
    }
    print(json.dumps(report, indent=1))
    if args.output:
        report["answers"] = [{"question": q, "model": a, "decision": d, "routed": r} for q, a, d, r in zip(questions, answers, decisions, routed)]
        with open(args.output, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
