"""medlora/scope_gate.py: labels from the one rule, the classifier's fit, its file, routing, features."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from data.format import EncodedExample
from lora.adapter_files import WEIGHTS_NAME
from medlora.checkpoint import file_sha256
from medlora.scope_gate import (
    GATE_CLASSES,
    GATE_FILE,
    OVERRIDE_CONFIDENCE,
    Decision,
    ScopeGate,
    choose_decline_threshold,
    choose_override_confidence,
    confusion_matrix,
    fit_gate,
    fit_scope_gate,
    gate_labels,
    label_of,
    prompt_features,
)


def routes(gate: ScopeGate, features: torch.Tensor) -> list[str]:
    return [decision.route for decision in gate.decide(features)]


@pytest.mark.parametrize(
    "answer, label",
    [
        ("Chess openings are outside my scope; I only answer medical and health questions.", "decline"),
        ("Call your local emergency number now. Chew an aspirin only if told to.", "emergency"),
        ("Typical adult doses vary; ask your clinician or pharmacist about yours.", "clinician"),
        ("A potassium level outside the normal range can cause arrhythmias.", "answer"),
    ],
)
def test_labels_come_from_the_training_answers_through_the_rule(answer, label):
    assert label_of(answer) == label


def test_fit_separates_separable_classes_and_round_trips_through_its_file(tmp_path):
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(len(GATE_CLASSES), 8, generator=generator, dtype=torch.float64) * 5
    labels = [GATE_CLASSES[i % 4] for i in range(80)]
    features = torch.stack([centers[GATE_CLASSES.index(l)] for l in labels]) + torch.randn(80, 8, generator=generator, dtype=torch.float64)
    gate = fit_scope_gate(features, labels)
    assert routes(gate, features) == labels
    assert gate.save(tmp_path).name == GATE_FILE
    loaded = ScopeGate.load(tmp_path)
    assert routes(loaded, features) == labels
    assert torch.equal(loaded.weight, gate.weight)


def test_a_rare_class_still_gets_predicted_thanks_to_class_weights():
    features = torch.cat([torch.zeros(95, 2), torch.ones(5, 2) * 3]).double() + torch.linspace(0, 0.1, 100).double()[:, None]
    labels = ["answer"] * 95 + ["emergency"] * 5
    assert routes(fit_scope_gate(features, labels), torch.tensor([[3.0, 3.0]], dtype=torch.float64)) == ["emergency"]


def test_bad_labels_and_bad_files_fail_with_one_line(tmp_path):
    with pytest.raises(ValueError, match="unknown gate label 'maybe'"):
        fit_scope_gate(torch.zeros(2, 3, dtype=torch.float64), ["answer", "maybe"])
    (tmp_path / GATE_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable scope gate"):
        ScopeGate.load(tmp_path)


def two_class_gate(decline_threshold: float) -> ScopeGate:
    """A hand-made gate on 1-d features: logit(decline) - logit(answer) = 2 h, so p(decline) = sigmoid(2 h)."""
    weight = torch.zeros(len(GATE_CLASSES), 1, dtype=torch.float64)
    weight[GATE_CLASSES.index("decline"), 0] = 2.0
    bias = torch.full((len(GATE_CLASSES),), -50.0, dtype=torch.float64)
    bias[GATE_CLASSES.index("answer")] = bias[GATE_CLASSES.index("decline")] = 0.0
    return ScopeGate(torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64), weight, bias, decline_threshold)


def test_a_decline_under_the_threshold_answers_instead():
    gate = two_class_gate(decline_threshold=0.9)
    features = torch.tensor([[0.5], [2.0]], dtype=torch.float64)  # p(decline) = sigmoid(1) = 0.731, sigmoid(4) = 0.982
    low, high = gate.decide(features)
    assert (low.route, high.route) == ("answer", "decline")
    assert low.probability == pytest.approx(1 - torch.sigmoid(torch.tensor(1.0)).item()) == low.p_answer
    assert high.probability == pytest.approx(torch.sigmoid(torch.tensor(4.0)).item())


def test_the_threshold_is_the_lowest_that_keeps_validation_false_declines_at_most_2_percent():
    gate = two_class_gate(decline_threshold=0.5)
    # 100 medical prompts: 3 of them at p(decline) = sigmoid(2 x 0.5) = 0.73, the rest far below; 5 real declines far above.
    features = torch.tensor([[0.5]] * 3 + [[-3.0]] * 97 + [[3.0]] * 5, dtype=torch.float64)
    labels = ["answer"] * 100 + ["decline"] * 5
    assert choose_decline_threshold(gate, features, labels) == 0.8  # 0.5, 0.6, 0.7 decline 3/100 > 2%
    assert choose_decline_threshold(gate, features[3:], labels[3:]) == 0.5


def test_the_override_confidence_is_the_lowest_that_loses_at_most_2_percent_of_validation_declines():
    # 100 prompts that should be declined; the gate answers four, at p(answer) 0.55, 0.65, 0.75 and 0.97.
    p_answer = [0.55, 0.65, 0.75, 0.97]
    # The model declines the first three on its own, so an override at or under their p(answer) loses them.
    assert choose_override_confidence(p_answer, [True, True, True, False], 100) == 0.6  # 0.5 loses 3 (> 2% of 100), 0.6 two
    assert choose_override_confidence(p_answer, [True, True, True, False], 50) == 0.7  # 2% of 50 is one prompt
    assert choose_override_confidence(p_answer, [False, False, False, False], 100) == 0.5  # the model declines none
    assert choose_override_confidence([], [], 0) == 0.5  # nothing to lose
    assert choose_override_confidence([0.995] * 3, [True] * 3, 10) == 0.99  # none keeps the bound: the highest
    with pytest.raises(ValueError):
        choose_override_confidence([0.6], [True, False], 10)  # one flag per prompt


def test_the_gate_overrides_only_answer_routes_at_its_confidence():
    gate = two_class_gate(0.5)
    gate.override_confidence = 0.8
    assert gate.overrides(Decision("answer", 0.85, 0.85)) and not gate.overrides(Decision("answer", 0.75, 0.75))
    assert not gate.overrides(Decision("decline", 0.9, 0.05))


def test_confusion_matrix_counts_true_class_by_route():
    matrix = confusion_matrix(["answer", "answer", "decline"], ["answer", "decline", "decline"])
    assert matrix[0][:2] == [1, 1] and matrix[1][:2] == [0, 1] and sum(map(sum, matrix)) == 3


def test_the_gate_is_bound_to_its_adapter_file(tmp_path):
    (tmp_path / WEIGHTS_NAME).write_bytes(b"weights one")
    gate = two_class_gate(0.7)
    gate.adapter_sha256 = file_sha256(tmp_path / WEIGHTS_NAME)
    gate.info = {"train_class_counts": {"answer": 3, "decline": 2}}
    gate.save(tmp_path)
    gate.override_confidence = 0.6
    gate.save(tmp_path)
    loaded = ScopeGate.load(tmp_path)
    assert loaded.decline_threshold == 0.7 and loaded.info == gate.info and loaded.adapter_sha256 == gate.adapter_sha256
    assert loaded.override_confidence == 0.6
    (tmp_path / WEIGHTS_NAME).write_bytes(b"weights two")
    with pytest.raises(ValueError, match="fitted on other adapter weights"):
        ScopeGate.load(tmp_path)


def test_a_gate_file_from_before_the_override_was_chosen_keeps_the_old_confidence(tmp_path):
    gate = two_class_gate(0.7)
    gate.save(tmp_path)
    path = tmp_path / GATE_FILE
    tensors, metadata = load_file(str(path)), safe_open(str(path), "pt").metadata()
    del metadata["override_confidence"]
    save_file(tensors, str(path), metadata=metadata)
    assert ScopeGate.load(tmp_path).override_confidence == OVERRIDE_CONFIDENCE == 0.9


def example(question: str, answer: str) -> EncodedExample:
    return EncodedExample([1, 2], [-100, 2], 1, question, answer)


def test_rows_without_declines_make_no_gate_and_cost_no_forward_pass():
    medical_only = [example("What is insulin?", "A hormone."), example("Dose?", "Ask your clinician or pharmacist.")]
    assert gate_labels(medical_only) is None
    assert fit_gate(None, None, medical_only, [], "unused") is None  # a forward pass on model None would raise


def test_fit_gate_records_counts_confusion_threshold_and_adapter(tiny_model, tokenizer, tmp_path):
    (tmp_path / WEIGHTS_NAME).write_bytes(b"adapter")
    rows = [example(f"What does organ {i} do?", "It filters blood.") for i in range(6)]
    rows += [example(f"Who won match {i}?", "Sports are outside my scope; I only answer medical questions.") for i in range(6)]
    gate = fit_gate(tiny_model, tokenizer, rows, rows[:2] + rows[-2:], tmp_path)
    assert gate.info["train_class_counts"] == {"answer": 6, "decline": 6, "emergency": 0, "clinician": 0}
    assert sum(map(sum, gate.info["validation_confusion"]["true_by_routed"])) == 4
    assert gate.decline_threshold in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
    assert gate.adapter_sha256 == file_sha256(tmp_path / WEIGHTS_NAME)
    assert "override" not in gate.info and gate.override_confidence == OVERRIDE_CONFIDENCE  # no model_declines given


def test_fit_gate_chooses_the_override_on_the_decline_prompts_it_would_answer(tiny_model, tokenizer, tmp_path):
    (tmp_path / WEIGHTS_NAME).write_bytes(b"adapter")
    rows = [example(f"What does organ {i} do?", "It filters blood.") for i in range(6)]
    rows += [example(f"Who won match {i}?", "Sports are outside my scope; I only answer medical questions.") for i in range(6)]
    asked = []

    def model_declines(questions):
        asked.extend(questions)
        return [True] * len(questions)

    gate = fit_gate(tiny_model, tokenizer, rows, rows[:2] + rows[-2:], tmp_path, model_declines=model_declines)
    validation = rows[:2] + rows[-2:]
    decisions = gate.decide(prompt_features(tiny_model, tokenizer, [e.question for e in validation]))
    missed = [e.question for e, d in zip(validation, decisions) if label_of(e.answer) == "decline" and d.route == "answer"]
    assert asked == missed  # only the decline prompts the gate would answer are asked
    assert gate.info["override"]["routed_to_answer"] == len(missed) and gate.info["override"]["decline_prompts"] == 2
    expected = choose_override_confidence([d.p_answer for e, d in zip(validation, decisions) if e.question in missed], [True] * len(missed), 2)
    assert gate.override_confidence == gate.info["override"]["confidence"] == expected


def test_prompt_features_do_not_depend_on_the_batch(tiny_model, tokenizer):
    questions = ["What is insulin?", "Why is the sky blue, and what makes sunsets red in the evening?"]
    together = prompt_features(tiny_model, tokenizer, questions, batch_size=2)
    alone = torch.cat([prompt_features(tiny_model, tokenizer, [q], batch_size=1) for q in questions])
    assert together.shape == (2, tiny_model.config.hidden_size)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
