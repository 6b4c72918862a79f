"""Sources beside the answer: the training flashcards closest to a question, found with BM25.

    sources = sources_for_adapter("runs/cpu/adapter")   # the run's training cards, its threshold fitted
    for card in sources.search("How does heparin work?", k=2):
        print(f"[{card.score:.1f}] {card.question} -> {card.answer}")
    sources.notice                                       # why there are none, when there are none

The cards are the training rows of the run's --data (same rows, N and seed as train.py, so the
split's validation and test rows are never sources): the medical, borderline and safety rows; the
out-of-domain rows never (their answers are declines, not facts). Data without topics: every row.
Question and answer are shown as training saw them (data.clean's normalization), never rewritten.

Ranking is BM25 from `bm25s` (Lucene's variant, k1 = 1.5, b = 0.75) over each card's question and
answer, lowercased, cut into words of two or more letters, English stop words removed, each word
Porter-stemmed (nltk's stemmer, as ROUGE's), so "works" finds "work" and "binding" finds "binds":

    score(q, card) = sum over query words w  idf(w) * tf / (tf + k1 (1 - b + b |card| / avg |card|))
    idf(w) = ln(1 + (N - df(w) + 0.5) / (df(w) + 0.5))

with tf the count of w in the card, |card| its word count, N the number of cards and df(w) the
number of cards holding w.

A query sharing no word with any card scores 0 everywhere and gets no card. A question gets cards
only when its best card's score reaches the threshold fitted on the validation split
(`fit_threshold`): the score that best tells the validation split's medical questions (they should
get a card) from its out-of-domain questions (they should not). Data without out-of-domain rows
borrows those of the embedded flashcards as the questions that should get none. A further card is
shown when it reaches the threshold too, or holds every query word the best card matched
(`FlashcardIndex.search`).

The emergency route's follow-up line comes from the same training rows (medlora.answer): the
safety rows whose answer opens with an emergency referral (medlora.scope), indexed by BM25 over
their questions alone (`Sources.nearest_emergency_row`). A message nearest "I want to kill myself
tonight." gets that row's crisis line, whatever words it uses; one that shares no word with any of
these questions gets none.
"""

from __future__ import annotations

import logging

import time
from dataclasses import dataclass, field
from pathlib import Path

import bm25s
import numpy as np
from nltk.stem.porter import PorterStemmer

from data import DataError, QAPair, clean_rows, load_rows, sample_and_split
from data.load import EMBEDDED_DATASET
from medlora.config import TrainConfig
from medlora.run_folder import read_config, run_folder_of
from medlora.scope import is_emergency_referral

logging.getLogger("bm25s").setLevel(logging.WARNING)  # bm25s sets its own logger to DEBUG: one line per index built

NOT_A_SOURCE_TOPIC = "out_of_domain"  # rows whose answer declines the question: never shown as a source
SAFETY_TOPIC = "safety"  # rows for emergencies and personal doses; those that open with an emergency referral give its follow-up
STOP_WORDS = "en_plus"  # bm25s' copy of nltk's 179 English stop words: "how", "does", "the" would match every card
_STEMMER = PorterStemmer()


@dataclass(frozen=True)
class Card:
    """One flashcard shown beside an answer: its question and answer verbatim, and its BM25 score."""

    question: str
    answer: str
    score: float


def words(texts: list[str]) -> list[list[str]]:
    """The BM25 words of each text: lowercased runs of 2+ word characters, stop words removed, stemmed."""
    return bm25s.tokenize(texts, stopwords=STOP_WORDS, stemmer=stem_words, return_ids=False, show_progress=False)


def stem_words(text_words: list[str]) -> list[str]:
    """Porter stems of the words, in order ("works" -> "work", "binding" -> "bind")."""
    return [_STEMMER.stem(word) for word in text_words]


