"""The answer path: how the product answers a prompt. Chat and evaluation both answer through it,
so what evaluation measures is what a user gets.

    path = AnswerPath.from_adapter(None, "runs/cpu/adapter", settings=GenerationSettings())  # model, gate, sources
    answer = path.answer("What is the capital of Australia?")
    answer.text     # "That question is outside my scope: ..."   what the user sees
    answer.route    # "decline"                                     answer | decline | emergency | clinician
    answer.label    # "scope check: not a medical question (p = 0.98)"   None when the guard did not act
    answer.cards    # the training flashcards that go with it (medlora.sources)
    answers = path.answer_many(questions)                             # batched, for evaluation
    pieces = path.stream(question, history)                           # streamed, for chat; returns the Answer

prompt -> model (+ the scope gate on the prompt's own state, medlora.scope_gate) -> route -> text:

* answer: the model's answer, with up to `card_count` related training flashcards beside it. If
  the gate is sure enough the prompt is medicine (p(answer) >= its override_confidence, chosen on
  the validation split: medlora.scope_gate) but the model's opening (its first OVERRIDE_SENTENCES
  sentences) declines or deflects, by the judge of medlora.scope, it answers again with its
  decline phrases banned: a model's over-refusal must not reach the user either. If that second
  answer declines too (in words the ban does not know), the user gets the related training
  flashcards verbatim under NO_ANSWER_SENTENCE instead, and the label says the model declined
  twice; with no card over the sources' threshold, the second decline is shown.
* decline: the model's own decline when its answer is one that says what the assistant's scope
  is (medlora.scope.is_scope_decline; cut to ROUTED_SENTENCES sentences), else a decline that says
  what the assistant can help with; a question about an animal is sent to a veterinarian.
* emergency: the referral first, then the follow-up of the nearest emergency training row
  (medlora.sources: BM25 over the safety rows' questions; a message nearest a self-harm row gets
  that row's crisis line), or, when no row shares a word with the message, a short fixed line.
  Never the model's own text: "sit still and wait" after "call an ambulance" is worse than nothing.
* clinician: the clinician sentence, then the related training flashcards verbatim and marked as
  such; with no card over the sources' threshold, the sentence alone. Never the model's own text.

A route adds nothing unverified: besides the model's own answer (answer route) and its own decline
(decline route), every word comes from this module or from the training rows.

One routing core serves both callers: `answer_many` (evaluation, batched) and `stream` (chat)
generate the model's text with the same caps (`model_caps`: a routed prompt needs only its
opening, ROUTED_MAX_NEW_TOKENS and ROUTED_SENTENCES), judge the same opening for the override,
and build the Answer with the same `routed`. Given the same path and prompt, both give the same
text, route, label and cards (tests/medlora/test_answer.py).

Without a gate every prompt takes the "answer" route with no override: the model alone, for study
(chat.py --no-scope-gate) and for models with no gate (the base model).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from medlora.generation import GENERATION_BATCH_SIZE, GenerationSettings, generate_answers, load_for_inference, stream_answer
from medlora.scope import decline_phrase_ids, first_sentences, is_decline, is_scope_decline, sentence_ends
from medlora.scope_gate import GATE_FILE, Decision, ScopeGate, prompt_features
from medlora.sources import Card, Sources, cards_text, sources_for_adapter

OVERRIDE_SENTENCES = 2  # the model's opening the override judges: a deflection may take two ("I'm not a doctor. Ask me ...")
ROUTED_SENTENCES = 2  # a routed prompt's model text ends here: a decline keeps its own words up to this many sentences
ROUTED_MAX_NEW_TOKENS = 64  # ... and has at most this many tokens (about three sentences)
CARD_COUNT = 2  # training flashcards with an answer (beside it) or a clinician referral (in it); chat's --sources default
SOURCE_ROUTES = ("answer", "clinician")  # routes whose text is medicine: they get cards; declines and emergencies none

DECLINE_ANSWER = (
    "That question is outside my scope: I only answer medical and health questions. "
    "Ask me about a condition, a medicine, a test or how the body works."
)
VETERINARY_DECLINE = (
    "Questions about animals are outside my scope: I only answer questions about human health. "
    "Please ask a veterinarian; if an animal may have been poisoned, call your vet or an animal poison line now."
)
EMERGENCY_SENTENCE = "Call your local emergency number now."
# After the referral when no emergency training row shares a word with the message.
EMERGENCY_FALLBACK_LINE = "Stay with the person, or with someone, while you wait for help."
CLINICIAN_SENTENCE = "For your own dose or diagnosis, ask your clinician or pharmacist."
# Before the cards when the model declined twice a prompt the gate is sure is medicine.
NO_ANSWER_SENTENCE = "The model gave no answer to this question; these training flashcards are the nearest to it."
VETERINARY = re.compile(
    r"\b(?:dog|dogs|puppy|cat|cats|kitten|pet|pets|horse|horses|pony|rabbit|hamster|guinea pig|parrot|budgie|"
    r"fish|goldfish|ferret|cow|cows|sheep|goat|goats|pig|pigs|chicken|chickens|vet|veterinarian|veterinary)\b",
    re.IGNORECASE,
)
ROUTE_LABELS = {
    "decline": "not a medical question",
    "emergency": "this may be an emergency",
    "clinician": "a personal dose or diagnosis",
    "answer": "a medical question; the model's decline was overridden",
}
DECLINED_AGAIN_LABEL = "a medical question; the model declined it, and again when asked to answer"


@dataclass(frozen=True)
class Answer:
    """One answered prompt: what the user sees, the route it took, its flashcards, and the model's own words."""

    text: str  # what the user sees
    route: str  # answer | decline | emergency | clinician ("answer" without a gate)
    probability: float | None  # the gate's probability of `route`; None without a gate
    model_text: str  # the model's own answer under the route's caps (when overridden: its declining opening)
    overridden: bool = False  # the model declined a prompt the gate was sure is medicine, and answered again
    cards: tuple[Card, ...] = ()  # training flashcards: beside an answer, inside a clinician referral's text
    cards_in_text: bool = False  # the text is the cards (clinician route; an answer the model declined twice)

    @property
    def label(self) -> str | None:
        """The line that tells the user the guard acted, or None when it did not."""
        if self.probability is None or (self.route == "answer" and not self.overridden):
            return None
        if self.overridden and (self.cards_in_text or declines(self.text)):  # the second answer declined too: say so
            return f"scope check: {DECLINED_AGAIN_LABEL} (p = {self.probability:.2f})"
        return f"scope check: {ROUTE_LABELS[self.route]} (p = {self.probability:.2f})"

    @property
    def cards_beside(self) -> tuple[Card, ...]:
        """The cards to show beside the text: an answer's, unless its text already shows them (as a clinician referral's does)."""
        return self.cards if self.route == "answer" and not self.cards_in_text else ()


