"""Evaluation settings: flags, then the adapter's run folder, then defaults, each with its source.

    settings = resolve_settings({"adapter": "runs/cpu/adapter", "compare_base": True})
    print("\n".join(settings.lines()))   # every setting, its value and where it came from

With an adapter inside a run folder, model, data, num_examples, seed and max_length come from
RUN/config.json, so the evaluated split is the one training held out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from data import check_max_length, check_num_examples
from lora import read_adapter_config
from medlora.config import TrainConfig
from medlora.generation import GENERATION_BATCH_SIZE, GenerationSettings
from medlora.model import model_display_name
from medlora.run_folder import RUN_CONFIG_FIELDS, read_config, run_folder_of

# Split rows whose reference answer is a scope statement, not medicine: they are left out of
# perplexity, BLEU and ROUGE (scope behaviour is measured on the held-out scope set instead).
NON_MEDICAL_TOPICS = ("out_of_domain", "safety")
# Most new tokens per answer to a held-out scope prompt. The scope rule (medlora.scope) looks for a
# decline or a referral, which a trained answer gives in its first sentence or two; 64 tokens is
# about three sentences. Measured against 200 tokens in docs/evaluation.md.
SCOPE_MAX_NEW_TOKENS = 64
# Scope answers also stop at the end of their second sentence (medlora.generation.first_sentences):
# the rule judges the opening, and a batch ends when every row has said it.
SCOPE_SENTENCES = 2
SPLITS = ("test", "validation")
SAMPLING_DEFAULTS = {"temperature": 0.7, "top_p": 0.9}  # used with --sample when not given


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
    batch_size: int = GENERATION_BATCH_SIZE  # questions per generation batch (medlora.generation)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    precision: str = "auto"  # weight dtype: auto = fp32 on CPU (batch-invariant greedy answers), bf16/fp16 on CUDA
    device: str | None = None  # cpu | cuda | cuda:N (None = CUDA when available)
    output: str = "eval.json"  # the JSON report; predictions, PNG and markdown are written next to it
    cache: bool = True  # reuse the base model's outputs from an earlier run with the same key (medlora.evaluation.cache)
    scope: bool = True  # also answer the held-out scope prompts, for the scope rates (--no-scope: off)
    scope_gate: bool = True  # with an adapter that has one: a third column, its answers through the scope gate
    grounding: bool = True  # with an adapter: ROUGE-L with the closest flashcards in the prompt, and of the top card alone
    scope_set: str | None = None  # held-out scope prompts (JSON lines, data.scope_set.load_heldout); None = data/scope_heldout.jsonl
    sources: dict[str, str] = field(default_factory=dict)  # where each setting came from

    @property
    def model_keys(self) -> list[str]:
        """Which columns this evaluation has: "finetuned" with an adapter, "base" without or when compared."""
        keys = ["finetuned"] if self.adapter else []
        return keys + (["base"] if self.compare_base or not self.adapter else [])

    @property
    def scope_generation(self) -> GenerationSettings:
        """The generation settings for held-out scope prompts: max_new_tokens capped at SCOPE_MAX_NEW_TOKENS."""
        return dataclasses.replace(self.generation, max_new_tokens=min(self.generation.max_new_tokens, SCOPE_MAX_NEW_TOKENS))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        """One line per setting with its value and source, for printing at start."""
        shown = {
            "model": model_display_name(self.model), "adapter": self.adapter or "none (base model only)",
            "data": self.data or "embedded flashcards", "num_examples": self.num_examples or "all",
            "seed": self.seed, "max_length": self.max_length, "split": self.split, "limit": self.limit or "none",
            "compare_base": self.compare_base, "batch_size": self.batch_size,
            "generation": ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self.generation).items()),
            "precision": self.precision, "device": self.device or "auto", "output": self.output,
            "cache": "base model results reused when unchanged" if self.cache else "off (--no-cache)",
            "scope": f"{self.scope_set or 'data/scope_heldout.jsonl'}, max_new_tokens={self.scope_generation.max_new_tokens}"
            if self.scope else "off",
            "grounding": "grounded and retrieval-only ROUGE-L rows" if self.grounding else "off (--no-grounding)",
            "scope_gate": "the fine-tuned model's answers through its scope gate too" if self.scope_gate else "off (--no-scope-gate)",
        }
        return [f"[settings] {name:<19} {value}  ({self.sources.get(name, 'default')})" for name, value in shown.items()]


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
            run_config = read_config(run_dir)
            for name in RUN_CONFIG_FIELDS:
                values[name] = getattr(run_config, name)
                sources[name] = str(run_dir / "config.json")
        values["output"] = str(run_dir / "eval.json") if run_dir is not None else "eval.json"
        sources["output"] = "next to the run folder" if run_dir is not None else "default"
    for name in (*RUN_CONFIG_FIELDS, "adapter", "split", "limit", "compare_base", "batch_size", "precision", "device", "output", "scope_set"):
        if flags.get(name) is not None and flags.get(name) is not False:
            if run_dir is not None and name in RUN_CONFIG_FIELDS and name != "model" and flags[name] != values[name]:
                sources[name] = f"{flag_name(name)}; the run used {values[name]!r}, so this split may hold training rows"
            else:
                sources[name] = flag_name(name)
            values[name] = flags[name]
    if flags.get("no_cache"):
        values["cache"], sources["cache"] = False, "--no-cache"
    if flags.get("no_scope"):
        values["scope"], sources["scope"] = False, "--no-scope"
    if flags.get("no_grounding"):
        values["grounding"], sources["grounding"] = False, "--no-grounding"
    if flags.get("no_scope_gate"):
        values["scope_gate"], sources["scope_gate"] = False, "--no-scope-gate"
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
        (Path(settings.output).suffix == ".json", f"--output must be a .json file, got {settings.output!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    check_num_examples(settings.num_examples)
    check_max_length(settings.max_length)
