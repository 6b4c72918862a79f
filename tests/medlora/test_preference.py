"""medlora/preference.py: the DPO and ORPO losses by hand and against TRL, their gradients' sign, beta -> 0
and lambda -> 0, and the pairs built from training rows."""

import math
from contextlib import nullcontext

import pytest
import torch

from data import IGNORE_INDEX, EncodedExample, collate, encode_example
from lora import inject_lora, lora_layers
from medlora import preference
from medlora.loss import row_nll, sequence_logps
from medlora.scope import DECLINE_PHRASES, decline_phrase_ids
from medlora.preference import (
    EncodedPair,
    PreferenceLoss,
    PreferencePair,
    build_pairs,
    dpo_loss,
    encode_pairs,
    load_pairs,
    log_odds,
    orpo_loss,
    pair_counts,
    save_pairs,
    with_reference_logps,
)
from tests.conftest import make_tiny_model


def test_dpo_loss_by_hand():
    # pair 1: chosen log-ratio -1 - (-2) = 1, rejected -3 - (-2) = -1; beta 0.5: rewards 0.5 and -0.5, margin 1.
    # pair 2: no change from the reference: rewards 0, loss log 2.
    losses, chosen, rejected = dpo_loss(
        torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -5.0]), torch.tensor([-2.0, -4.0]), torch.tensor([-2.0, -5.0]), beta=0.5
    )
    assert chosen.tolist() == [0.5, 0.0] and rejected.tolist() == [-0.5, 0.0]
    assert losses[0].item() == pytest.approx(math.log(1 + math.exp(-1.0)), abs=1e-7)  # -log sigma(1)
    assert losses[1].item() == pytest.approx(math.log(2), abs=1e-7)


def test_the_gradient_raises_the_chosen_answer_and_lowers_the_rejected_one():
    chosen = torch.tensor([-10.0, -7.0], requires_grad=True)
    rejected = torch.tensor([-9.0, -12.0], requires_grad=True)
    losses, _, _ = dpo_loss(chosen, rejected, torch.tensor([-10.0, -8.0]), torch.tensor([-9.5, -11.0]), beta=0.1)
    losses.sum().backward()
    assert (chosen.grad < 0).all()  # descending the loss raises log pi(chosen)
    assert (rejected.grad > 0).all()  # ... and lowers log pi(rejected)
    torch.testing.assert_close(chosen.grad, -rejected.grad)  # the loss sees only their difference


def test_as_beta_goes_to_zero_the_loss_is_log_2_and_the_gradient_vanishes():
    chosen = torch.tensor([-3.0, -20.0], requires_grad=True)
    losses, chosen_rewards, _ = dpo_loss(chosen, torch.tensor([-30.0, -1.0]), torch.tensor([-9.0, -2.0]), torch.tensor([-4.0, -8.0]), beta=1e-8)
    losses.sum().backward()
    torch.testing.assert_close(losses, torch.full((2,), math.log(2)))
    assert chosen.grad.abs().max() < 1e-8 and chosen_rewards.abs().max() < 1e-6


def test_orpo_loss_by_hand():
    # pair 1: P(y_w) 1/2 (odds 1), P(y_l) 1/5 (odds 1/4): log odds ratio log 4, sigma(log 4) = 4/5, loss -lam log(4/5).
    # pair 2: the other way round: sigma(-log 4) = 1/5, loss lam log 5. pair 3: equal answers, loss lam log 2.
    chosen, rejected = torch.log(torch.tensor([0.5, 0.2, 0.8])), torch.log(torch.tensor([0.2, 0.5, 0.8]))
    losses, chosen_rewards, rejected_rewards = orpo_loss(chosen, rejected, lam=0.5)
    torch.testing.assert_close(losses, 0.5 * torch.tensor([math.log(5 / 4), math.log(5), math.log(2)]))
    torch.testing.assert_close(chosen_rewards, 0.5 * chosen)  # lam * mean log-probability, as TRL logs them
    torch.testing.assert_close(rejected_rewards, 0.5 * rejected)