def emergency_text(nearest_row: Card | None) -> str:
    """The referral first, then the nearest emergency row's answer after its own referral sentence (else a fixed line)."""
    follow_up = nearest_row.answer[len(first_sentences(nearest_row.answer, 1)):].strip() if nearest_row else ""
    return f"{EMERGENCY_SENTENCE} {follow_up or EMERGENCY_FALLBACK_LINE}"


def decline_text(question: str, model_text: str) -> str:
    """The model's own decline (its first sentences) if it declined in the training rows' way, saying
    what its scope is (is_scope_decline; a deflection is not shown), else the fixed decline; animals go to a vet."""
    own = first_sentences(model_text, ROUTED_SENTENCES)
    if VETERINARY.search(question):
        return own if is_scope_decline(own) and "veterinar" in own.lower() else VETERINARY_DECLINE
    return own if is_scope_decline(own) else DECLINE_ANSWER


def clinician_text(cards: Sequence[Card]) -> str:
    """The clinician sentence, then the cards verbatim under their header (medlora.sources.cards_text)."""
    return f"{CLINICIAN_SENTENCE}\n\n{cards_text(list(cards))}" if cards else CLINICIAN_SENTENCE


def declines(model_text: str) -> bool:
    """The override's judge: does the model's opening decline or deflect (medlora.scope.is_decline)?"""
    return is_decline(first_sentences(model_text, OVERRIDE_SENTENCES))


def opening_declines(model, tokenizer, batch_size: int = GENERATION_BATCH_SIZE) -> Callable[[list[str]], list[bool]]:
    """A function of questions -> whether the model declines each on its own: its greedy opening
    (ROUTED_MAX_NEW_TOKENS, OVERRIDE_SENTENCES) read by the override's judge. The scope gate's fit
    asks it of a handful of validation prompts to choose the override confidence (medlora.scope_gate)."""
    settings = GenerationSettings(max_new_tokens=ROUTED_MAX_NEW_TOKENS)

    def model_declines(questions: list[str]) -> list[bool]:
        texts = generate_answers(model, tokenizer, questions, settings, batch_size, stop_after_sentences=OVERRIDE_SENTENCES)
        return [declines(text) for text in texts]

    return model_declines


def declined_twice(overridden_by: str | None) -> bool:
    """Whether the model's second answer, asked again with its decline phrases banned, declines too."""
    return overridden_by is not None and declines(overridden_by)


