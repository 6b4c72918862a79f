"""The one chat formatter: training, evaluation and chat all build prompts here.

A prompt is the tokenizer's own chat template applied to
    [system prompt, (earlier user/assistant turns), user question]
with the generation prompt appended (with `context`, e.g. flashcards for evaluation's grounding rows, the user turn
is the context, a blank line, then the question), so it is right for any chat model (SmolLM2's ChatML,
TinyLlama's `<|system|>...</s>`). Training appends the answer and its end-of-turn token.

Labels are completion-only: -100 on every prompt token, the token id on every answer token and on
the end-of-turn/EOS token that closes the answer, so the model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

IGNORE_INDEX = -100
SYSTEM_PROMPT = (
    "You are a knowledgeable and accurate medical assistant. Answer medical questions clearly and "
    "concisely based on established medical knowledge. If a question is outside the medical domain, "
    "politely indicate that it is outside your specialty."
)


@dataclass(frozen=True)
class EncodedExample:
    """Token ids and completion-only labels of one example, with its texts for evaluation."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    question: str
    answer: str
    topic: str = ""

    @property
    def answer_token_count(self) -> int:
        return len(self.input_ids) - self.prompt_length


def build_messages(question: str, history: Sequence[tuple[str, str]] = (), context: str = "") -> list[dict]:
    """System prompt, earlier (user, assistant) turns, then the new user question, after `context` if any."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": f"{context}\n\n{question}" if context else question})
    return messages


def prompt_text(tokenizer, question: str, history: Sequence[tuple[str, str]] = (), context: str = "") -> str:
    """The rendered prompt, ending with the template's assistant header."""
    return tokenizer.apply_chat_template(build_messages(question, history, context), tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer, question: str, history: Sequence[tuple[str, str]] = (), context: str = "") -> list[int]:
    """Token ids of the prompt, exactly as inference sees them (`context`: text put before the question)."""
    return tokenizer(prompt_text(tokenizer, question, history, context), add_special_tokens=False)["input_ids"]


def completion_ids(tokenizer, question: str, answer: str) -> list[int]:
    """Token ids of the answer and its end-of-turn token, as the chat template renders them.

    The template renders prompt + answer + closing tokens. Everything after the prompt up to and
    including the first EOS is the completion; what follows it (ChatML's trailing newline) is
    dropped. A template that closes a turn without EOS gets EOS appended.
    """
    messages = build_messages(question) + [{"role": "assistant", "content": answer}]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = prompt_text(tokenizer, question)
    if not full.startswith(prompt):
        raise ValueError("this tokenizer's chat template does not render the prompt as a prefix of the full chat")
    ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return ids[: ids.index(eos) + 1] if eos in ids else ids + [eos]


def encode_example(tokenizer, question: str, answer: str, max_length: int, topic: str = "") -> EncodedExample | None:
    """Prompt + completion ids with completion-only labels, or None when the prompt alone is too long.

    Truncation keeps the whole prompt and cuts the answer to fit `max_length` tokens.
    """
    prompt = prompt_ids(tokenizer, question)
    if len(prompt) >= max_length:
        return None
    completion = completion_ids(tokenizer, question, answer)[: max_length - len(prompt)]
    return EncodedExample(
        input_ids=prompt + completion,
        labels=[IGNORE_INDEX] * len(prompt) + completion,
        prompt_length=len(prompt),
        question=question,
        answer=answer,
        topic=topic,
    )