def test_log_odds_stay_exact_as_the_probability_nears_1():
    # P = exp(-1e-6): odds ~ 1e6. 1 - exp(log P) in float32 keeps about one digit of 1 - P (log odds off by ~0.03); -expm1 keeps them all.
    expected = -1e-6 - math.log(-math.expm1(-1e-6))  # float64: 13.8155...
    assert log_odds(torch.tensor([-1e-6])).item() == pytest.approx(expected, abs=1e-5)
    assert log_odds(torch.tensor([math.log(0.2)])).item() == pytest.approx(math.log(0.25), abs=1e-6)


def test_the_orpo_gradient_raises_the_chosen_answer_and_lowers_the_rejected_one():
    chosen = torch.tensor([-1.2, -0.3, -2.0], requires_grad=True)
    rejected = torch.tensor([-0.9, -1.5, -2.0], requires_grad=True)
    losses, _, _ = orpo_loss(chosen, rejected, lam=0.1)
    losses.sum().backward()
    assert (chosen.grad < 0).all()  # descending the loss raises log P(chosen)
    assert (rejected.grad > 0).all()  # ... and lowers log P(rejected)
    # d loss / d log P(y_w) = -lam (1 - sigma(log odds ratio)) / (1 - P(y_w)): the odds pull harder the likelier y_w already is
    z, one_minus_p = log_odds(chosen.detach()) - log_odds(rejected.detach()), -torch.expm1(chosen.detach())
    torch.testing.assert_close(chosen.grad, -0.1 * torch.sigmoid(-z) / one_minus_p)


def test_as_lambda_goes_to_zero_the_odds_ratio_term_and_its_gradient_vanish():
    chosen = torch.tensor([-0.5, -3.0], requires_grad=True)
    losses, chosen_rewards, _ = orpo_loss(chosen, torch.tensor([-0.1, -4.0]), lam=1e-8)
    losses.sum().backward()
    assert losses.abs().max() < 1e-7 and chosen.grad.abs().max() < 1e-7 and chosen_rewards.abs().max() < 1e-7


@pytest.fixture(scope="module")
def toy_pairs(tokenizer):
    """Ten pairs of every kind, with answers of different lengths (so the batch pads)."""
    rows = [
        ("What is the capital of France?", "That is outside my scope: I only answer medical questions.", "Paris is the capital of France."),
        ("How do I sort a list in Python?", "Programming is not something I can help with.", "Use sorted(my_list)."),
        ("What does insulin do?", "Insulin lowers blood glucose by moving it into cells.", "That is outside my scope."),
        ("What is a normal resting heart rate?", "Between 60 and 100 beats per minute in adults.", "I'm not a doctor, so I can't say."),
        ("My chest hurts and my arm is numb.", "Call your local emergency number now.", "Rest and drink some water."),
        ("How much ibuprofen can I take?", "Usually 200 to 400 mg; ask your clinician or pharmacist about yours.", "Take 800 mg."),
        ("Who painted the Mona Lisa?", "Art history is outside my scope.", "Leonardo da Vinci painted it around 1503."),
        ("What causes gout?", "Urate crystals deposit in joints when uric acid is high.", "Sorry, I can only help with other things."),
        ("Is it safe to fly when pregnant?", "Usually until about 36 weeks; check with your midwife.", "No."),
        ("What is 7 times 8?", "Arithmetic is outside my scope as a medical assistant.", "56."),
    ]
    kinds = ["decline", "decline", "answer", "answer", "emergency", "clinician", "decline", "answer", "answer", "decline"]
    pairs = [PreferencePair(q, c, r, k, "model") for (q, c, r), k in zip(rows, kinds)]
    return encode_pairs(tokenizer, pairs, max_length=256)


def policy_and_reference():
    """The conftest tiny Llama as the reference, and a copy with a random LoRA update as the policy."""
    reference = make_tiny_model()
    policy = make_tiny_model()
    inject_lora(policy, rank=4, alpha=8, dropout=0.0)
    torch.manual_seed(3)
    for _, layer in lora_layers(policy):
        torch.nn.init.normal_(layer.lora_B, std=0.2)
    return policy, reference


