"""A learned scope gate: a linear classifier on the model's own hidden state at the end of the prompt.

    h = the last layer's hidden state (after the final norm) at the prompt's last token   [hidden]
    p(class | prompt) = softmax(W (h - mean) / std + b)        W: [classes x hidden], b: [classes]
    classes: answer (medicine: let the model answer), decline (outside the assistant's scope),
             emergency (send to emergency help first), clinician (a personal dose or diagnosis)

    gate = fit_gate(model, tokenizer, train_rows, validation_rows, "runs/cpu/adapter")   # train.py
    gate = ScopeGate.load("runs/cpu/adapter")       # refused unless fitted on exactly this adapter
    gate.decide(prompt_features(model, tokenizer, ["What is the capital of Australia?"]))
    # -> [Decision(route="decline", probability=0.98)]

Labels come from the training answers through the one rule (medlora.scope): an answer that
declines is a "decline" prompt, one that refers to emergency help an "emergency" prompt, one that
refers to a clinician a "clinician" prompt, anything else "answer". The classifier is a
multinomial logistic regression with an L2 penalty and class weights inversely proportional to
class frequency, fitted by L-BFGS in float64: about a second for a thousand prompts.

Declining a medical question fails a user, so a decline needs confidence: the gate declines only
when p(decline) >= `decline_threshold`, chosen on the validation split as the lowest threshold
that keeps false declines there at or under MAX_VALIDATION_FALSE_DECLINE; below it the prompt is
answered. When the gate routes a prompt to the answer and the model declines it anyway, the
answer path asks the model again (medlora.answer) if p(answer) >= `override_confidence`, chosen
on the validation split the same way from the other side: the lowest threshold at which such
re-answers would lose at most MAX_VALIDATION_LOST_DECLINE of the prompts that should be declined.
The gate is bound to the adapter it was fitted on: its file records the sha256 of that
adapter's weights file, and loading it next to other weights is refused.

The gate only decides; what the user then sees is composed by the answer path (medlora.answer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from data.format import prompt_ids
from lora.adapter_files import WEIGHTS_NAME  # the adapter file a gate is bound to
from medlora.checkpoint import file_sha256
from medlora.model import expanded_cache, prefix_cache, shared_prefix_length
from medlora.scope import is_clinician_referral, is_decline, is_emergency_referral

GATE_CLASSES = ("answer", "decline", "emergency", "clinician")
GATE_FILE = "scope_gate.safetensors"
L2_PENALTY = 1e-3  # on the standardized features' weights; small: the classes separate well
MAX_VALIDATION_FALSE_DECLINE = 0.02  # highest share of the validation split's non-decline prompts the gate may decline
MAX_VALIDATION_LOST_DECLINE = 0.02  # highest share of the validation split's decline prompts the override may re-answer
THRESHOLD_CANDIDATES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)  # p(decline) and p(answer) thresholds tried, lowest first
OVERRIDE_CONFIDENCE = 0.9  # the override's p(answer) in gate files written before it was chosen on validation
FEATURE_BATCH_SIZE = 32  # prompts per forward pass when computing features


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
def prompt_features(model, tokenizer, questions: Sequence[str], history: Sequence[tuple[str, str]] = (),
                    batch_size: int = FEATURE_BATCH_SIZE) -> torch.Tensor:
    """[n, hidden] float64: the last layer's hidden state at each prompt's last token.

    Each prompt is `data.format.prompt_ids(question, history)`, the prompt the model answers. Every
    prompt opens with the same tokens (the system prompt and the template's header, about two
    thirds of a short prompt): they run once, and each batch of prompts attends to their keys and
    values instead of recomputing them. The rest of each prompt is right-padded, so the state is
    read at the prompt's own last position; padding after it cannot affect it (causal attention).
    """
    was_training = model.training
    model.eval()  # no dropout on the LoRA branch while the gate reads the model
    device = next(model.parameters()).device
    prompts = [prompt_ids(tokenizer, question, history) for question in questions]
    shared = shared_prefix_length(prompts)
    prefix = prefix_cache(model, prompts[0][:shared]) if shared else None
    order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]))
    features = torch.empty(len(prompts), model.config.hidden_size, dtype=torch.float64)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        rests = [prompts[i][shared:] for i in rows]
        input_ids = torch.full((len(rows), max(map(len, rests))), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), shared + input_ids.shape[1]), dtype=torch.long)
        for row, rest in enumerate(rests):
            input_ids[row, : len(rest)] = torch.tensor(rest)
            attention_mask[row, : shared + len(rest)] = 1
        cache = expanded_cache(prefix, len(rows)) if prefix is not None else None
        hidden = model.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             cache=cache, use_cache=cache is not None).last_hidden_state  # [rows, rest, hidden]
        last = torch.tensor([len(rest) - 1 for rest in rests], device=device)
        features[rows] = hidden[torch.arange(len(rows), device=device), last].double().cpu()
    model.train(was_training)
    return features


@dataclass(frozen=True)
class Decision:
    """The gate's route for one prompt and its probability."""

    route: str  # one of GATE_CLASSES
    probability: float  # p(route | prompt) by the gate
    p_answer: float  # p(answer | prompt): how sure the gate is that this is medicine


