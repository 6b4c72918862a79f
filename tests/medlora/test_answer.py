"""medlora/answer.py: the routes' texts, the guard's label, and the answer path around a model, its gate and its sources."""

import re
from dataclasses import replace

import pytest
import torch

from data import QAPair
from medlora import answer as answer_module
from medlora.answer import (
    CLINICIAN_SENTENCE,
    DECLINE_ANSWER,
    EMERGENCY_FALLBACK_LINE,
    EMERGENCY_SENTENCE,
    NO_ANSWER_SENTENCE,
    ROUTED_MAX_NEW_TOKENS,
    ROUTED_SENTENCES,
    VETERINARY_DECLINE,
    Answer,
    AnswerPath,
    clinician_text,
    decline_text,
    emergency_text,
)
from medlora.generation import GenerationSettings
from medlora.scope import first_sentences, is_clinician_referral, is_decline, is_emergency_referral
from medlora.scope_gate import GATE_FILE, Decision, ScopeGate
from medlora.sources import Card, FlashcardIndex, Sources, build_sources, cards_text
from tests.conftest import chatty_tiny_model

# The keywords the emergency route used to pick its follow-up line by (before issue 31): the
# paraphrases below contain none of them, so only the nearest training row can find their line.
OLD_EMERGENCY_KEYWORDS = re.compile(
    r"suicid|kill (?:my|him|her)sel|end (?:my|his|her) life|want to die|self[- ]?harm|hurt (?:my|him|her)self"
    r"|bleed|blood (?:is )?(?:pouring|spurting|everywhere)|deep cut|stab"
    r"|not breathing|isn't breathing|stopped breathing|no pulse|unresponsive|collapsed|won't wake|unconscious",
    re.IGNORECASE,
)
SELF_HARM_PARAPHRASES = [
    "I don't want to be alive anymore.",
    "I keep thinking about taking my own life.",
    "Tonight I want to finish myself off.",
    "I have been planning how to end it all, my life feels pointless.",
]


@pytest.fixture(scope="module")
def sources():
    """The embedded flashcards' training cards, as chat and evaluation build them."""
    return build_sources(None)


@pytest.mark.parametrize("question", SELF_HARM_PARAPHRASES)
def test_self_harm_in_other_words_gets_the_crisis_line_of_the_nearest_training_row(sources, question):
    assert not OLD_EMERGENCY_KEYWORDS.search(question)
    row = sources.nearest_emergency_row(question)
    text = emergency_text(row)
    assert text.startswith(EMERGENCY_SENTENCE) and is_emergency_referral(first_sentences(text, 1))
    assert "crisis line" in text and "988" in text
    assert text.endswith(row.answer[len(first_sentences(row.answer, 1)):].strip())  # the row's own words, verbatim


def test_other_emergencies_get_their_nearest_row_s_follow_up(sources):
    text = emergency_text(sources.nearest_emergency_row("My girl swallowed one of those small round watch batteries"))
    assert text == f"{EMERGENCY_SENTENCE} Do not make her vomit, and bring the battery packaging with you."


def test_emergency_with_no_row_in_common_gets_the_fixed_line(sources):
    assert sources.nearest_emergency_row("zzzz qqqq") is None
    assert emergency_text(None) == f"{EMERGENCY_SENTENCE} {EMERGENCY_FALLBACK_LINE}"


def test_clinician_route_shows_the_cards_verbatim_and_marked_never_the_model_s_text():
    cards = [Card("Can I take ibuprofen with my lisinopril?", "NSAIDs such as ibuprofen can raise blood pressure.", 7.5)]
    text = clinician_text(cards)
    assert text == f"{CLINICIAN_SENTENCE}\n\n{cards_text(cards)}"
    assert "Related flashcards (training cards, shown as written" in text and cards[0].answer in text
    assert is_clinician_referral(text)
    assert clinician_text([]) == CLINICIAN_SENTENCE  # no card over the threshold: the sentence stands alone


def test_decline_keeps_the_model_s_own_decline_cut_to_two_sentences():
    own = "Football is outside my scope. I only answer medical and health questions. Anyway, Brazil won."
    assert decline_text("Who won the cup?", own) == "Football is outside my scope. I only answer medical and health questions."


def test_decline_shows_a_deflection_never_but_the_fixed_decline():
    deflection = "I'm an AI for medicine and health care, so I can't answer medical queries directly. But you might ask about Peru."
    assert is_decline(deflection)  # the judge (evaluation, override) reads it as a decline ...
    assert decline_text("What is the capital of Peru?", deflection) == DECLINE_ANSWER  # ... but a user never sees it