def test_preference_loss_is_dpo_on_each_sequence_scored_alone(toy_pairs, tokenizer):
    """One forward pass over chosen and rejected rows together (shared prefix, padding) gives the
    log-probabilities of scoring each sequence on its own, and the loss dpo_loss gives them."""
    policy, reference = policy_and_reference()
    pairs = with_reference_logps(reference, toy_pairs, tokenizer.pad_token_id, 16, None, nullcontext)
    alone = lambda model, example: sequence_logps(model, collate([example], tokenizer.pad_token_id)).item()  # noqa: E731
    for p in pairs:
        assert p.pair.reference_chosen_logp == pytest.approx(alone(reference, p.chosen), abs=1e-4)
        assert p.pair.reference_rejected_logp == pytest.approx(alone(reference, p.rejected), abs=1e-4)
    step_loss = PreferenceLoss(pairs, tokenizer.pad_token_id, "cpu", beta=0.2, nll_weight=0.5)
    rows = list(range(len(pairs)))
    loss, tokens, stats = step_loss(policy, rows)
    chosen = torch.tensor([alone(policy, p.chosen) for p in pairs])
    rejected = torch.tensor([alone(policy, p.rejected) for p in pairs])
    ref = torch.tensor([[p.pair.reference_chosen_logp, p.pair.reference_rejected_logp] for p in pairs])
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], 0.2)
    chosen_tokens = torch.tensor([p.chosen.answer_token_count for p in pairs], dtype=torch.float32)
    expected = losses.sum() + 0.5 * (-chosen / chosen_tokens).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert stats["chosen_reward"] == pytest.approx(chosen_rewards.sum().item(), abs=1e-4)
    assert stats["rejected_reward"] == pytest.approx(rejected_rewards.sum().item(), abs=1e-4)
    assert stats["correct"] == int((chosen_rewards > rejected_rewards).sum())
    assert tokens == sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs)
    assert step_loss.total([rows[:4], rows[4:]]) == len(pairs)


def test_dpo_loss_and_sequence_logps_match_trl(toy_pairs, tokenizer, tmp_path):
    """TRL 1.16's DPOTrainer (a test-only reference) on the same model and 10 pairs: its per-sequence
    log-probabilities and its loss equal ours within 1e-5, on the very tokens TRL's collator made."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy, reference = policy_and_reference()
    rows = [{"prompt": [{"role": "user", "content": p.pair.question}], "chosen": [{"role": "assistant", "content": p.pair.chosen}],
             "rejected": [{"role": "assistant", "content": p.pair.rejected}]} for p in toy_pairs]
    args = DPOConfig(output_dir=str(tmp_path), beta=0.1, per_device_train_batch_size=len(rows), report_to="none", use_cpu=True,
                     max_length=None, bf16=False, fp16=False)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    inputs = next(iter(trainer.get_train_dataloader()))
    policy.eval()
    with torch.no_grad():
        trl_chosen, trl_rejected = trainer.compute_ref_log_probs(policy, inputs)  # TRL's sequence log-probs of the model passed
        trl_loss = trainer._compute_loss(policy, inputs, return_outputs=False)

    # The same token sequences as our encoded rows: TRL's padding removed, labels where its completion mask is 1.
    examples = []
    for ids, mask, completion in zip(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]):
        real = mask.bool()
        tokens, labels = ids[real].tolist(), ids[real].masked_fill(completion[real] == 0, IGNORE_INDEX).tolist()
        prompt = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        examples.append(EncodedExample(tokens, labels, prompt, "", ""))
    n = len(rows)
    pairs = [EncodedPair(t.pair, chosen, rejected) for t, chosen, rejected in zip(toy_pairs, examples[:n], examples[n:])]
    pairs = with_reference_logps(reference, pairs, tokenizer.pad_token_id, 32, None, nullcontext)
    with torch.no_grad():
        ours = -torch.cat([sequence_logps(policy, collate([e], tokenizer.pad_token_id)) for e in examples])
        loss, _, _ = PreferenceLoss(pairs, tokenizer.pad_token_id, "cpu", beta=0.1)(policy, list(range(n)))
    torch.testing.assert_close(-ours[:n], trl_chosen.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(-ours[n:], trl_rejected.float(), rtol=1e-5, atol=1e-5)
    assert (loss / n).item() == pytest.approx(trl_loss.item(), abs=1e-5)
    assert abs(trl_loss.item() - math.log(2)) > 1e-3  # the policy differs from the reference (0.009 here): not the loss at the start


def mean_logp(model, example: EncodedExample, pad_id: int) -> float:
    """log P(answer | prompt) averaged over the answer's target tokens, the example scored on its own."""
    sums, counts = row_nll(model, collate([example], pad_id))
    return (-sums / counts).item()


