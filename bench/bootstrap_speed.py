"""How long all bootstrap intervals of one evaluate.py --compare-base report take.

    python -m bench.bootstrap_speed                 # 50 split examples, 296 scope prompts
    python -m bench.bootstrap_speed --examples 200

Builds two ModelOutputs (base and fine-tuned) of the evaluation's real shape: answers cut from
reference answers of the embedded flashcards (so BLEU and ROUGE are not trivial), random NLL sums,
and scope flags for the held-out set's rate populations. Then times summarize() for both models
and paired_deltas(), i.e. every interval in the report (1000 resamples each).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from data import load_rows
from data.scope_set import load_heldout
from medlora.evaluation.scores import ModelOutputs, paired_deltas, scope_outcomes, summarize
from medlora.metrics import rouge_scores


def fake_outputs(references: list[str], shift: int, rng: np.random.Generator) -> ModelOutputs:
    n = len(references)
    answers = [" ".join(references[(i + shift) % n].split()[:40]) for i in range(n)]
    nll = np.column_stack([rng.uniform(50, 150, n), np.full(n, 40.0), rng.uniform(150, 300, n), np.full(n, 120.0)])
    prompts = load_heldout()
    scope_answers = ["That is outside my scope." if rng.random() < 0.5 else "An answer." for _ in prompts]
    return ModelOutputs(
        answers, references, nll, {k: np.array(v) for k, v in rouge_scores(answers, references).items()},
        scope_answers, {k: np.array(v, dtype=float) for k, v in scope_outcomes(prompts, scope_answers).items()},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=50, help="split examples (default: 50)")
    args = parser.parse_args()
    references = [str(row["output"]) for row in load_rows(None).rows[: args.examples]]
    rng = np.random.default_rng(1)
    base, finetuned = fake_outputs(references, 1, rng), fake_outputs(references, 0, rng)
    started = time.perf_counter()
    summarize(base)
    summarize(finetuned)
    paired_deltas(base, finetuned)
    print(f"all intervals of a --compare-base report ({args.examples} examples, {len(base.scope_answers)} scope prompts, "
          f"1000 resamples): {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
