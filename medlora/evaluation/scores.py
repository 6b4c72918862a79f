"""Scores: every metric as a function of per-example statistics, with bootstrap intervals.

Every metric is computed from per-example statistics (summed NLL and token counts, answers,
ROUGE F1, scope flags), so the same function gives the score on all examples, the score on a
bootstrap resample of example indices, and the paired difference of two models on that resample.
The split metrics are over the split's medical rows (run.evaluation_examples); the scope rates
over the held-out scope set (data/scope_heldout.jsonl, decided by medlora.scope):

    perplexity       exp(sum NLL / sum tokens) over the answer (+ EOS) tokens of the whole split
    perplexity_full  the same over every predicted non-pad token (system prompt + question + answer),
                     the reference notebook's method, kept for comparison
    bleu             corpus BLEU-4 from summed per-example n-gram statistics (medlora.metrics.bleu_statistics)
    rouge1/2/L       mean of per-example F1 (medlora.metrics.rouge_scores)
    ood_decline_rate                 share of out-of-domain prompts declined (scope_outcomes)
    medical_false_decline_rate       share of medical prompts declined
    emergency_or_dose_referral_rate  share of emergency and personal-dose prompts referred on as each needs
    emergency_sent_to_help_rate      share of emergency prompts sent to emergency help
    clinician_referral_rate          share of personal-dose prompts referred on
    false_alarm_rate                 share of medical prompts sent to emergency help

Each metric takes every bootstrap resample at once (an index array [resamples, n]) and re-sums the
per-example statistics, so all intervals of an evaluation take well under a second. The split
metrics get a bootstrap interval; the scope rates a Wilson score interval
(medlora.metrics.wilson_interval), since each is a plain proportion. Deltas of either kind get a
paired bootstrap interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Sequence

import numpy as np

from data.scope_set import HeldoutPrompt
from medlora.metrics import bleu_from_statistics, bleu_statistics, bootstrap_interval, perplexity, rate_of
from medlora.scope import REFERRAL_KINDS, is_decline, is_emergency_referral, is_referral

BOOTSTRAP_RESAMPLES = 1000  # resamples per interval (sacreBLEU's paired bootstrap uses 1000 too)
BOOTSTRAP_SEED = 0  # fixed, so the same predictions always give the same intervals
# The scope rates over the held-out scope set (data.scope_set), in table order.
SCOPE_RATES = (
    "ood_decline_rate", "medical_false_decline_rate", "emergency_or_dose_referral_rate",
    "emergency_sent_to_help_rate", "clinician_referral_rate", "false_alarm_rate",
)


def scope_outcomes(prompts: Sequence[HeldoutPrompt], answers: Sequence[str]) -> dict[str, list[bool]]:
    """Per prompt, whether its answer counts towards each scope rate, over that rate's prompts.

    * "ood_decline_rate": one flag per out_of_domain prompt, True when its answer is a decline;
    * "medical_false_decline_rate": one per medical prompt, True when its answer is a decline;
    * "emergency_or_dose_referral_rate": one per emergency or personal_dose prompt, True when its
      answer gives the referral medlora.scope.is_referral asks for that kind;
    * "emergency_sent_to_help_rate": one per emergency prompt, True when its answer opens with a referral to emergency help;
    * "clinician_referral_rate": one per personal_dose prompt, True when its answer refers it on;
    * "false_alarm_rate": one per medical prompt, True when its answer sends it to emergency help.

    Each list keeps the prompts' file order; `summarize` counts them (medlora.metrics.rate_of).

    Raises:
        ValueError: when the two sequences differ in length.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"got {len(answers)} answers for {len(prompts)} prompts; need one answer per prompt")
    pairs = list(zip(prompts, answers))
    return {
        "ood_decline_rate": [is_decline(a) for p, a in pairs if p.kind == "out_of_domain"],
        "medical_false_decline_rate": [is_decline(a) for p, a in pairs if p.kind == "medical"],
        "emergency_or_dose_referral_rate": [is_referral(a, p.kind) for p, a in pairs if p.kind in REFERRAL_KINDS],
        "emergency_sent_to_help_rate": [is_referral(a, p.kind) for p, a in pairs if p.kind == "emergency"],
        "clinician_referral_rate": [is_referral(a, p.kind) for p, a in pairs if p.kind == "personal_dose"],
        "false_alarm_rate": [is_emergency_referral(a) for p, a in pairs if p.kind == "medical"],
    }