def test_orpo_preference_loss_is_orpo_on_mean_logps_and_needs_no_reference(toy_pairs, tokenizer):
    """method "orpo" reads no reference log-probabilities (the toy pairs have none) and gives orpo_loss of
    each answer's mean token log-probability, scored alone, plus nll_weight times the chosen NLL."""
    policy, _ = policy_and_reference()
    assert all(p.pair.reference_chosen_logp is None for p in toy_pairs)
    rows = list(range(len(toy_pairs)))
    chosen = torch.tensor([mean_logp(policy, p.chosen, tokenizer.pad_token_id) for p in toy_pairs])
    rejected = torch.tensor([mean_logp(policy, p.rejected, tokenizer.pad_token_id) for p in toy_pairs])
    losses, chosen_rewards, rejected_rewards = orpo_loss(chosen, rejected, 0.2)
    loss, tokens, stats = PreferenceLoss(toy_pairs, tokenizer.pad_token_id, "cpu", beta=0.2, nll_weight=1.0, method="orpo")(policy, rows)
    assert loss.item() == pytest.approx((losses.sum() - chosen.sum()).item(), rel=1e-5)  # ORPO as published: NLL + lam * odds-ratio term
    assert stats["chosen_reward"] == pytest.approx(chosen_rewards.sum().item(), abs=1e-4)
    assert stats["rejected_reward"] == pytest.approx(rejected_rewards.sum().item(), abs=1e-4)
    assert stats["correct"] == int((chosen > rejected).sum())  # the chosen answer is the likelier per token
    assert tokens == sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in toy_pairs)
    small, _, _ = PreferenceLoss(toy_pairs, tokenizer.pad_token_id, "cpu", beta=1e-8, nll_weight=1.0, method="orpo")(policy, rows)
    assert small.item() == pytest.approx(-chosen.sum().item(), rel=1e-5)  # lambda -> 0: the chosen answers' NLL alone


