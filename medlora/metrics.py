"""Evaluation metrics for generated answers: BLEU, ROUGE, perplexity, bootstrap intervals.

Pure functions, no model code. Each metric is built the way sacreBLEU and rouge_score build
theirs: sufficient statistics first (n-gram counts, summed NLL and token count), the score last.

    corpus_bleu(predictions, references)    corpus BLEU-4 in [0, 1], sacreBLEU-13a compatible
    bleu_statistics(prediction, reference)  its per-example sufficient statistics; bleu_from_statistics
    rouge_scores(predictions, references)   per-example ROUGE-1/2/L F1 (Porter-stemmed)
    perplexity(nll_sum, token_count)        exp(nll_sum / token_count)
    bootstrap_interval(n, metric_of_indices) percentile bootstrap of any corpus-level metric
    wilson_interval(count, total)           Wilson score interval of a proportion
    rate_of(flags)                          count / total of True flags with its Wilson interval (a Rate)

The summed NLL and token counts come from the model, through medlora.loss (row_nll in training,
answer_and_sequence_nll in evaluation).

Tests (hand-computed values and parity with sacreBLEU):

    .venv/bin/python -m pytest -q tests/medlora/test_metrics.py
"""

import math
import re
import string
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TypedDict

import numpy as np
from rouge_score import rouge_scorer

# --- mteval-v13a tokenization -------------------------------------------------------------

# Every ASCII punctuation mark except the four that need context: apostrophe and hyphen stay
# inside words ("patient's", "follow-up"); period and comma are handled next to digits below.
_SYMBOLS = "".join(char for char in string.punctuation if char not in "'-.,")
_SYMBOL = re.compile(f"([{re.escape(_SYMBOLS)}])")
_PERIOD_OR_COMMA_AFTER_NON_DIGIT = re.compile(r"([^0-9])([.,])")
_PERIOD_OR_COMMA_BEFORE_NON_DIGIT = re.compile(r"([.,])([^0-9])")
_DASH_AFTER_DIGIT = re.compile(r"([0-9])(-)")


def tokenize_13a(text: str) -> list[str]:
    """Split text into tokens the way mteval-v13a does (sacreBLEU's ``tokenize="13a"``).

    Steps, in the order mteval-v13a.pl applies them:

    1. Drop ``<skipped>`` markers, join words hyphenated across a line end (``"-\\n"`` is
       removed), turn remaining newlines into spaces.
    2. Unescape ``&quot; &amp; &lt; &gt;`` (``&quot;`` before ``&amp;``, so ``"&amp;quot;"``
       becomes ``"&quot;"``, as in the Perl script).
    3. Pad every ASCII punctuation mark except ``' - . ,`` with spaces: ``"(5 mg)"`` ->
       ``( 5 mg )``.
    4. Split a period or comma off unless it sits between digits: ``"3.5"`` and ``"1,000"``
       stay whole, ``"dose."`` -> ``dose .``, ``"3."`` at the end -> ``3 .``.
    5. Split a dash off when a digit precedes it: ``"5-10"`` -> ``5 - 10``, while
       ``"follow-up"`` stays one token.
    6. Split on whitespace.

    Case is preserved (sacreBLEU's default ``lowercase=False``).

    Args:
        text: one segment (a prediction or a reference).

    Returns:
        The tokens; ``" ".join(tokens)`` equals sacreBLEU's ``Tokenizer13a()(text)``.
    """
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for escaped, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        text = text.replace(escaped, char)
    # Surrounding spaces let a period or comma at either end count as "next to a non-digit".
    text = f" {text} "
    text = _SYMBOL.sub(r" \1 ", text)
    text = _PERIOD_OR_COMMA_AFTER_NON_DIGIT.sub(r"\1 \2 ", text)
    text = _PERIOD_OR_COMMA_BEFORE_NON_DIGIT.sub(r" \1 \2", text)
    text = _DASH_AFTER_DIGIT.sub(r"\1 \2 ", text)
    return text.split()


