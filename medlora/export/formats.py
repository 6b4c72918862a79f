"""Export a base model plus a LoRA adapter in four formats, each written atomically.

    result = export_adapter("runs/cpu/adapter", "gguf", "medlora.gguf", dtype="q8_0")

  hf         folder: merged model.safetensors, config.json, generation_config.json (greedy, eos =
             the end-of-turn token), the tokenizer with its chat template
  gguf       one file: the merged model for llama.cpp
  gguf-lora  folder: base.gguf (the unmodified base model) + adapter.gguf (the LoRA alone)
  ollama     folder: model.gguf (merged) + Modelfile (FROM, ChatML TEMPLATE, stop, SYSTEM)

Everything is written into a hidden staging path beside the target (".NAME.partial-XXXX") and
renamed into place at the end, so an interrupted export leaves no file or folder under the
target's name; an existing target is only replaced with overwrite=True.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from medlora.model import load_model_and_tokenizer, model_display_name
from data.format import SYSTEM_PROMPT, prompt_text
from medlora.generation import GenerationSettings
from lora import AdapterError, load_adapter, read_adapter_config, unload_lora
from lora.adapter_files import WEIGHTS_NAME
from medlora.export.gguf_lora import write_lora_gguf
from medlora.export.gguf_model import GGUF_DTYPES, check_llama, write_model_gguf
from medlora.export.gguf_tokenizer import gguf_tokenizer

FORMATS = ("hf", "gguf", "gguf-lora", "ollama")
GGUF_MODEL_FILE = "model.gguf"
LORA_BASE_FILE = "base.gguf"
LORA_ADAPTER_FILE = "adapter.gguf"
MODELFILE = "Modelfile"
CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")


class ExportError(ValueError):
    """An export that cannot be done as asked; the message is one line and names the value."""


@dataclass(frozen=True)
class ExportResult:
    """What was written, for the script to print."""

    path: Path
    files: tuple[str, ...]  # paths relative to `path` (empty when `path` is a file)
    base_model: str


def default_dtype(fmt: str) -> str:
    """f32 for the hf folder (its answers then equal chat.py's on a CPU), f16 for the GGUF formats."""
    return "f32" if fmt == "hf" else "f16"


def check_request(adapter: str | os.PathLike, fmt: str, out: str | os.PathLike, dtype: str, overwrite: bool) -> dict:
    """Every check that needs no model: format, dtype, output, adapter files. Returns the adapter config."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if dtype not in GGUF_DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not one of {', '.join(GGUF_DTYPES)}")
    if fmt == "hf" and dtype == "q8_0":
        raise ExportError("--dtype q8_0 applies to GGUF formats only: the hf format is f32 or f16")
    target = Path(out)
    if target.exists() and not overwrite:
        raise ExportError(f"{target} already exists: pass --overwrite to replace it")
    if not target.parent.is_dir() and target.parent.exists():
        raise ExportError(f"{target.parent} is not a folder")
    config = read_adapter_config(adapter)  # AdapterError: missing folder, config, or a bad field
    if not (Path(adapter) / WEIGHTS_NAME).is_file():
        raise AdapterError(f"{Path(adapter) / WEIGHTS_NAME}: missing")
    return config


@contextlib.contextmanager
def staged(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty staging folder beside `target`; on success, move its single entry to `target`.

    The entry (a file or a folder named like the target) is renamed into place; a previous target
    (overwrite) is first moved aside and deleted after, so the target name never holds a partial export.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        entries = list(staging.iterdir())
        assert len(entries) == 1, f"staging must hold one entry, holds {entries}"
        if target.exists() or target.is_symlink():
            if not overwrite:
                raise ExportError(f"{target} already exists: pass --overwrite to replace it")
            aside = staging / ".replaced"
            os.replace(target, aside)
        os.replace(entries[0], target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_hf_folder(model, tokenizer, folder: Path, dtype: str) -> None:
    """The merged model as a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads alone.

    The generation config makes a plain `model.generate(input_ids)` decode as chat.py does by
    default: greedy, the project's repetition penalty and answer length, stopping at end-of-turn.
    """
    settings = GenerationSettings()
    model = model.to(torch.float16 if dtype == "f16" else torch.float32)
    model.generation_config.update(
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,  # the chat template's end-of-turn token
        pad_token_id=tokenizer.pad_token_id,
        repetition_penalty=settings.repetition_penalty,
        max_new_tokens=settings.max_new_tokens,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def check_chatml(tokenizer) -> None:
    """Ollama's TEMPLATE here is ChatML; refuse a tokenizer whose chat template is something else."""
    prompt = prompt_text(tokenizer, "?")
    if not all(marker in prompt for marker in CHATML_MARKERS):
        raise ExportError("the ollama format writes a ChatML template (<|im_start|>...<|im_end|>); this tokenizer's chat template is not ChatML")


GATE_NOT_EXPORTED = (
    "The scope gate (scope_gate.safetensors next to the adapter) is not part of this model: "
    "it declines, refers emergencies and answers on its own"
)


def scope_note(adapter: str | os.PathLike) -> str:
    """One line for export.py: the gate stays behind, and the model-only scope rates that the
    adapter's run folder's eval.json measured (or how to measure them)."""
    report = Path(adapter).resolve().parent / "eval.json"
    try:
        rates = json.loads(report.read_text())["finetuned"]["scope"]
        measured = ", ".join(
            f"{label} {rates[name]['count']}/{rates[name]['total']}"
            for name, label in (("ood_decline_rate", "declines"), ("medical_false_decline_rate", "false declines"),
                                ("emergency_or_dose_referral_rate", "emergency/dose referrals"))
        )
        return f"note: {GATE_NOT_EXPORTED}. Model-only rates on the held-out scope set ({report}): {measured}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"note: {GATE_NOT_EXPORTED}. Measure the model-only rates with: python evaluate.py --adapter {adapter}"


def modelfile_text(gguf_file: str, system_prompt: str = SYSTEM_PROMPT) -> str:
    """An Ollama Modelfile: the GGUF, the ChatML chat format as a Go template, stop at end-of-turn, the training system prompt.

    `.Messages` holds the conversation with SYSTEM as its first message, so the template renders
    the same text as `data.format.prompt_text` (system, user/assistant turns, assistant header).
    """
    start, end = CHATML_MARKERS
    template = (
        "{{- range .Messages }}" + start + "{{ .Role }}\n{{ .Content }}" + end + "\n{{ end }}" + start + "assistant\n"
    )
    system = system_prompt.replace('"""', '\\"\\"\\"')
    return (
        f"# {GATE_NOT_EXPORTED}\n"
        f"FROM ./{gguf_file}\n"
        f'TEMPLATE """{template}"""\n'
        f'PARAMETER stop "{end}"\n'
        "PARAMETER temperature 0\n"
        f'SYSTEM """{system}"""\n'
    )


def export_adapter(
    adapter: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike,
    dtype: str | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Load the adapter's base model, then write `fmt` to `out` (see the module docstring).

    The base model is the one named in the adapter's adapter_config.json (train.py writes the
    run's --model there). `dtype` None means `default_dtype(fmt)`.

    Raises:
        ExportError, AdapterError, NotLlamaError, UnknownTokenizerError (ValueErrors), ModelLoadError, OSError.
    """
    dtype = dtype or default_dtype(fmt)
    adapter_config = check_request(adapter, fmt, out, dtype, overwrite)
    base = adapter_config.get("base_model_name_or_path") or None
    model, tokenizer = load_model_and_tokenizer(base, dtype=torch.float32)
    if fmt != "hf":
        check_llama(model.config)
        gguf_tokenizer(tokenizer, model.config.vocab_size)  # an unknown tokenizer fails before any writing
    if fmt == "ollama":
        check_chatml(tokenizer)
    base_name = model_display_name(base)
    target = Path(out)
    with staged(target, overwrite) as staging:
        entry = staging / target.name
        if fmt == "gguf-lora":
            entry.mkdir()
            write_model_gguf(model.state_dict(), model.config, tokenizer, entry / LORA_BASE_FILE, dtype, base_name)
            load_adapter(model, adapter)
            write_lora_gguf(model, model.config, entry / LORA_ADAPTER_FILE, f"{base_name} LoRA {Path(adapter)}")
        else:
            load_adapter(model, adapter)
            unload_lora(model)  # merged: W = W0 + (alpha/r) B A, plain Linear layers again
            name = f"{base_name} + {Path(adapter)}"
            if fmt == "hf":
                write_hf_folder(model, tokenizer, entry, dtype)
            elif fmt == "gguf":
                write_model_gguf(model.state_dict(), model.config, tokenizer, entry, dtype, name)
            else:
                entry.mkdir()
                write_model_gguf(model.state_dict(), model.config, tokenizer, entry / GGUF_MODEL_FILE, dtype, name)
                (entry / MODELFILE).write_text(modelfile_text(GGUF_MODEL_FILE), encoding="utf-8")
    files = tuple(sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())) if target.is_dir() else ()
    return ExportResult(target, files, base_name)
