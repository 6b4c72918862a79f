"""Evaluate a fine-tuned adapter against its base model on the split training held out.

    python evaluate.py --adapter runs/cpu/adapter --compare-base     # table + runs/cpu/eval.json
    python evaluate.py --adapter runs/cpu/adapter --limit 20 --max-new-tokens 100
    python evaluate.py                                               # the embedded base model only
    python evaluate.py --experiments experiments/cpu.json --limit 8 --max-new-tokens 64
    python evaluate.py --experiments experiments/reference_t4.json   # the reference's four runs (GPU)

With --adapter RUN/adapter, model, data, --num-examples, --seed and --max-length default to
RUN/config.json, so prepare_data rebuilds the very split training used, and the report goes to
RUN/eval.json. Next to the JSON report: <name>_predictions.jsonl (question, reference, each
model's answer), <name>_metrics.png (bar chart) and <name>.md (the printed table).

Perplexity is exp(summed NLL / target tokens) over the whole split: answer tokens only, and
(perplexity_full, the reference notebook's method) every token of the sequence. Answers are
generated in left-padded batches, greedy unless --sample. Every metric has a 95% bootstrap
interval; with --compare-base the delta has a paired one. See medlora/evaluation/ for the details.

--experiments FILE trains every experiment of a JSON list (preset + overrides, run folders under
runs/experiments/<name>), each in its own train.py process, evaluates and inspects each adapter,
and writes the table (r, variant, seed, losses and perplexities, ROUGE, BLEU, s/step, trainable
parameters, the inspector's stable rank and |dW|/|W0|, peak memory, time) as markdown and JSON
(experiments/runner.py). Finished runs and same-settings evaluations are reused, not redone.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from transformers.utils.logging import disable_progress_bar

from experiments.runner import experiments_table, load_experiments, run_experiments, save_experiments
from medlora.errors import USER_FAILURES, report_failure
from medlora.evaluation.report import markdown_table, save_evaluation
from medlora.evaluation.run import run_evaluation
from medlora.evaluation.scores import BOOTSTRAP_RESAMPLES
from medlora.evaluation.settings import SAMPLING_DEFAULTS, SCOPE_MAX_NEW_TOKENS, SPLITS, resolve_settings
from medlora.flags import add_shared_flags
from medlora.generation import GENERATION_BATCH_SIZE, GenerationSettings

FLAGS_SET_BY_EACH_EXPERIMENT = ("model", "adapter", "data", "num_examples", "seed", "max_length", "compare_base")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2]
    )
    add = parser.add_argument
    add("--adapter", help="adapter folder (RUN/adapter from train.py); without it the base model is evaluated")
    add("--compare-base", action="store_true", help="with --adapter: also evaluate the base model, and the delta")
    add_shared_flags(parser, {
        "model": "the run's, else the adapter's, else the embedded SmolLM2-135M-Instruct",
        "data": "the run's, else the embedded flashcards",
        "num_examples": "the run's, else all",
        "seed": "the run's, else 42; also --sample's unless --sample-seed",
        "max_length": "the run's, else 512",
        "precision": "auto: bf16/fp16 on CUDA, fp32 on CPU, so answers do not depend on --batch-size",
        "device": "CUDA when available",
    })
    add("--split", choices=SPLITS, help="split to evaluate (default: test)")
    add("--limit", type=int, help="evaluate only the first N examples of the split, and at most N held-out scope prompts, "
        "taken in turn from each kind (default: all)")
    add("--batch-size", type=int, help=f"questions per generation batch (default: {GENERATION_BATCH_SIZE})")
    add("--max-new-tokens", type=int, help=f"most tokens generated per answer (default: {GenerationSettings.max_new_tokens})")
    add("--sample", action="store_true", help="sample instead of greedy decoding")
    add("--temperature", type=float, help=f"with --sample: softmax temperature (default: {SAMPLING_DEFAULTS['temperature']})")
    add("--top-p", type=float, help=f"with --sample: nucleus probability mass (default: {SAMPLING_DEFAULTS['top_p']})")
    add("--sample-seed", type=int, help="with --sample: seed of the sampler (default: --seed)")
    add("--no-cache", action="store_true", help="evaluate the base model again instead of reusing its cached results "
        "(~/.cache/medlora/eval, keyed by model, data, split, generation settings and code version)")
    add("--no-scope", action="store_true", help="skip the held-out scope prompts (and their rates)")
    add("--no-grounding", action="store_true", help="leave out the grounding rows (the fine-tuned model with its top 2 "
        "training flashcards in the prompt, and the top card's answer alone; docs/sources.md)")
    add("--no-scope-gate", action="store_true", help="leave out the third column: the fine-tuned model's answers through its scope gate")
    add("--scope-set", help="held-out scope prompts, JSON lines {question, kind, category, wording} "
        f"(default: data/scope_heldout.jsonl); answered with at most {SCOPE_MAX_NEW_TOKENS} new tokens for the scope rates")
    add("--output", help="report .json (default: RUN/eval.json next to the adapter's run folder, else eval.json; "
        "with --experiments: runs/experiments/<file name>.json)")
    add("--experiments", help="JSON list of training configs: train each, evaluate each, write the experiment table")
    return parser.parse_args(argv)


def evaluate(flags: dict) -> None:
    settings = resolve_settings(flags)
    print("\n".join(settings.lines()))
    started = time.perf_counter()
    evaluation = run_evaluation(settings)
    paths = save_evaluation(evaluation, settings.output)
    print()
    print(markdown_table(evaluation.report))
    print()
    print(f"[eval] {time.perf_counter() - started:.0f} s; wrote " + ", ".join(str(path) for path in paths.values()))


def experiments(flags: dict) -> None:
    refused = [f"--{name.replace('_', '-')}" for name in FLAGS_SET_BY_EACH_EXPERIMENT if flags.get(name) not in (None, False)]
    if refused:
        raise ValueError(f"{', '.join(refused)} cannot be combined with --experiments: each experiment's run config sets them")
    path = Path(flags.pop("experiments"))
    output = flags.pop("output") or str(Path("runs/experiments") / f"{path.stem}.json")
    planned = load_experiments(path)
    print(f"[experiments] {len(planned)} from {path}: {', '.join(name for name, _ in planned)}; "
          f"evaluation: {flags.get('limit') or 'all'} examples, bootstrap {BOOTSTRAP_RESAMPLES} resamples")
    started = time.perf_counter()
    rows = run_experiments(planned, flags)
    paths = save_experiments(rows, output)
    print()
    print(experiments_table(rows))
    print()
    print(f"[experiments] {(time.perf_counter() - started) / 60:.1f} min; wrote " + ", ".join(str(p) for p in paths.values()))


def main(argv: list[str] | None = None) -> int:
    flags = vars(parse_args(argv))
    disable_progress_bar()  # transformers' per-weight loading bar; our own bars stay
    try:
        if flags.get("experiments"):
            experiments(flags)
        else:
            evaluate(flags)
    except USER_FAILURES as error:
        return report_failure(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
