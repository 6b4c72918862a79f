"""One evaluation: the held-out split, each model's perplexity statistics and answers, the report.

    evaluation = run_evaluation(settings)   # settings from medlora.evaluation.settings
    evaluation.report                       # {"settings", "base"?, "finetuned"?, "delta"?}
"""

from __future__ import annotations

import gc
import itertools
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from data import EncodedExample, micro_batches, prepare_data
from data.scope_set import HeldoutPrompt, load_heldout
from medlora.evaluation.cache import cache_key, cache_path, read_cached, write_cached
from medlora.evaluation.grounding import GroundingOutputs, grounding_outputs, grounding_report
from medlora.evaluation.scores import METRICS, ExampleNlls, ModelOutputs, paired_deltas, scope_outcomes, summarize
from medlora.evaluation.settings import NON_MEDICAL_TOPICS, SCOPE_SENTENCES, EvalSettings
from medlora.answer import CARD_COUNT, AnswerPath
from medlora.loss import answer_and_sequence_nll, batch_on_device
from medlora.metrics import rouge_scores
from medlora.model import TORCH_DTYPES, choose_device, load_tokenizer, resolve_precision
from medlora.scope_gate import GATE_CLASSES, label_of
from medlora.sources import sources_for_adapter

GROUNDING_CARDS = 2  # flashcards put before the question for the grounded row (docs/sources.md)


@torch.no_grad()
def example_nlls(
    model, examples: list[EncodedExample], pad_id: int, progress: bool = False, max_batch_tokens: int = 2048
) -> ExampleNlls:
    """Summed NLL (nats) and target-token count of each example, answer-only and full-sequence.

    Examples are batched longest first under a padded-token budget (data.micro_batches), and
    medlora.loss.answer_and_sequence_nll keeps each example's sums apart (both from one forward pass
    per batch, the system-prompt prefix run once), so the split's perplexity is exp(sum of NLL / sum
    of tokens) over any set of examples (a bootstrap resample included), never a mean of per-batch
    perplexities.
    """
    lengths = [len(example.input_ids) for example in examples]
    device = next(model.parameters()).device
    sums = ExampleNlls.zeros(len(examples))
    with tqdm(total=len(examples), desc="perplexity", unit="example", disable=not progress) as bar:
        for rows in micro_batches(list(range(len(examples))), lengths, 1, max_batch_tokens):
            batch = batch_on_device(examples, rows, pad_id, device)
            answer_nll, answer_tokens, full_nll, full_tokens = answer_and_sequence_nll(model, batch)
            for part, nll, tokens in ((sums.answer, answer_nll, answer_tokens), (sums.full, full_nll, full_tokens)):
                part.nll[rows], part.tokens[rows] = nll.double().cpu().numpy(), tokens.double().cpu().numpy()
            bar.update(len(rows))
    return sums


def evaluate_model(
    path: AnswerPath, examples: list[EncodedExample], scope_prompts: list[HeldoutPrompt], settings: EvalSettings,
    progress: bool = True,
) -> tuple[ModelOutputs, ModelOutputs | None]:
    """Perplexity statistics and answers on the medical split rows; answers to the held-out scope prompts.

    Every answer comes from the answer path (medlora.answer), the one chat answers through. The
    split rows are answered by the model alone. The scope prompts are answered once, through the
    path's gate when it has one: the model's own answers make the model-only outputs, the answers
    the user gets (routed by the gate) the second, scope-only outputs (None without a gate). Scope
    answers use settings.scope_generation (max_new_tokens capped at SCOPE_MAX_NEW_TOKENS) and end at
    their SCOPE_SENTENCES-th sentence.
    """
    started = time.perf_counter()
    nll = example_nlls(path.model, examples, path.tokenizer.pad_token_id, progress)
    phase_line("perplexity", len(examples), started, "examples")
    started = time.perf_counter()
    alone = replace(path, gate=None, card_count=0)
    answers = [answer.text for answer in alone.answer_many([e.question for e in examples], progress)]
    phase_line("split answers", len(examples), started)
    started = time.perf_counter()
    scope_path = replace(path, settings=settings.scope_generation, stop_after_sentences=SCOPE_SENTENCES)
    scope = scope_path.answer_many([p.question for p in scope_prompts], progress) if scope_prompts else []
    phase_line("scope answers" + (" (through the gate)" if path.gate else ""), len(scope_prompts), started)
    references = [example.answer for example in examples]
    model_only = ModelOutputs(
        answers=answers,
        references=references,
        nll=nll,
        rouge={name: np.array(values) for name, values in rouge_scores(answers, references).items()},
        scope_answers=[answer.model_text for answer in scope],
        scope=scope_flags(scope_prompts, [answer.model_text for answer in scope]),
    )
    if path.gate is None:
        return model_only, None
    routed = [answer.text for answer in scope]
    return model_only, ModelOutputs([], [], ExampleNlls.zeros(0), {}, routed, scope_flags(scope_prompts, routed))


