"""medlora/optimizer_step.py: one step over micro-batches equals one step over the whole batch; only
the adapters move; a non-finite loss leaves the weights as they were."""

from contextlib import nullcontext

import pytest
import torch

from data import clean_rows, encode_example, load_rows
from lora import inject_lora, lora_parameters
from medlora.loss import AnswerLoss, row_nll
from medlora.optimizer_step import optimizer_step
from tests.conftest import make_tiny_model


@pytest.fixture(scope="module")
def examples(tokenizer):
    pairs, _ = clean_rows(load_rows(None).rows[:20], "embedded")
    return [encode_example(tokenizer, p.question, p.answer, 512) for p in pairs[:8]]


def lora_model_and_optimizer():
    model = make_tiny_model()
    inject_lora(model, dropout=0.0)
    model.train()
    optimizer = torch.optim.SGD(lora_parameters(model), lr=0.1)  # linear in the gradient, so equal steps compare closely
    return model, optimizer


def take_step(model, optimizer, examples, tokenizer, batches, loss_fn=row_nll):
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step_loss = AnswerLoss(examples, tokenizer.pad_token_id, "cpu", row_nll=loss_fn)
    return optimizer_step(model, optimizer, scaler, step_loss, batches, nullcontext, 1.0)


def test_four_micro_batches_take_the_step_of_one_batch(examples, tokenizer):
    whole, whole_optimizer = lora_model_and_optimizer()
    split, split_optimizer = lora_model_and_optimizer()
    one = take_step(whole, whole_optimizer, examples, tokenizer, [list(range(8))])
    four = take_step(split, split_optimizer, examples, tokenizer, [[0, 1], [2, 3], [4, 5], [6, 7]])
    assert four.loss == pytest.approx(one.loss, rel=1e-5)
    assert four.grad_norm == pytest.approx(one.grad_norm, rel=1e-4)
    assert four.tokens == one.tokens  # real (non-pad) tokens, however the step is cut
    for a, b in zip(lora_parameters(whole), lora_parameters(split)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_only_the_adapters_change_and_the_gradients_are_zeroed(examples, tokenizer):
    model, optimizer = lora_model_and_optimizer()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    outcome = take_step(model, optimizer, examples, tokenizer, [[0, 1, 2, 3]])
    assert not outcome.skipped and outcome.loss > 0
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name for name in changed)
    assert all(p.grad is None for p in model.parameters())


def test_a_nan_loss_skips_the_update(examples, tokenizer):
    model, optimizer = lora_model_and_optimizer()
    before = [p.detach().clone() for p in lora_parameters(model)]

    def nan_loss(model, batch):
        sums, counts = row_nll(model, batch)
        return sums * float("nan"), counts

    outcome = take_step(model, optimizer, examples, tokenizer, [[0, 1]], loss_fn=nan_loss)
    assert outcome.skipped
    assert all(torch.equal(p, b) for p, b in zip(lora_parameters(model), before))
