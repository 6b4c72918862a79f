"""Sample and split: a pure function of the rows and the seed.

train.py and evaluate.py call this with the same rows, N and seed and get the same split, so test
rows are never trained on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Generic, Sequence, TypeVar

from data.load import DataError

Row = TypeVar("Row")
SPLIT_FRACTIONS = (0.85, 0.10, 0.05)  # train / validation / test, as the reference (2,550 / 300 / 150)


@dataclass(frozen=True)
class Splits(Generic[Row]):
    train: list[Row]
    validation: list[Row]
    test: list[Row]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def check_num_examples(num_examples: int | None) -> None:
    """Raise DataError unless `num_examples` is None (all rows) or positive."""
    if num_examples is not None and num_examples <= 0:
        raise DataError(f"--num-examples must be positive, got {num_examples}")


def sample_and_split(rows: Sequence[Row], num_examples: int | None = None, seed: int = 42) -> Splits[Row]:
    """Shuffle with `seed`, keep the first `num_examples` (all when None), split 85 / 10 / 5.

    Sizes: validation = round(0.10 n), test = round(0.05 n), train = the rest; for n = 3,000 that
    is 2,550 / 300 / 150.
    """
    check_num_examples(num_examples)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    sample = [rows[i] for i in order[: num_examples or len(rows)]]
    n = len(sample)
    n_val, n_test = round(SPLIT_FRACTIONS[1] * n), round(SPLIT_FRACTIONS[2] * n)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise DataError(f"{n} examples are too few to split into train / validation / test")
    return Splits(sample[:n_train], sample[n_train : n_train + n_val], sample[n_train + n_val :])


SCOPE_TOPICS = ("out_of_domain", "borderline", "safety")  # rows that teach where the assistant's scope ends


def repeat_scope_rows(rows: list[Row], times: int) -> list[Row]:
    """The training rows with every row of a SCOPE_TOPICS topic repeated `times` times in all.

    Scope rows are a minority of the data, and a small model learns the boundary (decline, answer
    the health-adjacent, refer emergencies) slowly; repeating them is the cheapest lever. Only the
    training split is repeated, so validation and test stay as split. times = 1 returns `rows`.
    """
    return rows + [row for row in rows if getattr(row, "topic", "") in SCOPE_TOPICS] * (times - 1)
