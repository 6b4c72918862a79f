"""medlora/answer.py: the routes' texts, the guard's label, and the answer path around a model and its gate."""

import pytest

from medlora import answer as answer_module
from medlora.answer import (
    CLINICIAN_SENTENCE,
    DECLINE_ANSWER,
    EMERGENCY_SENTENCE,
    VETERINARY_DECLINE,
    Answer,
    AnswerPath,
    compose,
    first_sentence_done,
)
from medlora.generation import GenerationSettings, first_sentences
from medlora.scope import is_clinician_referral, is_decline, is_emergency_referral
from medlora.scope_gate import Decision


def test_the_first_sentence_is_done_at_its_end_mark():
    assert first_sentence_done("Call 911 now.") and first_sentence_done("Call 911 now. Stay")
    assert not first_sentence_done("Give 2.5 mg") and not first_sentence_done("That is outside my")


def test_emergency_keeps_the_model_s_referral_and_its_next_sentence_only():
    model_text = "Call your local emergency number now. Press hard on the wound. Then sit and wait an hour."
    assert compose("emergency", "My arm is bleeding a lot", model_text) == "Call your local emergency number now. Press hard on the wound."


@pytest.mark.parametrize(
    "question, expected",
    [
        ("I want to end my life tonight", "crisis line"),
        ("He is bleeding heavily from a deep cut", "press firmly on the wound"),
        ("My mother collapsed and is not breathing", "start CPR"),
        ("My face feels numb and droopy", "Stay with the person"),
    ],
)
def test_emergency_without_a_model_referral_puts_the_referral_first_then_a_fixed_line(question, expected):
    text = compose("emergency", question, "It is probably nothing. Sit still and wait a few hours.")
    assert text.startswith(EMERGENCY_SENTENCE) and expected in text
    assert "Sit still" not in text  # the model's non-emergency advice never follows a referral
    assert is_emergency_referral(first_sentences(text, 1))


def test_clinician_route_puts_the_referral_first_and_marks_the_rest_as_general_information():
    text = compose("clinician", "How much ibuprofen should I take?", "Adults often take 200 to 400 mg.")
    assert text == f"{CLINICIAN_SENTENCE} General information: Adults often take 200 to 400 mg."
    assert is_clinician_referral(text)


def test_decline_keeps_the_model_s_own_decline_cut_to_two_sentences():
    own = "Football is outside my scope. I only answer medical and health questions. Anyway, Brazil won."
    assert compose("decline", "Who won the cup?", own) == "Football is outside my scope. I only answer medical and health questions."


def test_decline_replaces_an_answer_and_sends_animals_to_a_vet():
    assert compose("decline", "What is the capital of Australia?", "Canberra.") == DECLINE_ANSWER and is_decline(DECLINE_ANSWER)
    assert compose("decline", "My dog ate chocolate, what do I do?", "Give him milk.") == VETERINARY_DECLINE
    assert is_decline(VETERINARY_DECLINE) and "veterinarian" in VETERINARY_DECLINE


def test_the_label_shows_only_when_the_guard_acted():
    assert Answer("Insulin lowers glucose.", "answer", 0.97, "Insulin lowers glucose.").label is None
    assert Answer("x", "answer", None, "x").label is None  # no gate
    assert Answer(DECLINE_ANSWER, "decline", 0.966, "Canberra.").label == "scope check: not a medical question (p = 0.97)"
    assert "overridden" in Answer("Insulin is a hormone.", "answer", 0.95, "That is outside my scope.", overridden=True).label


class FakeGate:
    """Decides from the question's first word: the test's stand-in for a fitted gate."""

    def __init__(self, routes: dict[str, Decision]) -> None:
        self.routes = routes


@pytest.fixture
def fake_path(monkeypatch):
    """An AnswerPath whose model answers from a table and whose gate decides from a table."""
    model_answers = {
        "Capital?": "Canberra is the capital.",
        "Insulin?": "That is outside my scope as a medical assistant.",
        "Stroke?": "It may be tiredness. Rest at home.",
        "Cells?": "Cells are the unit of life.",
    }
    decisions = {
        "Capital?": Decision("decline", 0.98, 0.01),
        "Insulin?": Decision("answer", 0.95, 0.95),
        "Stroke?": Decision("emergency", 0.9, 0.05),
        "Cells?": Decision("answer", 0.7, 0.7),  # not sure enough to override anything
    }
    calls = []

    def generate(model, tokenizer, questions, settings, batch_size=16, progress=False, bad_words_ids=None, stop_after_sentences=None):
        calls.append((list(questions), bad_words_ids is not None))
        return ["Insulin is a hormone that lowers blood glucose." if bad_words_ids else model_answers[q] for q in questions]

    monkeypatch.setattr(answer_module, "generate_answers", generate)
    path = AnswerPath(None, None, FakeGate(decisions), GenerationSettings())
    monkeypatch.setattr(path, "decisions", lambda questions, history=(): [decisions[q] for q in questions])
    monkeypatch.setattr(path, "banned_ids", lambda: [[1, 2]])
    return path, calls


def test_answer_many_routes_and_overrides_a_sure_medical_decline(fake_path):
    path, calls = fake_path
    capital, insulin, stroke, cells = path.answer_many(["Capital?", "Insulin?", "Stroke?", "Cells?"])
    assert capital.text == DECLINE_ANSWER and capital.model_text == "Canberra is the capital." and capital.label
    assert insulin.overridden and insulin.text.startswith("Insulin is a hormone") and not is_decline(insulin.text)
    assert insulin.model_text == "That is outside my scope as a medical assistant."
    assert stroke.text.startswith(EMERGENCY_SENTENCE) and "Rest at home" not in stroke.text
    assert cells.text == "Cells are the unit of life." and cells.label is None
    assert calls == [(["Capital?", "Insulin?", "Stroke?", "Cells?"], False), (["Insulin?"], True)]  # one batch, then the override


def test_without_a_gate_the_model_answers_alone(monkeypatch):
    monkeypatch.setattr(answer_module, "generate_answers", lambda m, t, questions, *a, **k: ["Paris." for _ in questions])
    (only,) = AnswerPath(None, None, None, GenerationSettings()).answer_many(["Capital of France?"])
    assert (only.text, only.route, only.probability, only.label) == ("Paris.", "answer", None, None)


def test_stream_holds_a_sure_medical_decline_back_and_answers_again(monkeypatch, fake_path):
    path, _ = fake_path

    def stream(model, tokenizer, question, history, settings, max_context_tokens=None, bad_words_ids=None):
        text = "Insulin is a hormone. It lowers glucose." if bad_words_ids else "That is outside my scope. Sorry."
        yield from text.split(" ")[:1] + [" " + word for word in text.split(" ")[1:]]

    monkeypatch.setattr(answer_module, "stream_answer", stream)
    pieces = path.stream("Insulin?")
    shown = []
    while True:
        try:
            shown.append(next(pieces))
        except StopIteration as done:
            answer = done.value
            break
    assert "".join(shown) == "Insulin is a hormone. It lowers glucose." == answer.text
    assert answer.overridden and answer.model_text == "That is outside my scope."


def test_stream_gives_a_routed_answer_in_one_piece(monkeypatch, fake_path):
    path, _ = fake_path
    monkeypatch.setattr(answer_module, "stream_answer", lambda *a, **k: iter(["Canberra ", "is the capital."]))
    answer = path.answer("Capital?")
    assert answer.text == DECLINE_ANSWER and answer.route == "decline" and answer.probability == 0.98
