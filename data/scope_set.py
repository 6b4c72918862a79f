"""The held-out scope set: prompts that training never sees, and what a good answer does with each.

    prompts = load_heldout()            # data/scope_heldout.jsonl, in file order
    prompts[0].kind                     # "out_of_domain", "medical", "emergency" or "personal_dose"

Each line of the file is one JSON object: {"question": str, "kind": one of KINDS, "category": str,
"wording": "textbook" | "lay"} (wording required for medical prompts). medlora.scope judges the
answers; medlora.evaluation counts the rates.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

HELDOUT_PATH = Path(__file__).with_name("scope_heldout.jsonl")
KINDS = ("out_of_domain", "medical", "emergency", "personal_dose")  # the `kind` of a held-out prompt
WORDINGS = ("textbook", "lay")  # the `wording` of a held-out prompt; required for kind "medical"


@dataclass(frozen=True)
class HeldoutPrompt:
    """One held-out prompt and what a good answer does with it."""

    question: str  # the user's message
    kind: str  # one of KINDS: decline it, answer it, or refer the user on
    category: str  # subject, e.g. "astronomy", "pharmacology", "chest_pain"
    wording: str | None = None  # one of WORDINGS; given for every medical prompt


_FIELDS = {"question", "kind", "category", "wording"}


def _parse_prompt(line: str) -> HeldoutPrompt:
    """One JSON line -> HeldoutPrompt; ValueError saying what is wrong (without the location)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    unknown = sorted(set(row) - _FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_FIELDS))}")
    for name in ("question", "kind", "category"):
        if not isinstance(row.get(name), str) or not row[name].strip():
            raise ValueError(f"field {name!r} must be a non-empty string")
    if row["kind"] not in KINDS:
        raise ValueError(f"kind {row['kind']!r} is not one of {', '.join(KINDS)}")
    wording = row.get("wording")
    if wording is None and row["kind"] == "medical":
        raise ValueError(f"a medical prompt needs a wording ({' or '.join(WORDINGS)})")
    if wording is not None and wording not in WORDINGS:
        raise ValueError(f"wording {wording!r} is not one of {', '.join(WORDINGS)}")
    return HeldoutPrompt(row["question"], row["kind"], row["category"], wording)


def question_key(question: str) -> str:
    """A question with case, punctuation and whitespace removed: equal keys = the same question."""
    return "".join(re.findall(r"[^\W_]+", question.lower()))


def load_heldout(path: str | Path | None = None) -> list[HeldoutPrompt]:
    """Read the held-out scope set, one JSON object per line.

    Each line: {"question": str, "kind": one of KINDS, "category": str, "wording": "textbook" |
    "lay"} (wording required for medical prompts, optional otherwise). Blank lines are skipped.

    Args:
        path: the JSON-lines file; default `data/scope_heldout.jsonl`.

    Returns:
        The prompts in file order.

    Raises:
        ValueError: one line naming the file, the line number and the problem (bad JSON, a missing
            or unknown field, a kind or wording not allowed, a repeated question), or a missing or
            empty file.
    """
    path = Path(path) if path is not None else HELDOUT_PATH
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read the held-out scope set {path}: {error}") from None
    prompts: list[HeldoutPrompt] = []
    first_line_of: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            prompt = _parse_prompt(line)
        except ValueError as error:
            raise ValueError(f"{path}:{number}: {error}") from None
        key = question_key(prompt.question)
        if key in first_line_of:
            raise ValueError(f"{path}:{number}: question repeats line {first_line_of[key]}: {prompt.question!r}")
        first_line_of[key] = number
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no prompts in the held-out scope set")
    return prompts
