"""Evaluation: perplexity, generated-answer metrics, bootstrap intervals, reports, experiment tables.

evaluate.py is the thin script around this module:

    settings = resolve_settings({"adapter": "runs/cpu/adapter", "compare_base": True})
    evaluation = run_evaluation(settings)        # defaults read from runs/cpu/config.json
    print(markdown_table(evaluation.report))
    save_evaluation(evaluation, settings.output) # eval.json, eval_predictions.jsonl, eval_metrics.png, eval.md

Every metric is computed from per-example statistics (summed NLL and token counts, answers,
ROUGE F1, decline flags), so the same function gives the score on all examples, the score on a
bootstrap resample of example indices, and the paired difference of two models on that resample:

    perplexity       exp(sum NLL / sum tokens) over the answer (+ EOS) tokens of the whole split
    perplexity_full  the same over every predicted non-pad token (system prompt + question + answer),
                     the reference notebook's method, kept for comparison
    bleu             corpus BLEU-4 (metrics.corpus_bleu), recomputed on each resample
    rouge1/2/L       mean of per-example F1 (metrics.rouge_scores)
    ood_decline_rate share of out-of-domain questions answered with a scope statement
"""

from __future__ import annotations

import dataclasses
import gc
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from base_model import TORCH_DTYPES, choose_device, load_tokenizer, model_display_name, resolve_precision
from data import IGNORE_INDEX, EncodedExample, collate, micro_batches, prepare_data
from inference import GenerationSettings, generate_answers, load_for_inference
from lora import read_adapter_config
from metrics import bootstrap_interval, corpus_bleu, is_scope_decline, perplexity, rouge_scores
from training import PRESETS, TrainConfig, config_from_preset, row_nll

OUT_OF_DOMAIN_TOPIC = "out_of_domain"  # the `topic` of the dataset rows that should be declined

# Out-of-domain questions held out from every dataset: none of them is in data/medical_flashcards.jsonl
# (tests/test_evaluation.py checks), so the decline rate also measures questions never trained on.
HELDOUT_OOD_QUESTIONS = (
    "What is the capital city of Australia?",
    "Which river is the longest in South America?",
    "How long should I knead bread dough by hand?",
    "How do I make a vinaigrette salad dressing?",
    "How do I read a CSV file with pandas?",
    "What does the git rebase command do?",
    "How many points is a touchdown worth in American football?",
    "What is the maximum number of sets in a men's Grand Slam tennis match?",
    "What is the difference between a major and a minor scale?",
    "Who wrote the play Romeo and Juliet?",
    "What is a Roth IRA and how is it taxed?",
    "Why does the Moon have phases?",
    "What is the past tense of the Spanish verb tener?",
    "How do I reset the password of my Wi-Fi router?",
    "Which planet in the solar system has the most moons?",
)

BOOTSTRAP_RESAMPLES = 1000  # resamples per interval (sacreBLEU's paired bootstrap uses 1000 too)
BOOTSTRAP_SEED = 0  # fixed, so the same predictions always give the same intervals
SPLITS = ("test", "validation")
RUN_CONFIG_FIELDS = ("model", "data", "num_examples", "seed", "max_length")  # read from RUN/config.json
SAMPLING_DEFAULTS = {"temperature": 0.7, "top_p": 0.9}  # used with --sample when not given


# ---- settings ---------------------------------------------------------------------------------