# --- BLEU ---------------------------------------------------------------------------------


def _check_same_length(predictions: Sequence[str], references: Sequence[str]) -> None:
    """Raise ValueError unless there is exactly one reference per prediction."""
    if len(predictions) != len(references):
        raise ValueError(
            f"need one reference per prediction, got {len(predictions)} predictions "
            f"and {len(references)} references"
        )


BLEU_ORDERS = 4  # BLEU-4: n-grams of 1 to 4 tokens, weight 1/4 each
# Columns of bleu_statistics: clipped matches of order 1..4, prediction n-grams of order 1..4
# (at least 1 each), prediction length, reference length (tokens).
MATCHES, TOTALS, PREDICTION_LENGTH, REFERENCE_LENGTH = slice(0, 4), slice(4, 8), 8, 9


def _ngram_counts(tokens: list[str], order: int) -> Counter:
    return Counter(tuple(tokens[i : i + order]) for i in range(len(tokens) - order + 1))


def bleu_statistics(prediction: str, reference: str) -> np.ndarray:
    """BLEU's sufficient statistics of one example: what corpus BLEU sums over examples.

    For each order n = 1..4: the clipped n-gram matches (each prediction n-gram counts at most as
    often as it occurs in the reference) and the number of prediction n-grams, at least 1 (nltk's
    per-sentence ``max(1, count)``); then the prediction and reference lengths. Tokens come from
    :func:`tokenize_13a` after stripping trailing whitespace, as sacreBLEU does.

    Returns:
        int64 [10]: matches 1..4, totals 1..4, prediction length, reference length.
    """
    prediction_tokens, reference_tokens = tokenize_13a(prediction.rstrip()), tokenize_13a(reference.rstrip())
    statistics = np.zeros(10, dtype=np.int64)
    for order in range(1, BLEU_ORDERS + 1):
        predicted, referenced = _ngram_counts(prediction_tokens, order), _ngram_counts(reference_tokens, order)
        statistics[order - 1] = sum(min(count, referenced[ngram]) for ngram, count in predicted.items())
        statistics[BLEU_ORDERS + order - 1] = max(1, sum(predicted.values()))
    statistics[PREDICTION_LENGTH], statistics[REFERENCE_LENGTH] = len(prediction_tokens), len(reference_tokens)
    return statistics


