"""One evaluation: the held-out split, each model's perplexity statistics and answers, the report.

    evaluation = run_evaluation(settings)   # settings from medlora.evaluation.settings
    evaluation.report                       # {"settings", "base"?, "finetuned"?, "delta"?}
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from data import EncodedExample, micro_batches, prepare_data
from medlora.evaluation.scores import METRICS, ModelOutputs, paired_deltas, summarize
from medlora.evaluation.settings import OUT_OF_DOMAIN_TOPIC, EvalSettings
from medlora.generation import generate_answers, load_for_inference
from medlora.loss import heldout_row_nll
from medlora.metrics import is_scope_decline, rouge_scores
from medlora.model import TORCH_DTYPES, choose_device, load_tokenizer, resolve_precision


def example_nlls(
    model, examples: list[EncodedExample], pad_id: int, progress: bool = False, max_batch_tokens: int = 2048
) -> np.ndarray:
    """Summed NLL and target-token count of each example, answer-only and full-sequence.

    Examples are batched longest first under a padded-token budget (data.micro_batches), and
    medlora.loss.row_nll keeps each example's sums apart, so the split's perplexity is exp(sum of
    NLL / sum of tokens) over any set of examples (a bootstrap resample included), never a mean of
    per-batch perplexities. The answer-only pass shares the system-prompt prefix across the batch.

    Returns:
        [n, 4] float64: answer NLL (nats), answer tokens, full NLL (nats), full tokens.
    """
    lengths = [len(example.input_ids) for example in examples]
    batches = micro_batches(list(range(len(examples))), lengths, 1, max_batch_tokens)
    answer_pass = heldout_row_nll(model, examples, batches, pad_id)
    full_pass = heldout_row_nll(model, examples, batches, pad_id, full_sequence=True)
    table = np.zeros((len(examples), 4))
    with tqdm(total=len(examples), desc="perplexity", unit="example", disable=not progress) as bar:
        for (rows, answer_sums, answer_counts), (_, full_sums, full_counts) in zip(answer_pass, full_pass):
            table[rows] = torch.stack([answer_sums.double(), answer_counts.double(), full_sums.double(), full_counts.double()], dim=1).cpu().numpy()
            bar.update(len(rows))
    return table


def evaluate_model(model, tokenizer, examples: list[EncodedExample], settings: EvalSettings, progress: bool = True) -> ModelOutputs:
    """Perplexity statistics, answers to the split's questions and to the out-of-domain questions."""
    nll = example_nlls(model, examples, tokenizer.pad_token_id, progress)
    questions = [example.question for example in examples] + list(settings.extra_ood_questions)
    answers = generate_answers(model, tokenizer, questions, settings.generation, settings.batch_size, progress)
    split_answers = answers[: len(examples)]
    ood_answers = [a for a, e in zip(split_answers, examples) if e.topic == OUT_OF_DOMAIN_TOPIC] + answers[len(examples):]
    references = [example.answer for example in examples]
    return ModelOutputs(
        answers=split_answers,
        references=references,
        nll=nll,
        rouge={name: np.array(values) for name, values in rouge_scores(split_answers, references).items()},
        ood_answers=ood_answers,
        ood_declines=np.array([float(is_scope_decline(answer)) for answer in ood_answers]),
    )


@dataclass
class Evaluation:
    """The report (what evaluate.py prints and saves) and what it was computed from."""

    report: dict  # {"settings", "base"?, "finetuned"?, "delta"?}
    examples: list[EncodedExample]
    outputs: dict[str, ModelOutputs]  # by model key: "base", "finetuned"


def evaluation_examples(tokenizer, settings: EvalSettings) -> list[EncodedExample]:
    """The split training held out (same data, N, seed and max length), cut to --limit."""
    prepared = prepare_data(tokenizer, settings.data, settings.num_examples, settings.seed, settings.max_length)
    print("\n".join(prepared.report_lines()))
    examples = getattr(prepared.examples, settings.split)
    if not examples:
        raise ValueError(f"the {settings.split} split is empty ({prepared.examples.sizes()}); use more --num-examples")
    return examples[: settings.limit]


def run_evaluation(settings: EvalSettings, progress: bool = True) -> Evaluation:
    """Evaluate the fine-tuned model (adapter merged) and/or the base model on the held-out split.

    The data are prepared before any model is loaded, and the fine-tuned model is evaluated
    first, so a bad dataset or adapter fails before minutes of generation.
    """
    device = choose_device(settings.device)
    dtype = TORCH_DTYPES[resolve_precision(settings.precision, device, batch_invariant=True)]
    examples = evaluation_examples(load_tokenizer(settings.model), settings)
    outputs = {}
    for key in settings.model_keys:
        adapter = settings.adapter if key == "finetuned" else None
        model, tokenizer, description = load_for_inference(settings.model, adapter, device, dtype)
        print(f"[eval] {description} on {device}: {len(examples)} {settings.split} examples, "
              f"{len(settings.extra_ood_questions)} held-out out-of-domain questions")
        outputs[key] = evaluate_model(model, tokenizer, examples, settings, progress)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    report: dict = {"settings": settings.to_json()}
    intervals = len(METRICS) * (len(outputs) + (len(outputs) == 2))
    with tqdm(total=intervals, desc="bootstrap", unit="interval", disable=not progress) as bar:
        for key in ("base", "finetuned"):
            if key in outputs:
                report[key] = summarize(outputs[key], bar)
        if len(outputs) == 2:
            report["delta"] = paired_deltas(outputs["base"], outputs["finetuned"], bar)
    return Evaluation(report, examples, outputs)
