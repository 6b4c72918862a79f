"""The loss: summed next-token NLL over the answer tokens, per row and per batch, and on held-out rows.

    batch = batch_on_device(examples, [0, 1, 2], pad_id, device)  # input_ids, attention_mask, labels
    nll, target_tokens = plain_answer_nll(model, batch)          # the definition: scalar sum (nats), count
    nll, target_tokens = answer_nll(model, batch)                # the same numbers, computed faster
    loss = nll / target_tokens                                   # the mean answer-token loss

`plain_answer_nll` is the loss as defined; `row_nll` (behind `answer_nll`) is its optimisation,
which tests/medlora/test_loss.py holds equal to it in value and gradients, as it holds
`answer_and_sequence_nll` (evaluation's answer-only and full-sequence sums from one pass). Sums, never means:
train.py divides each micro-batch's sum by the target-token count of the whole optimizer step,
and evaluation pools sums over examples before it divides, so every target token weighs the same
wherever it falls.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from data import IGNORE_INDEX, EncodedExample, collate, micro_batches
from medlora.distributed import SINGLE_PROCESS, World
from medlora.model import expanded_cache, shared_prefix_length


def plain_answer_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The definition: a full forward pass, then cross-entropy of every position's logits against
    the next token, summed over target (answer + EOS) tokens; returns (scalar NLL in nats, count)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [batch, seq, vocab]
    targets = batch["labels"][:, 1:]  # [batch, seq - 1]: position t predicts token t + 1; IGNORE_INDEX elsewhere
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, int((targets != IGNORE_INDEX).sum())


# Below this many shared tokens the prefix is not run separately: its pass is one more call through
# every layer, which a few tokens do not pay for. A round floor, not a tuned value: the embedded
# data's rows share a system prompt several times longer, so any floor well below it acts the same.
MIN_SHARED_PREFIX_TOKENS = 8


def batch_on_device(examples: Sequence[EncodedExample], rows: Sequence[int], pad_id: int, device) -> dict[str, torch.Tensor]:
    """The examples at `rows`, right-padded (data.collate) and moved to `device`: [batch, seq] each."""
    return {name: tensor.to(device) for name, tensor in collate([examples[i] for i in rows], pad_id).items()}


def common_prefix_length(batch: dict[str, torch.Tensor]) -> int:
    """Tokens every row of the batch starts with, leaving at least one real token of each row after them
    (medlora.model.shared_prefix_length on the rows' real tokens).

    Every example starts with the same system prompt (and chat-template header), so rows share a prefix.
    """
    lengths = batch["attention_mask"].sum(dim=1).tolist()  # right-padded: a row's real tokens come first
    return shared_prefix_length([row[:length] for row, length in zip(batch["input_ids"].tolist(), lengths)])


def prefix_before_targets(batch: dict[str, torch.Tensor]) -> int:
    """The common prefix, stopped one token before the earliest target, so no target is predicted from it."""
    first_target = int((batch["labels"] != IGNORE_INDEX).int().argmax(dim=1).min())  # earliest target position
    return max(0, min(common_prefix_length(batch), first_target - 1))


def prefix_then_rest(model, batch: dict[str, torch.Tensor], prefix: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Final hidden states, the first `prefix` tokens (shared by every row) run once for one row.

    Returns (the prefix's [1, prefix, hidden], or None when prefix is 0; the rest's [batch, seq - prefix,
    hidden]). The prefix's keys and values are computed for one row, expanded to the batch, and the
    rest of each row attends to them; gradients flow back through the expansion into the one pass.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if not prefix:
        return None, model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    head = model.model(input_ids=ids[:1, :prefix], use_cache=True)
    cache = expanded_cache(head.cache, ids.shape[0])
    rest = model.model(input_ids=ids[:, prefix:], attention_mask=mask, cache=cache, use_cache=True).last_hidden_state
    return head.last_hidden_state, rest


def row_nll(model, batch: dict[str, torch.Tensor], share_prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`plain_answer_nll` per row, optimised: summed NLL over target (answer + EOS) tokens, and counts.

    Returns ([batch] float32 NLL in nats, differentiable; [batch] int64 counts). A row's sums do not
    depend on the other rows of the batch (padding is masked), which lets evaluation batch examples.

    Two savings that leave the math unchanged (tests/medlora/test_loss.py compares both against
    plain_answer_nll):
      * The shared prompt prefix (system prompt + template header, about half of a short example's
        tokens) runs through the model once per batch instead of once per row (`prefix_then_rest`).
        Only for a prefix of MIN_SHARED_PREFIX_TOKENS or more, and not under activation
        checkpointing (transformers then turns the cache off).
      * The 49,152-way lm_head runs only at positions whose next token is a target: the hidden
        state at position t predicts token t + 1. Prompt and padding positions never reach it.
    """
    ids, labels = batch["input_ids"], batch["labels"]
    prefix = prefix_before_targets(batch) if share_prefix and ids.shape[0] > 1 else 0
    if prefix < MIN_SHARED_PREFIX_TOKENS or model.is_activation_checkpointing:
        prefix = 0
    _, hidden = prefix_then_rest(model, batch, prefix)
    targets = labels[:, prefix + 1 :]  # [batch, seq - prefix - 1]: the token each position predicts
    is_target = targets != IGNORE_INDEX
    logits = model.lm_head(hidden[:, :-1][is_target])  # [targets, vocab]
    token_nll = torch.nn.functional.cross_entropy(logits.float(), targets[is_target], reduction="none")  # [targets]
    row_of_target = is_target.nonzero()[:, 0]  # [targets], row-major like the boolean index above
    sums = torch.zeros(ids.shape[0], dtype=token_nll.dtype, device=token_nll.device).index_add(0, row_of_target, token_nll)
    return sums, is_target.sum(dim=1)


def answer_nll(model, batch: dict[str, torch.Tensor], share_prefix: bool = True) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over every target token of the batch (a scalar), and how many there are."""
    sums, counts = row_nll(model, batch, share_prefix)
    return sums.sum(), int(counts.sum())


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log pi(answer | prompt) of each row: the summed log-probability of its target (answer + EOS) tokens, [batch].

    The negative of `row_nll`'s sums: the SFT loss and the preference loss (medlora/preference.py) read
    one definition, so the completion-only mask (the labels) is defined once.
    """
    return -row_nll(model, batch)[0]


RowNLL = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (model, batch) -> ([batch] summed NLL, [batch] target counts)


@dataclass(frozen=True)
class AnswerLoss:
    """The SFT stage's loss, as medlora.optimizer_step.optimizer_step takes it: for a micro-batch (indices
    into `examples`), the summed answer-token NLL, each row's sum times its topic's weight; for the whole
    step, the weighted target-token count that the step's sum is divided by.

        loss = sum_rows w(topic) * NLL(row) / sum_rows w(topic) * target_tokens(row)

    With every weight 1 (the default) this is the step's mean answer-token NLL. A weight above 1 on
    "out_of_domain" makes each decline token count more without repeating the row (--scope-weight).
    """

    examples: Sequence[EncodedExample]
    pad_id: int
    device: torch.device | str
    topic_weights: dict[str, float] = field(default_factory=dict)  # topic -> weight; topics not named weigh 1
    row_nll: RowNLL = row_nll  # medlora.loss.row_nll, or a benchmark's alternative with the same contract
    stat_names: tuple[str, ...] = ()  # nothing is logged beside the loss

    def weight(self, index: int) -> float:
        return self.topic_weights.get(self.examples[index].topic, 1.0)

    def total(self, batches: Sequence[Sequence[int]]) -> float:
        """What the step's summed loss is divided by: the weighted target tokens of every micro-batch of the step."""
        return float(sum(self.weight(i) * self.examples[i].answer_token_count for rows in batches for i in rows))

    def __call__(self, model, rows: Sequence[int]) -> tuple[torch.Tensor, int, dict[str, float]]:
        """(the micro-batch's weighted summed NLL, its real tokens, no extra statistics)."""
        batch = batch_on_device(self.examples, rows, self.pad_id, self.device)
        sums, _ = self.row_nll(model, batch)
        if self.topic_weights:
            sums = sums * torch.tensor([self.weight(i) for i in rows], dtype=sums.dtype, device=sums.device)
        return sums.sum(), int(batch["attention_mask"].sum()), {}


def full_sequence_labels(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with every non-pad token as a target (system prompt + question + answer).

    This is the reference notebook's perplexity (labels = input_ids, padding ignored). The first
    token of a sequence has nothing before it, so a row of L tokens has L - 1 targets.
    """
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    return {**batch, "labels": labels}


@torch.no_grad()
def heldout_row_nll(
    model,
    examples: Sequence[EncodedExample],
    batches: Sequence[Sequence[int]],
    pad_id: int,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> Iterator[tuple[Sequence[int], torch.Tensor, torch.Tensor]]:
    """For each batch of example indices: (the indices, [batch] summed answer NLL, [batch] target counts).

    No gradients; the model runs on its own device, in whatever train/eval mode the caller set.
    """
    device = next(model.parameters()).device
    for rows in batches:
        batch = batch_on_device(examples, rows, pad_id, device)
        with autocast():
            sums, counts = row_nll(model, batch)
        yield rows, sums, counts


@torch.no_grad()
def answer_and_sequence_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Evaluation's two perplexities from one forward pass: per row, the summed NLL and count of the
    answer (target) tokens, then of every non-pad token after the first (`full_sequence_labels`).

    Returns four [batch] tensors: answer NLL (float32, nats), answer counts, full NLL, full counts.
    The shared prefix runs once (`prefix_then_rest`); here it holds targets of the full sequence, so its
    hidden states are expanded to every row before lm_head, which runs at every non-pad position.
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    prefix = common_prefix_length(batch) if ids.shape[0] > 1 else 0
    head, rest = prefix_then_rest(model, batch, prefix if prefix >= MIN_SHARED_PREFIX_TOKENS else 0)
    hidden = rest if head is None else torch.cat([head.expand(ids.shape[0], -1, -1), rest], dim=1)  # [batch, seq, hidden]
    is_token = mask[:, 1:] == 1  # [batch, seq - 1]: position t predicts token t + 1
    is_answer = labels[:, 1:] != IGNORE_INDEX  # a subset of is_token
    token_nll = torch.zeros(is_token.shape, dtype=torch.float32, device=ids.device)
    logits = model.lm_head(hidden[:, :-1][is_token])  # [tokens, vocab]
    token_nll[is_token] = torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:][is_token], reduction="none")
    return (token_nll * is_answer).sum(dim=1), is_answer.sum(dim=1), token_nll.sum(dim=1), is_token.sum(dim=1)


def validation_loss(
    model, examples: Sequence[EncodedExample], pad_id: int, batch_size: int, max_batch_tokens: int | None, autocast,
    world: World = SINGLE_PROCESS,
) -> float:
    """Answer-token NLL summed over the whole split, divided by its target-token count (nats).

    Examples are batched shortest first, cut as training cuts its micro-batches. Under torchrun
    each rank scores its shard of those batches and the sums are all-reduced, so every rank gets
    the loss of the whole split. The model is put in eval mode (no dropout) for the pass and back
    in train mode after it.
    """
    model.eval()
    lengths = [len(example.input_ids) for example in examples]
    order = sorted(range(len(examples)), key=lambda i: lengths[i])
    mine = world.shard(micro_batches(order, lengths, batch_size, max_batch_tokens))
    nll_sum, count = 0.0, 0
    for _, sums, counts in heldout_row_nll(model, examples, mine, pad_id, autocast=autocast):
        nll_sum, count = nll_sum + sums.sum().item(), count + int(counts.sum())
    model.train()
    nll_sum, count = world.sum(nll_sum, count)
    return nll_sum / count