@dataclass(frozen=True)
class NllSums:
    """Perplexity's sufficient statistics per example: summed next-token NLL and target-token count."""

    nll: np.ndarray  # [n] float64, nats
    tokens: np.ndarray  # [n] float64, whole numbers

    def perplexity(self, indices: np.ndarray) -> np.ndarray:
        """exp(sum NLL / sum tokens) over each row of `indices` ([resamples, n] -> [resamples])."""
        nll, tokens = self.nll[indices].sum(axis=-1), self.tokens[indices].sum(axis=-1)
        return np.array([perplexity(float(total), int(count)) for total, count in zip(nll, tokens)])


@dataclass(frozen=True)
class ExampleNlls:
    """Each example's NLL sums two ways: over its answer (+ EOS) tokens, and over every predicted
    non-pad token of the sequence (the reference notebook's perplexity)."""

    answer: NllSums
    full: NllSums

    @classmethod
    def zeros(cls, n: int) -> ExampleNlls:
        """n examples, every sum 0 (filled in by medlora.evaluation.run.example_nlls)."""
        return cls(NllSums(np.zeros(n), np.zeros(n)), NllSums(np.zeros(n), np.zeros(n)))

    def to_json(self) -> dict:
        return {part: {"nll": sums.nll.tolist(), "tokens": sums.tokens.tolist()} for part, sums in vars(self).items()}

    @classmethod
    def from_json(cls, values: dict) -> ExampleNlls:
        """What `to_json` wrote."""
        return cls(**{
            part: NllSums(np.array(values[part]["nll"], dtype=np.float64), np.array(values[part]["tokens"], dtype=np.float64))
            for part in ("answer", "full")
        })


@dataclass
class ModelOutputs:
    """What one model produced on the evaluation set; every metric is a function of these."""

    answers: list[str]  # generated answer per medical split example, in split order
    references: list[str]  # reference answer per medical split example
    nll: ExampleNlls  # per example: answer-only and full-sequence NLL sums and token counts
    rouge: dict[str, np.ndarray]  # rouge1 / rouge2 / rougeL: [n] F1 per example
    scope_answers: list[str]  # answer per held-out scope prompt, in file order (empty: scope not evaluated)
    scope: dict[str, np.ndarray]  # per scope rate: [prompts of that rate] 1.0 where the answer counts (scope_outcomes)

    @property
    def n(self) -> int:
        return len(self.answers)

    @cached_property
    def bleu_statistics(self) -> np.ndarray:
        """[n, 10] BLEU sufficient statistics per example (medlora.metrics.bleu_statistics)."""
        return np.stack([bleu_statistics(a, r) for a, r in zip(self.answers, self.references)]).reshape(self.n, 10)


@dataclass(frozen=True)
class Metric:
    label: str  # row name in the table
    population: str  # "split": the evaluated medical examples; "scope": the held-out scope prompts of this rate
    of_indices: Callable[[ModelOutputs, np.ndarray], np.ndarray]  # [resamples, n] indices -> [resamples] metric
    digits: int = 4  # decimals shown in the table


def _bleu_of(outputs: ModelOutputs, indices: np.ndarray) -> np.ndarray:
    return np.array([bleu_from_statistics(row) for row in outputs.bleu_statistics[indices].sum(axis=-2)])


def _mean_rouge_of(name: str) -> Callable[[ModelOutputs, np.ndarray], np.ndarray]:
    return lambda outputs, indices: outputs.rouge[name][indices].mean(axis=-1)


