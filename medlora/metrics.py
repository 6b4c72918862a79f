"""Evaluation metrics for generated answers: BLEU, ROUGE, perplexity, bootstrap intervals.

Pure functions, no model code. Each metric is built the way sacreBLEU and rouge_score build
theirs: sufficient statistics first (n-gram counts, summed NLL and token count), the score last.

    corpus_bleu(predictions, references)    corpus BLEU-4 in [0, 1], sacreBLEU-13a compatible
    rouge_scores(predictions, references)   per-example ROUGE-1/2/L F1 (Porter-stemmed)
    perplexity(nll_sum, token_count)        exp(nll_sum / token_count)
    bootstrap_interval(n, metric_of_indices) percentile bootstrap of any corpus-level metric

The summed NLL and token counts come from the model, through medlora.loss.row_nll.

Tests (hand-computed values and parity with sacreBLEU):

    .venv/bin/python -m pytest -q tests/medlora/test_metrics.py
"""

import math
import re
import string
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from nltk.translate import bleu_score
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


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 in [0, 1] of predictions against one reference each.

    ``BLEU = BP * exp(sum_{n=1..4} 0.25 * log p_n)``, where ``p_n`` is the modified n-gram
    precision pooled over the corpus (clipped n-gram matches summed over all sentences, divided
    by prediction n-grams summed over all sentences) and ``BP = min(1, exp(1 - r / c))`` with
    ``c`` the total prediction length and ``r`` the total reference length, in tokens.

    Tokens come from :func:`tokenize_13a`; the score comes from
    ``nltk.translate.bleu_score.corpus_bleu`` with uniform weights and no smoothing. It equals
    ``sacrebleu.corpus_bleu(predictions, [references], tokenize="13a").score / 100`` (within
    float rounding) whenever

    * every n-gram order has at least one match in the corpus, and
    * every prediction has at least 4 tokens,

    which holds for a realistic corpus of multi-sentence answers. Outside those conditions the
    two tools differ by design, and this function keeps the unsmoothed definition:

    * an order with zero matches makes BLEU 0 here (nltk stands in the smallest positive float
      for that precision, so the score is below 1e-70), while sacreBLEU's default ``exp``
      smoothing (mteval-v13a's) replaces the k-th zero precision with ``1 / (2^k * total_n)``;
    * nltk counts at least one n-gram slot per sentence (its per-sentence denominator is
      ``max(1, count)``), so a prediction shorter than n tokens adds 1 to the order-n
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
    # sacreBLEU strips trailing whitespace before tokenizing; it matters only for a "-\n" at
    # the very end, which would otherwise join with nothing.
    prediction_tokens = [tokenize_13a(text.rstrip()) for text in predictions]
    reference_tokens = [[tokenize_13a(text.rstrip())] for text in references]
    with warnings.catch_warnings():
        # nltk warns once per zero-match n-gram order; the docstring above covers that case.
        warnings.filterwarnings("ignore", message=r"\s*The hypothesis contains 0 counts")
        score = bleu_score.corpus_bleu(
            reference_tokens, prediction_tokens, weights=(0.25, 0.25, 0.25, 0.25)
        )
    return float(score)


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
        nll_sum: negative log-likelihood summed over all target tokens (medlora.loss.row_nll).
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
    metric_of_indices: Callable[[np.ndarray], float],
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a metric over n examples, resampling example indices.

    Each resample draws n indices uniformly with replacement from ``0 .. n-1`` and calls
    ``metric_of_indices(indices)``; the interval is the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles (numpy's linear interpolation) of those values.

    Contract: ``metric_of_indices`` recomputes the whole metric on the examples at ``indices``
    (an int array of length n, repeats allowed). That is what makes corpus-level metrics come
    out right, since they pool sufficient statistics rather than average per-example scores:

        bootstrap_interval(len(preds), lambda idx: corpus_bleu(
            [preds[i] for i in idx], [refs[i] for i in idx]))
        bootstrap_interval(len(nll), lambda idx: perplexity(nll[idx].sum(), counts[idx].sum()))

    Deterministic: the same seed gives the same interval.

    Args:
        n: number of examples.
        metric_of_indices: the metric of the examples selected by an index array.
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
    resampled_metrics = np.array(
        [metric_of_indices(rng.integers(0, n, size=n)) for _ in range(n_resamples)]
    )
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(resampled_metrics, [tail, 1.0 - tail])
    return float(low), float(high)
