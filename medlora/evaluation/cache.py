"""Cached base-model results: the base model answers the same split the same way on every run.

    key = cache_key(settings, dtype, device)
    outputs = read_cached(key)                      # ModelOutputs, or None on a miss
    write_cached(key, outputs)                      # after evaluating the base model

`make run` evaluates the base model beside the fine-tuned one on every run, although nothing it
depends on has changed. Its outputs (answers, per-example NLL sums, ROUGE F1, scope answers and
flags) are stored as JSON (never pickled) in cache_root()/eval/<key>.json, where the key is the
sha256 of everything they depend on:

    model       the resolved model folder's file names, sizes and modification times (a hub id: the id)
    data        the dataset file's sha256 (a hub id: the id), num_examples, seed, max_length, split, limit
    generation  GenerationSettings, batch size, the scope cap and the scope set's sha256
    precision   the weight dtype and the device type
    code        sha256 of every .py file of medlora/, data/ and lora/, and the torch and transformers versions

Any change to one of these is a miss, and the base model is evaluated again. evaluate.py
--no-cache neither reads nor writes the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers

from data import EMBEDDED_DATASET
from data.scope_set import HELDOUT_PATH
from medlora.evaluation.scores import ExampleNlls, ModelOutputs
from medlora.evaluation.settings import SCOPE_MAX_NEW_TOKENS, SCOPE_SENTENCES, EvalSettings
from medlora.model import cache_root, resolve_model_source

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CODE_PACKAGES = ("medlora", "data", "lora")  # their source decides what the base model's outputs are


def eval_cache_dir() -> Path:
    return cache_root() / "eval"


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _folder_fingerprint(folder: Path) -> list:
    return sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in folder.iterdir() if f.is_file())


def _source_fingerprint(source: str | None, embedded: Path | None = None) -> object:
    """A file's sha256, a folder's file list (name, size, mtime), or the hub id itself."""
    path = embedded if source in (None, "", "embedded") and embedded is not None else Path(source or "").expanduser()
    if path.is_file():
        return _file_digest(path)
    if path.is_dir():
        return _folder_fingerprint(path)
    return source


def code_version() -> str:
    """sha256 over the source of medlora/, data/ and lora/, plus the torch and transformers versions."""
    digest = hashlib.sha256(f"torch {torch.__version__} transformers {transformers.__version__}".encode())
    for package in CODE_PACKAGES:
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(PROJECT_ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key(settings: EvalSettings, dtype: torch.dtype, device: torch.device) -> dict:
    """Everything the base model's outputs depend on (see the module docstring)."""
    return {
        "model": _source_fingerprint(resolve_model_source(settings.model)),
        "data": _source_fingerprint(settings.data, EMBEDDED_DATASET),
        "split": {name: getattr(settings, name) for name in ("num_examples", "seed", "max_length", "split", "limit")},
        "generation": dataclasses.asdict(settings.generation),
        "batch_size": settings.batch_size,
        "scope": [settings.scope, SCOPE_MAX_NEW_TOKENS, SCOPE_SENTENCES, _file_digest(Path(settings.scope_set or HELDOUT_PATH)) if settings.scope else None],
        "precision": [str(dtype), device.type],
        "code": code_version(),
    }


def cache_path(key: dict) -> Path:
    return eval_cache_dir() / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()}.json"


def read_cached(key: dict) -> ModelOutputs | None:
    """The cached outputs for this key, or None when there are none (or the file is unreadable)."""
    try:
        saved = json.loads(cache_path(key).read_text())
    except (OSError, ValueError):
        return None
    if saved.get("key") != json.loads(json.dumps(key)):
        return None
    values = saved["outputs"]
    return ModelOutputs(
        answers=values["answers"],
        references=values["references"],
        nll=ExampleNlls.from_json(values["nll"]),
        rouge={name: np.array(scores, dtype=np.float64) for name, scores in values["rouge"].items()},
        scope_answers=values["scope_answers"],
        scope={name: np.array(flags, dtype=np.float64) for name, flags in values["scope"].items()},
    )


def write_cached(key: dict, outputs: ModelOutputs) -> Path:
    """Store outputs under key (written to a temporary file and renamed in: never half a file)."""
    path = cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {
        "answers": outputs.answers,
        "references": outputs.references,
        "nll": outputs.nll.to_json(),
        "rouge": {name: scores.tolist() for name, scores in outputs.rouge.items()},
        "scope_answers": outputs.scope_answers,
        "scope": {name: flags.tolist() for name, flags in outputs.scope.items()},
    }
    handle, staging = tempfile.mkstemp(prefix=".staging-", suffix=".json", dir=path.parent)
    with os.fdopen(handle, "w") as file:
        json.dump({"key": key, "outputs": values}, file)
    os.replace(staging, path)
    return path