@dataclass
class EvalSettings:
    """Everything one evaluation depends on; printed at start and stored in the output JSON."""

    model: str | None  # base model: None = embedded SmolLM2-135M-Instruct, a local folder, or a hub id
    adapter: str | None  # adapter folder (merged at load); None = evaluate the base model only
    data: str | None  # dataset: None = embedded flashcards, a local file, or a hub id
    num_examples: int | None  # rows sampled before the 85/10/5 split, as in training (None = all)
    seed: int  # split seed, as in training
    max_length: int  # tokens per encoded example; longer answers are cut (as in training)
    split: str = "test"  # test | validation
    limit: int | None = None  # evaluate only the first N examples of the split (None = all)
    compare_base: bool = False  # with an adapter: also evaluate the base model and the delta
    batch_size: int = 16  # questions per generation batch: 5.97x faster per answer than 1 at a time (fp32, CPU)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    precision: str = "auto"  # weight dtype: auto = fp32 on CPU (batch-invariant greedy answers), bf16/fp16 on CUDA
    device: str | None = None  # cpu | cuda | cuda:N (None = CUDA when available)
    output: str = "eval.json"  # the JSON report; predictions, PNG and markdown are written next to it
    extra_ood_questions: tuple[str, ...] = HELDOUT_OOD_QUESTIONS  # added to the split's out-of-domain rows
    sources: dict[str, str] = field(default_factory=dict)  # where each setting came from

    @property
    def model_keys(self) -> list[str]:
        """Which columns this evaluation has: "finetuned" with an adapter, "base" without or when compared."""
        keys = ["finetuned"] if self.adapter else []
        return keys + (["base"] if self.compare_base or not self.adapter else [])

    def to_json(self) -> dict:
        values = dataclasses.asdict(self)
        values["extra_ood_questions"] = list(self.extra_ood_questions)
        return values

    def lines(self) -> list[str]:
        """One line per setting with its value and source, for printing at start."""
        shown = {
            "model": model_display_name(self.model), "adapter": self.adapter or "none (base model only)",
            "data": self.data or "embedded flashcards", "num_examples": self.num_examples or "all",
            "seed": self.seed, "max_length": self.max_length, "split": self.split, "limit": self.limit or "none",
            "compare_base": self.compare_base, "batch_size": self.batch_size,
            "generation": ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self.generation).items()),
            "precision": self.precision, "device": self.device or "auto", "output": self.output,
            "extra_ood_questions": len(self.extra_ood_questions),
        }
        return [f"[settings] {name:<19} {value}  ({self.sources.get(name, 'default')})" for name, value in shown.items()]


def run_folder_of(adapter: str | Path) -> Path | None:
    """The train.py run folder holding `adapter` (RUN/adapter with a RUN/config.json), or None."""
    run_dir = Path(adapter).parent
    return run_dir if (run_dir / "config.json").is_file() else None


def read_run_config(run_dir: Path) -> dict:
    """RUN/config.json as a dict; ValueError naming the file when it cannot be used."""
    path = run_dir / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable run config ({error})") from None
    if not isinstance(config, dict) or not set(RUN_CONFIG_FIELDS) <= set(config):
        raise ValueError(f"{path}: not a train.py run config (needs the keys {', '.join(RUN_CONFIG_FIELDS)})")
    return config


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def resolve_settings(flags: dict) -> EvalSettings:
    """Turn command-line values (None = not given) into EvalSettings, recording each one's source.

    Precedence for model, data, num_examples, seed and max_length: the flag, then the adapter's
    run folder (RUN/config.json, so the split is the one training held out), then, for the model,
    the adapter's adapter_config.json, then the training defaults. The default output is
    RUN/eval.json in the adapter's run folder, else eval.json.

    Raises:
        ValueError: naming the flag and what is allowed (AdapterError for a missing or bad adapter).
    """
    adapter = flags.get("adapter")
    defaults = TrainConfig()
    values: dict = {name: getattr(defaults, name) for name in RUN_CONFIG_FIELDS} | {"adapter": adapter}
    sources: dict[str, str] = {}
    run_dir = None
    if adapter:
        adapter_config = read_adapter_config(adapter)  # fails at once on a missing or broken adapter
        values["model"] = adapter_config.get("base_model_name_or_path") or None
        sources["model"] = str(Path(adapter) / "adapter_config.json")
        run_dir = run_folder_of(adapter)
        if run_dir is not None:
            run_config = read_run_config(run_dir)
            for name in RUN_CONFIG_FIELDS:
                values[name] = run_config[name]
                sources[name] = str(run_dir / "config.json")
        values["output"] = str(run_dir / "eval.json") if run_dir is not None else "eval.json"
        sources["output"] = "next to the run folder" if run_dir is not None else "default"
    for name in (*RUN_CONFIG_FIELDS, "adapter", "split", "limit", "compare_base", "batch_size", "precision", "device", "output"):
        if flags.get(name) is not None and flags.get(name) is not False:
            if run_dir is not None and name in RUN_CONFIG_FIELDS and name != "model" and flags[name] != values[name]:
                sources[name] = f"{flag_name(name)}; the run used {values[name]!r}, so this split may hold training rows"
            else:
                sources[name] = flag_name(name)
            values[name] = flags[name]
    generation = generation_settings(flags, values["seed"])
    if generation != GenerationSettings():
        sources["generation"] = "flags"
    settings = EvalSettings(**values, generation=generation, sources=sources)
    check_settings(settings)
    return settings


