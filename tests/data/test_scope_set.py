"""data/scope_set.py: reading the held-out scope set, the file itself, and its separation from the
training questions."""

import json
import re
from collections import Counter
from difflib import SequenceMatcher

import pytest

from data import EMBEDDED_DATASET
from data.scope_set import HELDOUT_PATH, HeldoutPrompt, load_heldout, question_key


# ---- load_heldout ---------------------------------------------------------------------------

GOOD_LINE = '{"question": "Why is the sky blue?", "kind": "out_of_domain", "category": "physics"}'


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", r"not valid JSON"),
        ('["a list"]', r"expected a JSON object, got list"),
        ('{"question": "Q?", "kind": "medical", "category": "anatomy", "wording": "lay", "answer": "A"}',
         r"unknown field\(s\) answer"),
        ('{"kind": "medical", "category": "anatomy", "wording": "lay"}', r"field 'question' must be a non-empty string"),
        ('{"question": "  ", "kind": "medical", "category": "anatomy", "wording": "lay"}', r"field 'question'"),
        ('{"question": "Q?", "kind": "trivia", "category": "x"}', r"kind 'trivia' is not one of out_of_domain, medical"),
        ('{"question": "Q?", "kind": "medical", "category": "anatomy"}', r"a medical prompt needs a wording"),
        ('{"question": "Q?", "kind": "medical", "category": "anatomy", "wording": "slang"}', r"wording 'slang' is not one"),
        ('{"question": "why is the SKY blue", "kind": "out_of_domain", "category": "physics"}', r"question repeats line 1"),
    ],
)
def test_load_heldout_names_the_bad_line(tmp_path, bad_line, message):
    path = tmp_path / "heldout.jsonl"
    path.write_text(GOOD_LINE + "\n" + bad_line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: ") + message) as error:
        load_heldout(path)
    assert "\n" not in str(error.value)


def test_load_heldout_missing_or_empty_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read the held-out scope set"):
        load_heldout(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no prompts"):
        load_heldout(tmp_path / "empty.jsonl")


def test_load_heldout_skips_blank_lines(tmp_path):
    path = tmp_path / "heldout.jsonl"
    path.write_text("\n" + GOOD_LINE + "\n\n", encoding="utf-8")
    assert load_heldout(path) == [HeldoutPrompt("Why is the sky blue?", "out_of_domain", "physics")]


# ---- the held-out file itself ---------------------------------------------------------------


@pytest.fixture(scope="module")
def heldout():
    return load_heldout()


def test_heldout_default_path_is_the_data_file(heldout):
    assert HELDOUT_PATH.parent.name == "data" and HELDOUT_PATH.is_file()
    assert len(heldout) == len(load_heldout(HELDOUT_PATH))


def test_heldout_counts(heldout):
    kinds = Counter(prompt.kind for prompt in heldout)
    assert kinds["out_of_domain"] >= 125
    assert kinds["medical"] >= 125
    assert kinds["emergency"] >= 20 and kinds["personal_dose"] >= 12
    assert kinds["emergency"] + kinds["personal_dose"] >= 32


def test_heldout_covers_categories_and_wordings(heldout):
    ood_categories = {p.category for p in heldout if p.kind == "out_of_domain"}
    assert len(ood_categories) >= 25 and "veterinary" in ood_categories
    medical_categories = {p.category for p in heldout if p.kind == "medical"}
    assert {"pharmacology", "physiology", "pathology", "microbiology", "anatomy", "biochemistry",
            "clinical_medicine", "nutrition", "exercise", "sleep", "mental_health", "first_aid",
            "travel_health", "skin_and_sun"} <= medical_categories
    wordings = Counter(p.wording for p in heldout if p.kind == "medical")
    assert wordings["textbook"] >= 40 and wordings["lay"] >= 40


# ---- separation from the training rows ----------------------------------------------------


def _training_rows():
    with EMBEDDED_DATASET.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


# A held-out prompt must not be a reworded training question, or the scope rates measure recall of
# the training set. Two measures, each with its threshold: the overlap of content words and the
# character-level similarity of the whole lowercased text.
JACCARD_LIMIT = 0.34  # content-word Jaccard at or above this: the same question in other words
RATIO_LIMIT = 0.7  # difflib ratio on lowercased text at or above this: the same sentence, edited

# Common English function words, written out here so that no corpus is downloaded at test time.
STOP_WORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before
    being below between both but by can could did do does doing don down during each few for from
    further get got had has have having he her here hers herself him himself his how i if in into is
    isn it its itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them themselves
    then there these they this those through to too under until up very was wasn we were what when
    where which while who whom why will with won would you your yours yourself yourselves""".split()
)


def content_words(text: str) -> frozenset[str]:
    """Lowercase alphanumeric tokens of 3 or more characters, minus STOP_WORDS."""
    return frozenset(w for w in re.findall(r"[^\W_]+", text.lower()) if len(w) >= 3 and w not in STOP_WORDS)


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """|a & b| / |a | b|; 0.0 for two empty sets."""
    return len(a & b) / len(a | b) if a | b else 0.0


def reworded_pairs(questions: list[str], training_questions: list[str]) -> list[tuple[str, str]]:
    """Every (question, training question) pair at or above either limit.

    The ratio is difflib's SequenceMatcher(None, question, training question).ratio() on the
    lowercased texts. Its cheap upper bounds (real_quick_ratio, quick_ratio) rule out most pairs
    first, and each training question is indexed once (as difflib's second sequence), so the
    296 x 1,004 pairs of the real files take seconds.
    """
    words_of = {question: content_words(question) for question in questions}
    pairs = []
    for training_question in training_questions:
        training_words = content_words(training_question)
        matcher = SequenceMatcher(None, b=training_question.lower())
        for question in questions:
            matcher.set_seq1(question.lower())
            if jaccard(words_of[question], training_words) >= JACCARD_LIMIT or (
                matcher.real_quick_ratio() >= RATIO_LIMIT
                and matcher.quick_ratio() >= RATIO_LIMIT
                and matcher.ratio() >= RATIO_LIMIT
            ):
                pairs.append((question, training_question))
    return pairs


def test_question_key_ignores_case_punctuation_and_spaces():
    assert question_key("What is  the capital of France?") == question_key("what is the capital of france")
    assert question_key("Is 91 prime?") != question_key("Is 97 prime?")


def test_the_separation_measures_flag_a_reworded_question():
    eggs, training_eggs = "Are eggs bad for your cholesterol?", "Are eggs bad for my cholesterol?"
    assert content_words(eggs) == {"eggs", "bad", "cholesterol"}
    assert jaccard(content_words(eggs), content_words(training_eggs)) == 1.0
    # Sharing only a template ("What is the ... on Earth?") is caught by the ratio, not the words.
    desert, ocean = "What is the driest desert on Earth?", "What is the largest ocean on Earth?"
    assert jaccard(content_words(desert), content_words(ocean)) == pytest.approx(1 / 5)
    assert SequenceMatcher(None, desert.lower(), ocean.lower()).ratio() >= RATIO_LIMIT
    unrelated = "Name the desert in Chile known for going years without rain."
    assert reworded_pairs([eggs, desert, unrelated], [training_eggs, ocean]) == [(eggs, training_eggs), (desert, ocean)]


def test_no_heldout_question_is_a_training_question(heldout):
    training_keys = {question_key(row["input"]) for row in _training_rows()}
    assert not [p.question for p in heldout if question_key(p.question) in training_keys]


def test_no_heldout_question_rewords_a_training_question(heldout):
    assert not reworded_pairs([p.question for p in heldout], [row["input"] for row in _training_rows()])
