"""load -> clean -> sample and split -> encode: the whole data path in one call."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.clean import CleaningReport, QAPair, clean_rows
from data.format import EncodedExample, encode_example
from data.load import DataError, load_rows
from data.split import Splits, sample_and_split

MIN_MAX_LENGTH = 16  # tokens: room for the chat template's markers and a few words


@dataclass
class PreparedData:
    """Everything the scripts need from the data: examples per split, and the reports."""

    source: str
    cleaning: CleaningReport
    bad_rows: int
    examples: Splits[EncodedExample]
    prompt_too_long: int

    def token_lengths(self) -> list[int]:
        return [len(e.input_ids) for split in (self.examples.train, self.examples.validation, self.examples.test) for e in split]

    def token_length_stats(self) -> dict[str, int]:
        """p50, p95 and max of the encoded lengths (prompt + answer + EOS) over all splits."""
        lengths = np.array(self.token_lengths())
        return {
            "p50": int(np.percentile(lengths, 50)),
            "p95": int(np.percentile(lengths, 95)),
            "max": int(lengths.max()),
        }

    def report_lines(self) -> list[str]:
        lines = [f"[data] {self.source}: " + self.cleaning.lines()[0]]
        if self.bad_rows:
            lines.append(f"[data] skipped {self.bad_rows} unreadable rows (--skip-bad-rows)")
        if self.prompt_too_long:
            lines.append(f"[data] dropped {self.prompt_too_long} examples whose prompt alone exceeds max length")
        sizes = self.examples.sizes()
        stats = self.token_length_stats()
        lines.append(
            f"[data] splits train {sizes['train']} / validation {sizes['validation']} / test {sizes['test']}; "
            f"tokens p50 {stats['p50']}, p95 {stats['p95']}, max {stats['max']}"
        )
        return lines


def check_max_length(max_length: int) -> None:
    """Raise DataError unless `max_length` leaves room for a prompt and an answer."""
    if max_length < MIN_MAX_LENGTH:
        raise DataError(f"--max-length must be at least {MIN_MAX_LENGTH} tokens, got {max_length}")


def prepare_data(
    tokenizer,
    source: str | None = None,
    num_examples: int | None = None,
    seed: int = 42,
    max_length: int = 512,
    skip_bad_rows: bool = False,
) -> PreparedData:
    """Load, clean, sample/split with `seed`, and encode every split with the chat template."""
    check_max_length(max_length)
    raw = load_rows(source, skip_bad_rows=skip_bad_rows)
    pairs, cleaning = clean_rows(raw.rows, raw.source)
    splits = sample_and_split(pairs, num_examples, seed)
    too_long = 0

    def encode(rows: list[QAPair]) -> list[EncodedExample]:
        nonlocal too_long
        encoded = []
        for pair in rows:
            example = encode_example(tokenizer, pair.question, pair.answer, max_length, pair.topic)
            if example is None:
                too_long += 1
            else:
                encoded.append(example)
        return encoded

    examples = Splits(encode(splits.train), encode(splits.validation), encode(splits.test))
    if not examples.train:
        raise DataError(f"{raw.source}: no training example fits --max-length {max_length}")
    return PreparedData(raw.source, cleaning, raw.bad_rows, examples, too_long)


def save_length_histogram(lengths: list[int], path: str, max_length: int) -> None:
    """Histogram PNG of token lengths, like the reference's token_length_distribution.png."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    axes.hist(lengths, bins=40, color="#4477aa")
    axes.axvline(max_length, color="#cc3311", linestyle="--", label=f"max length {max_length}")
    axes.set_xlabel("tokens per example (prompt + answer + EOS)")
    axes.set_ylabel("examples")
    axes.set_title("Token length distribution")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