def test_decline_replaces_an_answer_and_sends_animals_to_a_vet():
    assert decline_text("What is the capital of Australia?", "Canberra.") == DECLINE_ANSWER and is_decline(DECLINE_ANSWER)
    assert decline_text("My dog ate chocolate, what do I do?", "Give him milk.") == VETERINARY_DECLINE
    assert is_decline(VETERINARY_DECLINE) and "veterinarian" in VETERINARY_DECLINE


def test_the_label_shows_only_when_the_guard_acted():
    assert Answer("Insulin lowers glucose.", "answer", 0.97, "Insulin lowers glucose.").label is None
    assert Answer("x", "answer", None, "x").label is None  # no gate
    assert Answer(DECLINE_ANSWER, "decline", 0.966, "Canberra.").label == "scope check: not a medical question (p = 0.97)"
    assert "overridden" in Answer("Insulin is a hormone.", "answer", 0.95, "That is outside my scope.", overridden=True).label
    again = Answer("That's not something my area covers: I answer medical and health questions only.", "answer", 0.99,
                   "That is outside my scope.", overridden=True)  # the override's second answer declined too (make run at db94e5f)
    assert again.label == "scope check: a medical question; the model declined it, and again when asked to answer (p = 0.99)"


@pytest.mark.parametrize("route, shown", [("answer", True), ("clinician", True), ("decline", False), ("emergency", False)])
def test_only_answers_routed_as_medicine_get_cards(sources, route, shown):
    path = AnswerPath(None, None, None, GenerationSettings(), sources)
    assert bool(path.cards_for(route, "What is the mechanism of action of heparin?")) is shown


def test_only_an_answer_shows_its_cards_beside_it():
    card = Card("q", "a", 5.0)
    assert Answer("x", "answer", 0.9, "x", cards=(card,)).cards_beside == (card,)
    assert Answer(clinician_text([card]), "clinician", 0.9, "x", cards=(card,)).cards_beside == ()  # already in its text


# ---- the answer path around a scripted model and gate ------------------------------------------

MODEL_ANSWERS = {
    "Capital?": "Canberra is the capital.",
    "Insulin?": "That is outside my scope as a medical assistant.",
    "Sleep?": "I'm not an expert in sleep, but I can help you with other health questions.",
    "Stroke?": "It may be tiredness. Rest at home.",
    "Ibuprofen dose?": "Ibuprofen has no side effects at all, take as much as you like.",
    "Cells?": "Cells are the unit of life.",
    "Heart?": "That is outside my scope.",
    "Tendon?": "That is outside my scope.",
}
ANSWER_AGAIN = "Insulin is a hormone. It lowers glucose."  # the scripted model's answer with its decline phrases banned
DECLINE_AGAIN = "That's not something my area covers: I answer medical and health questions only."  # ... on the two questions it declines twice (make run at db94e5f)
DECISIONS = {
    "Capital?": Decision("decline", 0.98, 0.01),
    "Insulin?": Decision("answer", 0.95, 0.95),
    "Sleep?": Decision("answer", 0.93, 0.93),
    "Stroke?": Decision("emergency", 0.9, 0.05),
    "Ibuprofen dose?": Decision("clinician", 0.8, 0.1),
    "Cells?": Decision("answer", 0.7, 0.7),  # not sure enough to override anything
    "Heart?": Decision("answer", 0.99, 0.99),
    "Tendon?": Decision("answer", 0.99, 0.99),  # declined twice too, and no card shares a word with it
}
SURE_AT_0_9 = ScopeGate(torch.zeros(1), torch.ones(1), torch.zeros(4, 1), torch.zeros(4), override_confidence=0.9)
CARDS = [
    QAPair("Can I take ibuprofen with my lisinopril?", "NSAIDs such as ibuprofen can raise blood pressure.", "safety"),
    QAPair("What is the function of cells?", "Cells are the basic unit of life.", "physiology"),
    QAPair("Why does the heart beat faster?", "Adrenaline raises the heart rate.", "physiology"),
    QAPair("My husband is having a stroke, his face droops.", "Call your local emergency number now. Note the time it started.", "safety"),
]


def scripted_sources() -> Sources:
    return Sources(FlashcardIndex(CARDS, min_score=0.1), "test cards", emergency_rows=FlashcardIndex(CARDS[3:], questions_only=True))


@pytest.fixture
def fake_path(monkeypatch):
    """An AnswerPath whose model answers from MODEL_ANSWERS and whose gate decides from DECISIONS."""
    calls = []

    def generate(model, tokenizer, questions, settings, batch_size=16, progress=False, bad_words_ids=None, stop_after_sentences=None):
        calls.append((list(questions), settings.max_new_tokens, stop_after_sentences, bad_words_ids is not None))
        return [again(q) if bad_words_ids else MODEL_ANSWERS[q] for q in questions]

    monkeypatch.setattr(answer_module, "generate_answers", generate)
    path = AnswerPath(None, None, SURE_AT_0_9, GenerationSettings(), scripted_sources())
    monkeypatch.setattr(path, "decisions", lambda questions, history=(): [DECISIONS[q] for q in questions])
    monkeypatch.setattr(path, "banned_ids", lambda: [[1, 2]])
    return path, calls