def bleu_from_statistics(statistics: Sequence[int]) -> float:
    """Corpus BLEU-4 from :func:`bleu_statistics` summed over the corpus' examples.

    ``BLEU = BP * exp(sum_{n=1..4} 0.25 * log p_n)`` with ``p_n = matches_n / totals_n`` and
    ``BP = 1`` when the prediction length c exceeds the reference length r, ``0`` when c = 0,
    else ``exp(1 - r / c)``. No matching unigram gives 0; an order with no match counts as the
    smallest positive float (so BLEU < 1e-70), as unsmoothed nltk does. The arithmetic (float
    division, ``math.log``, ``math.fsum``) follows ``nltk.translate.bleu_score.corpus_bleu``, so the
    score is the same float.
    """
    matches, totals = statistics[MATCHES], statistics[TOTALS]
    prediction_length, reference_length = int(statistics[PREDICTION_LENGTH]), int(statistics[REFERENCE_LENGTH])
    if matches[0] == 0:
        return 0.0
    if prediction_length > reference_length:
        brevity_penalty = 1.0
    elif prediction_length == 0:
        brevity_penalty = 0.0
    else:
        brevity_penalty = math.exp(1 - reference_length / prediction_length)
    precisions = [int(m) / int(t) if m else sys.float_info.min for m, t in zip(matches, totals)]
    return float(brevity_penalty * math.exp(math.fsum(math.log(p) / BLEU_ORDERS for p in precisions)))


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 in [0, 1] of predictions against one reference each.

    ``BLEU = BP * exp(sum_{n=1..4} 0.25 * log p_n)``, where ``p_n`` is the modified n-gram
    precision pooled over the corpus (clipped n-gram matches summed over all sentences, divided
    by prediction n-grams summed over all sentences) and ``BP = min(1, exp(1 - r / c))`` with
    ``c`` the total prediction length and ``r`` the total reference length, in tokens.

    Sufficient statistics first (:func:`bleu_statistics` per example, summed), the score last
    (:func:`bleu_from_statistics`), so a bootstrap resample only re-sums the statistics. Tokens
    come from :func:`tokenize_13a`. The score equals
    ``nltk.translate.bleu_score.corpus_bleu`` with uniform weights and no smoothing (tested to
    the last bit) and ``sacrebleu.corpus_bleu(predictions, [references], tokenize="13a").score / 100``
    (within float rounding) whenever

    * every n-gram order has at least one match in the corpus, and
    * every prediction has at least 4 tokens,

    which holds for a realistic corpus of multi-sentence answers. Outside those conditions the
    two tools differ by design, and this function keeps the unsmoothed definition:

    * an order with zero matches makes BLEU 0 here (the smallest positive float stands in for that
      precision, so the score is below 1e-70), while sacreBLEU's default ``exp``
      smoothing (mteval-v13a's) replaces the k-th zero precision with ``1 / (2^k * total_n)``;
    * at least one n-gram slot is counted per sentence (the per-sentence denominator is
      ``max(1, count)``, as in nltk), so a prediction shorter than n tokens adds 1 to the order-n
      denominator, where sacreBLEU adds 0.

    Args:
        predictions: generated texts, one per example.
        references: the reference text for each prediction.

    Returns:
        BLEU in [0, 1]; 0.0 for an empty corpus or when every prediction is empty.

    Raises:
        ValueError: if the two lists differ in length.
    """
    _check_same_length(predictions, references)
    if not predictions:
        return 0.0
    return bleu_from_statistics(sum(bleu_statistics(p, r) for p, r in zip(predictions, references)))


# --- ROUGE --------------------------------------------------------------------------------

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """Per-example ROUGE-1, ROUGE-2 and ROUGE-L F1 of each prediction against its reference.

    ``F1 = 2 P R / (P + R)`` with ``P = overlap / prediction units`` and
    ``R = overlap / reference units``; the units are unigrams (rouge1), bigrams (rouge2), or
    for rougeL the overlap is the longest common subsequence and the units are tokens.
    rouge_score's tokenizer lowercases, keeps only ``[a-z0-9]`` runs and Porter-stems tokens
    longer than 3 characters, so "drugs" matches "drug" and "reduced" matches "reduce".

    Args:
        predictions: generated texts, one per example.
        references: the reference text for each prediction.

    Returns:
        ``{"rouge1": [...], "rouge2": [...], "rougeL": [...]}``, one F1 in [0, 1] per example,
        in input order. Average the lists for a corpus score.

    Raises:
        ValueError: if the two lists differ in length.
    """
    _check_same_length(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores: dict[str, list[float]] = {rouge_type: [] for rouge_type in ROUGE_TYPES}
    for prediction, reference in zip(predictions, references):
        # rouge_score's argument order is (target, prediction).
        example = scorer.score(reference, prediction)
        for rouge_type in ROUGE_TYPES:
            scores[rouge_type].append(example[rouge_type].fmeasure)
    return scores


# --- Perplexity ---------------------------------------------------------------------------


def perplexity(nll_sum: float, token_count: int) -> float:
    """Perplexity ``exp(nll_sum / token_count)`` from a summed NLL in nats.

    Args:
        nll_sum: negative log-likelihood summed over all target tokens (medlora.loss).
        token_count: number of target tokens in that sum.

    Returns:
        The perplexity, >= 1 for a proper NLL.

    Raises:
        ValueError: if token_count is not positive.
    """
    if token_count <= 0:
        raise ValueError(f"token_count must be a positive number of tokens, got {token_count}")
    return math.exp(nll_sum / token_count)


# --- Bootstrap confidence intervals ----------------------------------------------------------


def bootstrap_interval(
    n: int,
    metric_of_indices: Callable[[np.ndarray], np.ndarray],
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a metric over n examples, resampling example indices.

    Each resample draws n indices uniformly with replacement from ``0 .. n-1``; the interval is
    the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles (numpy's linear interpolation) of
    the metric over the resamples.

    Contract: ``metric_of_indices`` gets every resample at once, an int array
    ``[n_resamples, n]`` (repeats allowed), and returns the metric of each row, ``[n_resamples]``,
    recomputing the whole metric from the examples' sufficient statistics. That is what makes
    corpus-level metrics come out right (they pool statistics rather than average per-example
    scores) and fast (a resample re-sums statistics, it does not re-tokenize):

        statistics = np.stack([bleu_statistics(p, r) for p, r in zip(preds, refs)])   # [n, 10]
        bootstrap_interval(n, lambda idx: [bleu_from_statistics(row) for row in statistics[idx].sum(1)])
        bootstrap_interval(n, lambda idx: np.exp(nll[idx].sum(1) / counts[idx].sum(1)))

    Deterministic: the same seed gives the same interval. The resamples come from one
    ``numpy.random.default_rng(seed).integers(0, n, size=(n_resamples, n))`` call, which draws the
    same index arrays as a loop of ``rng.integers(0, n, size=n)`` calls (tested).

    Args:
        n: number of examples.
        metric_of_indices: the metric of each resample, given the [n_resamples, n] index array.
        n_resamples: number of bootstrap resamples.
        seed: seed of the numpy random generator.
        level: coverage of the interval, in (0, 1).

    Returns:
        ``(low, high)``.

    Raises:
        ValueError: if n or n_resamples is not positive, or level is outside (0, 1).
    """
    if n <= 0:
        raise ValueError(f"n must be a positive number of examples, got {n}")
    if n_resamples <= 0:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    resamples = rng.integers(0, n, size=(n_resamples, n))  # [n_resamples, n]
    resampled_metrics = np.asarray(metric_of_indices(resamples), dtype=float)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(resampled_metrics, [tail, 1.0 - tail])
    return float(low), float(high)


# --- Proportions: Wilson score intervals ---------------------------------------------------

Z_95 = 1.959963984540054  # 97.5th percentile of the standard normal: a two-sided 95% interval


def wilson_interval(count: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion `count / total`.

    With p = count / total and n = total:

        centre     = (p + z^2 / (2n)) / (1 + z^2 / n)
        half_width = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))
        interval   = [centre - half_width, centre + half_width]

    (Wilson 1927; method 3 in Newcombe 1998.) Unlike p +- z sqrt(p(1-p)/n), it stays inside
    [0, 1] and does not shrink to zero width at 0/n or n/n, which matters for rates near 0% or 100%.

    Args:
        count: successes, 0 <= count <= total.
        total: trials, >= 1.
        z: standard-normal quantile; the default gives a two-sided 95% interval.

    Returns:
        (low, high).

    Raises:
        ValueError: when total < 1 or count is outside [0, total].
    """
    if total < 1:
        raise ValueError(f"a Wilson interval needs total >= 1, got {total}")
    if not 0 <= count <= total:
        raise ValueError(f"count must be between 0 and total={total}, got {count}")
    p = count / total
    shrink = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / shrink
    half_width = z / shrink * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


class Rate(TypedDict):
    """A rate with its sufficient statistics; rate, low and high are None when total is 0."""

    count: int  # prompts that met the condition
    total: int  # prompts the rate is over
    rate: float | None  # count / total
    low: float | None  # Wilson 95% interval, lower end
    high: float | None  # Wilson 95% interval, upper end


def rate_of(flags: Sequence[bool]) -> Rate:
    """count / total of True flags, with its Wilson 95% interval (None for no flags)."""
    count, total = int(sum(flags)), len(flags)
    if total == 0:
        return Rate(count=0, total=0, rate=None, low=None, high=None)
    low, high = wilson_interval(count, total)
    return Rate(count=count, total=total, rate=count / total, low=low, high=high)
