"""Tests of medlora/metrics.py: hand-computed BLEU/ROUGE/perplexity values, parity with sacreBLEU, and
Wilson intervals against Newcombe (1998).

    .venv/bin/python -m pytest -q tests/medlora/test_metrics.py
"""

import math
import string
import warnings

import numpy as np
import pytest
import sacrebleu
from hypothesis import given, settings
from hypothesis import strategies as st
from nltk.translate import bleu_score as nltk_bleu_score
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from medlora.metrics import (
    bleu_from_statistics,
    bleu_statistics,
    bootstrap_interval,
    corpus_bleu,
    perplexity,
    rate_of,
    rouge_scores,
    tokenize_13a,
    wilson_interval,
)

# --- tokenize_13a -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("Take 3.5 mg daily.", ["Take", "3.5", "mg", "daily", "."]),
        ("Up to 1,000 mg, twice.", ["Up", "to", "1,000", "mg", ",", "twice", "."]),
        ("A follow-up in 5-10 days", ["A", "follow-up", "in", "5", "-", "10", "days"]),
        (
            "the patient's (BP) &quot;high&quot;",
            ["the", "patient's", "(", "BP", ")", '"', "high", '"'],
        ),
        ("fever &lt;38&gt; &amp; chills", ["fever", "<", "38", ">", "&", "chills"]),
        ("hyper-\ntension <skipped>noted", ["hypertension", "noted"]),
    ],
)
def test_tokenize_13a_examples(text: str, tokens: list[str]) -> None:
    assert tokenize_13a(text) == tokens


TOKENIZER_PARITY_STRINGS = [
    "Take 3.5 mg of ibuprofen every 6 hours.",
    "A dose of 1,000 mg, twice daily, is the maximum.",
    "Schedule a follow-up visit in 2-3 weeks.",
    'She said "it hurts" when she coughs.',
    "Blood pressure &lt;120/80&gt; is normal &amp; healthy.",
    "He reported &quot;chest pain&quot; at rest.",
    "Wait... is it serious?",
    "Use 0.5%-1% hydrocortisone (not more)!",
    "Temperature: 38.5°C; pulse: 110 bpm.",
    "The patient's HbA1c was 7.2%.",
    "Call 911 (or 112 in the EU) right away.",
    "Ratio 3:1, i.e. three to one.",
    "Costs $1,250.00 per month [approx.]",
    "Dosage was 5 mg/kg/day -- check with a doctor.",
    "hyper-\ntension is common <skipped> in adults",
    "Year 2019-2020: 12,5 cases per 1.000.",
    "Email: nurse@clinic.org #triage {urgent} | yes ~ no",
    ".5 mg is half a milligram, 5. is five",
    "  extra   spaces\tand\ttabs\n",
    "Ünïcödé — dashes “curly quotes” and it’s fine.",
    "&amp;quot; stays escaped once",
    "a-b c--d 9-e f-9 -7",
]


@pytest.mark.parametrize("text", TOKENIZER_PARITY_STRINGS)
def test_tokenize_13a_matches_sacrebleu(text: str) -> None:
    assert tokenize_13a(text) == Tokenizer13a()(text).split()


# Fragments that exercise every rule: digits next to . , -, symbols, entities, line breaks.
_TOKENIZER_FRAGMENTS = st.sampled_from(
    list("ab5 .,-'\n") + list(string.punctuation) + ["&quot;", "&amp;", "&lt;", "<skipped>", "-\n"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_TOKENIZER_FRAGMENTS, max_size=30).map("".join))
def test_tokenize_13a_matches_sacrebleu_on_generated_text(text: str) -> None:
    assert tokenize_13a(text) == Tokenizer13a()(text).split()


# --- corpus_bleu --------------------------------------------------------------------------


def test_bleu_single_pair_by_hand() -> None:
    # prediction: the cat sat on the mat   (6 tokens)
    # reference:  the cat sat on a mat     (6 tokens)
    # 1-grams: the (clipped to 1), cat, sat, on, mat match; second "the" does not -> 5/6
    # 2-grams: the cat, cat sat, sat on match; on the, the mat do not              -> 3/5
    # 3-grams: the cat sat, cat sat on match; sat on the, on the mat do not         -> 2/4
    # 4-grams: the cat sat on matches; cat sat on the, sat on the mat do not        -> 1/3
    # c = r = 6, so BP = 1.
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25  # = (1/12) ** 0.25
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(
        expected, abs=1e-12
    )