def again(question: str) -> str:
    """The scripted model's answer with its decline phrases banned."""
    return DECLINE_AGAIN if question in ("Heart?", "Tendon?") else ANSWER_AGAIN


def test_answer_many_routes_and_overrides_a_sure_medical_decline_or_deflection(fake_path):
    path, calls = fake_path
    capital, insulin, sleep, stroke, dose, cells, heart, tendon = path.answer_many(list(MODEL_ANSWERS))
    assert capital.text == DECLINE_ANSWER and capital.model_text == "Canberra is the capital." and capital.label
    for overridden in (insulin, sleep):
        assert overridden.overridden and overridden.text == ANSWER_AGAIN
    assert insulin.model_text == "That is outside my scope as a medical assistant."
    assert stroke.text == f"{EMERGENCY_SENTENCE} Note the time it started." and "Rest at home" not in stroke.text
    assert dose.text.startswith(CLINICIAN_SENTENCE) and "no side effects" not in dose.text
    assert dose.cards and dose.cards[0].question == CARDS[0].question and CARDS[0].answer in dose.text
    assert cells.text == "Cells are the unit of life." and cells.label is None and cells.cards_beside
    assert (capital.cards, stroke.cards) == ((), ())
    # The routed prompts at their caps, the answer route at the path's, then the overrides at the answer route's.
    assert calls == [(["Capital?", "Stroke?", "Ibuprofen dose?"], ROUTED_MAX_NEW_TOKENS, ROUTED_SENTENCES, False),
                     (["Insulin?", "Sleep?", "Cells?", "Heart?", "Tendon?"], 200, None, False),
                     (["Insulin?", "Sleep?", "Heart?", "Tendon?"], 200, None, True)]


def test_a_sure_medical_question_the_model_declines_twice_gets_the_cards_instead(fake_path):
    path, _ = fake_path
    heart, tendon = path.answer_many(["Heart?", "Tendon?"])
    assert heart.text == f"{NO_ANSWER_SENTENCE}\n\n{cards_text(list(heart.cards))}" and CARDS[2].answer in heart.text
    assert not is_decline(heart.text) and heart.cards_beside == ()  # the cards are in the text, not beside it again
    assert heart.overridden and heart.model_text == MODEL_ANSWERS["Heart?"]
    assert heart.label == "scope check: a medical question; the model declined it, and again when asked to answer (p = 0.99)"
    assert tendon.text == DECLINE_AGAIN and tendon.cards == () and "declined it, and again" in tendon.label  # no card: the decline stands


def test_without_a_gate_the_model_answers_alone(monkeypatch):
    monkeypatch.setattr(answer_module, "generate_answers", lambda m, t, questions, *a, **k: ["Paris." for _ in questions])
    (only,) = AnswerPath(None, None, None, GenerationSettings()).answer_many(["Capital of France?"])
    assert (only.text, only.route, only.probability, only.label, only.cards) == ("Paris.", "answer", None, None, ())


def scripted_stream(model, tokenizer, question, history, settings, max_context_tokens=None, bad_words_ids=None):
    """Stream MODEL_ANSWERS word by word, as stream_answer yields pieces."""
    text = again(question) if bad_words_ids else MODEL_ANSWERS[question]
    words = text.split(" ")
    yield from words[:1] + [" " + word for word in words[1:]]


def streamed(pieces):
    shown = []
    while True:
        try:
            shown.append(next(pieces))
        except StopIteration as done:
            return "".join(shown), done.value


def test_stream_holds_a_sure_medical_deflection_back_and_answers_again(monkeypatch, fake_path):
    path, _ = fake_path
    monkeypatch.setattr(answer_module, "stream_answer", scripted_stream)
    shown, answer = streamed(path.stream("Sleep?"))
    assert shown == ANSWER_AGAIN == answer.text
    assert answer.overridden and answer.model_text == MODEL_ANSWERS["Sleep?"]


def test_stream_gives_a_routed_answer_in_one_piece(monkeypatch, fake_path):
    path, _ = fake_path
    monkeypatch.setattr(answer_module, "stream_answer", scripted_stream)
    pieces = path.stream("Capital?")
    assert next(pieces) == DECLINE_ANSWER
    answer = path.answer("Capital?")
    assert answer.text == DECLINE_ANSWER and answer.route == "decline" and answer.probability == 0.98


