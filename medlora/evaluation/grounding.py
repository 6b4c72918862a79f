"""Does putting the closest flashcards in the prompt help? ROUGE-L of three answer sources, measured.

    grounding = grounding_outputs(model, tokenizer, examples, sources, settings.generation, k=2)
    report = grounding_report(finetuned_answers, grounding)
    print(grounding_table(report))

On the evaluated split rows (the test split's medical rows), three answers per question, each
scored with ROUGE-L F1 against the reference answer (medlora.metrics.rouge_scores):

    finetuned   the fine-tuned model asked the plain question (evaluate.py's own answers)
    grounded    the fine-tuned model with the top-k cards above the threshold before the question
    retrieval   the top-1 card's answer alone, no model (empty when no card reaches the threshold)

Each gets the mean and a 95% bootstrap interval; grounded - finetuned and retrieval - finetuned get
a paired bootstrap interval (the same resampled questions for both), the same machinery as the
rest of the evaluation (medlora.evaluation.scores.bootstrap). evaluate.py adds these rows with an
adapter; --no-grounding leaves them out. No script puts cards in the prompt otherwise (docs/sources.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data import EncodedExample
from medlora.evaluation.scores import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, bootstrap
from medlora.generation import GENERATION_BATCH_SIZE, GenerationSettings, generate_answers
from medlora.metrics import rouge_scores
from medlora.sources import Sources, grounding_context

ROWS = {"finetuned": "Fine-tuned", "grounded": "Fine-tuned + cards in prompt", "retrieval": "Top-1 card alone"}


@dataclass
class GroundingOutputs:
    """The grounded answers and the retrieval-only answers of each evaluated question."""

    references: list[str]  # reference answer per question
    grounded: list[str]  # the model's answer with the cards in its prompt
    retrieval: list[str]  # the top-1 card's answer ("" when no card reaches the threshold)
    cards_shown: list[int]  # how many cards went into each grounded prompt
    k: int  # the most cards per prompt


def grounding_outputs(
    model, tokenizer, examples: list[EncodedExample], sources: Sources, generation: GenerationSettings, k: int = 2, batch_size: int = GENERATION_BATCH_SIZE
) -> GroundingOutputs:
    """Answer each example's question with its top-k cards before it; take the top-1 card's answer as the retrieval answer."""
    if k < 1:
        raise ValueError(f"grounding needs at least one card per prompt, got k={k}")
    cards = [sources.search(example.question, k) for example in examples]
    grounded = generate_answers(
        model, tokenizer, [e.question for e in examples], generation, batch_size, contexts=[grounding_context(c) for c in cards]
    )
    return GroundingOutputs(
        references=[example.answer for example in examples],
        grounded=grounded,
        retrieval=[found[0].answer if found else "" for found in cards],
        cards_shown=[len(found) for found in cards],
        k=k,
    )


def _summary(scores: np.ndarray) -> dict:
    low, high = bootstrap(len(scores), lambda indices: scores[indices].mean(axis=-1))
    return {"rougeL": float(scores.mean()), "interval": [low, high]}


def _paired_delta(scores: np.ndarray, baseline: np.ndarray) -> dict:
    difference = scores - baseline  # per question; resampling it resamples both on the same questions
    low, high = bootstrap(len(difference), lambda indices: difference[indices].mean(axis=-1))
    return {"value": float(difference.mean()), "interval": [low, high], "excludes_zero": low > 0 or high < 0}


def grounding_report(finetuned_answers: list[str], grounding: GroundingOutputs) -> dict:
    """ROUGE-L F1 of each row with its 95% bootstrap interval, and each row's paired delta to the fine-tuned model.

    Returns:
        {"n", "k", "questions_with_cards", "finetuned"|"grounded"|"retrieval": {"rougeL", "interval"},
         "delta": {"grounded"|"retrieval": {"value", "interval", "excludes_zero"}}}
    """
    if len(finetuned_answers) != len(grounding.references):
        raise ValueError(f"need one fine-tuned answer per question, got {len(finetuned_answers)} for {len(grounding.references)}")
    if not finetuned_answers:
        raise ValueError("no questions to compare grounding on")
    answers = {"finetuned": finetuned_answers, "grounded": grounding.grounded, "retrieval": grounding.retrieval}
    rouge_l = {key: np.array(rouge_scores(texts, grounding.references)["rougeL"]) for key, texts in answers.items()}
    report: dict = {
        "n": len(finetuned_answers),
        "k": grounding.k,
        "questions_with_cards": int(sum(count > 0 for count in grounding.cards_shown)),
    }
    report |= {key: _summary(scores) for key, scores in rouge_l.items()}
    report["delta"] = {key: _paired_delta(rouge_l[key], rouge_l["finetuned"]) for key in ("grounded", "retrieval")}
    return report


def grounding_table(report: dict) -> str:
    """Answer source | ROUGE-L F1 [95% interval] | delta to the fine-tuned model [paired interval], and a footnote."""
    lines = ["| Answer source | ROUGE-L F1 | Delta (- fine-tuned) |", "|---|---:|---:|"]
    for key, label in ROWS.items():
        low, high = report[key]["interval"]
        delta = report["delta"].get(key)
        delta_cell = "" if delta is None else (
            f"{delta['value']:+.4f} [{delta['interval'][0]:+.4f}, {delta['interval'][1]:+.4f}]" + (" *" if delta["excludes_zero"] else "")
        )
        lines.append(f"| {label} | {report[key]['rougeL']:.4f} [{low:.4f}, {high:.4f}] | {delta_cell} |")
    lines += [
        "",
        f"{report['n']} questions; {report['questions_with_cards']} had a card above the sources threshold "
        f"(the grounded row puts up to {report['k']} before the question; without one the prompt is the plain question and the "
        f"top-1 answer is empty). [low, high] = 95% bootstrap interval ({BOOTSTRAP_RESAMPLES} resamples, seed "
        f"{BOOTSTRAP_SEED}); * = the paired interval excludes 0.",
    ]
    return "\n".join(lines)