def test_bleu_two_pairs_pool_counts_and_apply_brevity_penalty() -> None:
    predictions = ["the cat sat on the mat", "take two tablets daily."]
    references = ["the cat sat on a mat", "take two tablets daily with food."]
    # Pair 1 as in the test above: 5/6, 3/5, 2/4, 1/3, length 6 vs 6.
    # Pair 2 tokens: take two tablets daily .  vs  take two tablets daily with food .
    #   1-grams 5/5; 2-grams 3/4 ("daily ." misses); 3-grams 2/3; 4-grams 1/2; length 5 vs 7.
    # Corpus precisions pool numerators and denominators (not a mean of sentence BLEU):
    #   p1 = (5+5)/(6+5) = 10/11, p2 = (3+3)/(5+4) = 6/9, p3 = (2+2)/(4+3) = 4/7,
    #   p4 = (1+1)/(3+2) = 2/5; c = 11, r = 13 -> BP = exp(1 - 13/11).
    expected = math.exp(1 - 13 / 11) * (10 / 11 * 6 / 9 * 4 / 7 * 2 / 5) ** 0.25
    assert corpus_bleu(predictions, references) == pytest.approx(expected, abs=1e-12)
    assert corpus_bleu(predictions, references) == pytest.approx(
        sacrebleu.corpus_bleu(predictions, [references], tokenize="13a").score / 100, abs=1e-12
    )


def test_bleu_identical_texts_is_one() -> None:
    texts = ["Take 3.5 mg twice daily.", "Rest, drink fluids and see a doctor if fever persists."]
    assert corpus_bleu(texts, texts) == pytest.approx(1.0, abs=1e-12)


def test_bleu_with_one_empty_prediction_by_hand() -> None:
    predictions = ["the cat sat on the mat", ""]
    references = ["the cat sat on a mat", "take two tablets daily with food."]
    # The empty prediction matches nothing but its reference still counts in r:
    # c = 6, r = 6 + 7 = 13 -> BP = exp(1 - 13/6).
    # nltk counts one n-gram slot for a sentence without n-grams (denominator max(1, 0) = 1):
    #   p1 = 5/7, p2 = 3/6, p3 = 2/5, p4 = 1/4.
    ours = math.exp(1 - 13 / 6) * (5 / 7 * 3 / 6 * 2 / 5 * 1 / 4) ** 0.25
    assert corpus_bleu(predictions, references) == pytest.approx(ours, abs=1e-12)
    # sacreBLEU adds 0 to the denominators: 5/6, 3/5, 2/4, 1/3 -> the documented divergence.
    theirs = math.exp(1 - 13 / 6) * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert sacrebleu.corpus_bleu(predictions, [references]).score / 100 == pytest.approx(
        theirs, abs=1e-12
    )


def test_bleu_zero_match_order_is_zero_without_smoothing() -> None:
    # "a b c d" vs "a b x d": p1 = 3/4, p2 = 1/3 ("a b"), p3 = 0/2, p4 = 0/1.
    # Unsmoothed BLEU has a zero factor, so it is 0 (nltk: below 1e-70).
    assert corpus_bleu(["a b c d"], ["a b x d"]) < 1e-70
    # sacreBLEU's exp smoothing replaces the k-th zero precision with 1 / (2^k * total):
    # p3 = 1/(2*2), p4 = 1/(4*1) -> (3/4 * 1/3 * 1/4 * 1/4) ** 0.25 = (1/64) ** 0.25.
    smoothed = sacrebleu.corpus_bleu(["a b c d"], [["a b x d"]]).score / 100
    assert smoothed == pytest.approx((1 / 64) ** 0.25, abs=1e-12)


def test_bleu_empty_corpus_and_all_empty_predictions_are_zero(
    recwarn: pytest.WarningsRecorder,
) -> None:
    assert corpus_bleu([], []) == 0.0
    assert corpus_bleu(["", ""], ["take two tablets", "rest"]) == 0.0
    assert len(recwarn) == 0


