"""medlora/loss.py: the optimized answer-token NLL against its definition (plain_answer_nll), the
shared prefix, and the held-out passes built on it."""

from contextlib import nullcontext
from dataclasses import replace

import pytest
import torch

from data import clean_rows, collate, encode_example, load_rows
from lora import inject_lora, lora_layers, lora_parameters
from medlora.loss import (
    AnswerLoss, answer_and_sequence_nll, answer_nll, common_prefix_length, full_sequence_labels, plain_answer_nll, prefix_before_targets,
    row_nll, validation_loss,
)
from tests.conftest import make_tiny_model


@pytest.fixture(scope="module")
def examples(tokenizer):
    pairs, _ = clean_rows(load_rows(None).rows[:40], "embedded")
    return [encode_example(tokenizer, p.question, p.answer, 512) for p in pairs[:16]]


def lora_model_with_random_B():
    model = make_tiny_model()
    inject_lora(model, dropout=0.0)
    torch.manual_seed(1)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    return model.train()


@pytest.mark.parametrize("share_prefix", [True, False])
def test_optimized_loss_and_gradients_equal_the_plain_definition(examples, tokenizer, share_prefix):
    batch = collate(examples[:6], tokenizer.pad_token_id)
    assert prefix_before_targets(batch) > 30  # the system prompt is shared
    model = lora_model_with_random_B()
    reference, reference_count = plain_answer_nll(model, batch)
    reference.backward()
    reference_grads = [p.grad.clone() for p in lora_parameters(model)]
    model.zero_grad()
    nll, count = answer_nll(model, batch, share_prefix=share_prefix)
    nll.backward()
    assert count == reference_count == sum(e.answer_token_count for e in examples[:6])
    assert abs(nll.item() - reference.item()) / count <= 1e-5
    for ours, theirs in zip((p.grad for p in lora_parameters(model)), reference_grads):
        assert (ours - theirs).abs().max() <= 1e-5 * max(1.0, theirs.abs().max().item())


def test_shared_prefix_stops_before_the_first_target(examples, tokenizer):
    batch = collate([examples[0], examples[0]], tokenizer.pad_token_id)  # identical rows share everything
    assert prefix_before_targets(batch) == examples[0].prompt_length - 1


def test_one_pass_gives_each_rows_answer_and_full_sequence_nll(examples, tokenizer):
    # Evaluation's single pass against the definition, row by row: plain_answer_nll on the row's own
    # labels, and on full_sequence_labels (every non-pad token after the first is a target).
    batch = collate(examples[:5], tokenizer.pad_token_id)
    assert common_prefix_length(batch) > 30 and len(set(batch["attention_mask"].sum(dim=1).tolist())) > 1  # shared, padded
    model = lora_model_with_random_B().eval()
    answer, answer_count, full, full_count = answer_and_sequence_nll(model, batch)
    with torch.no_grad():
        for row in range(5):
            one = {name: tensor[row : row + 1] for name, tensor in batch.items()}
            for (nll, count), (ours, our_count) in (
                (plain_answer_nll(model, one), (answer[row], answer_count[row])),
                (plain_answer_nll(model, full_sequence_labels(one)), (full[row], full_count[row])),
            ):
                assert our_count == count
                assert ours.item() == pytest.approx(nll.item(), rel=1e-5)
    assert full_count.tolist() == [len(e.input_ids) - 1 for e in examples[:5]]


def test_validation_loss_pools_the_split_however_it_is_batched(examples, tokenizer):
    model = lora_model_with_random_B()
    loss = validation_loss(model, examples, tokenizer.pad_token_id, 16, None, nullcontext)
    assert model.training  # put back in train mode after the pass
    with torch.no_grad():
        nll, count = answer_nll(model, collate(examples, tokenizer.pad_token_id))
    assert loss == pytest.approx(nll.item() / count, rel=1e-5)  # summed NLL / target tokens of the whole split
    assert validation_loss(model, examples, tokenizer.pad_token_id, 2, None, nullcontext) == pytest.approx(loss, rel=1e-5)
    assert validation_loss(model, examples, tokenizer.pad_token_id, 1, 600, nullcontext) == pytest.approx(loss, rel=1e-5)


def test_topic_weights_scale_each_rows_nll_and_the_steps_token_total(examples, tokenizer):
    rows = [replace(e, topic="borderline" if i % 2 else "physiology") for i, e in enumerate(examples[:4])]
    model = lora_model_with_random_B()
    plain, weighted = AnswerLoss(rows, tokenizer.pad_token_id, "cpu"), AnswerLoss(rows, tokenizer.pad_token_id, "cpu", {"borderline": 3.0})
    with torch.no_grad():
        sums, _ = row_nll(model, collate(rows, tokenizer.pad_token_id))
        plain_sum, weighted_sum = plain(model, [0, 1, 2, 3])[0].item(), weighted(model, [0, 1, 2, 3])[0].item()
    assert plain_sum == pytest.approx(sums.sum().item(), rel=1e-5)
    assert weighted_sum == pytest.approx((sums[0] + 3 * sums[1] + sums[2] + 3 * sums[3]).item(), rel=1e-5)  # borderline rows count 3 times
    tokens = [e.answer_token_count for e in rows]
    assert weighted.total([[0, 1], [2, 3]]) == tokens[0] + 3 * tokens[1] + tokens[2] + 3 * tokens[3]  # and so do their tokens in the mean