def generation_settings(flags: dict, seed: int) -> GenerationSettings:
    """Greedy unless --sample; sampling uses --temperature, --top-p and --sample-seed (default: --seed)."""
    max_new_tokens = flags["max_new_tokens"] if flags.get("max_new_tokens") is not None else GenerationSettings.max_new_tokens
    if not flags.get("sample"):
        given = [flag_name(name) for name in ("temperature", "top_p", "sample_seed") if flags.get(name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --sample (decoding is greedy without it)")
        return GenerationSettings(max_new_tokens=max_new_tokens)
    sampling = {name: flags[name] if flags.get(name) is not None else default for name, default in SAMPLING_DEFAULTS.items()}
    if sampling["temperature"] <= 0:
        raise ValueError(f"--temperature must be positive with --sample, got {sampling['temperature']}")
    sample_seed = flags["sample_seed"] if flags.get("sample_seed") is not None else seed
    return GenerationSettings(max_new_tokens=max_new_tokens, seed=sample_seed, **sampling)


def check_settings(settings: EvalSettings) -> None:
    """Raise ValueError naming the first invalid setting (before any model is loaded)."""
    checks = [
        (settings.split in SPLITS, f"--split must be one of {', '.join(SPLITS)}, got {settings.split!r}"),
        (settings.limit is None or settings.limit > 0, f"--limit must be a positive integer, got {settings.limit}"),
        (settings.batch_size > 0, f"--batch-size must be a positive integer, got {settings.batch_size}"),
        (settings.num_examples is None or settings.num_examples > 0, f"--num-examples must be positive, got {settings.num_examples}"),
        (settings.max_length >= 16, f"--max-length must be at least 16, got {settings.max_length}"),
        (Path(settings.output).suffix == ".json", f"--output must be a .json file, got {settings.output!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


# ---- per-example statistics -------------------------------------------------------------------

def full_sequence_labels(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with every non-pad token as a target (system prompt + question + answer).

    This is the reference notebook's perplexity (labels = input_ids, padding ignored). The first
    token of a sequence has nothing before it, so a row of L tokens has L - 1 targets.
    """
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    return {**batch, "labels": labels}


@torch.no_grad()
def example_nlls(
    model, examples: list[EncodedExample], pad_id: int, progress: bool = False, max_batch_tokens: int = 2048
) -> np.ndarray:
    """Summed NLL and target-token count of each example, answer-only and full-sequence.

    Examples are batched longest first under a padded-token budget (data.micro_batches), and
    training.row_nll keeps each example's sums apart, so the split's perplexity is exp(sum of NLL /
    sum of tokens) over any set of examples (a bootstrap resample included), never a mean of
    per-batch perplexities. The answer-only pass shares the system-prompt prefix across the batch.

    Returns:
        [n, 4] float64: answer NLL (nats), answer tokens, full NLL (nats), full tokens.
    """
    device = next(model.parameters()).device
    lengths = [len(example.input_ids) for example in examples]
    table = np.zeros((len(examples), 4))
    with tqdm(total=len(examples), desc="perplexity", unit="example", disable=not progress) as bar:
        for rows in micro_batches(list(range(len(examples))), lengths, 1, max_batch_tokens):
            batch = {name: tensor.to(device) for name, tensor in collate([examples[i] for i in rows], pad_id).items()}
            answer_sums, answer_counts = row_nll(model, batch)
            full_sums, full_counts = row_nll(model, full_sequence_labels(batch))
            table[rows] = torch.stack([answer_sums.double(), answer_counts.double(), full_sums.double(), full_counts.double()], dim=1).cpu().numpy()
            bar.update(len(rows))
    return table


@dataclass
class ModelOutputs:
    """What one model produced on the evaluation set; every metric is a function of these."""

    answers: list[str]  # generated answer per split example, in split order
    references: list[str]  # reference answer per split example
    nll: np.ndarray  # [n, 4] answer NLL, answer tokens, full NLL, full tokens (see example_nlls)
    rouge: dict[str, np.ndarray]  # rouge1 / rouge2 / rougeL: [n] F1 per example
    ood_answers: list[str]  # answer per out-of-domain question (split rows first, then the held-out list)
    ood_declines: np.ndarray  # [n_ood] 1.0 where the answer is a scope statement

    @property
    def n(self) -> int:
        return len(self.answers)


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


# ---- metrics, intervals, deltas ---------------------------------------------------------------

@dataclass(frozen=True)
class Metric:
    label: str  # row name in the table
    population: str  # "split": the evaluated examples; "ood": the out-of-domain questions
    of_indices: Callable[[ModelOutputs, np.ndarray], float]  # the metric of the examples at these indices
    digits: int = 4  # decimals shown in the table


ANSWER_COLUMN, FULL_COLUMN = 0, 2  # column of the summed NLL in ModelOutputs.nll; its token count is the next one


def _perplexity_of(column: int) -> Callable[[ModelOutputs, np.ndarray], float]:
    def of_indices(outputs: ModelOutputs, indices: np.ndarray) -> float:
        return perplexity(float(outputs.nll[indices, column].sum()), int(outputs.nll[indices, column + 1].sum()))

    return of_indices


def _bleu_of(outputs: ModelOutputs, indices: np.ndarray) -> float:
    return corpus_bleu([outputs.answers[i] for i in indices], [outputs.references[i] for i in indices])


def _mean_rouge_of(name: str) -> Callable[[ModelOutputs, np.ndarray], float]:
    return lambda outputs, indices: float(outputs.rouge[name][indices].mean())


METRICS: dict[str, Metric] = {
    "perplexity": Metric("Perplexity (answer tokens)", "split", _perplexity_of(ANSWER_COLUMN), digits=2),
    "perplexity_full": Metric("Perplexity (full sequence)", "split", _perplexity_of(FULL_COLUMN), digits=2),
    "bleu": Metric("BLEU-4", "split", _bleu_of),
    "rouge1": Metric("ROUGE-1 F1", "split", _mean_rouge_of("rouge1")),
    "rouge2": Metric("ROUGE-2 F1", "split", _mean_rouge_of("rouge2")),
    "rougeL": Metric("ROUGE-L F1", "split", _mean_rouge_of("rougeL")),
    "ood_decline_rate": Metric(
        "Out-of-domain decline rate", "ood", lambda outputs, indices: float(outputs.ood_declines[indices].mean()), digits=2
    ),
}


def population_size(outputs: ModelOutputs, metric: Metric) -> int:
    return outputs.n if metric.population == "split" else len(outputs.ood_declines)


def summarize(outputs: ModelOutputs, bar=None) -> dict:
    """Every metric on all examples, with its 95% bootstrap interval (None where there are no examples)."""
    summary: dict = {"n": outputs.n, "ood_n": len(outputs.ood_declines), "ood_declined": int(outputs.ood_declines.sum())}
    intervals = {}
    for name, metric in METRICS.items():
        size = population_size(outputs, metric)
        summary[name] = metric.of_indices(outputs, np.arange(size)) if size else None
        intervals[name] = list(bootstrap(size, lambda indices: metric.of_indices(outputs, indices))) if size else None
        if bar is not None:
            bar.update(1)
    summary["intervals"] = intervals
    return summary


def paired_deltas(base: ModelOutputs, finetuned: ModelOutputs, bar=None) -> dict:
    """Fine-tuned minus base for every metric, with a paired bootstrap interval of the difference.

    Both models are scored on the SAME resampled indices, so the interval says how much of the
    delta could come from which examples happened to be drawn. `excludes_zero` marks a delta
    whose interval does not contain 0.
    """
    deltas: dict = {}
    for name, metric in METRICS.items():
        size = population_size(finetuned, metric)

        def difference(indices: np.ndarray, metric: Metric = metric) -> float:
            return metric.of_indices(finetuned, indices) - metric.of_indices(base, indices)

        deltas[name] = None
        if size:
            low, high = bootstrap(size, difference)
            deltas[name] = {"value": difference(np.arange(size)), "interval": [low, high], "excludes_zero": low > 0 or high < 0}
        if bar is not None:
            bar.update(1)
    return deltas


def bootstrap(size: int, metric_of_indices: Callable[[np.ndarray], float]) -> tuple[float, float]:
    return bootstrap_interval(size, metric_of_indices, n_resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED)


# ---- the whole evaluation ---------------------------------------------------------------------

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


# ---- reports ----------------------------------------------------------------------------------

COLUMN_TITLES = {"base": "Base", "finetuned": "Fine-tuned"}


def format_value(summary: dict, name: str) -> str:
    """'value [low, high]' with the metric's decimals; declines also show the count."""
    value, interval, digits = summary[name], summary["intervals"][name], METRICS[name].digits
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
    if name == "ood_decline_rate":
        text += f" ({summary['ood_declined']}/{summary['ood_n']})"
    return text


def format_delta(delta: dict | None, name: str) -> str:
    if delta is None:
        return "n/a"
    digits = METRICS[name].digits
    low, high = delta["interval"]
    return f"{delta['value']:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]" + (" *" if delta["excludes_zero"] else "")


def markdown_table(report: dict) -> str:
    """Metric | Base | Fine-tuned | Delta, each cell 'value [95% interval]', and a footnote."""
    keys = [key for key in ("base", "finetuned") if key in report]
    has_delta = "delta" in report
    header = ["Metric"] + [COLUMN_TITLES[key] for key in keys] + (["Delta (fine-tuned - base)"] if has_delta else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for name, metric in METRICS.items():
        cells = [metric.label] + [format_value(report[key], name) for key in keys]
        if has_delta:
            cells.append(format_delta(report["delta"][name], name))
        lines.append("| " + " | ".join(cells) + " |")
    first = report[keys[0]]
    settings = report["settings"]
    extra = len(settings["extra_ood_questions"])
    lines += [
        "",
        f"{first['n']} {settings['split']} examples; {first['ood_n']} out-of-domain questions "
        f"({first['ood_n'] - extra} from the split + {extra} held out). Perplexity: lower is better; "
        f"the others: higher is better. [low, high] = 95% bootstrap interval ({BOOTSTRAP_RESAMPLES} resamples, "
        f"seed {BOOTSTRAP_SEED})" + ("; * = the paired interval of the delta excludes 0." if has_delta else "."),
    ]
    return "\n".join(lines)


def output_paths(output: str | Path) -> dict[str, Path]:
    """The files written for --output FILE.json: the report, predictions, chart and table."""
    path = Path(output)
    return {
        "json": path,
        "predictions": path.with_name(f"{path.stem}_predictions.jsonl"),
        "chart": path.with_name(f"{path.stem}_metrics.png"),
        "table": path.with_suffix(".md"),
    }


def prediction_rows(evaluation: Evaluation) -> list[dict]:
    """One row per question: question, reference, and each model's answer (held-out OOD rows have no reference)."""
    settings = evaluation.report["settings"]
    rows = [
        {"source": settings["split"], "topic": e.topic, "question": e.question, "reference": e.answer}
        for e in evaluation.examples
    ] + [
        {"source": "heldout_ood", "topic": OUT_OF_DOMAIN_TOPIC, "question": q, "reference": None}
        for q in settings["extra_ood_questions"]
    ]
    ood_rows = [i for i, row in enumerate(rows) if row["topic"] == OUT_OF_DOMAIN_TOPIC]
    for key in [key for key in ("base", "finetuned") if key in evaluation.outputs]:
        outputs = evaluation.outputs[key]
        for row, answer in zip(rows, outputs.answers):
            row[key] = answer
        for index, answer, declined in zip(ood_rows, outputs.ood_answers, outputs.ood_declines):
            rows[index][key] = answer
            rows[index][f"{key}_declined"] = bool(declined)
    return rows


def save_chart(report: dict, path: Path) -> None:
    """Bar chart of every metric per model with its 95% interval: scores in [0, 1] left, perplexities right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [key for key in ("base", "finetuned") if key in report]
    colors = {"base": "#bbbbbb", "finetuned": "#4477aa"}
    panels = [
        ("score (higher is better)", ["bleu", "rouge1", "rouge2", "rougeL", "ood_decline_rate"]),
        ("perplexity (lower is better)", ["perplexity", "perplexity_full"]),
    ]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [5, 2]})
    width = 0.8 / len(keys)
    for axis, (ylabel, names) in zip(axes, panels):
        names = [name for name in names if report[keys[0]][name] is not None]
        for offset, key in enumerate(keys):
            values = [report[key][name] for name in names]
            low = [value - report[key]["intervals"][name][0] for name, value in zip(names, values)]
            high = [report[key]["intervals"][name][1] - value for name, value in zip(names, values)]
            positions = [i + (offset - (len(keys) - 1) / 2) * width for i in range(len(names))]
            axis.bar(positions, values, width, yerr=[low, high], capsize=3, color=colors[key], label=COLUMN_TITLES[key])
        axis.set_xticks(range(len(names)), [METRICS[name].label.replace(" (", "\n(") for name in names], fontsize=8)
        axis.set_ylabel(ylabel)
    axes[0].set_ylim(0, 1)
    axes[0].legend()
    figure.suptitle(f"{report['settings']['split']} split, n = {report[keys[0]]['n']} (error bars: 95% bootstrap interval)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def save_evaluation(evaluation: Evaluation, output: str | Path) -> dict[str, Path]:
    """Write the JSON report, the predictions JSONL, the bar chart PNG and the markdown table."""
    paths = output_paths(output)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps(evaluation.report, indent=2) + "\n")
    with open(paths["predictions"], "w") as handle:
        for row in prediction_rows(evaluation):
            handle.write(json.dumps(row) + "\n")
    save_chart(evaluation.report, paths["chart"])
    paths["table"].write_text(markdown_table(evaluation.report) + "\n")
    return paths


# ---- experiments ------------------------------------------------------------------------------

EXPERIMENT_KEYS = ("name", "description")  # allowed in an experiment besides TrainConfig fields
EXPERIMENT_COLUMNS = {  # row key -> column title, in table order
    "name": "Experiment", "r": "r", "lr": "LR", "epochs": "Epochs", "train_loss": "Train loss",
    "val_loss": "Val loss", "rouge1": "ROUGE-1", "bleu": "BLEU", "perplexity": "Perplexity",
    "peak_memory_gb": "Peak memory (GB)", "time_min": "Time (min)",
}


def load_experiments(path: str | Path) -> list[tuple[str, TrainConfig]]:
    """Read a JSON list of experiments: each a preset plus TrainConfig overrides and a unique name.

        [{"name": "EXP-01", "preset": "t4", "rank": 8, "lr": 2e-4, "epochs": 1}, ...]

    An experiment's run folder is runs/experiments/<name> unless it sets output_dir.

    Raises:
        ValueError: naming the file, the experiment and the bad key or value.
    """
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable experiments file ({error})") from None
    if not isinstance(entries, list) or not entries or not all(isinstance(entry, dict) for entry in entries):
        raise ValueError(f"{path}: expected a non-empty JSON list of objects, one per experiment")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    experiments, names = [], set()
    for index, entry in enumerate(entries):
        name = entry.get("name")
        if not isinstance(name, str) or not name or name in names:
            raise ValueError(f"{path}: experiment {index} needs a unique \"name\", got {name!r}")
        names.add(name)
        unknown = sorted(set(entry) - fields - set(EXPERIMENT_KEYS))
        if unknown:
            raise ValueError(f"{path}: {name}: unknown key {unknown[0]!r}; allowed: {', '.join(EXPERIMENT_KEYS)} and the TrainConfig fields")
        preset = entry.get("preset", "cpu")
        if preset not in PRESETS:
            raise ValueError(f"{path}: {name}: preset must be one of {sorted(PRESETS)}, got {preset!r}")
        overrides = {key: value for key, value in entry.items() if key in fields and key != "preset"}
        experiments.append((name, config_from_preset(preset, **{"output_dir": f"runs/experiments/{name}", **overrides})))
    return experiments


def finished_run_summary(config: TrainConfig) -> dict | None:
    """summary.json of a finished run of exactly this config in its output_dir, or None."""
    run_dir = Path(config.output_dir)
    try:
        saved = json.loads((run_dir / "config.json").read_text())
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = saved == json.loads(json.dumps(config.to_json()))
    return summary if same and (run_dir / "adapter").is_dir() else None


def run_experiments(experiments: list[tuple[str, TrainConfig]], train_fn: Callable, eval_flags: dict, progress: bool = True) -> list[dict]:
    """Train each experiment with `train_fn` (train.train), evaluate its adapter, return one row each.

    A run folder that already holds a finished run of the same config is evaluated without
    retraining. The evaluation uses `eval_flags` (limit, generation, device...) and the run's own
    config for model, data and split; it scores only the fine-tuned model, on the split alone.
    """
    rows = []
    for number, (name, config) in enumerate(experiments, start=1):
        print(f"[experiments] {name} ({number}/{len(experiments)}): run folder {config.output_dir}")
        summary = finished_run_summary(config)
        if summary is None:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()  # peak memory per experiment, not since the process began
            summary = train_fn(config, overwrite=(Path(config.output_dir) / "config.json").is_file())
        else:
            print(f"[experiments] {name}: reusing the finished run (same config) in {config.output_dir}")
        adapter = Path(config.output_dir) / "adapter"
        settings = resolve_settings({**eval_flags, "adapter": str(adapter), "output": str(Path(config.output_dir) / "eval.json")})
        settings.extra_ood_questions = ()
        evaluation = run_evaluation(settings, progress)
        save_evaluation(evaluation, settings.output)
        finetuned = evaluation.report["finetuned"]
        rows.append({
            "name": name, "r": config.rank, "lr": config.lr, "epochs": config.epochs,
            "train_loss": summary["train_loss"], "val_loss": summary["best_val_loss"],
            "rouge1": finetuned["rouge1"], "bleu": finetuned["bleu"], "perplexity": finetuned["perplexity"],
            "peak_memory_gb": summary["peak_memory_gb"], "time_min": summary["time_s"] / 60,
            "steps": summary["steps"], "n": finetuned["n"], "run_dir": config.output_dir,
        })
        gc.collect()
    return rows


def experiments_table(rows: list[dict]) -> str:
    """The experiment table as markdown, one row per experiment, with a footnote on each column's meaning."""
    formats = {"lr": "{:.3g}", "epochs": "{:g}", "train_loss": "{:.4f}", "val_loss": "{:.4f}", "rouge1": "{:.4f}",
               "bleu": "{:.4f}", "perplexity": "{:.2f}", "peak_memory_gb": "{:.2f}", "time_min": "{:.1f}"}
    lines = ["| " + " | ".join(EXPERIMENT_COLUMNS.values()) + " |", "|---|" + "---:|" * (len(EXPERIMENT_COLUMNS) - 1)]
    for row in rows:
        cells = [formats.get(key, "{}").format(row[key]) if row[key] is not None else "n/a" for key in EXPERIMENT_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    n = sorted({row["n"] for row in rows})
    lines += [
        "",
        "Train loss: answer-token loss of the last optimizer step; val loss: best validation answer-token loss. "
        f"ROUGE-1 (mean F1), BLEU-4 and answer-token perplexity of the fine-tuned model on {'/'.join(map(str, n))} "
        "held-out examples. Peak memory: CUDA peak allocation of the experiment, or on CPU the process's peak "
        "resident memory so far (it never goes down between experiments). Time: training only.",
    ]
    return "\n".join(lines)


def save_experiments(rows: list[dict], output: str | Path) -> dict[str, Path]:
    """Write the experiment table as JSON and markdown (same name, .md)."""
    paths = {"json": Path(output), "table": Path(output).with_suffix(".md")}
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps({"experiments": rows}, indent=2) + "\n")
    paths["table"].write_text(experiments_table(rows) + "\n")
    return paths