def test_bleu_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 predictions and 1 references"):
        corpus_bleu(["a", "b"], ["a"])


# Realistic answer pairs: paraphrases sharing some wording, numbers, hyphens and units.
MEDICAL_PAIRS = [
    ("Take 400 mg of ibuprofen every 6 to 8 hours with food.",
     "Take 400 mg of ibuprofen every 8 hours, always with food."),
    ("Drink plenty of fluids and rest until the fever goes down.",
     "Rest and drink plenty of fluids until your fever goes down."),
    ("A normal resting heart rate for adults is 60 to 100 beats per minute.",
     "For adults, a normal resting heart rate is between 60 and 100 beats per minute."),
    ("See a doctor if the rash spreads or you develop a fever.",
     "You should see a doctor if the rash spreads or if you get a fever."),
    ("Blood pressure below 120/80 mmHg is considered normal.",
     "A blood pressure below 120/80 mmHg is considered normal for most adults."),
    ("Antibiotics do not work against viral infections such as the common cold.",
     "Antibiotics do not work against viruses, so they will not cure the common cold."),
    ("Apply a cold compress for 15 minutes to reduce the swelling.",
     "Apply a cold compress for 10 to 15 minutes to reduce swelling."),
    ("Type 2 diabetes is often managed with diet, exercise and metformin.",
     "Type 2 diabetes is usually managed with diet, exercise and, if needed, metformin."),
    ("Children should not be given aspirin because of the risk of Reye's syndrome.",
     "Do not give aspirin to children because of the risk of Reye's syndrome."),
    ("The maximum daily dose of paracetamol for adults is 4,000 mg.",
     "For adults, the maximum daily dose of paracetamol is 4,000 mg (4 g)."),
    ("Wash the wound with clean water and cover it with a sterile bandage.",
     "Clean the wound with water and cover it with a sterile bandage."),
    ("Seek emergency care immediately if you have chest pain and shortness of breath.",
     "Chest pain with shortness of breath needs emergency care immediately."),
    ("Most colds get better on their own within 7 to 10 days.",
     "Most colds get better on their own in about 7 to 10 days."),
    ("A follow-up blood test is recommended in 3 months.",
     "A follow-up blood test is usually recommended after 3 months."),
    ("Iron-rich foods include red meat, beans and leafy green vegetables.",
     "Foods rich in iron include red meat, beans and dark leafy green vegetables."),
    ("Adults need 7 to 9 hours of sleep each night.",
     "Most adults need 7 to 9 hours of sleep per night."),
    ("Stop taking the medication and call your doctor if you notice swelling of the face.",
     "Call your doctor and stop the medication if you notice swelling of your face or lips."),
    ("A fever is a body temperature above 38 degrees Celsius.",
     "A fever is usually defined as a body temperature above 38 degrees Celsius (100.4 F)."),
    ("Vaccination is the best way to prevent the flu each year.",
     "Getting vaccinated every year is the best way to prevent the flu."),
    ("Symptoms of dehydration include thirst, dark urine and dizziness.",
     "Common symptoms of dehydration include thirst, dark urine, headache and dizziness."),
    ("Low-dose aspirin may be prescribed to prevent a second heart attack.",
     "Your doctor may prescribe low-dose aspirin to prevent a second heart attack."),
    ("Use sunscreen with an SPF of at least 30 and reapply every 2 hours.",
     "Use a sunscreen with SPF 30 or higher and reapply it every 2 hours."),
    ("High cholesterol usually has no symptoms, so regular blood tests are important.",
     "High cholesterol often has no symptoms, which is why regular blood tests are important."),
    ("Allergic reactions can be treated with antihistamines such as cetirizine.",
     "Mild allergic reactions are treated with antihistamines such as cetirizine or loratadine."),
    ("Take the antibiotic for the full course, even if you feel better.",
     "Finish the full course of the antibiotic even if you feel better."),
    ("A sprained ankle should be rested, iced, compressed and elevated.",
     "Rest, ice, compression and elevation are the treatment for a sprained ankle."),
    ("The recommended dose for children is 10-15 mg per kg of body weight.",
     "For children, the recommended dose is 10-15 mg per kg of body weight every 6 hours."),
    ("Regular exercise lowers the risk of heart disease and type 2 diabetes.",
     "Regular physical exercise lowers your risk of heart disease and type 2 diabetes."),
    ("Smoking is the leading cause of lung cancer.",
     "Smoking is the leading cause of lung cancer and COPD."),
    ("Migraine attacks can be triggered by stress, lack of sleep and certain foods.",
     "Stress, lack of sleep and certain foods can trigger migraine attacks."),
]