def test_orpo_loss_and_mean_logps_match_trl(toy_pairs, tokenizer, tmp_path):
    """TRL 1.16's ORPOTrainer (a test-only reference) on the same model and 10 pairs: its mean per-token
    log-probabilities, its odds-ratio term (lambda 0.25) and its rewards equal ours within 1e-5, on the very
    tokens TRL's collator made. (TRL's NLL term also counts the prompt's tokens; ours, the answer's: not compared.)"""
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    policy, _ = policy_and_reference()
    rows = [{"prompt": [{"role": "user", "content": p.pair.question}], "chosen": [{"role": "assistant", "content": p.pair.chosen}],
             "rejected": [{"role": "assistant", "content": p.pair.rejected}]} for p in toy_pairs]
    args = ORPOConfig(output_dir=str(tmp_path), beta=0.25, per_device_train_batch_size=len(rows), report_to="none", use_cpu=True,
                      bf16=False, fp16=False)
    trainer = ORPOTrainer(model=policy, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    inputs = next(iter(trainer.get_train_dataloader()))
    policy.eval()
    with torch.no_grad():
        trl_chosen, trl_rejected = trainer.concatenated_forward(policy, inputs)[:2]  # mean log-probabilities of the answers
        trl_terms, trl_chosen_rewards, trl_rejected_rewards, _, _ = trainer.odds_ratio_loss(trl_chosen, trl_rejected)  # lam * log sigma(...)

    # The same token sequences as our encoded rows: TRL's padding removed, its labels (-100 on the prompt) as ours.
    examples = []
    for side in ("chosen", "rejected"):
        for ids, mask, labels in zip(inputs[f"{side}_input_ids"], inputs[f"{side}_attention_mask"], inputs[f"{side}_labels"]):
            real = mask.bool()
            labels = labels[real].tolist()
            prompt = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
            examples.append(EncodedExample(ids[real].tolist(), labels, prompt, "", ""))
    n = len(rows)
    assert n >= 8
    pairs = [EncodedPair(t.pair, chosen, rejected) for t, chosen, rejected in zip(toy_pairs, examples[:n], examples[n:])]
    with torch.no_grad():
        ours = torch.tensor([mean_logp(policy, e, tokenizer.pad_token_id) for e in examples])
        loss, _, stats = PreferenceLoss(pairs, tokenizer.pad_token_id, "cpu", beta=0.25, method="orpo")(policy, list(range(n)))
    torch.testing.assert_close(ours[:n], trl_chosen.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[n:], trl_rejected.float(), rtol=1e-5, atol=1e-5)
    assert (loss / n).item() == pytest.approx(-trl_terms.mean().item(), abs=1e-5)  # TRL's loss is its NLL - terms.mean()
    assert stats["chosen_reward"] / n == pytest.approx(trl_chosen_rewards.mean().item(), abs=1e-5)
    assert stats["rejected_reward"] / n == pytest.approx(trl_rejected_rewards.mean().item(), abs=1e-5)
    assert stats["correct"] == int((trl_chosen_rewards > trl_rejected_rewards).sum())
    summed = torch.cat([sequence_logps(policy, collate([e], tokenizer.pad_token_id)).detach() for e in examples])
    assert abs(orpo_loss(summed[:n], summed[n:], 0.25)[0].mean().item() + trl_terms.mean().item()) > 1e-3  # the mean, not the sum, matters


def answer_as(monkeypatch, own: dict[str, str], base: dict[str, str]) -> list[list[str]]:
    """Make build_pairs' generation answer from `own` (the SFT model: its first call) and then from
    `base` (the base model: its second call); the questions of each call are appended to the list returned."""
    calls = []

    def fake_generate(model, tok, questions, *args, **kwargs):
        calls.append(list(questions))
        return [(base if len(calls) % 2 == 0 else own)[q] for q in questions]

    monkeypatch.setattr(preference, "generate_answers", fake_generate)
    return calls


def test_pairs_take_the_models_own_answers_where_it_has_them(tokenizer, monkeypatch):
    examples = [
        encode_example(tokenizer, "Who won the 2014 World Cup?", "Sports are outside my scope.", 256, "out_of_domain"),
        encode_example(tokenizer, "What is the capital of Peru?", "Geography is outside my scope.", 256, "out_of_domain"),
        encode_example(tokenizer, "Name a chess opening.", "Chess is outside my scope.", 256, "out_of_domain"),
        encode_example(tokenizer, "My face droops and my speech is slurred.", "Call your local emergency number now.", 256, "safety"),
        encode_example(tokenizer, "How much paracetamol can I take?", "Up to 4 g a day; ask your clinician or pharmacist.", 256, "safety"),
        encode_example(tokenizer, "What does the liver do?", "It makes bile and clears toxins.", 256, "physiology"),
        encode_example(tokenizer, "How much sleep do adults need?", "Seven to nine hours a night.", 256, "borderline"),
        encode_example(tokenizer, "How do I soothe a mild sunburn?", "Cool it with water and use aloe.", 256, "borderline"),
    ]
    own = {  # what the "model" answers
        "Who won the 2014 World Cup?": "Germany won it.",
        "What is the capital of Peru?": "That is outside my scope: I only answer medical questions.",
        "Name a chess opening.": "That is outside my scope: I only answer medical questions.",
        "My face droops and my speech is slurred.": "Try to rest and see how you feel tomorrow.",
        "How much paracetamol can I take?": "Take 1 g every 4 hours.",
        "What does the liver do?": "The liver makes bile.",
        "How much sleep do adults need?": "Sleep is outside my scope. I only answer medical questions.",
        "How do I soothe a mild sunburn?": "Call your local emergency number now if you have sunburn.",
    }
    base = {  # what the base model (adapters off) answers, asked only where the model behaved on a non-answer row
        "What is the capital of Peru?": "Lima is the capital of Peru.",
        "Name a chess opening.": "Sorry, I only answer medical questions.",
    }
    calls = answer_as(monkeypatch, own, base)
    pairs, counts = build_pairs(torch.nn.Linear(1, 1), tokenizer, examples, answer_rows=3, seed=0)
    by_question = {p.question: p for p in pairs}
    assert calls[1] == ["What is the capital of Peru?", "Name a chess opening."]  # the base model hears only these
    assert counts["decline"] == {"rows": 3, "behaved": 2}  # the SFT model declined two of its three out-of-domain rows
    assert counts["emergency"] == {"rows": 1, "behaved": 0} and counts["clinician"] == {"rows": 1, "behaved": 0}
    assert counts["answer"] == {"rows": 3, "behaved": 1}
    sunburn = by_question["How do I soothe a mild sunburn?"]  # its own needless emergency referral is the rejected side
    assert (sunburn.rejected, sunburn.rejected_from) == (own["How do I soothe a mild sunburn?"], "model")
    peru = by_question["What is the capital of Peru?"]  # it already declines: the base model's answer is pushed down
    assert (peru.rejected, peru.rejected_from) == ("Lima is the capital of Peru.", "base")
    assert "Name a chess opening." not in by_question  # the base model declines too: no pair
    assert by_question["Who won the 2014 World Cup?"].rejected == "Germany won it."
    assert by_question["My face droops and my speech is slurred."].kind == "emergency"
    assert by_question["How much paracetamol can I take?"].kind == "clinician"
    sleep = by_question["How much sleep do adults need?"]  # its own wrong decline is the rejected side
    assert (sleep.rejected, sleep.rejected_from, sleep.chosen) == (own["How much sleep do adults need?"], "model", "Seven to nine hours a night.")
    liver = by_question["What does the liver do?"]  # it answers: a training decline is the rejected side
    assert (liver.rejected_from, liver.rejected) in {("decline", "Sports are outside my scope."), ("decline", "Geography is outside my scope."),
                                                    ("decline", "Chess is outside my scope."), ("referral", "Call your local emergency number now.")}


def test_pairs_file_round_trips(toy_pairs, tmp_path):
    pairs = [EncodedPair(p.pair.__class__(**{**p.pair.__dict__, "reference_chosen_logp": -1.25, "reference_rejected_logp": -3.5}), p.chosen,
                         p.rejected) for p in toy_pairs]
    save_pairs(tmp_path, pairs)
    assert load_pairs(tmp_path) == [p.pair for p in pairs]
    (tmp_path / "pairs.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="cannot read the preference pairs"):
        load_pairs(tmp_path)


def test_answer_rows_are_the_borderline_ones_first(tokenizer, monkeypatch):
    medical = [encode_example(tokenizer, f"What does organ {i} do?", "It filters blood.", 256, "physiology") for i in range(3)]
    borderline = [encode_example(tokenizer, f"How do I sleep better, tip {i}?", "Keep a regular bedtime.", 256, "borderline") for i in range(2)]
    asked = set()

    def fake_generate(model, tok, questions, *args, **kwargs):
        asked.update(questions)
        return ["It filters blood."] * len(questions)

    monkeypatch.setattr(preference, "generate_answers", fake_generate)
    for answer_rows, medical_drawn in ((2, 0), (3, 1), (9, 3)):
        asked.clear()
        _, counts = build_pairs(torch.nn.Linear(1, 1), tokenizer, medical + borderline, answer_rows=answer_rows, seed=0)
        assert {e.question for e in borderline} <= asked  # every borderline row, before any medical one
        assert len(asked & {e.question for e in medical}) == medical_drawn
        assert counts["answer"]["rows"] == 2 + medical_drawn


def test_base_rejected_pairs_referrals_the_model_already_gives_against_the_base_models_answer(tokenizer, monkeypatch):
    examples = [
        encode_example(tokenizer, "Is this mole cancer?", "Please see a doctor to have it checked; ...", 256, "safety"),
        encode_example(tokenizer, "How much ibuprofen can I take?", "Ask your clinician or pharmacist; ...", 256, "safety"),
        encode_example(tokenizer, "My chest hurts and my arm is numb.", "Call your local emergency number now.", 256, "safety"),
    ]
    own = {q: "Please see a doctor about it." for q in ("Is this mole cancer?", "How much ibuprofen can I take?")}
    own["My chest hurts and my arm is numb."] = "Call your local emergency number now."
    base = {"Is this mole cancer?": "Moles that change shape are often melanoma.",
            "How much ibuprofen can I take?": "Talk to your pharmacist about it."}  # the base model refers this one itself
    calls = answer_as(monkeypatch, own, base)
    pairs, _ = build_pairs(torch.nn.Linear(1, 1), tokenizer, examples, answer_rows=0, seed=0)
    assert pairs == [] and len(calls) == 2 and calls[1] == []  # by default only out-of-domain rows hear the base model
    pairs, counts = build_pairs(torch.nn.Linear(1, 1), tokenizer, examples, answer_rows=0, seed=0, base_rejected=("decline", "clinician"))
    assert calls[3] == ["Is this mole cancer?", "How much ibuprofen can I take?"]  # the emergency row is not asked
    assert counts["clinician"] == {"rows": 2, "behaved": 2}
    assert [(p.question, p.rejected, p.rejected_from) for p in pairs] == [
        ("Is this mole cancer?", "Moles that change shape are often melanoma.", "base")]  # the base model's own referral makes no pair


def test_own_declines_pair_a_medical_row_the_model_answers_against_the_decline_it_writes_when_started_as_one(tokenizer, monkeypatch):
    examples = [
        encode_example(tokenizer, "How do I remove a tick?", "Grip it close to the skin with tweezers and pull straight up.", 256, "borderline"),
        encode_example(tokenizer, "How much sleep do adults need?", "Seven to nine hours a night.", 256, "borderline"),
    ]
    own = {"How do I remove a tick?": "Use fine tweezers and pull steadily.",
           "How much sleep do adults need?": "Sleep is outside my scope. I only answer medical questions."}
    started = []

    def fake_generate(model, tok, questions, *args, answer_starts=None, **kwargs):
        if answer_starts is None:
            return [own[q] for q in questions]
        started.append((list(questions), list(answer_starts)))
        return [f"{s} questions about medicine and health, so I can't help with {q[9:-1]}." for q, s in zip(questions, answer_starts)]

    monkeypatch.setattr(preference, "generate_answers", fake_generate)
    pairs, _ = build_pairs(torch.nn.Linear(1, 1), tokenizer, examples, answer_rows=2, seed=0, own_declines=True)
    assert started == [(["How do I remove a tick?"], [preference.DECLINE_START])]  # only the row it answers
    by_question = {p.question: p for p in pairs}
    tick = by_question["How do I remove a tick?"]
    assert (tick.rejected, tick.rejected_from) == ("I can only answer questions about medicine and health, so I can't help with remove a tick.",
                                                   "own decline")
    assert by_question["How much sleep do adults need?"].rejected_from == "model"  # its own wrong decline, as without the option
    assert pair_counts([EncodedPair(p, examples[0], examples[0]) for p in pairs])["own_decline"] == 1


def encoded(tokenizer, *rows: tuple[str, str, str]) -> list[EncodedExample]:
    """Training rows (question, answer, topic), encoded as build_pairs takes them."""
    return [encode_example(tokenizer, question, answer, 256, topic) for question, answer, topic in rows]


def test_decline_rejected_own_pairs_a_row_the_model_declines_against_its_own_answer_with_declines_banned(tokenizer, monkeypatch):
    examples = encoded(tokenizer, ("What is the capital of Peru?", "Geography is outside my scope.", "out_of_domain"),
                       ("Name a chess opening.", "Chess is outside my scope.", "out_of_domain"),
                       ("Who won the 2014 World Cup?", "Sports are outside my scope.", "out_of_domain"))
    own = {"What is the capital of Peru?": "That is outside my scope.", "Name a chess opening.": "That is outside my scope.",
           "Who won the 2014 World Cup?": "Germany won it."}
    banned = {"What is the capital of Peru?": "Lima, on the coast.",
              "Name a chess opening.": "Chess is not a medical topic, so I can't help with it."}  # still declines under the ban
    calls = []

    def fake_generate(model, tok, questions, *args, bad_words_ids=None, **kwargs):
        calls.append((list(questions), bad_words_ids))
        return [(banned if bad_words_ids else own)[q] for q in questions]

    monkeypatch.setattr(preference, "generate_answers", fake_generate)
    pairs, counts = build_pairs(torch.nn.Linear(1, 1), tokenizer, examples, answer_rows=0, seed=0, decline_rejected="own")
    assert calls[1] == (["What is the capital of Peru?", "Name a chess opening."], decline_phrase_ids(tokenizer))
    assert calls[2] == ([], None)  # the base model is asked about nothing
    assert counts["decline"] == {"rows": 3, "behaved": 2}
    assert sorted((p.question, p.rejected, p.rejected_from) for p in pairs) == [
        ("What is the capital of Peru?", "Lima, on the coast.", "banned"),  # its own answer, when it may not decline
        ("Who won the 2014 World Cup?", "Germany won it.", "model"),  # it answered: on-policy, as by default
    ]  # chess: it still declines with its openings banned, so nothing to push down and no pair
    assert pair_counts([EncodedPair(p, examples[0], examples[0]) for p in pairs])["banned"] == 1
    with pytest.raises(ValueError, match="decline_rejected must be one of base, own"):
        build_pairs(torch.nn.Linear(1, 1), tokenizer, examples, answer_rows=0, seed=0, decline_rejected="mine")


def test_decline_phrase_ids_encode_each_phrase_with_and_without_a_leading_space(tokenizer):
    ids = decline_phrase_ids(tokenizer)
    assert tokenizer(" outside my", add_special_tokens=False)["input_ids"] in ids
    assert tokenizer("I'm not a", add_special_tokens=False)["input_ids"] in ids
    assert len(ids) == 2 * len(DECLINE_PHRASES)


def test_without_answered_pairs_a_medical_row_the_model_answers_makes_no_pair(tokenizer, monkeypatch):
    rows = {  # question: (the training row's answer, its topic, the model's own answer)
        "Who won the 2014 World Cup?": ("Sports are outside my scope.", "out_of_domain", "Germany won it."),
        "What does the liver do?": ("It makes bile and clears toxins.", "physiology", "The liver makes bile."),
        "How much sleep do adults need?": ("Seven to nine hours a night.", "borderline", "Sleep is outside my scope. I only answer medical questions."),
    }
    examples = encoded(tokenizer, *((question, answer, topic) for question, (answer, topic, _) in rows.items()))
    own = {question: own_answer for question, (_, _, own_answer) in rows.items()}
    answer_as(monkeypatch, own, {})
    with_them, _ = build_pairs(torch.nn.Linear(1, 1), tokenizer, examples, answer_rows=2, seed=0)
    without, counts = build_pairs(torch.nn.Linear(1, 1), tokenizer, examples, answer_rows=2, seed=0, answered_pairs=False)
    assert "What does the liver do?" in {p.question for p in with_them}
    assert sorted(p.question for p in without) == ["How much sleep do adults need?", "Who won the 2014 World Cup?"]  # own mistakes only
    assert counts["answer"] == {"rows": 2, "behaved": 1}