def scope_flags(prompts: list[HeldoutPrompt], answers: list[str]) -> dict[str, np.ndarray]:
    return {name: np.array(flags, dtype=float) for name, flags in scope_outcomes(prompts, answers).items()}


def phase_line(name: str, count: int, started: float, unit: str = "answers") -> None:
    """One line per evaluation phase: how many, how long, how many per second."""
    seconds = time.perf_counter() - started
    if count:
        print(f"[eval] {name}: {count} {unit} in {seconds:.1f} s ({count / seconds:.2f} {unit}/s)")


GATED = "finetuned_gate"  # the fine-tuned model's answers through its scope gate (scope prompts only)
MODEL_KEYS = ("base", "finetuned", GATED)  # the report's columns, in order


@dataclass
class Evaluation:
    """The report (what evaluate.py prints and saves) and what it was computed from."""

    report: dict  # {"settings", "base"?, "finetuned"?, "delta"?}
    examples: list[EncodedExample]  # the medical split rows evaluated
    scope_prompts: list[HeldoutPrompt]  # the held-out scope prompts answered (empty with settings.scope off)
    outputs: dict[str, ModelOutputs]  # by model key: "base", "finetuned"


def evaluation_examples(tokenizer, settings: EvalSettings) -> list[EncodedExample]:
    """The medical rows of the split training held out (same data, N, seed and max length), cut to --limit.

    Rows whose topic is in NON_MEDICAL_TOPICS ("out_of_domain", "safety") are left out: their
    reference answers are scope statements, which the held-out scope set measures instead.
    """
    prepared = prepare_data(tokenizer, settings.data, settings.num_examples, settings.seed, settings.max_length)
    print("\n".join(prepared.report_lines()))
    split = getattr(prepared.examples, settings.split)
    examples = [example for example in split if example.topic not in NON_MEDICAL_TOPICS]
    if not examples:
        raise ValueError(
            f"the {settings.split} split has no medical rows ({len(split)} rows, {prepared.examples.sizes()}); use more --num-examples"
        )
    return examples[: settings.limit]