def nltk_bleu(predictions: list[str], references: list[str]) -> float:
    """nltk's unsmoothed corpus BLEU-4 on mteval-13a tokens: what corpus_bleu used to call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns on a zero-match order
        return float(nltk_bleu_score.corpus_bleu(
            [[tokenize_13a(r.rstrip())] for r in references], [tokenize_13a(p.rstrip()) for p in predictions]
        ))


@pytest.mark.parametrize(
    "predictions, references",
    [
        ([p for p, _ in MEDICAL_PAIRS], [r for _, r in MEDICAL_PAIRS]),
        (["the cat sat on the mat", ""], ["the cat sat on a mat", "take two tablets daily with food."]),
        (["a b c d"], ["a b x d"]),
        (["short", "a b"], ["a longer reference text here", "a b"]),
        (["the the the the the the"], ["the cat"]),
        (["", ""], ["take two tablets", "rest"]),
    ],
    ids=["realistic", "one-empty", "zero-order", "short-predictions", "clipping", "all-empty"],
)
def test_bleu_from_statistics_equals_nltk_to_the_last_bit(predictions, references) -> None:
    assert corpus_bleu(predictions, references) == nltk_bleu(predictions, references)


def test_bleu_statistics_by_hand() -> None:
    # "the the cat" vs "the cat": 1-grams the (clipped 2 -> 1) + cat = 2 of 3; 2-grams "the cat" 1 of 2;
    # no 3-gram match of 1; no 4-gram (0 -> counted as 1 slot); lengths 3 and 2.
    assert bleu_statistics("the the cat", "the cat").tolist() == [2, 1, 0, 0, 3, 2, 1, 1, 3, 2]


def test_bleu_matches_sacrebleu_on_realistic_corpus() -> None:
    predictions = [prediction for prediction, _ in MEDICAL_PAIRS]
    references = [reference for _, reference in MEDICAL_PAIRS]
    reference_bleu = sacrebleu.corpus_bleu(predictions, [references], tokenize="13a")
    # Non-degenerate corpus: every n-gram order has matches, so smoothing plays no part.
    assert all(count > 0 for count in reference_bleu.counts)
    assert corpus_bleu(predictions, references) == pytest.approx(
        reference_bleu.score / 100, abs=1e-4
    )


# --- rouge_scores -------------------------------------------------------------------------


def test_rouge_by_hand_with_stemming() -> None:
    predictions = ["the patient takes drugs", "Reduce the dose."]
    references = ["the patient took the drug", "The dose was reduced."]
    # Pair 1 stemmed: [the patient take drug] vs [the patient took the drug]
    #   ("drugs" -> "drug", "takes" -> "take"; "took" stays, so it does not match "take").
    #   ROUGE-1: overlap the, patient, drug = 3; P = 3/4, R = 3/5, F = 2*(3/4)(3/5)/(27/20) = 2/3
    #   ROUGE-2: only "the patient" shared; P = 1/3, R = 1/4, F = 2*(1/12)/(7/12) = 2/7
    #   ROUGE-L: LCS the patient drug = 3; P = 3/4, R = 3/5, F = 2/3
    # Pair 2 stemmed: [reduc the dose] vs [the dose was reduc] ("reduced" -> "reduc")
    #   ROUGE-1: overlap 3; P = 3/3, R = 3/4, F = 2*(3/4)/(7/4) = 6/7
    #   ROUGE-2: only "the dose" shared; P = 1/2, R = 1/3, F = 2*(1/6)/(5/6) = 2/5
    #   ROUGE-L: LCS "the dose" = 2; P = 2/3, R = 2/4, F = 2*(1/3)/(7/6) = 4/7
    scores = rouge_scores(predictions, references)
    assert scores["rouge1"] == pytest.approx([2 / 3, 6 / 7], abs=1e-12)
    assert scores["rouge2"] == pytest.approx([2 / 7, 2 / 5], abs=1e-12)
    assert scores["rougeL"] == pytest.approx([2 / 3, 4 / 7], abs=1e-12)


def test_rouge_empty_inputs_and_length_check() -> None:
    assert rouge_scores([], []) == {"rouge1": [], "rouge2": [], "rougeL": []}
    with pytest.raises(ValueError, match="1 predictions and 0 references"):
        rouge_scores(["a"], [])


# --- perplexity -------------------------------------------------------------------------


def test_uniform_probabilities_give_perplexity_equal_to_vocab_size() -> None:
    # 8 targets, each with probability 1/4: nll = 8 log 4 nats.
    assert perplexity(8 * math.log(4), 8) == pytest.approx(4.0, rel=1e-12)


def test_perplexity_pools_sums_across_batches_not_batch_means() -> None:
    # Batch A: two targets with probabilities 3/4 and 1/4, nll log(16/3); batch B: one target with 1/2.
    nll_a, count_a = -math.log(3 / 4) - math.log(1 / 4), 2
    nll_b, count_b = math.log(2), 1
    pooled = perplexity(nll_a + nll_b, count_a + count_b)
    # exp((log(16/3) + log 2) / 3) = (32/3) ** (1/3) ~ 2.201
    assert pooled == pytest.approx((32 / 3) ** (1 / 3), rel=1e-12)
    # The mean of batch perplexities, (4/sqrt(3) + 2) / 2 ~ 2.155, weighs batch B's single
    # token like batch A's two and is a different number.
    mean_of_batches = (perplexity(nll_a, count_a) + perplexity(nll_b, count_b)) / 2
    assert mean_of_batches == pytest.approx((4 / math.sqrt(3) + 2) / 2, rel=1e-12)
    assert abs(mean_of_batches - pooled) > 0.04


def test_perplexity_rejects_non_positive_token_count() -> None:
    assert perplexity(0.0, 5) == 1.0
    with pytest.raises(ValueError, match="token_count .* got 0"):
        perplexity(1.0, 0)
    with pytest.raises(ValueError, match="got -3"):
        perplexity(1.0, -3)


# --- bootstrap ----------------------------------------------------------------------------


def mean_interval(values, **options) -> tuple[float, float]:
    """Bootstrap interval of the mean of per-example values (as ROUGE and decline rates are scored)."""
    values = np.asarray(values, dtype=float)
    return bootstrap_interval(len(values), lambda indices: values[indices].mean(axis=1), **options)


def test_bootstrap_of_one_example_or_constant_values_collapses() -> None:
    # Every resample of one example is [0]; every resample of equal values has the same mean.
    assert mean_interval([0.7]) == (0.7, 0.7)
    assert mean_interval([0.25] * 10, n_resamples=50) == pytest.approx((0.25, 0.25))


def test_bootstrap_interval_contains_point_estimate_and_is_deterministic() -> None:
    values = [0.1, 0.4, 0.35, 0.8, 0.6, 0.2, 0.9, 0.5, 0.45, 0.3]
    low, high = mean_interval(values, seed=3)
    assert min(values) <= low <= np.mean(values) <= high <= max(values)
    assert mean_interval(values, seed=3) == (low, high)
    assert mean_interval(values, seed=4) != (low, high)
    # A wider coverage level gives a wider interval on the same resamples.
    wide_low, wide_high = mean_interval(values, seed=3, level=0.99)
    assert wide_low <= low and high <= wide_high


def test_bootstrap_interval_of_corpus_bleu_contains_point_estimate() -> None:
    predictions = [prediction for prediction, _ in MEDICAL_PAIRS]
    references = [reference for _, reference in MEDICAL_PAIRS]
    statistics = np.stack([bleu_statistics(p, r) for p, r in MEDICAL_PAIRS])

    def bleu_of(indices: np.ndarray) -> list[float]:
        return [bleu_from_statistics(row) for row in statistics[indices].sum(axis=1)]

    point = corpus_bleu(predictions, references)
    low, high = bootstrap_interval(len(predictions), bleu_of, n_resamples=100, seed=0)
    assert low <= point <= high
    assert bootstrap_interval(len(predictions), bleu_of, n_resamples=100, seed=0) == (low, high)


def test_bootstrap_from_statistics_equals_rescoring_each_resample() -> None:
    """The vectorized bootstrap gives the very interval of the old loop that re-scored the texts
    of each resample (same seed, same index arrays): BLEU through nltk, ROUGE as a mean."""
    predictions = ([prediction for prediction, _ in MEDICAL_PAIRS] * 3)[:-1]  # an odd n, too
    references = ([reference for _, reference in MEDICAL_PAIRS] * 3)[:-1]
    statistics = np.stack([bleu_statistics(p, r) for p, r in zip(predictions, references)])
    rouge = np.array(rouge_scores(predictions, references)["rougeL"])
    rng = np.random.default_rng(0)
    looped_bleu, looped_rouge = [], []
    for _ in range(200):
        indices = rng.integers(0, len(predictions), size=len(predictions))
        looped_bleu.append(nltk_bleu([predictions[i] for i in indices], [references[i] for i in indices]))
        looped_rouge.append(float(rouge[indices].mean()))
    expected_bleu = tuple(float(q) for q in np.quantile(looped_bleu, [0.025, 0.975]))
    expected_rouge = tuple(float(q) for q in np.quantile(looped_rouge, [0.025, 0.975]))
    n = len(predictions)
    assert bootstrap_interval(n, lambda idx: [bleu_from_statistics(r) for r in statistics[idx].sum(1)], 200) == expected_bleu
    assert bootstrap_interval(n, lambda idx: rouge[idx].mean(axis=1), 200) == expected_rouge


def test_bootstrap_interval_of_perplexity_resamples_sums() -> None:
    # Example 0: nll 2 log 2 over 2 tokens; example 1: log 2 over 1 token. Any resample pools
    # k copies of the first and n-k of the second: exp((2k + (2-k)) log 2 / (2k + 2-k)) = 2.
    nll = np.array([2 * math.log(2), math.log(2)])
    counts = np.array([2, 1])
    low, high = bootstrap_interval(
        2, lambda idx: [perplexity(a, int(b)) for a, b in zip(nll[idx].sum(1), counts[idx].sum(1))], n_resamples=20
    )
    assert (low, high) == pytest.approx((2.0, 2.0))


def test_bootstrap_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n must be a positive number of examples, got 0"):
        bootstrap_interval(0, lambda idx: 0.0)
    with pytest.raises(ValueError, match="n_resamples must be positive, got 0"):
        bootstrap_interval(1, lambda idx: 0.0, n_resamples=0)
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\), got 1.0"):
        bootstrap_interval(1, lambda idx: 0.0, level=1.0)


# --- Wilson intervals and rates -------------------------------------------------------------


def test_wilson_by_hand():
    z2 = 1.959963984540054**2
    # 0/10: centre = half_width = (z^2/20) / (1 + z^2/10), so the interval is [0, z^2 / (10 + z^2)].
    assert wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))
    assert wilson_interval(0, 10)[1] == pytest.approx(0.27753, abs=1e-5)
    # 5/10: centre 0.5; half_width = z / (1 + z^2/10) * sqrt(0.025 + z^2/400) = 1.41600 * 0.18602.
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    # n/n mirrors 0/n.
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + z2), 1.0))


@pytest.mark.parametrize(
    ("count", "total", "low", "high"),
    # Newcombe (1998), Statistics in Medicine 17:857-872, Table I, method 3 (Wilson score, no continuity correction).
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
     (29, 29, 0.8830, 1.0)],
)
def test_wilson_matches_newcombe(count, total, low, high):
    assert wilson_interval(count, total) == pytest.approx((low, high), abs=6e-5)


@pytest.mark.parametrize(("count", "total", "message"), [(0, 0, "total >= 1, got 0"), (11, 10, "got 11"), (-1, 5, "got -1")])
def test_wilson_rejects_bad_counts(count, total, message):
    with pytest.raises(ValueError, match=message):
        wilson_interval(count, total)


def test_rate_of_counts_true_flags_with_the_wilson_interval():
    low, high = wilson_interval(1, 4)
    assert rate_of([True, False, False, False]) == {"count": 1, "total": 4, "rate": 0.25, "low": low, "high": high}
    assert rate_of([]) == {"count": 0, "total": 0, "rate": None, "low": None, "high": None}