@dataclass
class AnswerPath:
    """The model, its scope gate (or None), its sources (or None) and the decoding settings: everything that answers a prompt."""

    model: object
    tokenizer: object
    gate: ScopeGate | None
    settings: GenerationSettings
    sources: Sources | None = None  # training flashcards for cards and emergency follow-ups; None: neither
    card_count: int = CARD_COUNT  # cards per answer and per clinician referral (0: none)
    batch_size: int = GENERATION_BATCH_SIZE  # answer_many: questions per generation batch
    stop_after_sentences: int | None = None  # the answer route's text ends at this sentence (evaluation's scope prompts)
    description: str = ""  # which model answers, for the user: "SmolLM2-135M-Instruct + adapter ... (merged)"
    notices: tuple[str, ...] = ()  # one line each: which way prompts are routed, what the sources are
    _banned: list[list[int]] | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_adapter(cls, model: str | None, adapter: str | None, *, settings: GenerationSettings, device="cpu",
                     dtype: torch.dtype = torch.float32, use_gate: bool = True, card_count: int = CARD_COUNT,
                     batch_size: int = GENERATION_BATCH_SIZE, stop_after_sentences: int | None = None) -> AnswerPath:
        """Load the base model with `adapter` merged, the scope gate saved next to it and the run's sources.

        The gate is read first, so a bad gate file fails before the slow model load. Sources are built
        when they are used: with a gate (the emergency and clinician routes) or with cards to show.

        Raises:
            ValueError: (one line) a gate file that is unreadable or was fitted on other weights,
                a card_count below 0; AdapterError / ModelLoadError from the model load.
        """
        if card_count < 0:
            raise ValueError(f"card_count must be 0 (no cards) or a positive number of cards, got {card_count}")
        gate, gate_notice = load_gate(adapter, use_gate)
        net, tokenizer, description = load_for_inference(model, adapter, device, dtype)
        sources = sources_for_adapter(adapter) if gate is not None or card_count else None
        notices = (gate_notice,) + ((sources.notice,) if sources is not None else ())
        return cls(net, tokenizer, gate, settings, sources, card_count, batch_size, stop_after_sentences, description, notices)

    def banned_ids(self) -> list[list[int]]:
        """decline_phrase_ids of the path's tokenizer, encoded once."""
        if self._banned is None:
            self._banned = decline_phrase_ids(self.tokenizer)
        return self._banned

    def decisions(self, questions: Sequence[str], history: Sequence[tuple[str, str]] = ()) -> list[Decision | None]:
        """The gate's decision for each prompt (None each without a gate)."""
        if self.gate is None:
            return [None] * len(questions)
        return self.gate.decide(prompt_features(self.model, self.tokenizer, questions, history))

    # ---- the routing core: the same for answer_many and stream ------------------------------------

    def overrides(self, decision: Decision | None) -> bool:
        """Whether a decline by the model on this prompt is overridden (ScopeGate.overrides); never without a gate."""
        return decision is not None and self.gate is not None and self.gate.overrides(decision)

    def model_caps(self, decision: Decision | None) -> tuple[GenerationSettings, int | None]:
        """The settings and sentence limit the model's own text is generated with on this prompt's route.

        The answer route: the path's. A routed prompt: only what its route reads, the opening
        (at most ROUTED_MAX_NEW_TOKENS tokens and ROUTED_SENTENCES sentences, or the path's own
        limits when lower).
        """
        if decision is None or decision.route == "answer":
            return self.settings, self.stop_after_sentences
        settings = replace(self.settings, max_new_tokens=min(self.settings.max_new_tokens, ROUTED_MAX_NEW_TOKENS))
        return settings, min(ROUTED_SENTENCES, self.stop_after_sentences or ROUTED_SENTENCES)

    def cards_for(self, route: str, question: str) -> tuple[Card, ...]:
        """The training flashcards that go with an answer on this route: up to card_count over the threshold."""
        if self.sources is None or not self.card_count or route not in SOURCE_ROUTES:
            return ()
        return tuple(self.sources.search(question, self.card_count))

    def routed(self, question: str, decision: Decision | None, model_text: str, overridden_by: str | None = None) -> Answer:
        """The Answer for a prompt, given the gate's decision and the model's own text.

        `overridden_by`: the model's second answer, with its decline phrases banned, when its
        first (`model_text`) declined a prompt the gate was sure is medicine.
        """
        if decision is None:
            return Answer(model_text, "answer", None, model_text, cards=self.cards_for("answer", question))
        route, cards = decision.route, self.cards_for(decision.route, question)
        cards_instead = route == "answer" and declined_twice(overridden_by) and bool(cards)  # of a second decline
        if route == "decline":
            text = decline_text(question, model_text)
        elif route == "emergency":
            text = emergency_text(self.sources.nearest_emergency_row(question) if self.sources is not None else None)
        elif route == "clinician":
            text = clinician_text(cards)
        elif cards_instead:
            text = f"{NO_ANSWER_SENTENCE}\n\n{cards_text(list(cards))}"
        else:
            text = model_text if overridden_by is None else overridden_by
        in_text = route == "clinician" or cards_instead
        return Answer(text, route, decision.probability, model_text, overridden_by is not None, cards, in_text)

    # ---- the two callers --------------------------------------------------------------------------

    def answer_many(self, questions: Sequence[str], progress: bool = False) -> list[Answer]:
        """Answer each question on its own (no history), in batches: the model's texts (one batch run
        per distinct cap), then the overrides (one more run), then the routes."""
        decisions = self.decisions(questions)
        caps = [self.model_caps(decision) for decision in decisions]
        model_texts = [""] * len(questions)
        for cap in dict.fromkeys(caps):
            group = [i for i, c in enumerate(caps) if c == cap]
            for index, text in zip(group, self.generate([questions[i] for i in group], cap, progress)):
                model_texts[index] = text
        redo = [i for i, (d, text) in enumerate(zip(decisions, model_texts)) if self.overrides(d) and declines(text)]
        again = dict(zip(redo, self.generate([questions[i] for i in redo], caps[redo[0]], banned=True) if redo else []))
        for index in redo:  # an overridden answer's own text is its declining opening, as in stream
            model_texts[index] = first_sentences(model_texts[index], OVERRIDE_SENTENCES)
        return [self.routed(q, d, text, again.get(i)) for i, (q, d, text) in enumerate(zip(questions, decisions, model_texts))]

    def generate(self, questions: list[str], caps: tuple[GenerationSettings, int | None], progress: bool = False,
                 banned: bool = False) -> list[str]:
        """The model's batched answers under `caps` (model_caps), with the decline phrases banned when `banned`."""
        settings, stop = caps
        return generate_answers(self.model, self.tokenizer, questions, settings, self.batch_size, progress,
                                bad_words_ids=self.banned_ids() if banned else None, stop_after_sentences=stop)

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
        is medicine, the model's opening (OVERRIDE_SENTENCES sentences) is held back until it is
        complete: if it declines, the model answers again with its decline phrases banned, and that
        is streamed once its own opening is known not to decline (else the cards come in one piece).
        The other routes are built from the model's opening, so their text comes in one piece.
        """
        decision = self.decisions([question], history)[0]
        settings, stop = self.model_caps(decision)

        def model_pieces(banned: bool = False) -> Iterator[str]:
            return stream_answer(self.model, self.tokenizer, question, history, settings, max_context_tokens,
                                 bad_words_ids=self.banned_ids() if banned else None)

        pieces, held, declined = model_pieces(), "", None
        if decision is not None and decision.route != "answer":
            model_text = cut(read_until(pieces, stop), stop)
            pieces.close()
            answer = self.routed(question, decision, model_text)
            yield answer.text
            return answer
        if self.overrides(decision):
            held = read_until(pieces, OVERRIDE_SENTENCES)
            if declines(cut(held, stop)):
                pieces.close()
                declined = first_sentences(cut(held, stop), OVERRIDE_SENTENCES)
                pieces = model_pieces(banned=True)
                held = read_until(pieces, OVERRIDE_SENTENCES)  # the second opening is held back too
                answer = self.routed(question, decision, declined, cut(held, stop))
                if answer.cards_in_text:  # it declined again: routed shows the cards instead, in one piece
                    pieces.close()
                    yield answer.text
                    return answer
        text = yield from shown_until(pieces, held, stop)
        return self.routed(question, decision, declined if declined is not None else text,
                           text if declined is not None else None)


def read_until(pieces: Iterator[str], stop: int | None) -> str:
    """The streamed text, read until its `stop`-th sentence has ended (to the end for None); not cut, not closed."""
    text = ""
    for piece in pieces:
        text += piece
        if stop is not None and len(sentence_ends(text)) >= stop:
            break
    return text


def cut(text: str, stop: int | None) -> str:
    """`text` stripped and ended at its `stop`-th sentence, as generate_answers ends a batched answer."""
    return text.strip() if stop is None else first_sentences(text.strip(), stop)


def shown_until(pieces: Iterator[str], held: str, stop: int | None) -> Iterator[str]:
    """Yield `held`, then the pieces, never past the `stop`-th sentence; return the text shown, stripped."""
    text = shown = ""
    for piece in itertools.chain([held], pieces):
        text += piece
        done = stop is not None and len(sentence_ends(text)) >= stop
        visible = first_sentences(text, stop) if done else text
        if len(visible) > len(shown):
            yield visible[len(shown):]
            shown = visible
        if done:
            pieces.close()
            break
    return shown.strip()


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