def run_evaluation(settings: EvalSettings, progress: bool = True) -> Evaluation:
    """Evaluate the fine-tuned model (adapter merged) and/or the base model on the held-out split.

    The base model's outputs are read from the evaluation cache when an earlier run stored them
    under the same key (medlora.evaluation.cache), and stored there otherwise (unless settings.cache
    is off).

    The data are prepared before any model is loaded, and the fine-tuned model is evaluated
    first, so a bad dataset or adapter fails before minutes of generation.
    """
    device = choose_device(settings.device)
    dtype = TORCH_DTYPES[resolve_precision(settings.precision, device, batch_invariant=True)]
    examples = evaluation_examples(load_tokenizer(settings.model), settings)
    scope_prompts = limited(load_heldout(settings.scope_set), settings.limit) if settings.scope else []
    outputs, grounding = {}, None
    for key in settings.model_keys:
        base_key = cache_key(settings, dtype, device) if key == "base" and settings.cache else None
        cached = read_cached(base_key) if base_key is not None else None
        if cached is not None:
            print(f"[eval] base model: reusing its results from {cache_path(base_key)} (same model, data, split, "
                  "generation settings and code; --no-cache recomputes them)")
            outputs[key] = cached
            continue
        finetuned = key == "finetuned"  # the base model answers alone: no gate, no cards
        path = AnswerPath.from_adapter(settings.model, settings.adapter if finetuned else None, settings=settings.generation,
                                       device=device, dtype=dtype, use_gate=finetuned and settings.scope_gate and bool(scope_prompts),
                                       card_count=CARD_COUNT if finetuned else 0, batch_size=settings.batch_size)
        for notice in path.notices if finetuned and scope_prompts else ():
            print(f"[eval] {notice}")
        print(f"[eval] {path.description} on {device}: {len(examples)} medical {settings.split} examples, "
              f"{len(scope_prompts)} held-out scope prompts")
        outputs[key], gated = evaluate_model(path, examples, scope_prompts, settings, progress)
        if gated is not None:
            outputs[GATED] = gated
        if finetuned and settings.grounding:
            grounding = grounded_outputs(path, examples, settings)
        if base_key is not None:
            write_cached(base_key, outputs[key])
        del path
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    report: dict = {"settings": settings.to_json()}
    paired = "base" in outputs and "finetuned" in outputs
    intervals = len(METRICS) * (len(outputs) + paired)
    with tqdm(total=intervals, desc="bootstrap", unit="interval", disable=not progress) as bar:
        for key in MODEL_KEYS:
            if key in outputs:
                report[key] = summarize(outputs[key], bar)
        if paired:
            report["delta"] = paired_deltas(outputs["base"], outputs["finetuned"], bar)
    if grounding is not None:
        report["grounding"] = grounding_report(outputs["finetuned"].answers, grounding)
    if scope_prompts:
        report["scope_confusion"] = {key: scope_confusion(scope_prompts, outputs[key].scope_answers) for key in MODEL_KEYS if key in outputs}
    return Evaluation(report, examples, scope_prompts, outputs)


def grounded_outputs(path: AnswerPath, examples: list[EncodedExample], settings: EvalSettings) -> GroundingOutputs | None:
    """The fine-tuned model's answers with the closest training flashcards in the prompt, and the top
    card's answer alone (medlora.evaluation.grounding); None when the run's data has no cards.
    The cards are the answer path's sources (those chat shows)."""
    sources = path.sources if path.sources is not None else sources_for_adapter(settings.adapter)
    if sources.index is None:
        print(f"[eval] grounding: {sources.notice}")
        return None
    started = time.perf_counter()
    grounding = grounding_outputs(path.model, path.tokenizer, examples, sources, settings.generation, GROUNDING_CARDS, settings.batch_size)
    phase_line(f"grounded answers (top {GROUNDING_CARDS} cards in the prompt)", len(examples), started)
    return grounding


def limited(prompts: list[HeldoutPrompt], limit: int | None) -> list[HeldoutPrompt]:
    """At most `limit` held-out prompts, taken in turn from each kind (so every kind stays in), in file order."""
    if limit is None or limit >= len(prompts):
        return prompts
    by_kind = {kind: [i for i, p in enumerate(prompts) if p.kind == kind] for kind in dict.fromkeys(p.kind for p in prompts)}
    taken = [i for group in itertools.zip_longest(*by_kind.values()) for i in group if i is not None][:limit]
    return [prompts[i] for i in sorted(taken)]


def scope_confusion(prompts: list[HeldoutPrompt], answers: list[str]) -> dict[str, dict[str, int]]:
    """Per held-out kind, how many answers the rule reads as each outcome (medlora.scope_gate.label_of:
    emergency referral, decline, clinician referral, or an answer)."""
    table = {kind: dict.fromkeys(GATE_CLASSES, 0) for kind in dict.fromkeys(p.kind for p in prompts)}
    for prompt, answer in zip(prompts, answers):
        table[prompt.kind][label_of(answer)] += 1
    return table
