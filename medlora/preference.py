"""Preference training (DPO or ORPO): the losses, the pairs they learn from, and the reference log-probabilities.

Direct Preference Optimization (Rafailov et al., 2023, arXiv:2305.18290) learns from pairs
(x, y_w, y_l): a prompt, the answer we prefer ("chosen") and one we do not ("rejected"). With pi the
model being trained and pi_ref the frozen model the stage starts from (here: the SFT adapter),

    loss = -log sigma(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

Each log pi(y|x) is one number per sequence, the log-probability summed over the answer tokens
(medlora.loss.sequence_logps: the SFT loss's completion-only mask, defined once). beta * (log pi -
log pi_ref) is an answer's implicit reward; the loss is the logistic loss of the chosen answer's
reward beating the rejected one's, and beta sets how far the model may move from pi_ref to win.
SFT only raises the chosen text; DPO also lowers the rejected text for the same prompt, so it
shows the model what not to say where a decline and an answer look alike.

ORPO (Hong et al., 2024, arXiv:2403.07691), the stage's other loss (--preference-loss orpo), needs no
reference model: it compares the odds of the two answers under pi alone. With log P(y|x) the MEAN
log-probability of the answer's tokens (length-normalised) and odds(y|x) = P(y|x) / (1 - P(y|x)),

    loss = -log P(y_w|x) - lambda * log sigma(log odds(y_w|x) - log odds(y_l|x))

the chosen answer's mean token NLL (PreferenceLoss's nll_weight term) plus lambda times the odds-ratio term.

    pairs, counts = build_pairs(model, tokenizer, train_examples, answer_rows=64, seed=42)
    encoded = encode_pairs(tokenizer, pairs, max_length=512)
    encoded = with_reference_logps(model, encoded, pad_id, ...)      # once, before the first step (DPO only)
    step_loss = PreferenceLoss(encoded, pad_id, device, beta=0.1)    # what optimizer_step takes; method="orpo" for ORPO

The pairs come from the training rows only (never a held-out prompt), with the SFT model's own
answers as the rejected side wherever it has one (on-policy): docs/scope.md says how each kind is
built and why. train.py writes them to the run folder (pairs.jsonl) with their reference
log-probabilities, so a reader can study them and a resumed run reads them back instead of
generating them again (under ORPO the reference log-probabilities stay null).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, replace
from itertools import zip_longest
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from data import EncodedExample, collate, encode_example, micro_batches
from lora import adapters_off
from medlora.generation import GenerationSettings, generate_answers
from medlora.loss import heldout_row_nll, row_nll
from medlora.scope import decline_phrase_ids, is_clinician_referral, is_decline, is_emergency_referral

PAIRS_FILE = "pairs.jsonl"
PREFERENCE_SUMMARY = "preference.json"  # what the SFT model already did on the paired rows, and the pairs per kind
PAIR_KINDS = ("decline", "answer", "emergency", "clinician")  # what the chosen answer does
# The model's own answer is read up to its second sentence: what the scope rule judges (a decline
# or a referral must open the answer) and what the rejected side needs to show the behaviour.
OWN_ANSWER_SENTENCES = 2
OWN_ANSWER_MAX_TOKENS = 24
# How the SFT model of the cpu preset opens most of its own wrong declines of medical training rows
# (87 of try e13's 127, pairs.jsonl): started with it, the model writes the decline it would give.
DECLINE_START = "I can only answer"
PREFERENCE_LOSSES = ("dpo", "orpo")  # the preference stage's losses (--preference-loss)
DECLINE_REJECTED = ("base", "own")  # the rejected side of an out-of-domain row the SFT model already declines (--dpo-decline-rejected)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO loss of each pair, and the chosen and rejected rewards beside it.

        reward(y) = beta * (log pi(y|x) - log pi_ref(y|x))
        loss      = -log sigma(reward(y_w) - reward(y_l))

    Args:
        policy_chosen_logps: [pairs] log pi(y_w|x), summed over the chosen answer's tokens.
        policy_rejected_logps: [pairs] log pi(y_l|x).
        reference_chosen_logps: [pairs] log pi_ref(y_w|x) (no gradient).
        reference_rejected_logps: [pairs] log pi_ref(y_l|x).
        beta: how strongly the rewards are scaled; > 0.

    Returns:
        ([pairs] losses, [pairs] chosen rewards, [pairs] rejected rewards); the rewards are detached,
        for logging. As beta -> 0 every loss -> log 2 and its gradient -> 0.
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def log_odds(logps: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) from log p < 0: log p - log(1 - exp(log p)), with 1 - exp(log p) taken as
    -expm1(log p), which stays exact as p -> 1 (where 1 - exp would cancel to a few bits, or to 0)."""
    return logps - torch.log(-torch.expm1(logps))


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term of each pair, and the chosen and rejected rewards beside it.

        log odds(y) = log P(y|x) - log(1 - P(y|x))
        loss        = -lam * log sigma(log odds(y_w) - log odds(y_l))

    log P(y|x) is the MEAN log-probability of the answer's tokens (ORPO's length-normalised likelihood,
    arXiv:2403.07691), so P is the geometric mean of the token probabilities, in (0, 1). There is no
    reference model: the two answers are compared under the policy alone. ORPO's whole objective is the
    chosen answer's mean token NLL plus this term (PreferenceLoss adds the NLL with its nll_weight).

    Args:
        policy_chosen_logps: [pairs] log P(y_w|x), the mean over the chosen answer's tokens; < 0.
        policy_rejected_logps: [pairs] log P(y_l|x), the mean over the rejected answer's tokens.
        lam: lambda, the weight of the term beside the NLL; > 0.

    Returns:
        ([pairs] losses, [pairs] chosen rewards, [pairs] rejected rewards); the rewards are lam * log P,
        detached, for logging (as TRL's ORPOTrainer logs them). As lam -> 0 every loss and its gradient
        -> 0: what is left of ORPO is SFT on the chosen answers.
    """
    losses = -lam * F.logsigmoid(log_odds(policy_chosen_logps) - log_odds(policy_rejected_logps))
    return losses, lam * policy_chosen_logps.detach(), lam * policy_rejected_logps.detach()


@dataclass(frozen=True)
class PreferencePair:
    """One preference pair, as pairs.jsonl holds it."""

    question: str  # a training row's question
    chosen: str  # the training row's answer
    rejected: str  # the SFT model's own answer, or a training decline (see rejected_from)
    kind: str  # one of PAIR_KINDS: what the chosen answer does
    rejected_from: str  # "model": the SFT model's own answer (on-policy) | "own decline": its decline when started as one | "banned": its answer with its decline openings banned | "base": the base model's | "decline" / "referral": a training row's
    reference_chosen_logp: float | None = None  # log pi_ref(chosen | question), filled before DPO's first step (ORPO: None)
    reference_rejected_logp: float | None = None


def row_kind(example: EncodedExample) -> str:
    """What a training row's answer does (PAIR_KINDS): decline an out-of-domain question, send an
    emergency to help, send a personal dose or diagnosis to a clinician, or answer."""
    if example.topic == "out_of_domain":
        return "decline"
    if example.topic == "safety":
        return "emergency" if is_emergency_referral(example.answer) else "clinician"
    return "answer"


def behaves(kind: str, own_answer: str) -> bool:
    """Whether the model's own answer already does what a row of this kind asks (judged by medlora.scope)."""
    if kind == "decline":
        return is_decline(own_answer)
    if kind == "emergency":
        return is_emergency_referral(own_answer)
    if kind == "clinician":
        return is_clinician_referral(own_answer) or is_emergency_referral(own_answer)
    return not (is_decline(own_answer) or is_emergency_referral(own_answer))


@torch.no_grad()
def build_pairs(
    model, tokenizer, examples: Sequence[EncodedExample], answer_rows: int, seed: int, batch_size: int = 128,
    decline_rows: int | None = None, base_rejected: Sequence[str] = ("decline",), own_declines: bool = False,
    decline_rejected: str = "base", answered_pairs: bool = True,
) -> tuple[list[PreferencePair], dict[str, dict[str, int]]]:
    """Preference pairs from the training rows, and how often the model already behaved, by kind.

    Every safety row, `decline_rows` out-of-domain rows (all when None) and `answer_rows` medical or
    borderline rows, drawn with `seed`, get the model's own greedy answer (up to its second sentence).
    The answer rows are the borderline ones first (lay health questions: the boundary, where the SFT
    model declines most of its own training rows), then medical ones. Then, by the row's kind:

    * decline (out-of-domain): chosen = the row's decline, rejected = the model's answer;
    * emergency: chosen = the referral-first answer, rejected = the model's answer without the referral;
    * clinician (personal dose or diagnosis): chosen = the clinician-first answer, rejected = the model's bare answer;
    * answer (medical, borderline): chosen = the row's answer, rejected = the model's own decline,
      deflection or emergency referral where it makes one, else, in turn, a training row's decline
      or emergency referral (the two ways a small model over-applies what the scope rows teach);
      with `answered_pairs=False`, a row the model already answers makes no pair;
      with `own_declines`, the decline the model itself writes for that question when its answer is
      started with DECLINE_START ("I can only answer questions about medicine and health, so I can't
      help with tick removal."): a rejected side it finds likely, for this very question (try e17 in
      docs/scope.md: it raised false declines, since it shares its template with the chosen declines).

    Where the model already handles a row of a kind in `base_rejected` (by default: declines an
    out-of-domain row), its answer has nothing to push down, so the rejected side is the base
    model's answer (the adapters turned off, lora.adapters_off): what the model said before
    fine-tuning, unless that behaves too. DPO's gradient does not fade on a pair the model already
    ranks right (every pair starts at margin 0 against the reference), so these pairs widen the
    behaviour's margin on prompts it already gets right. With `decline_rejected="own"`, an
    out-of-domain row's rejected side is instead the model's own answer with its decline openings
    banned (medlora.scope.decline_phrase_ids, as the answer path's override writes it): what this
    model says when it does not decline, on-policy in everything but the ban; a row where it still
    declines makes no pair. Other rows the model already gets right
    make no pair: emergency referrals pushed up this way spread to every question (docs/scope.md, e4).

    Returns (pairs, counts): counts[kind] = {"rows": rows of that kind asked, "behaved": how many of
    the model's own answers already did what the row asks} (out-of-domain "behaved" is the diagnostic
    "how many of its own training out-of-domain prompts does the SFT model decline").
    """
    if decline_rejected not in DECLINE_REJECTED:
        raise ValueError(f"decline_rejected must be one of {', '.join(DECLINE_REJECTED)}, got {decline_rejected!r}")
    draw = random.Random(seed)
    answer_pool = [e for e in examples if row_kind(e) == "answer"]
    boundary = [e for e in answer_pool if e.topic == "borderline"]
    medical = [e for e in answer_pool if e.topic != "borderline"]
    drawn = draw.sample(boundary, min(answer_rows, len(boundary)))  # the boundary first: where the SFT model declines
    drawn += draw.sample(medical, min(answer_rows - len(drawn), len(medical)))
    decline_pool = [e for e in examples if row_kind(e) == "decline"]
    if decline_rows is not None and decline_rows < len(decline_pool):
        decline_pool = draw.sample(decline_pool, decline_rows)
    rows = decline_pool + [e for e in examples if row_kind(e) in ("emergency", "clinician")] + drawn
    declines = [(e.answer, "decline") for e in examples if row_kind(e) == "decline"]
    referrals = [(e.answer, "referral") for e in examples if row_kind(e) == "emergency"]
    non_answers = [item for pair in zip_longest(declines, referrals) for item in pair if item is not None]  # (text, source), alternating
    settings = GenerationSettings(max_new_tokens=OWN_ANSWER_MAX_TOKENS)
    was_training = model.training
    model.eval()
    own = generate_answers(model, tokenizer, [e.question for e in rows], settings, batch_size, stop_after_sentences=OWN_ANSWER_SENTENCES)
    behaved = [behaves(row_kind(e), answer) for e, answer in zip(rows, own)]
    ask_base = [e for e, ok in zip(rows, behaved) if ok and row_kind(e) in base_rejected and row_kind(e) != "answer"]
    ask_own = [e.question for e in ask_base if row_kind(e) == "decline"] if decline_rejected == "own" else []
    ask_base = [e for e in ask_base if e.question not in ask_own]
    banned = dict(zip(ask_own, generate_answers(model, tokenizer, ask_own, settings, batch_size, stop_after_sentences=OWN_ANSWER_SENTENCES,
                                                bad_words_ids=decline_phrase_ids(tokenizer)) if ask_own else []))
    with adapters_off(model):
        base = dict(zip((e.question for e in ask_base), generate_answers(
            model, tokenizer, [e.question for e in ask_base], settings, batch_size, stop_after_sentences=OWN_ANSWER_SENTENCES)))
    forced = {}  # question -> the model's own decline of a medical row it answers (own_declines)
    if own_declines:
        answered = [e.question for e, ok in zip(rows, behaved) if ok and row_kind(e) == "answer"]
        forced = dict(zip(answered, generate_answers(model, tokenizer, answered, settings, batch_size, stop_after_sentences=OWN_ANSWER_SENTENCES,
                                                     answer_starts=[DECLINE_START] * len(answered))))
    model.train(was_training)
    pairs: list[PreferencePair] = []
    counts = {kind: {"rows": 0, "behaved": 0} for kind in PAIR_KINDS}
    for example, answer, ok in zip(rows, own, behaved):
        kind = row_kind(example)
        counts[kind]["rows"] += 1
        counts[kind]["behaved"] += int(ok)
        if not ok:
            pairs.append(PreferencePair(example.question, example.answer, answer, kind, "model"))
        elif kind == "answer" and example.question in forced:
            pairs.append(PreferencePair(example.question, example.answer, forced[example.question], kind, "own decline"))
        elif kind == "answer":
            if non_answers and answered_pairs:
                rejected, source = non_answers[len(pairs) % len(non_answers)]
                pairs.append(PreferencePair(example.question, example.answer, rejected, kind, source))
        elif example.question in banned and not behaves(kind, banned[example.question]):
            pairs.append(PreferencePair(example.question, example.answer, banned[example.question], kind, "banned"))
        elif example.question in base and not behaves(kind, base[example.question]):
            pairs.append(PreferencePair(example.question, example.answer, base[example.question], kind, "base"))
    return pairs, counts


@dataclass(frozen=True)
class EncodedPair:
    """A pair's two sequences, encoded like training rows (data.encode_example: completion-only labels)."""

    pair: PreferencePair
    chosen: EncodedExample
    rejected: EncodedExample

    @property
    def length(self) -> int:
        """Padded tokens the pair takes in a micro-batch: two rows of the longer sequence."""
        return 2 * max(len(self.chosen.input_ids), len(self.rejected.input_ids))


def encode_pairs(tokenizer, pairs: Sequence[PreferencePair], max_length: int) -> list[EncodedPair]:
    """Each pair's chosen and rejected answers after its question, with the chat template (pairs whose
    prompt alone exceeds max_length are dropped, as training drops such rows)."""
    encoded = []
    for pair in pairs:
        chosen = encode_example(tokenizer, pair.question, pair.chosen, max_length)
        rejected = encode_example(tokenizer, pair.question, pair.rejected, max_length)
        if chosen is not None and rejected is not None:
            encoded.append(EncodedPair(pair, chosen, rejected))
    return encoded


def with_reference_logps(model, pairs: Sequence[EncodedPair], pad_id: int, batch_size: int, max_batch_tokens: int | None,
                         autocast) -> list[EncodedPair]:
    """The pairs with log pi_ref of both answers, from the model as it is now (eval mode, no dropout).

    One pass over every chosen and rejected sequence before the stage's first step: the reference
    is then never needed again, so no second model is kept in memory.
    """
    sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    lengths = [len(s.input_ids) for s in sequences]
    order = sorted(range(len(sequences)), key=lambda i: lengths[i])
    logps = [0.0] * len(sequences)
    was_training = model.training
    model.eval()
    for rows, sums, _ in heldout_row_nll(model, sequences, micro_batches(order, lengths, batch_size, max_batch_tokens), pad_id, autocast):
        for row, nll in zip(rows, sums.tolist()):
            logps[row] = -nll
    model.train(was_training)
    n = len(pairs)
    return [
        replace(p, pair=replace(p.pair, reference_chosen_logp=logps[i], reference_rejected_logp=logps[n + i]))
        for i, p in enumerate(pairs)
    ]


@dataclass(frozen=True)
class PreferenceLoss:
    """The preference stage's loss, as medlora.optimizer_step.optimizer_step takes it.

    For a micro-batch of pairs (indices into `pairs`): the summed DPO loss (method "dpo": summed answer
    log-probabilities against the pairs' reference ones) or the ORPO odds-ratio term (method "orpo": mean
    token log-probabilities, no reference; `beta` is then ORPO's lambda), plus `nll_weight` times each
    chosen answer's mean token NLL (under DPO an SFT term on the chosen side, as RPO adds,
    arXiv:2404.19733: it keeps DPO from winning by lowering both answers; under ORPO, at 1, the NLL
    term of ORPO's own objective). The step divides by its number of pairs. The chosen and rejected
    rows run through the model in one forward pass.
    """

    pairs: Sequence[EncodedPair]
    pad_id: int
    device: torch.device | str
    beta: float  # DPO's beta, or ORPO's lambda
    nll_weight: float = 0.0
    method: str = "dpo"  # one of PREFERENCE_LOSSES
    stat_names: tuple[str, ...] = field(default=("chosen_reward", "rejected_reward", "correct"))

    def __post_init__(self):
        assert self.method in PREFERENCE_LOSSES, self.method  # the user's value is checked by TrainConfig.validate

    def total(self, batches: Sequence[Sequence[int]]) -> float:
        return float(sum(len(rows) for rows in batches))

    def __call__(self, model, rows: Sequence[int]) -> tuple[torch.Tensor, int, dict[str, float]]:
        """(summed loss of the pairs `rows`, real tokens read, summed rewards and correct preferences)."""
        n = len(rows)
        chosen = [self.pairs[i].chosen for i in rows]
        batch = {k: v.to(self.device) for k, v in collate(chosen + [self.pairs[i].rejected for i in rows], self.pad_id).items()}
        sums, counts = row_nll(model, batch)  # [2 * pairs]: chosen rows first
        if self.method == "orpo":
            mean_logps = -sums / counts  # [2 * pairs]: ORPO's length-normalised log P(y|x)
            losses, chosen_rewards, rejected_rewards = orpo_loss(mean_logps[:n], mean_logps[n:], self.beta)
        else:
            reference = torch.tensor(
                [[self.pairs[i].pair.reference_chosen_logp, self.pairs[i].pair.reference_rejected_logp] for i in rows],
                dtype=sums.dtype, device=sums.device,
            )  # [pairs, 2]
            losses, chosen_rewards, rejected_rewards = dpo_loss(-sums[:n], -sums[n:], reference[:, 0], reference[:, 1], self.beta)
        loss = losses.sum()
        if self.nll_weight:
            loss = loss + self.nll_weight * (sums[:n] / counts[:n]).sum()
        stats = {  # "correct": the chosen answer's reward is the higher (under ORPO: its mean log-probability, so its odds)
            "chosen_reward": chosen_rewards.sum().item(),
            "rejected_reward": rejected_rewards.sum().item(),
            "correct": (chosen_rewards > rejected_rewards).sum().item(),
        }
        return loss, int(batch["attention_mask"].sum()), stats


def save_pairs(run_dir: Path, pairs: Sequence[EncodedPair]) -> None:
    """pairs.jsonl: one PreferencePair per line, reference log-probabilities included (null under ORPO)."""
    with open(Path(run_dir) / PAIRS_FILE, "w", encoding="utf-8") as handle:
        for p in pairs:
            handle.write(json.dumps(asdict(p.pair), ensure_ascii=False) + "\n")


def load_pairs(run_dir: Path) -> list[PreferencePair]:
    """The pairs save_pairs wrote (a resumed run reads them instead of generating them again)."""
    path = Path(run_dir) / PAIRS_FILE
    try:
        return [PreferencePair(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"{path}: cannot read the preference pairs to resume the DPO stage ({error}); start again with --overwrite") from None


def pair_counts(pairs: Sequence[EncodedPair]) -> dict[str, int]:
    """How many pairs of each kind, and how many have the model's own (on_policy), its own started
    decline (own_decline, when there are any), its answer with its declines banned (banned, when
    there are any) or the base model's (base) answer as the rejected side."""
    counts = {kind: sum(p.pair.kind == kind for p in pairs) for kind in PAIR_KINDS}
    counts["on_policy"] = sum(p.pair.rejected_from == "model" for p in pairs)
    counts["base"] = sum(p.pair.rejected_from == "base" for p in pairs)
    for name, source in (("own_decline", "own decline"), ("banned", "banned")):  # the options' sources, when there are any
        if count := sum(p.pair.rejected_from == source for p in pairs):
            counts[name] = count
    return counts