class FlashcardIndex:
    """BM25 over flashcards (question + answer of each, or the questions alone), with a minimum score for a card to be shown."""

    def __init__(self, cards: list[QAPair], min_score: float = 0.0, questions_only: bool = False) -> None:
        if not cards:
            raise ValueError("a flashcard index needs at least one card, got none")
        self.cards = cards
        self.min_score = min_score
        card_words = words([card.question if questions_only else f"{card.question} {card.answer}" for card in cards])
        self.card_words = [frozenset(ws) for ws in card_words]
        self.retriever = bm25s.BM25()  # Lucene's BM25, k1 = 1.5, b = 0.75
        self.retriever.index(card_words, show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """[cards] float32: the BM25 score of every card for `query` (0 where they share no word)."""
        return self.word_scores(words([query])[0])

    def word_scores(self, query_words: list[str]) -> np.ndarray:
        """`scores` for a query already cut into BM25 words (`words`)."""
        ids = self.retriever.get_tokens_ids(query_words)
        if not ids:
            return np.zeros(len(self.cards), dtype=np.float32)
        return self.retriever.get_scores_from_ids(ids)

    def search(self, query: str, k: int) -> list[Card]:
        """Up to `k` cards for `query`, best first (ties keep data order).

        The best card is shown when its score reaches `min_score`: that threshold was fitted on the
        validation questions' best-card scores, so it decides whether a question gets sources at
        all. Each further card is shown when it reaches `min_score` too, or when it holds every
        query word the best card matched: the same evidence, found again ("How does heparin
        work?": the heparin mechanism card beside the heparin-induced thrombocytopenia one, not
        a card matched only by "work").
        """
        if k < 0:
            raise ValueError(f"k must be a non-negative number of cards, got {k}")
        query_words = words([query])[0]
        scores = self.word_scores(query_words)
        order = np.argsort(-scores, kind="stable")
        if k == 0 or scores[order[0]] <= 0 or scores[order[0]] < self.min_score:
            return []
        evidence = set(query_words) & self.card_words[order[0]]
        shown = [order[0]] + [
            i for i in order[1:] if scores[i] > 0 and (scores[i] >= self.min_score or evidence <= self.card_words[i])
        ][: k - 1]
        return [Card(self.cards[i].question, self.cards[i].answer, float(scores[i])) for i in shown]

    def top_scores(self, queries: list[str]) -> np.ndarray:
        """[queries] the best card's score for each query."""
        return np.array([self.scores(query).max() for query in queries], dtype=np.float64)


def fit_threshold(should_show: np.ndarray, should_not_show: np.ndarray) -> float:
    """The minimum score that best separates two sets of top-card scores (Youden's J).

    A card is shown when its score >= t. Over the candidates t (every positive score in
    `should_show`), pick the one maximizing
        J(t) = share of should_show >= t  -  share of should_not_show >= t,
    the lowest such t on a tie (at equal error, show more). With no `should_not_show` scores, J is
    the share shown, so t is the lowest positive score.

    Raises:
        ValueError: when `should_show` holds no positive score (no question shares a word with a card).
    """
    candidates = np.unique(should_show[should_show > 0])
    if candidates.size == 0:
        raise ValueError("no validation question shares a word with any flashcard: cannot fit a score threshold")
    shown = (should_show[None, :] >= candidates[:, None]).mean(axis=1)
    false_shown = (should_not_show[None, :] >= candidates[:, None]).mean(axis=1) if should_not_show.size else 0.0
    return float(candidates[np.argmax(shown - false_shown)])  # argmax: the first (lowest) t of a tie


@dataclass
class Sources:
    """The flashcards of one run, ready to search, or a notice saying why there are none."""

    index: FlashcardIndex | None  # None: no sources (see notice)
    notice: str  # one line: what the sources are, or why there are none
    build_seconds: float = 0.0  # time to read the data, index the cards and fit the threshold
    threshold_fit: dict = field(default_factory=dict)  # validation counts and rates behind the threshold
    emergency_rows: FlashcardIndex | None = None  # the training safety rows that open with an emergency referral, by question

    def search(self, question: str, k: int) -> list[Card]:
        """Up to `k` cards for `question`, best first; none when there is no index."""
        return self.index.search(question, k) if self.index is not None else []

    def nearest_emergency_row(self, question: str) -> Card | None:
        """The training emergency row whose question is nearest `question` by BM25; None when none shares a word."""
        found = self.emergency_rows.search(question, 1) if self.emergency_rows is not None else []
        return found[0] if found else None


def build_sources(data: str | None = None, num_examples: int | None = None, seed: int = 42) -> Sources:
    """Index the training cards of `data` (split as train.py splits it) and fit the threshold on its validation rows.

    Never raises for bad data: an unreadable or empty file, or one with no medical rows, gives
    Sources with no index and a notice that says why.
    """
    started = time.perf_counter()
    try:
        raw = load_rows(data)
        pairs, _ = clean_rows(raw.rows, raw.source)
        splits = sample_and_split(pairs, num_examples, seed)
    except DataError as error:
        return Sources(None, f"no sources: {error}")
    cards = [pair for pair in splits.train if pair.topic != NOT_A_SOURCE_TOPIC]
    if not cards:
        return Sources(None, f"no sources: {raw.source} has no medical training rows (only {NOT_A_SOURCE_TOPIC} ones)")
    index = FlashcardIndex(cards)
    emergency = [pair for pair in cards if pair.topic == SAFETY_TOPIC and is_emergency_referral(pair.answer)]
    medical = [pair.question for pair in splits.validation if pair.topic != NOT_A_SOURCE_TOPIC]
    declined = [pair.question for pair in splits.validation if pair.topic == NOT_A_SOURCE_TOPIC]
    declined_source = "validation"
    if not any(pair.topic == NOT_A_SOURCE_TOPIC for pair in pairs):
        declined, declined_source = embedded_out_of_domain_questions(), "embedded flashcards"
    try:
        medical_scores, declined_scores = index.top_scores(medical), index.top_scores(declined)
        index.min_score = fit_threshold(medical_scores, declined_scores)
    except ValueError as error:
        return Sources(None, f"no sources: {error}")
    fit = {
        "threshold": index.min_score,
        "medical_questions": len(medical),
        "medical_shown": float((medical_scores >= index.min_score).mean()),
        "out_of_domain_questions": len(declined),
        "out_of_domain_shown": float((declined_scores >= index.min_score).mean()) if declined else None,
        "out_of_domain_from": declined_source,
    }
    notice = (
        f"sources: {len(cards)} training flashcards of {raw.source}; a card is shown from BM25 score "
        f"{index.min_score:.2f} (fitted on {len(medical)} medical and {len(declined)} out-of-domain "
        f"{declined_source} questions); {len(emergency)} emergency rows give the emergency route's follow-up"
    )
    emergency_rows = FlashcardIndex(emergency, questions_only=True) if emergency else None
    return Sources(index, notice, time.perf_counter() - started, fit, emergency_rows)


def embedded_out_of_domain_questions() -> list[str]:
    """The out-of-domain questions of the embedded flashcards (questions that should get no card)."""
    pairs, _ = clean_rows(load_rows(None).rows, str(EMBEDDED_DATASET))
    return [pair.question for pair in pairs if pair.topic == NOT_A_SOURCE_TOPIC]


def sources_for_adapter(adapter: str | Path | None) -> Sources:
    """The sources of the run that trained `adapter`: its data, N and seed from RUN/config.json.

    An adapter outside a run folder, or no adapter, gets the training defaults (the embedded
    flashcards, all rows, seed 42).
    """
    run_dir = run_folder_of(adapter) if adapter is not None else None
    config = read_config(run_dir) if run_dir is not None else TrainConfig()
    return build_sources(config.data, config.num_examples, config.seed)


def cards_text(cards: list[Card]) -> str:
    """The cards as plain text, for the terminal, stderr and the web panel: a header line, then per card
    '[score] question' and the answer indented below it. No cards: "" (nothing is shown)."""
    if not cards:
        return ""
    lines = ["Related flashcards (training cards, shown as written; BM25 score in brackets):"]
    for card in cards:
        lines += [f"[{card.score:.1f}] {card.question}", f"    {card.answer}"]
    return "\n".join(lines)


def grounding_context(cards: list[Card]) -> str:
    """The cards as text for the prompt (evaluate.py's grounding rows; docs/sources.md): one 'Flashcard: Q ... A ...' paragraph each."""
    return "\n\n".join(f"Flashcard question: {card.question}\nFlashcard answer: {card.answer}" for card in cards)
