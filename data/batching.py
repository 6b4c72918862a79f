"""Length-grouped optimizer steps, token-budget micro-batches, and dynamic padding.

An optimizer step takes `step_examples` examples (micro-batch x gradient accumulation). Examples of
similar length are grouped into the same step, so little of each micro-batch is padding. Within a
step, examples are cut into micro-batches either of a fixed row count or by a padded-token budget
(rows x longest row <= max_tokens). Because the loss of a step is normalized by the step's total
target-token count, how a step is cut into micro-batches does not change its gradient.

The order is a pure function of (seed, epoch), which is what makes resume exact.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from data.format import IGNORE_INDEX, EncodedExample

GROUP_STEPS = 8  # examples are sorted by length within windows of this many steps


def epoch_steps(lengths: Sequence[int], step_examples: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices of every optimizer step of one epoch, length-grouped and shuffled.

    Shuffle all indices, sort by length inside windows of GROUP_STEPS steps, cut into steps, then
    shuffle the steps. The last step of an epoch may be smaller.
    """
    if step_examples <= 0:
        raise ValueError(f"step_examples must be positive, got {step_examples}")
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = step_examples * GROUP_STEPS
    grouped = []
    for start in range(0, len(order), window):
        grouped += sorted(order[start : start + window], key=lambda i: lengths[i])
    steps = [grouped[start : start + step_examples] for start in range(0, len(grouped), step_examples)]
    rng.shuffle(steps)
    return steps


def micro_batches(step: list[int], lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Cut one step's indices into micro-batches.

    With `max_tokens`, rows (longest first) are packed while rows x longest row <= max_tokens, a
    single over-long row still getting a batch of its own; without it, `batch_size` rows each.
    """
    if not max_tokens:
        return [step[i : i + batch_size] for i in range(0, len(step), batch_size)]
    batches: list[list[int]] = []
    current: list[int] = []
    for index in sorted(step, key=lambda i: -lengths[i]):
        longest = lengths[current[0]] if current else lengths[index]
        if current and (len(current) + 1) * longest > max_tokens:
            batches.append(current)
            current = []
        current.append(index)
    return batches + [current] if current else batches


def collate(examples: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels ([batch, seq] each)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of padded positions over all micro-batches: 1 - real tokens / (rows x width)."""
    real = sum(lengths[i] for batch in batches for i in batch)
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches if batch)
    return 1.0 - real / padded if padded else 0.0
