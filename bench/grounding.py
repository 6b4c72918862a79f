"""Sources build time, and whether cards in the prompt help: the figures of docs/sources.md.

    python -m bench.grounding --adapter runs/cpu/adapter --external ../shared/data/medical_meadow_wikidoc_patient_info.json

Times building the sources (read, clean, split, BM25 index, threshold fit; medlora.sources) on the
embedded flashcards and, with --external, on that file. Then loads the run's base model with the
adapter merged (fp32 on the CPU, greedy, as evaluate.py), answers the medical rows of the test split
plainly and with the top-k cards in the prompt, and prints the ROUGE-L table of
medlora.evaluation.grounding (fine-tuned, fine-tuned + cards in prompt, top-1 card alone).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from medlora.evaluation.grounding import grounding_outputs, grounding_report, grounding_table
from medlora.evaluation.run import evaluation_examples
from medlora.evaluation.settings import resolve_settings
from medlora.generation import generate_answers, load_for_inference
from medlora.sources import build_sources, sources_for_adapter


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, help="adapter folder inside a train.py run folder")
    parser.add_argument("--external", help="also time the sources build on this data file")
    parser.add_argument("--k", type=int, default=2, help="cards per grounded prompt (default: 2)")
    parser.add_argument("--limit", type=int, help="only the first N medical test rows (default: all)")
    parser.add_argument("--output", help="JSON file for the build times, the report and the answers")
    args = parser.parse_args(argv)

    for data in ["embedded", args.external] if args.external else ["embedded"]:
        built = build_sources(None if data == "embedded" else data)
        print(f"[sources] {data}: built in {built.build_seconds:.3f} s; {built.notice}; fit {json.dumps(built.threshold_fit)}")
    sources = sources_for_adapter(args.adapter)

    settings = resolve_settings({"adapter": args.adapter, "limit": args.limit, "precision": "fp32", "device": "cpu"})
    model, tokenizer, description = load_for_inference(settings.model, settings.adapter, "cpu", torch.float32)
    examples = evaluation_examples(tokenizer, settings)
    print(f"[grounding] {description}: {len(examples)} medical {settings.split} questions, k = {args.k}")
    started = time.perf_counter()
    plain = generate_answers(model, tokenizer, [e.question for e in examples], settings.generation, settings.batch_size)
    plain_seconds = time.perf_counter() - started
    grounding = grounding_outputs(model, tokenizer, examples, sources, settings.generation, args.k, settings.batch_size)
    grounded_seconds = time.perf_counter() - started - plain_seconds
    report = grounding_report(plain, grounding)
    print(f"[grounding] answers: plain {plain_seconds:.0f} s, grounded {grounded_seconds:.0f} s")
    print(grounding_table(report))
    if args.output:
        rows = [
            {"question": e.question, "reference": e.answer, "finetuned": p, "grounded": g, "retrieval": r, "cards": n}
            for e, p, g, r, n in zip(examples, plain, grounding.grounded, grounding.retrieval, grounding.cards_shown)
        ]
        with open(args.output, "w") as handle:
            json.dump({"report": report, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
