"""Scores: every metric as a function of per-example statistics, with bootstrap intervals.

Every metric is computed from per-example statistics (summed NLL and token counts, answers,
ROUGE F1, decline flags), so the same function gives the score on all examples, the score on a
bootstrap resample of example indices, and the paired difference of two models on that resample:

    perplexity       exp(sum NLL / sum tokens) over the answer (+ EOS) tokens of the whole split
    perplexity_full  the same over every predicted non-pad token (system prompt + question + answer),
                     the reference notebook's method, kept for comparison
    bleu             corpus BLEU-4 (medlora.metrics.corpus_bleu), recomputed on each resample
    rouge1/2/L       mean of per-example F1 (medlora.metrics.rouge_scores)
    ood_decline_rate share of out-of-domain questions answered with a scope statement
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from medlora.metrics import bootstrap_interval, corpus_bleu, perplexity

BOOTSTRAP_RESAMPLES = 1000  # resamples per interval (sacreBLEU's paired bootstrap uses 1000 too)
BOOTSTRAP_SEED = 0  # fixed, so the same predictions always give the same intervals


@dataclass
class ModelOutputs:
    """What one model produced on the evaluation set; every metric is a function of these."""

    answers: list[str]  # generated answer per split example, in split order
    references: list[str]  # reference answer per split example
    nll: np.ndarray  # [n, 4] answer NLL, answer tokens, full NLL, full tokens (see example_nlls)
    rouge: dict[str, np.ndarray]  # rouge1 / rouge2 / rougeL: [n] F1 per example
    ood_answers: list[str]  # answer per out-of-domain question (split rows first, then the held-out list)
    ood_declines: np.ndarray  # [n_ood] 1.0 where the answer is a scope statement

    @property
    def n(self) -> int:
        return len(self.answers)


@dataclass(frozen=True)
class Metric:
    label: str  # row name in the table
    population: str  # "split": the evaluated examples; "ood": the out-of-domain questions
    of_indices: Callable[[ModelOutputs, np.ndarray], float]  # the metric of the examples at these indices
    digits: int = 4  # decimals shown in the table


ANSWER_COLUMN, FULL_COLUMN = 0, 2  # column of the summed NLL in ModelOutputs.nll; its token count is the next one


def _perplexity_of(column: int) -> Callable[[ModelOutputs, np.ndarray], float]:
    def of_indices(outputs: ModelOutputs, indices: np.ndarray) -> float:
        return perplexity(float(outputs.nll[indices, column].sum()), int(outputs.nll[indices, column + 1].sum()))

    return of_indices


def _bleu_of(outputs: ModelOutputs, indices: np.ndarray) -> float:
    return corpus_bleu([outputs.answers[i] for i in indices], [outputs.references[i] for i in indices])


def _mean_rouge_of(name: str) -> Callable[[ModelOutputs, np.ndarray], float]:
    return lambda outputs, indices: float(outputs.rouge[name][indices].mean())


METRICS: dict[str, Metric] = {
    "perplexity": Metric("Perplexity (answer tokens)", "split", _perplexity_of(ANSWER_COLUMN), digits=2),
    "perplexity_full": Metric("Perplexity (full sequence)", "split", _perplexity_of(FULL_COLUMN), digits=2),
    "bleu": Metric("BLEU-4", "split", _bleu_of),
    "rouge1": Metric("ROUGE-1 F1", "split", _mean_rouge_of("rouge1")),
    "rouge2": Metric("ROUGE-2 F1", "split", _mean_rouge_of("rouge2")),
    "rougeL": Metric("ROUGE-L F1", "split", _mean_rouge_of("rougeL")),
    "ood_decline_rate": Metric(
        "Out-of-domain decline rate", "ood", lambda outputs, indices: float(outputs.ood_declines[indices].mean()), digits=2
    ),
}


def population_size(outputs: ModelOutputs, metric: Metric) -> int:
    return outputs.n if metric.population == "split" else len(outputs.ood_declines)


def summarize(outputs: ModelOutputs, bar=None) -> dict:
    """Every metric on all examples, with its 95% bootstrap interval (None where there are no examples)."""
    summary: dict = {"n": outputs.n, "ood_n": len(outputs.ood_declines), "ood_declined": int(outputs.ood_declines.sum())}
    intervals = {}
    for name, metric in METRICS.items():
        size = population_size(outputs, metric)
        summary[name] = metric.of_indices(outputs, np.arange(size)) if size else None
        intervals[name] = list(bootstrap(size, lambda indices: metric.of_indices(outputs, indices))) if size else None
        if bar is not None:
            bar.update(1)
    summary["intervals"] = intervals
    return summary


def paired_deltas(base: ModelOutputs, finetuned: ModelOutputs, bar=None) -> dict:
    """Fine-tuned minus base for every metric, with a paired bootstrap interval of the difference.

    Both models are scored on the SAME resampled indices, so the interval says how much of the
    delta could come from which examples happened to be drawn. `excludes_zero` marks a delta
    whose interval does not contain 0.
    """
    deltas: dict = {}
    for name, metric in METRICS.items():
        size = population_size(finetuned, metric)

        def difference(indices: np.ndarray, metric: Metric = metric) -> float:
            return metric.of_indices(finetuned, indices) - metric.of_indices(base, indices)

        deltas[name] = None
        if size:
            low, high = bootstrap(size, difference)
            deltas[name] = {"value": difference(np.arange(size)), "interval": [low, high], "excludes_zero": low > 0 or high < 0}
        if bar is not None:
            bar.update(1)
    return deltas


def bootstrap(size: int, metric_of_indices: Callable[[np.ndarray], float]) -> tuple[float, float]:
    return bootstrap_interval(size, metric_of_indices, n_resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED)
