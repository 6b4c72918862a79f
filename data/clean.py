"""Turn raw rows into clean question/answer pairs, and report every row dropped and why.

Schemas detected from the columns:
  * `instruction` / `input` / `output` (Medical Meadow): the question is `input`, or `instruction`
    when `input` is empty. The two are never joined ("Answer this question truthfully What is...").
  * `question` / `answer`.
  * `messages`: a list of {"role", "content"} turns; the first user turn and the assistant turn
    after it.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from data.load import DataError

SCHEMAS = {
    "instruction/input/output": ("instruction", "input", "output"),
    "question/answer": ("question", "answer"),
    "messages": ("messages",),
}
MIN_QUESTION_CHARS = 5
MIN_ANSWER_CHARS = 10
BARE_VERDICTS = {"yes", "no", "true", "false"}
DROP_REASONS = ("missing_field", "short_question", "short_answer", "yes_no_answer", "duplicate")


@dataclass(frozen=True)
class QAPair:
    """One clean example. `topic` is empty when the source has none."""

    question: str
    answer: str
    topic: str = ""


@dataclass
class CleaningReport:
    """Rows read, rows dropped per reason, rows kept: nothing is dropped silently."""

    rows_read: int
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def lines(self) -> list[str]:
        reasons = ", ".join(f"{reason} {self.dropped[reason]}" for reason in self.dropped if self.dropped[reason])
        return [
            f"rows read {self.rows_read}, kept {self.kept}, dropped {sum(self.dropped.values())}"
            + (f" ({reasons})" if reasons else "")
        ]


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def normalize(text: str) -> str:
    """Remove NUL and other control characters, NFC-normalize, collapse whitespace runs to one space."""
    text = unicodedata.normalize("NFC", _CONTROL.sub(" ", text))
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") else c for c in text)
    return " ".join(text.split())


def detect_schema(rows: list[dict], source: str) -> str:
    """Name of the schema whose columns the rows have, or a DataError naming what was found."""
    if not rows:
        raise DataError(f"{source}: no rows")
    columns: set[str] = set()
    for row in rows[:100]:
        columns.update(row)
    for name, required in SCHEMAS.items():
        if name == "instruction/input/output":
            if {"input", "output"} <= columns or {"instruction", "output"} <= columns:
                return name
        elif set(required) <= columns:
            return name
    accepted = "; ".join(SCHEMAS)
    raise DataError(f"{source}: columns {sorted(columns)} match no schema; accepted schemas: {accepted}")


def _text(row: dict, key: str) -> str | None:
    value = row.get(key)
    return value if isinstance(value, str) else None


def extract_pair(row: dict, schema: str) -> tuple[str | None, str | None]:
    """The raw (question, answer) of one row, None where the field is missing or not text."""
    if schema == "instruction/input/output":
        question = _text(row, "input")
        if not question or not question.strip():
            question = _text(row, "instruction")
        return question, _text(row, "output")
    if schema == "question/answer":
        return _text(row, "question"), _text(row, "answer")
    turns = row.get("messages")
    if not isinstance(turns, list):
        return None, None
    question = answer = None
    for turn in turns:
        if not isinstance(turn, dict):
            return None, None
        if turn.get("role") == "user" and question is None:
            question = _text(turn, "content")
        elif turn.get("role") == "assistant" and question is not None:
            answer = _text(turn, "content")
            break
    return question, answer


def clean_rows(rows: list[dict], source: str) -> tuple[list[QAPair], CleaningReport]:
    """Normalize, filter and de-duplicate rows; see DROP_REASONS for why a row can go."""
    schema = detect_schema(rows, source)
    report = CleaningReport(rows_read=len(rows), dropped=Counter({reason: 0 for reason in DROP_REASONS}))
    seen: set[tuple[str, str]] = set()
    pairs = []
    for row in rows:
        question, answer = extract_pair(row, schema)
        if question is None or answer is None:
            report.dropped["missing_field"] += 1
            continue
        question, answer = normalize(question), normalize(answer)
        if len(question) < MIN_QUESTION_CHARS:
            reason = "short_question"
        elif answer.lower().strip(" .!") in BARE_VERDICTS:
            reason = "yes_no_answer"
        elif len(answer) < MIN_ANSWER_CHARS:
            reason = "short_answer"
        elif (question, answer) in seen:
            reason = "duplicate"
        else:
            seen.add((question, answer))
            topic = row.get("topic")
            pairs.append(QAPair(question, answer, topic if isinstance(topic, str) else ""))
            continue
        report.dropped[reason] += 1
    report.kept = len(pairs)
    if not pairs:
        raise DataError(f"{source}: every row was filtered out ({report.lines()[0]})")
    return pairs, report
