"""medlora/scope_gate.py: labels from the one rule, the classifier's fit, its file, routing, features."""

import pytest
import torch

from medlora.scope import is_clinician_referral, is_decline, is_emergency_referral
from medlora.scope_gate import (
    CLINICIAN_SENTENCE,
    DECLINE_ANSWER,
    EMERGENCY_ANSWER,
    GATE_CLASSES,
    GATE_FILE,
    ScopeGate,
    fit_scope_gate,
    label_of,
    prompt_features,
    route,
)


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
    assert gate.predict(features) == labels
    assert gate.save(tmp_path).name == GATE_FILE
    loaded = ScopeGate.load(tmp_path)
    assert loaded.predict(features) == labels
    assert torch.equal(loaded.weight, gate.weight)


def test_a_rare_class_still_gets_predicted_thanks_to_class_weights():
    features = torch.cat([torch.zeros(95, 2), torch.ones(5, 2) * 3]).double() + torch.linspace(0, 0.1, 100).double()[:, None]
    labels = ["answer"] * 95 + ["emergency"] * 5
    assert fit_scope_gate(features, labels).predict(torch.tensor([[3.0, 3.0]], dtype=torch.float64)) == ["emergency"]


def test_bad_labels_and_bad_files_fail_with_one_line(tmp_path):
    with pytest.raises(ValueError, match="unknown gate label 'maybe'"):
        fit_scope_gate(torch.zeros(2, 3, dtype=torch.float64), ["answer", "maybe"])
    (tmp_path / GATE_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable scope gate"):
        ScopeGate.load(tmp_path)


def test_routing_declines_refers_or_keeps_the_model_s_answer():
    assert route("decline", "Paris.") == DECLINE_ANSWER and is_decline(DECLINE_ANSWER)
    assert route("emergency", "Rest.") == EMERGENCY_ANSWER and is_emergency_referral(EMERGENCY_ANSWER)
    assert route("clinician", "Adults often take 200 mg.") == f"Adults often take 200 mg. {CLINICIAN_SENTENCE}"
    assert is_clinician_referral(CLINICIAN_SENTENCE)
    kept = "Ask your clinician or pharmacist."
    assert route("clinician", kept) == kept and route("answer", "Insulin lowers glucose.") == "Insulin lowers glucose."


def test_prompt_features_do_not_depend_on_the_batch(tiny_model, tokenizer):
    questions = ["What is insulin?", "Why is the sky blue, and what makes sunsets red in the evening?"]
    together = prompt_features(tiny_model, tokenizer, questions, batch_size=2)
    alone = torch.cat([prompt_features(tiny_model, tokenizer, [q], batch_size=1) for q in questions])
    assert together.shape == (2, tiny_model.config.hidden_size)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
