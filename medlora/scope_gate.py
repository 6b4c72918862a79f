"""A learned scope gate: a linear classifier on the model's own hidden state at the end of the prompt.

    h = the last layer's hidden state (after the final norm) at the prompt's last token   [hidden]
    p(class | prompt) = softmax(W (h - mean) / std + b)        W: [classes x hidden], b: [classes]
    classes: answer (medicine: let the model answer), decline (outside the assistant's scope),
             emergency (send to emergency help first), clinician (a personal dose or diagnosis)

It is the fallback that issue-level tuning allows when data and training settings alone do not
teach a 135M model where its scope ends. It is reported apart from the model's own behaviour: the
model's answers are the model's; the gate only decides, from the model's own representation of
the prompt, whether to replace or extend an answer (see `route`).

Labels come from the training answers through the one rule (medlora.scope): an answer that
declines is a "decline" prompt, one that refers to emergency help an "emergency" prompt, one that
refers to a clinician a "clinician" prompt, anything else "answer". The classifier is a
multinomial logistic regression with an L2 penalty and class weights inversely proportional to
class frequency, fitted by L-BFGS in float64: about a second for a thousand prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from data.format import prompt_ids
from medlora.scope import is_clinician_referral, is_decline, is_emergency_referral

GATE_CLASSES = ("answer", "decline", "emergency", "clinician")
GATE_FILE = "scope_gate.safetensors"
L2_PENALTY = 1e-3  # on the standardized features' weights; small: the classes separate well
DECLINE_ANSWER = (
    "That question is outside my scope: I only answer medical and health questions. "
    "Ask me about a condition, a medicine, a test or how the body works."
)
EMERGENCY_ANSWER = (
    "Call your local emergency number now. If you can, stay with someone while you wait for help."
)
CLINICIAN_SENTENCE = "For your own dose or diagnosis, ask your clinician or pharmacist."


def label_of(answer: str) -> str:
    """The gate class a training answer teaches, by the one rule of medlora.scope."""
    if is_emergency_referral(answer):
        return "emergency"
    if is_decline(answer):
        return "decline"
    if is_clinician_referral(answer):
        return "clinician"
    return "answer"


@torch.no_grad()
def prompt_features(model, tokenizer, questions: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """[n, hidden] float64: the last layer's hidden state at each prompt's last token.

    Prompts are right-padded, so positions are the prompt's own (0..L-1) and the state is read
    at column L-1 of each row; padding after it cannot affect it (causal attention).
    """
    device = next(model.parameters()).device
    prompts = [prompt_ids(tokenizer, question) for question in questions]
    features = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        longest = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), longest), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        output = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), output_hidden_states=True)
        last = torch.tensor([len(ids) - 1 for ids in batch], device=device)
        hidden = output.hidden_states[-1]  # [batch, longest, hidden]
        features.append(hidden[torch.arange(len(batch), device=device), last].double().cpu())
    return torch.cat(features)


@dataclass
class ScopeGate:
    """Standardization and the linear layer: p = softmax(weight @ ((h - mean) / std) + bias)."""

    mean: torch.Tensor  # [hidden]
    std: torch.Tensor  # [hidden]
    weight: torch.Tensor  # [classes, hidden]
    bias: torch.Tensor  # [classes]

    def predict(self, features: torch.Tensor) -> list[str]:
        logits = ((features - self.mean) / self.std) @ self.weight.T + self.bias
        return [GATE_CLASSES[i] for i in logits.argmax(dim=1).tolist()]

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / GATE_FILE
        tensors = {"mean": self.mean, "std": self.std, "weight": self.weight, "bias": self.bias}
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(path), metadata={"classes": ",".join(GATE_CLASSES)})
        return path

    @classmethod
    def load(cls, folder: str | Path) -> ScopeGate:
        path = Path(folder) / GATE_FILE
        try:
            tensors = load_file(str(path))
        except (OSError, ValueError, SafetensorError) as error:
            raise ValueError(f"{path}: not a readable scope gate ({error})") from None
        if set(tensors) != {"mean", "std", "weight", "bias"} or tensors["weight"].shape[0] != len(GATE_CLASSES):
            raise ValueError(f"{path}: not a scope gate for the classes {', '.join(GATE_CLASSES)}")
        return cls(**tensors)


def fit_scope_gate(features: torch.Tensor, labels: Sequence[str], steps: int = 200) -> ScopeGate:
    """Multinomial logistic regression on standardized features, class-weighted, L2-penalized."""
    unknown = sorted(set(labels) - set(GATE_CLASSES))
    if unknown:
        raise ValueError(f"unknown gate label {unknown[0]!r}; the classes are {', '.join(GATE_CLASSES)}")
    targets = torch.tensor([GATE_CLASSES.index(label) for label in labels])
    counts = torch.bincount(targets, minlength=len(GATE_CLASSES)).double()
    class_weight = torch.where(counts > 0, counts.sum() / (len(GATE_CLASSES) * counts.clamp(min=1)), 0.0)
    mean, std = features.mean(dim=0), features.std(dim=0).clamp(min=1e-6)
    x = (features - mean) / std
    weight = torch.zeros(len(GATE_CLASSES), x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(GATE_CLASSES), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, targets, weight=class_weight) + L2_PENALTY * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    return ScopeGate(mean, std, weight.detach(), bias.detach())


def fit_gate_on_examples(model, tokenizer, examples) -> ScopeGate | None:
    """The gate fitted on `examples` (questions and their training answers), or None when the
    answers teach a single class (a dataset with no out-of-scope or safety rows has nothing to gate)."""
    labels = [label_of(example.answer) for example in examples]
    if len(set(labels)) < 2:
        return None
    return fit_scope_gate(prompt_features(model, tokenizer, [example.question for example in examples]), labels)


def route(decision: str, model_answer: str) -> str:
    """The answer the user sees: the gate's referral or decline, or the model's own answer."""
    if decision == "decline":
        return DECLINE_ANSWER
    if decision == "emergency":
        return EMERGENCY_ANSWER
    if decision == "clinician" and not is_clinician_referral(model_answer):
        return f"{model_answer} {CLINICIAN_SENTENCE}".strip()
    return model_answer