def test_stream_and_answer_many_agree_on_every_route(monkeypatch, fake_path):
    path, _ = fake_path
    monkeypatch.setattr(answer_module, "stream_answer", scripted_stream)
    questions = list(MODEL_ANSWERS)
    assert [path.answer(question) for question in questions] == path.answer_many(questions)


# ---- one flow: chat's stream and evaluation's batch on a real (tiny) model ---------------------


def test_chat_stream_and_evaluation_batch_give_the_same_answers(tokenizer, monkeypatch):
    """The same prompts through stream (chat) and answer_many (evaluation): the same text, route,
    label and cards on every route, an override included. The tiny model writes gibberish, so the
    judge is made to see a decline in any answer holding an "e" (the override then runs for real)."""
    questions = ["What is hypertension?", "Can I take ibuprofen with my lisinopril?", "What is the function of cells?",
                 "Who won the cup?", "My husband's face droops, is it a stroke?", "Does insulin make the heart beat faster?"]
    routes = ["answer", "clinician", "answer", "decline", "emergency", "answer"]
    sure = [0.95, 0.1, 0.5, 0.02, 0.05, 0.99]
    decisions = {q: Decision(route, 0.9, p) for q, route, p in zip(questions, routes, sure)}
    monkeypatch.setattr(answer_module, "is_decline", lambda text: "e" in text)
    for stop in (None, 2):  # chat's path, and evaluation's scope path (answers cut at their second sentence)
        path = AnswerPath(chatty_tiny_model(), tokenizer, SURE_AT_0_9, GenerationSettings(max_new_tokens=24), scripted_sources(),
                          batch_size=4, stop_after_sentences=stop)
        monkeypatch.setattr(path, "decisions", lambda qs, history=(): [decisions[q] for q in qs])
        batched = path.answer_many(questions)
        assert [answer.route for answer in batched] == routes
        assert any(answer.overridden for answer in batched) and any(answer.cards for answer in batched)
        assert any(answer.cards_in_text and answer.route == "answer" for answer in batched)  # declined twice: the cards
        assert any(answer.overridden and not answer.cards_in_text for answer in batched)  # ... or, with no card, streamed
        for question, answer in zip(questions, batched):
            shown, streamed_answer = streamed(path.stream(question))
            assert shown.strip() == streamed_answer.text == answer.text
            assert (streamed_answer.route, streamed_answer.label, streamed_answer.cards) == (answer.route, answer.label, answer.cards)
            assert streamed_answer.model_text == answer.model_text and streamed_answer.overridden == answer.overridden


# ---- loading: model, gate and sources together -----------------------------------------------


def test_from_adapter_loads_the_model_the_sources_and_says_which_way_prompts_go(tiny_adapter_dir):
    path = AnswerPath.from_adapter(None, str(tiny_adapter_dir), settings=GenerationSettings(max_new_tokens=4))
    assert path.gate is None and path.sources is not None and path.sources.index is not None
    assert "adapter" in path.description and any("no scope gate" in notice for notice in path.notices)
    assert replace(path, card_count=0).cards_for("answer", "What is the mechanism of action of heparin?") == ()
    assert path.cards_for("answer", "What is the mechanism of action of heparin?")


def test_a_bad_gate_fails_before_the_model_loads(tmp_path, tiny_adapter_dir, monkeypatch):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for file in tiny_adapter_dir.iterdir():
        (adapter / file.name).write_bytes(file.read_bytes())
    (adapter / GATE_FILE).write_bytes(b"not a gate")
    monkeypatch.setattr(answer_module, "load_for_inference", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match="not a readable scope gate"):
        AnswerPath.from_adapter(None, str(adapter), settings=GenerationSettings())


def test_card_count_must_not_be_negative():
    with pytest.raises(ValueError, match="card_count must be 0 .* got -1"):
        AnswerPath.from_adapter(None, None, settings=GenerationSettings(), card_count=-1)


def test_every_training_decline_opens_with_a_banned_phrase():
    """The override bans DECLINE_PHRASES: each decline row's first sentence holds one, so none of the
    ways the model learned to decline is left open when the gate is sure a prompt is medicine."""
    import json
    from pathlib import Path

    from medlora.scope import DECLINE_PHRASES
    from medlora.scope import first_sentences

    rows = [json.loads(line) for line in (Path(__file__).resolve().parents[2] / "data" / "medical_flashcards.jsonl").open()]
    declines = [row["output"] for row in rows if row["topic"] == "out_of_domain"]
    open_ones = [text for text in declines if not any(p.lower() in first_sentences(text, 1).lower() for p in DECLINE_PHRASES)]
    assert len(declines) > 600 and not open_ones, open_ones[:3]
