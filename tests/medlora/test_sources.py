"""medlora.sources: BM25 scores by hand, the threshold rule, which rows are cards, bad data."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from data import QAPair, build_messages
from medlora.sources import (
    Card,
    FlashcardIndex,
    Sources,
    build_sources,
    cards_text,
    fit_threshold,
    grounding_context,
    sources_for_adapter,
    words,
)

EXTERNAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "medical_meadow_wikidoc_patient_info.json"
K1, B = 1.5, 0.75  # bm25s' defaults, Lucene's BM25

# Three cards whose words survive stop-word removal and stemming unchanged.
CARDS = [
    QAPair("heparin", "antithrombin thrombin", "pharmacology"),  # 3 words
    QAPair("warfarin", "vitamin heparin heparin", "pharmacology"),  # 4 words
    QAPair("insulin", "pancreas", "physiology"),  # 2 words
]


def lucene_bm25(tf: int, length: int, average_length: float, df: int, n: int) -> float:
    idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
    return idf * tf / (tf + K1 * (1 - B + B * length / average_length))


def test_words_are_lowercased_stemmed_and_stop_words_go():
    assert words(["How does Heparin work? It works."]) == [["heparin", "work", "work"]]


def test_scores_equal_lucene_bm25_by_hand():
    index = FlashcardIndex(CARDS)
    average = (3 + 4 + 2) / 3
    # "heparin" is in cards 0 (tf 1, 3 words) and 1 (tf 2, 4 words): df 2 of N 3.
    expected = [lucene_bm25(1, 3, average, 2, 3), lucene_bm25(2, 4, average, 2, 3), 0.0]
    np.testing.assert_allclose(index.scores("How does heparin work?"), expected, rtol=1e-6)
    # Two query words add: "insulin" (df 1) in card 2 plus "heparin" in cards 0 and 1.
    both = index.scores("heparin or insulin?")
    assert both[2] == pytest.approx(lucene_bm25(1, 2, average, 1, 3), rel=1e-6)
    assert both[0] == pytest.approx(expected[0], rel=1e-6)


def test_search_returns_cards_verbatim_best_first():
    found = FlashcardIndex(CARDS).search("heparin", k=5)
    assert [card.question for card in found] == ["warfarin", "heparin"]  # tf 2 beats tf 1 despite the longer card
    assert found[0] == Card("warfarin", "vitamin heparin heparin", found[0].score)
    assert found[0].score > found[1].score > 0


def test_search_respects_k_and_min_score():
    index = FlashcardIndex(CARDS)
    assert len(index.search("heparin", k=1)) == 1
    assert index.search("heparin", k=0) == []
    index.min_score = float(index.scores("heparin")[1]) * 1.01  # above the best card: the question gets none
    assert index.search("heparin", k=5) == []
    with pytest.raises(ValueError, match="k must be a non-negative number of cards, got -1"):
        index.search("heparin", k=-1)


def test_a_further_card_needs_the_threshold_or_every_word_the_best_card_matched():
    index = FlashcardIndex(CARDS)
    # "heparin pancreas": the insulin card (pancreas, df 1) is best; the two heparin cards lack "pancreas".
    scores = index.scores("heparin pancreas")
    assert scores[2] > scores[1] > scores[0] > 0
    index.min_score = float(scores[1]) * 1.01  # only the best card reaches it
    assert [card.question for card in index.search("heparin pancreas", k=3)] == ["insulin"]
    index.min_score = float(scores[1])  # now the warfarin card reaches it on its own score
    assert [card.question for card in index.search("heparin pancreas", k=3)] == ["insulin", "warfarin"]
    # "heparin": the warfarin card is best and matched "heparin"; the heparin card holds it too, so it is
    # shown below the threshold, the insulin card (no "heparin") never.
    index.min_score = float(index.scores("heparin")[1])
    assert [card.question for card in index.search("heparin", k=3)] == ["warfarin", "heparin"]
    assert [card.question for card in index.search("heparin", k=1)] == ["warfarin"]


@pytest.mark.parametrize("query", ["What is the capital of France?", "", "the and of", "zzzz qqqq"])
def test_a_query_sharing_no_word_gets_no_card(query):
    index = FlashcardIndex(CARDS)
    assert not index.scores(query).any()
    assert index.search(query, k=3) == []


def test_fit_threshold_maximizes_youden_j_by_hand():
    medical = np.array([1.0, 2.0, 3.0, 4.0])
    declined = np.array([0.0, 1.5, 2.5])
    # t = 1: 4/4 - 2/3 = 0.333; t = 2: 3/4 - 1/3 = 0.417; t = 3: 2/4 - 0 = 0.5; t = 4: 1/4 - 0 = 0.25.
    assert fit_threshold(medical, declined) == 3.0
    # t = 1: 1 - 2/2 = 0; t = 2: 3/4 - 1/2 = 0.25; t = 3: 2/4 - 1/2 = 0; t = 4: 1/4 - 0 = 0.25: a tie keeps the lower t.
    assert fit_threshold(medical, np.array([1.5, 3.5])) == 2.0
    assert fit_threshold(np.array([0.0, 2.0, 3.0]), np.array([])) == 2.0  # no negatives: the lowest positive score


def test_fit_threshold_refuses_when_no_question_matches():
    with pytest.raises(ValueError, match="no validation question shares a word"):
        fit_threshold(np.zeros(3), np.array([1.0]))


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def flashcard(question: str, answer: str, topic: str) -> dict:
    return {"question": question, "answer": answer, "topic": topic}


def test_embedded_sources_are_training_rows_without_out_of_domain(tmp_path):
    from data import clean_rows, load_rows, sample_and_split

    sources = build_sources(None)
    pairs, _ = clean_rows(load_rows(None).rows, "embedded")
    splits = sample_and_split(pairs, None, 42)
    assert sources.index.cards == [pair for pair in splits.train if pair.topic != "out_of_domain"]
    assert {pair.topic for pair in sources.index.cards} >= {"borderline", "safety", "pharmacology"}
    fit = sources.threshold_fit
    assert fit["out_of_domain_from"] == "validation" and fit["threshold"] == sources.index.min_score > 0
    assert fit["medical_questions"] + fit["out_of_domain_questions"] == len(splits.validation)
    held_out = {pair.question for pair in splits.validation + splits.test}
    assert not held_out & {card.question for card in sources.index.cards}


def test_emergency_rows_are_the_training_safety_rows_that_open_with_a_referral():
    from data import clean_rows, load_rows, sample_and_split
    from medlora.scope import is_emergency_referral

    sources = build_sources(None)
    rows = sources.emergency_rows.cards
    pairs, _ = clean_rows(load_rows(None).rows, "embedded")
    train = sample_and_split(pairs, None, 42).train
    assert rows == [pair for pair in train if pair.topic == "safety" and is_emergency_referral(pair.answer)]
    assert sum("crisis line" in row.answer for row in rows) >= 2  # the self-harm rows are among them
    assert not any(row.answer.startswith("For adults") for row in rows)  # dose rows refer to a clinician, not here


def test_nearest_emergency_row_is_found_by_its_question_alone():
    rows = [QAPair("heparin overdose", "Call 911 now. antithrombin", "safety"), QAPair("insulin", "Call 911. heparin", "safety")]
    sources = Sources(FlashcardIndex(rows), "test cards", emergency_rows=FlashcardIndex(rows, questions_only=True))
    assert sources.nearest_emergency_row("heparin").question == "heparin overdose"  # the second row's answer says heparin, unindexed
    assert sources.nearest_emergency_row("antithrombin") is None  # only in an answer
    assert sources.search("antithrombin", 1)[0].question == "heparin overdose"  # the cards index answers too
    assert Sources(None, "no sources").nearest_emergency_row("heparin") is None


@pytest.mark.parametrize("question", ["What is the mechanism of action of heparin?", "How does heparin work?"])
def test_heparin_finds_the_antithrombin_card(question):
    cards = build_sources(None).search(question, k=2)
    assert len(cards) == 2 and any("antithrombin" in (card.question + card.answer).lower() for card in cards)
    assert all("heparin" in (card.question + card.answer).lower() for card in cards)


def test_data_without_topics_uses_every_row_and_borrows_out_of_domain_questions(tmp_path):
    rows = [flashcard(f"What does drug{i} inhibit in pathway{i}?", f"Drug{i} inhibits enzyme{i} in pathway{i}.", "") for i in range(40)]
    for row in rows:
        del row["topic"]
    sources = build_sources(write_rows(tmp_path / "plain.jsonl", rows))
    assert len(sources.index.cards) == 34  # 85% of 40, every row a card
    assert sources.threshold_fit["out_of_domain_from"] == "embedded flashcards"
    card = sources.index.cards[0]
    assert sources.search(card.question, k=1)[0].answer == card.answer


def test_empty_file_gives_a_notice_and_no_sources(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    sources = build_sources(str(empty))
    assert sources.index is None and sources.search("heparin", k=2) == []
    assert sources.notice == f"no sources: {empty}: file is empty"


def test_non_medical_file_gives_a_notice_and_no_sources(tmp_path):
    rows = [flashcard(f"What is the capital of country {i}?", "That is outside my scope: I only answer medical questions.", "out_of_domain") for i in range(20)]
    path = write_rows(tmp_path / "ood.jsonl", rows)
    sources = build_sources(path)
    assert sources.index is None and sources.search("capital", k=2) == []
    assert sources.notice == f"no sources: {path} has no medical training rows (only out_of_domain ones)"


def test_sources_follow_the_run_config(tmp_path):
    from medlora.config import TrainConfig
    from medlora.run_folder import write_config

    rows = [flashcard(f"Which organ makes hormone{i}?", f"The gland{i} makes hormone{i}.", "physiology") for i in range(30)]
    data = write_rows(tmp_path / "rows.jsonl", rows)
    (tmp_path / "adapter").mkdir()
    write_config(tmp_path, TrainConfig(data=data, num_examples=20, seed=7))
    sources = sources_for_adapter(tmp_path / "adapter")
    assert len(sources.index.cards) == 17  # 85% of the 20 sampled rows
    assert data in sources.notice


def test_cards_text_shows_each_card_verbatim_with_its_score():
    cards = [Card("What does heparin bind?", "Antithrombin.", 4.25), Card("<script>x</script>?", "a & b", 3.0)]
    assert cards_text(cards).splitlines() == [
        "Related flashcards (training cards, shown as written; BM25 score in brackets):",
        "[4.2] What does heparin bind?",
        "    Antithrombin.",
        "[3.0] <script>x</script>?",
        "    a & b",
    ]
    assert cards_text([]) == ""


def test_grounding_context_goes_before_the_question_in_the_one_formatter():
    cards = [Card("What does heparin bind?", "Antithrombin.", 4.2), Card("<b>bold</b>?", "x", 3.0)]
    context = grounding_context(cards)
    assert context == (
        "Flashcard question: What does heparin bind?\nFlashcard answer: Antithrombin.\n\n"
        "Flashcard question: <b>bold</b>?\nFlashcard answer: x"
    )
    user = build_messages("How does heparin work?", context=context)[-1]
    assert user == {"role": "user", "content": context + "\n\nHow does heparin work?"}
    assert build_messages("How does heparin work?")[-1]["content"] == "How does heparin work?"


@pytest.mark.skipif(not EXTERNAL.is_file(), reason=f"{EXTERNAL} not present")
def test_external_file_builds_with_borrowed_out_of_domain_questions():
    sources = build_sources(str(EXTERNAL))
    assert sources.index is not None and sources.threshold_fit["out_of_domain_from"] == "embedded flashcards"
    assert len(sources.index.cards) > 4000