@dataclass
class ScopeGate:
    """Standardization and the linear layer: p = softmax(weight @ ((h - mean) / std) + bias)."""

    mean: torch.Tensor  # [hidden]
    std: torch.Tensor  # [hidden]
    weight: torch.Tensor  # [classes, hidden]
    bias: torch.Tensor  # [classes]
    decline_threshold: float = 0.5  # decline only when p(decline) >= this (chosen on the validation split)
    override_confidence: float = OVERRIDE_CONFIDENCE  # re-ask a model that declines when p(answer) >= this (validation too)
    adapter_sha256: str = ""  # sha256 of the adapter weights file the gate was fitted on
    info: dict = field(default_factory=dict)  # class counts, validation confusion matrix: kept in the file

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """[n, classes] class probabilities of [n, hidden] features."""
        return torch.softmax(((features - self.mean) / self.std) @ self.weight.T + self.bias, dim=1)

    def decide(self, features: torch.Tensor) -> list[Decision]:
        """The most probable class of each prompt, except that a decline under the threshold answers."""
        decisions = []
        for p in self.probabilities(features).tolist():
            best = max(range(len(GATE_CLASSES)), key=lambda k: p[k])
            route = GATE_CLASSES[best]
            if route == "decline" and p[best] < self.decline_threshold:
                route, best = "answer", GATE_CLASSES.index("answer")
            decisions.append(Decision(route, p[best], p[GATE_CLASSES.index("answer")]))
        return decisions

    def overrides(self, decision: Decision) -> bool:
        """Whether a decline by the model on this prompt is overridden: the gate is sure enough it is medicine."""
        return decision.route == "answer" and decision.p_answer >= self.override_confidence

    def save(self, folder: str | Path) -> Path:
        """Write GATE_FILE into `folder` (the adapter folder)."""
        path = Path(folder) / GATE_FILE
        tensors = {"mean": self.mean, "std": self.std, "weight": self.weight, "bias": self.bias}
        metadata = {
            "classes": ",".join(GATE_CLASSES),
            "decline_threshold": repr(self.decline_threshold),
            "override_confidence": repr(self.override_confidence),
            "adapter_sha256": self.adapter_sha256,
            "info": json.dumps(self.info),
        }
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, folder: str | Path) -> ScopeGate:
        """The gate in `folder`; ValueError (one line) if unreadable or fitted on other adapter weights."""
        path = Path(folder) / GATE_FILE
        try:
            tensors = load_file(str(path))
            with open(path, "rb") as file:  # the header: 8-byte length, then JSON with "__metadata__"
                header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
            metadata = header.get("__metadata__", {})
            threshold, info = float(metadata["decline_threshold"]), json.loads(metadata["info"])
            override = float(metadata.get("override_confidence", OVERRIDE_CONFIDENCE))
        except (OSError, ValueError, KeyError, SafetensorError) as error:
            raise ValueError(f"{path}: not a readable scope gate ({error}); refit it with train.py") from None
        if set(tensors) != {"mean", "std", "weight", "bias"} or tensors["weight"].shape[0] != len(GATE_CLASSES):
            raise ValueError(f"{path}: not a scope gate for the classes {', '.join(GATE_CLASSES)}")
        weights = Path(folder) / WEIGHTS_NAME
        if weights.is_file() and file_sha256(weights) != metadata.get("adapter_sha256"):
            raise ValueError(
                f"{path} was fitted on other adapter weights than {weights} (sha256 differs): "
                "train again, or pass --no-scope-gate to use the model alone"
            )
        return cls(**tensors, decline_threshold=threshold, override_confidence=override, adapter_sha256=metadata.get("adapter_sha256", ""), info=info)


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


def choose_decline_threshold(gate: ScopeGate, features: torch.Tensor, labels: Sequence[str]) -> float:
    """The lowest THRESHOLD_CANDIDATES value whose false declines on these (validation) prompts stay
    at or under MAX_VALIDATION_FALSE_DECLINE of the prompts that are not declines; the highest if none does."""
    p_decline = gate.probabilities(features)[:, GATE_CLASSES.index("decline")]
    keep = torch.tensor([label != "decline" for label in labels])
    for threshold in THRESHOLD_CANDIDATES:
        if not keep.any() or (p_decline[keep] >= threshold).double().mean() <= MAX_VALIDATION_FALSE_DECLINE:
            return threshold
    return THRESHOLD_CANDIDATES[-1]