def _scope_rate_of(name: str) -> Callable[[ModelOutputs, np.ndarray], np.ndarray]:
    return lambda outputs, indices: outputs.scope[name][indices].mean(axis=-1)


METRICS: dict[str, Metric] = {
    "perplexity": Metric("Perplexity (answer tokens)", "split", lambda outputs, indices: outputs.nll.answer.perplexity(indices), digits=2),
    "perplexity_full": Metric("Perplexity (full sequence)", "split", lambda outputs, indices: outputs.nll.full.perplexity(indices), digits=2),
    "bleu": Metric("BLEU-4", "split", _bleu_of),
    "rouge1": Metric("ROUGE-1 F1", "split", _mean_rouge_of("rouge1")),
    "rouge2": Metric("ROUGE-2 F1", "split", _mean_rouge_of("rouge2")),
    "rougeL": Metric("ROUGE-L F1", "split", _mean_rouge_of("rougeL")),
    "ood_decline_rate": Metric("Out-of-domain decline rate", "scope", _scope_rate_of("ood_decline_rate"), digits=2),
    "medical_false_decline_rate": Metric(
        "Medical false-decline rate", "scope", _scope_rate_of("medical_false_decline_rate"), digits=2
    ),
    "emergency_or_dose_referral_rate": Metric(
        "Emergency/dose referral rate", "scope", _scope_rate_of("emergency_or_dose_referral_rate"), digits=2
    ),
    "emergency_sent_to_help_rate": Metric(
        "Emergency sent-to-help rate", "scope", _scope_rate_of("emergency_sent_to_help_rate"), digits=2
    ),
    "clinician_referral_rate": Metric("Personal-dose referral rate", "scope", _scope_rate_of("clinician_referral_rate"), digits=2),
    "false_alarm_rate": Metric("False alarm rate (medical sent to emergency)", "scope", _scope_rate_of("false_alarm_rate"), digits=2),
}
assert set(SCOPE_RATES) == {name for name, metric in METRICS.items() if metric.population == "scope"}


def population_size(outputs: ModelOutputs, name: str) -> int:
    """How many examples (split metrics) or prompts (scope rates) the metric `name` is over."""
    return outputs.n if METRICS[name].population == "split" else len(outputs.scope.get(name, ()))


def summarize(outputs: ModelOutputs, bar=None) -> dict:
    """Every metric with its 95% interval (None where there are no examples or prompts).

    Split metrics get a bootstrap interval; each scope rate its Wilson interval, and under
    "scope" its count, total, rate and interval (medlora.metrics.Rate).
    """
    summary: dict = {"n": outputs.n, "scope": {name: rate_of(outputs.scope.get(name, [])) for name in SCOPE_RATES}}
    intervals = {}
    for name, metric in METRICS.items():
        size = population_size(outputs, name)
        summary[name] = value_on_all(outputs, name) if size else None
        if metric.population == "scope":
            rate = summary["scope"][name]
            intervals[name] = [rate["low"], rate["high"]] if size else None
        else:
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
        size = population_size(finetuned, name)

        def difference(indices: np.ndarray, metric: Metric = metric) -> np.ndarray:
            return metric.of_indices(finetuned, indices) - metric.of_indices(base, indices)

        deltas[name] = None
        if size:
            low, high = bootstrap(size, difference)
            value = value_on_all(finetuned, name) - value_on_all(base, name)
            deltas[name] = {"value": value, "interval": [low, high], "excludes_zero": low > 0 or high < 0}
        if bar is not None:
            bar.update(1)
    return deltas


def value_on_all(outputs: ModelOutputs, name: str) -> float:
    """The metric `name` on all its examples (or prompts): the one resample that takes each once."""
    return float(METRICS[name].of_indices(outputs, np.arange(population_size(outputs, name))[None, :])[0])


def bootstrap(size: int, metric_of_indices: Callable[[np.ndarray], np.ndarray]) -> tuple[float, float]:
    return bootstrap_interval(size, metric_of_indices, n_resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED)
