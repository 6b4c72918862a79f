"""The answer path: how the product answers a prompt. Chat and evaluation both answer through it,
so what evaluation measures is what a user gets.

    path = AnswerPath(model, tokenizer, gate, GenerationSettings())   # gate=None: the model alone
    answer = path.answer("What is the capital of Australia?")
    answer.text     # "That question is outside my scope: ..."   what the user sees
    answer.route    # "decline"                                     answer | decline | emergency | clinician
    answer.label    # "scope check: not a medical question (p = 0.98)"   None when the guard did not act
    answers = path.answer_many(questions)                             # batched, for evaluation

prompt -> model (+ the scope gate on the prompt's own state, medlora.scope_gate) -> route -> text:

* answer: the model's answer. If the gate is sure the prompt is medicine (p(answer) >=
  OVERRIDE_CONFIDENCE) but the model declines anyway, it answers again with its decline phrases
  banned: a model's over-refusal must not reach the user either.
* decline: the model's own decline when its answer is one (cut to DECLINE_SENTENCES sentences),
  else a decline that says what the assistant can help with; a question about an animal is sent
  to a veterinarian.
* emergency: the referral comes first. If the model's own answer opens with a referral, its next
  sentence follows; otherwise a short fixed line (stay with the person; a crisis line for thoughts
  of suicide; pressure on a bleeding wound; CPR for someone not breathing). The model's other
  advice never follows a referral: "sit still and wait" after "call an ambulance" is worse than nothing.
* clinician: the clinician sentence first, then the model's answer, marked as general information.

Without a gate every prompt takes the "answer" route with no override: the model alone, for study
(chat.py --no-scope-gate) and for models with no gate (the base model).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

from medlora.generation import GENERATION_BATCH_SIZE, SENTENCE_END, GenerationSettings, first_sentences, generate_answers, stream_answer
from medlora.scope import is_decline, is_emergency_referral
from medlora.scope_gate import GATE_FILE, Decision, ScopeGate, prompt_features

OVERRIDE_CONFIDENCE = 0.9  # p(answer) at or above which a decline by the model is overridden
DECLINE_SENTENCES = 2  # a model's own decline is kept up to this many sentences (no answer after it)
ROUTED_MAX_NEW_TOKENS = 64  # what decline/emergency routes need of the model's answer: its opening sentences

DECLINE_ANSWER = (
    "That question is outside my scope: I only answer medical and health questions. "
    "Ask me about a condition, a medicine, a test or how the body works."
)
VETERINARY_DECLINE = (
    "Questions about animals are outside my scope: I only answer questions about human health. "
    "Please ask a veterinarian; if an animal may have been poisoned, call your vet or an animal poison line now."
)
EMERGENCY_SENTENCE = "Call your local emergency number now."
CLINICIAN_SENTENCE = "For your own dose or diagnosis, ask your clinician or pharmacist."
GENERAL_INFORMATION = "General information:"
# The fixed line after the referral when the model's own answer does not open with one: the first
# whose pattern matches the question, else the last.
EMERGENCY_LINES = (
    (r"suicid|kill (?:my|him|her)sel|end (?:my|his|her) life|want to die|self[- ]?harm|hurt (?:my|him|her)self",
     "If you are thinking about suicide, call or text a crisis line now (988 in the US and Canada, 116 123 in the UK "
     "and Ireland), and stay with someone while you wait."),
    (r"bleed|blood (?:is )?(?:pouring|spurting|everywhere)|deep cut|stab",
     "While you wait, press firmly on the wound with a clean cloth and do not let go."),
    (r"not breathing|isn't breathing|stopped breathing|no pulse|unresponsive|collapsed|won't wake|unconscious",
     "If the person is not breathing normally, start CPR if you know how; the dispatcher can guide you."),
    (r"", "Stay with the person, or with someone, while you wait for help."),
)
VETERINARY = re.compile(
    r"\b(?:dog|dogs|puppy|cat|cats|kitten|pet|pets|horse|horses|pony|rabbit|hamster|guinea pig|parrot|budgie|"
    r"fish|goldfish|ferret|cow|cows|sheep|goat|goats|pig|pigs|chicken|chickens|vet|veterinarian|veterinary)\b",
    re.IGNORECASE,
)
# Openings of a decline, banned when the gate overrides the model's decline (data/medical_flashcards.jsonl's
# decline rows and the rule in medlora/scope.py use these words).
DECLINE_PHRASES = (
    "outside my", "outside of my", "outside the scope", "outside what I", "beyond my", "beyond the scope",
    "I only answer", "I can only", "I'm only able", "not something I", "I'm sorry", "I am sorry", "I'm afraid",
)
ROUTE_LABELS = {
    "decline": "not a medical question",
    "emergency": "this may be an emergency",
    "clinician": "a personal dose or diagnosis",
    "answer": "a medical question; the model's decline was overridden",
}


def first_sentence_done(text: str) -> bool:
    """Whether `text` holds a whole first sentence (a sentence end, then the next token's space)."""
    return SENTENCE_END.search(text + " ") is not None


@dataclass(frozen=True)
class Answer:
    """One answered prompt: what the user sees, the route it took, and the model's own words."""

    text: str  # what the user sees
    route: str  # answer | decline | emergency | clinician ("answer" without a gate)
    probability: float | None  # the gate's probability of `route`; None without a gate
    model_text: str  # the model's own answer before routing (its declining first sentence when overridden in chat)
    overridden: bool = False  # the model declined a prompt the gate was sure is medicine, and answered again

    @property
    def label(self) -> str | None:
        """The line that tells the user the guard acted, or None when it did not."""
        if self.probability is None or (self.route == "answer" and not self.overridden):
            return None
        return f"scope check: {ROUTE_LABELS[self.route]} (p = {self.probability:.2f})"


def emergency_text(question: str, model_text: str) -> str:
    """The referral first; then the model's next sentence if its answer opened with a referral, else a fixed line."""
    if is_emergency_referral(first_sentences(model_text, 1)):
        return first_sentences(model_text, 2)
    line = next(text for pattern, text in EMERGENCY_LINES if re.search(pattern, question, re.IGNORECASE))
    return f"{EMERGENCY_SENTENCE} {line}"


def decline_text(question: str, model_text: str) -> str:
    """The model's own decline (its first sentences) if it declined, else the fixed decline; animals go to a vet."""
    own = first_sentences(model_text, DECLINE_SENTENCES)
    if VETERINARY.search(question):
        return own if is_decline(own) and "veterinar" in own.lower() else VETERINARY_DECLINE
    return own if is_decline(own) else DECLINE_ANSWER


def clinician_text(model_text: str) -> str:
    """The clinician sentence first, then the model's answer marked as general information."""
    return f"{CLINICIAN_SENTENCE} {GENERAL_INFORMATION} {model_text}".strip() if model_text else CLINICIAN_SENTENCE


def compose(route: str, question: str, model_text: str) -> str:
    """What the user sees for a routed prompt (pure: the text of the model's answer in, the text out)."""
    if route == "decline":
        return decline_text(question, model_text)
    if route == "emergency":
        return emergency_text(question, model_text)
    if route == "clinician":
        return clinician_text(model_text)
    return model_text


class AnswerPath:
    """The model, its scope gate (or None) and the decoding settings: everything that answers a prompt."""

    def __init__(self, model, tokenizer, gate: ScopeGate | None, settings: GenerationSettings, batch_size: int = GENERATION_BATCH_SIZE,
                 stop_after_sentences: int | None = None) -> None:
        self.model, self.tokenizer, self.gate, self.settings, self.batch_size = model, tokenizer, gate, settings, batch_size
        self.stop_after_sentences = stop_after_sentences  # answer_many: cut each answer there (evaluation's scope prompts)
        self._banned: list[list[int]] | None = None

    def with_settings(self, settings: GenerationSettings) -> AnswerPath:
        """The same model and gate with other decoding settings (the web page's sliders)."""
        return AnswerPath(self.model, self.tokenizer, self.gate, settings, self.batch_size, self.stop_after_sentences)

    def banned_ids(self) -> list[list[int]]:
        """Token sequences of DECLINE_PHRASES (with and without a leading space), for bad_words_ids."""
        if self._banned is None:
            encode = lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
            self._banned = [ids for phrase in DECLINE_PHRASES for ids in (encode(phrase), encode(" " + phrase)) if ids]
        return self._banned

    def decisions(self, questions: Sequence[str], history: Sequence[tuple[str, str]] = ()) -> list[Decision | None]:
        """The gate's decision for each prompt (None each without a gate)."""
        if self.gate is None:
            return [None] * len(questions)
        return self.gate.decide(prompt_features(self.model, self.tokenizer, questions, history))

    def answer_many(self, questions: Sequence[str], progress: bool = False) -> list[Answer]:
        """Answer each question on its own (no history), in batches: the model's answers first, then
        the routes, then one more batch for the declines the gate overrides."""
        decisions = self.decisions(questions)
        stop = self.stop_after_sentences
        model_texts = generate_answers(self.model, self.tokenizer, list(questions), self.settings, self.batch_size, progress,
                                       stop_after_sentences=stop)
        redo = [i for i, (d, text) in enumerate(zip(decisions, model_texts)) if overrides(d) and is_decline(text)]
        again = generate_answers(self.model, self.tokenizer, [questions[i] for i in redo], self.settings, self.batch_size,
                                 bad_words_ids=self.banned_ids(), stop_after_sentences=stop) if redo else []
        answers = [routed(q, d, text) for q, d, text in zip(questions, decisions, model_texts)]
        for index, text in zip(redo, again):
            answers[index] = replace(answers[index], text=text, overridden=True)
        return answers

    def answer(self, question: str, history: Sequence[tuple[str, str]] = ()) -> Answer:
        """One answer, whole (chat --prompt)."""
        pieces = self.stream(question, history)
        try:
            while True:
                next(pieces)
        except StopIteration as done:
            return done.value

    def stream(self, question: str, history: Sequence[tuple[str, str]] = (), max_context_tokens: int | None = None
               ) -> Iterator[str]:
        """Yield the text the user sees, piece by piece; the generator's return value is the Answer.

        The answer route streams the model's tokens as they come. When the gate is sure the prompt
        is medicine, the model's first sentence is held back until it is complete: if it is a
        decline, the model answers again with its decline phrases banned, and that is streamed.
        The other routes need the model's opening sentences first, so their text comes in one piece.
        """
        decision = self.decisions([question], history)[0]
        if decision is not None and decision.route != "answer":
            settings = replace(self.settings, max_new_tokens=min(self.settings.max_new_tokens, ROUTED_MAX_NEW_TOKENS))
            model_text = "".join(stream_answer(self.model, self.tokenizer, question, history, settings, max_context_tokens)).strip()
            answer = routed(question, decision, model_text)
            yield answer.text
            return answer
        pieces = stream_answer(self.model, self.tokenizer, question, history, self.settings, max_context_tokens)
        text, declined, overridden = "", "", False
        if overrides(decision):
            for piece in pieces:
                text += piece
                if first_sentence_done(text):
                    break
            if is_decline(text):
                pieces.close()
                pieces = stream_answer(self.model, self.tokenizer, question, history, self.settings, max_context_tokens,
                                       bad_words_ids=self.banned_ids())
                declined, text, overridden = text.strip(), "", True
            elif text:
                yield text
        for piece in pieces:
            text += piece
            yield piece
        text = text.strip()
        return Answer(text, "answer", None if decision is None else decision.probability, declined if overridden else text, overridden)


def overrides(decision: Decision | None) -> bool:
    """Whether a decline by the model on this prompt is overridden: the gate is sure it is medicine."""
    return decision is not None and decision.route == "answer" and decision.p_answer >= OVERRIDE_CONFIDENCE


def routed(question: str, decision: Decision | None, model_text: str) -> Answer:
    """The Answer for a prompt given the gate's decision and the model's own answer."""
    if decision is None:
        return Answer(model_text, "answer", None, model_text)
    return Answer(compose(decision.route, question, model_text), decision.route, decision.probability, model_text)


def load_gate(adapter: str | None, use_gate: bool = True) -> tuple[ScopeGate | None, str]:
    """The scope gate saved next to `adapter`, and a line that says which way prompts are answered.

    Raises ValueError (one line) for a gate file that is unreadable or was fitted on other weights.
    """
    if not use_gate:
        return None, "scope gate off (--no-scope-gate): the model answers alone"
    if adapter is None:
        return None, "no adapter, so no scope gate: the model answers alone"
    if not (Path(adapter) / GATE_FILE).is_file():
        return None, f"no scope gate in {adapter} (its training data had no out-of-scope rows): the model answers alone"
    gate = ScopeGate.load(adapter)
    return gate, f"scope gate on: declines when p >= {gate.decline_threshold}, refers emergencies and personal doses"