def choose_override_confidence(p_answer: Sequence[float], model_declines: Sequence[bool], decline_prompts: int) -> float:
    """The lowest THRESHOLD_CANDIDATES value at which the override would re-answer at most
    MAX_VALIDATION_LOST_DECLINE of the `decline_prompts` validation prompts that should be declined;
    the highest if none does.

    `p_answer` and `model_declines` describe the validation prompts that should be declined but that
    the gate routes to the answer: the gate's p(answer) for each, and whether the model declines it
    on its own. Those the model declines are lost if the override re-asks them, so each candidate
    costs the ones at or above it. A lower threshold re-answers more of the model's false declines,
    so the lowest that keeps the cost within the bound is taken: the gate's own threshold bounds
    false declines on the same split, this one bounds lost declines.
    """
    lost_at = [p for p, declined in zip(p_answer, model_declines, strict=True) if declined]
    for threshold in THRESHOLD_CANDIDATES:
        if sum(p >= threshold for p in lost_at) <= MAX_VALIDATION_LOST_DECLINE * decline_prompts:
            return threshold
    return THRESHOLD_CANDIDATES[-1]


def confusion_matrix(labels: Sequence[str], routes: Sequence[str]) -> list[list[int]]:
    """[true class][routed class] counts, in GATE_CLASSES order."""
    matrix = [[0] * len(GATE_CLASSES) for _ in GATE_CLASSES]
    for label, routed in zip(labels, routes):
        matrix[GATE_CLASSES.index(label)][GATE_CLASSES.index(routed)] += 1
    return matrix


def gate_labels(examples) -> list[str] | None:
    """The gate class of each example's answer, or None when the rows cannot teach a gate: it needs
    out-of-scope rows (answers that decline) beside rows that are answered. Costs no forward pass."""
    labels = [label_of(example.answer) for example in examples]
    return labels if "decline" in labels and "answer" in labels else None


def fit_gate(model, tokenizer, train_examples, validation_examples, adapter_dir: str | Path,
             model_declines: Callable[[list[str]], list[bool]] | None = None) -> ScopeGate | None:
    """Fit the gate on the training prompts of the model as it is now (the weights saved in
    `adapter_dir`), choose its decline threshold on the validation prompts, record the validation
    confusion matrix and the adapter's sha256. None when the training answers teach no scope
    (see gate_labels); the caller says so.

    `model_declines(questions)`: whether the model declines each question on its own (the answer
    path's judge on its opening). Given, the override confidence is chosen on the validation prompts
    too (choose_override_confidence); it is asked only of the decline prompts the gate would
    answer, a handful. Without it the gate keeps OVERRIDE_CONFIDENCE."""
    labels = gate_labels(train_examples)
    if labels is None:
        return None
    gate = fit_scope_gate(prompt_features(model, tokenizer, [e.question for e in train_examples]), labels)
    counts = {name: labels.count(name) for name in GATE_CLASSES}
    gate.info = {"train_class_counts": counts}
    if validation_examples:
        val_labels = [label_of(example.answer) for example in validation_examples]
        val_features = prompt_features(model, tokenizer, [e.question for e in validation_examples])
        gate.decline_threshold = choose_decline_threshold(gate, val_features, val_labels)
        decisions = gate.decide(val_features)
        routes = [decision.route for decision in decisions]
        gate.info["validation_confusion"] = {"classes": list(GATE_CLASSES), "true_by_routed": confusion_matrix(val_labels, routes)}
        gate.info["validation_accuracy"] = sum(l == r for l, r in zip(val_labels, routes)) / len(val_labels)
        if model_declines is not None:
            missed = [(example.question, decision.p_answer) for example, label, decision
                      in zip(validation_examples, val_labels, decisions) if label == "decline" and decision.route == "answer"]
            declined = model_declines([question for question, _ in missed]) if missed else []
            p_answer = [p for _, p in missed]
            gate.override_confidence = choose_override_confidence(p_answer, declined, val_labels.count("decline"))
            gate.info["override"] = {"decline_prompts": val_labels.count("decline"), "routed_to_answer": len(missed),
                                     "model_declined_p_answer": [round(p, 4) for p, d in zip(p_answer, declined) if d],
                                     "confidence": gate.override_confidence}
    gate.adapter_sha256 = file_sha256(Path(adapter_dir) / WEIGHTS_NAME)
    return gate
