"""The real llama.cpp runs our GGUF files: merged f32/f16/q8_0, and the base GGUF with the LoRA GGUF;
and the f16 GGUF of the committed `make run` adapter routes held-out scope prompts as transformers does.

Runs only in CI (CI=true): llama.cpp is compiled from the `llama-cpp-python` source package on
PyPI, CPU only, into its own folder outside the project's venv, and is used only here. Greedy
decoding with no repetition penalty on both sides, so the two engines follow the same rule;
prompts are given to llama.cpp as the project tokenizer's ids.

The build is portable (AVX2, FMA, F16C; no AVX512, no AMX), not `-march=native`. A native build on
a Xeon with AMX runs q8_0 matmuls on AMX tiles, and there, built by gcc 12.2, ggml's tile setup
hands `ldtilecfg` a config whose last 32 bytes are whatever the stack held; the CPU refused it
with a general protection fault, a segfault that ended CI (a small C program loading the same
config in a thread runs, so AMX itself works there). A native build also breaks on a CPU with
fewer features than the one that built it, and pip's wheel cache hands such a build on. So the
build skips that cache, and its folder is named by its flags.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("CI") != "true", reason="builds llama.cpp (many minutes): runs in CI only (CI=true)"),
]

LLAMA_CPP_VERSION = "0.3.36"
# GGML_NATIVE=OFF turns on ggml's portable x86 set (SSE4.2, AVX, AVX2, BMI2, FMA, F16C) and leaves
# AVX512 and AMX off; every CPU this project runs on has AVX2.
CPU_ONLY = (
    "-DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF"
    " -DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
)
BUILD_NAME = f"llama-cpp-python-{LLAMA_CPP_VERSION}-cpu-avx2"
MAX_NEW_TOKENS = 64


def install_llama_cpp():
    """Import llama_cpp from its own folder, building it first if that folder does not hold it."""
    target = Path.home() / ".cache" / "medlora" / BUILD_NAME
    if not (target / "llama_cpp" / "lib").is_dir():
        if not all(shutil.which(tool) for tool in ("cmake", "gcc", "g++")) and shutil.which("apt-get"):
            subprocess.run(["apt-get", "update", "-qq"], check=True)
            subprocess.run(["apt-get", "install", "-y", "-qq", "cmake", "gcc", "g++"], check=True)
        environment = {**os.environ, "CMAKE_ARGS": CPU_ONLY, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        subprocess.run(
            ["nice", "-n", "10", sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-cache-dir",
             "--no-binary", "llama-cpp-python", "--target", str(target),
             f"llama-cpp-python=={LLAMA_CPP_VERSION}", "diskcache"],
            check=True, env=environment,
        )
    sys.path.insert(0, str(target))
    return importlib.import_module("llama_cpp")


@pytest.fixture(scope="module")
def llama_cpp():
    return install_llama_cpp()


def test_the_llama_cpp_build_is_portable(llama_cpp):
    features = llama_cpp.llama_print_system_info().decode()
    assert "AVX2 = 1" in features and "FMA = 1" in features, features
    assert "AVX512" not in features and "AMX" not in features, features


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A random adapter on the embedded model; merged GGUF f32/f16/q8_0, the gguf-lora pair, and reference answers."""
    import torch

    from medlora.generation import GenerationSettings, generate_answers
    from medlora.export import export_adapter
    from tests.test_export import embedded_model_with_random_adapter

    folder = tmp_path_factory.mktemp("llamacpp")
    merged, tokenizer, questions = embedded_model_with_random_adapter(folder)
    export_adapter(folder / "adapter", "gguf-lora", folder / "lora", "f32")
    questions = questions[:8]
    settings = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, repetition_penalty=1.0)
    with torch.no_grad():
        expected = generate_answers(merged, tokenizer, questions, settings)
    return folder, tokenizer, questions, expected, merged


def open_llama(llama_cpp, model_path, lora_path=None, f32_cache: bool = True, **options):
    """llama.cpp on a GGUF file (and a LoRA GGUF). f32_cache keeps the attention's key/value cache in
    f32; llama.cpp's default is f16, which rounds every key and value, so an f32 file would not be
    compared with transformers' f32 arithmetic throughout."""
    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    return llama_cpp.Llama(
        model_path=str(model_path), lora_path=str(lora_path) if lora_path else None,
        n_ctx=1024, n_threads=2, n_batch=512, verbose=False, seed=0, **cache, **options,
    )


def llama_cpp_answers(llama_cpp, tokenizer, questions, model_path, lora_path=None, max_new_tokens: int = MAX_NEW_TOKENS,
                      f32_cache: bool = True) -> list[str]:
    from data.format import prompt_ids

    llm = open_llama(llama_cpp, model_path, lora_path, f32_cache)
    answers = []
    for question in questions:
        llm.reset()
        generated = []
        for token in llm.generate(prompt_ids(tokenizer, question), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            if token == tokenizer.eos_token_id or len(generated) == max_new_tokens:
                break
            generated.append(token)
        answers.append(tokenizer.decode(generated, skip_special_tokens=True).strip())
    llm.close()
    return answers


def agreement(name, expected, got) -> int:
    same = sum(a == b for a, b in zip(expected, got))
    print(f"llama.cpp {name}: {same}/{len(expected)} greedy answers ({MAX_NEW_TOKENS} tokens max) identical to transformers'")
    for a, b in zip(expected, got):
        if a != b:
            print(f"  transformers: {a[:90]!r}\n  llama.cpp:    {b[:90]!r}")
    return same


def teacher_forced_logits(llama_cpp, sequences: list[list[int]], model_path, lora_path=None) -> list:
    """llama.cpp's logits at every position of each token sequence, one array (positions, vocabulary) each."""
    import numpy as np

    llm = open_llama(llama_cpp, model_path, lora_path, logits_all=True)
    logits = []
    for ids in sequences:
        llm.reset()
        llm.eval(ids)
        logits.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    llm.close()
    return logits


@pytest.fixture(scope="module")
def shared_sequences(exports):
    """What both engines read: prompt + transformers' greedy answer for each question; where each
    answer's logits start (the position that predicts its first token); and transformers' logits from there."""
    import torch

    from data.format import prompt_ids

    _, tokenizer, questions, expected, merged = exports
    prompts = [prompt_ids(tokenizer, q) for q in questions]
    sequences = [p + tokenizer(a, add_special_tokens=False)["input_ids"] for p, a in zip(prompts, expected)]
    starts = [len(p) - 1 for p in prompts]
    with torch.no_grad():
        ours = [merged(torch.tensor([ids])).logits[0, start:].float().numpy() for ids, start in zip(sequences, starts)]
    return sequences, starts, ours


def compare_teacher_forced(llama_cpp, shared_sequences, name: str, model_path, lora_path=None) -> tuple[float, int, int]:
    """Both engines read the shared sequences; at each answer position, the largest logit difference
    and whether the two pick the same next token. Returns (largest, agreeing, positions)."""
    sequences, starts, ours = shared_sequences
    theirs = teacher_forced_logits(llama_cpp, sequences, model_path, lora_path)
    largest, agreeing, positions = 0.0, 0, 0
    for start, our, their in zip(starts, ours, theirs):
        their = their[start:]
        largest = max(largest, float(abs(our - their).max()))
        agreeing += int((our.argmax(-1) == their.argmax(-1)).sum())
        positions += len(our)
    print(f"llama.cpp {name}, teacher-forced on transformers' answers: largest logit difference {largest:.2e}, "
          f"same next token at {agreeing}/{positions} answer positions")
    return largest, agreeing, positions


# Greedy answers compared word for word are the user's view, but not a stable test. A near-tie
# between two tokens is settled by the last bits, these differ between the engines and even between
# processes of one engine (within a process they repeat), and one flip sends the rest of an answer
# elsewhere. On the Xeon, with llama.cpp's f16 cache, 8 processes gave 8/8 identical answers for
# both files in 6, 7/8 for both in one and 7/8 for the LoRA pair in another. So these tests assert
# the weights through logits, both engines reading one shared sequence, and print the greedy
# answers beside them. Measured on the merged f32 file: largest logit difference 6.3e-5 to 8.8e-5
# with the f32 cache (2.5e-2 with llama.cpp's f16 cache); the base file without its adapter, 0.21 to
# 0.27. A wrong weight, scale or row order moves logits by far more.
F32_LOGIT_TOLERANCE = 1e-3
SAME_NEXT_TOKEN_FLOOR = 0.99


def test_llama_cpp_merged_f32_gguf_computes_the_merged_model(llama_cpp, exports, shared_sequences):
    folder, tokenizer, questions, expected, _ = exports
    largest, agreeing, positions = compare_teacher_forced(llama_cpp, shared_sequences, "merged f32", folder / "merged-f32.gguf")
    agreement("merged f32", expected, llama_cpp_answers(llama_cpp, tokenizer, questions, folder / "merged-f32.gguf"))
    assert largest < F32_LOGIT_TOLERANCE and agreeing >= SAME_NEXT_TOKEN_FLOOR * positions


def test_llama_cpp_base_plus_lora_gguf_computes_the_merged_model(llama_cpp, exports, shared_sequences):
    folder, tokenizer, questions, expected, _ = exports
    base, adapter = folder / "lora" / "base.gguf", folder / "lora" / "adapter.gguf"
    largest, agreeing, positions = compare_teacher_forced(llama_cpp, shared_sequences, "base f32 + LoRA GGUF", base, adapter)
    agreement("base f32 + LoRA GGUF", expected, llama_cpp_answers(llama_cpp, tokenizer, questions, base, adapter))
    assert largest < F32_LOGIT_TOLERANCE and agreeing >= SAME_NEXT_TOKEN_FLOOR * positions
    # The same check tells the adapter's absence: the base file alone misses the tolerance by far.
    without, _, _ = compare_teacher_forced(llama_cpp, shared_sequences, "base f32 alone, adapter left out", base)
    assert without > 10 * F32_LOGIT_TOLERANCE


# Rounded files move logits by more than the f32 tolerance (largest difference: f16 about 0.06,
# q8_0 about 2), so these assert how often llama.cpp picks the merged model's next token, both
# reading one shared sequence: measured f16 99.8%, q8_0 96% of the answer positions (docs/export.md).
# q8_0 in llama.cpp also rounds the activations to 8 bits inside each matrix product. A wrong row
# order, scale or type would agree almost nowhere.
SAME_NEXT_TOKEN_FLOORS = {"f16": 0.98, "q8_0": 0.90}


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_llama_cpp_f16_and_q8_0_pick_the_merged_models_next_tokens(llama_cpp, exports, shared_sequences, dtype):
    folder, tokenizer, questions, expected, _ = exports
    _, agreeing, positions = compare_teacher_forced(llama_cpp, shared_sequences, f"merged {dtype}", folder / f"merged-{dtype}.gguf")
    got = llama_cpp_answers(llama_cpp, tokenizer, questions, folder / f"merged-{dtype}.gguf")
    agreement(f"merged {dtype}", expected, got)
    same_start = sum(a.split()[:3] == b.split()[:3] for a, b in zip(expected, got))
    print(f"llama.cpp merged {dtype}: {same_start}/{len(questions)} answers begin with the same 3 words")
    assert agreeing >= SAME_NEXT_TOKEN_FLOORS[dtype] * positions


def test_llama_cpp_tokenizes_as_the_project_tokenizer(llama_cpp, exports):
    from tests.test_export import tokenizer_strings

    folder, tokenizer, _, _, _ = exports
    llm = llama_cpp.Llama(model_path=str(folder / "merged-q8_0.gguf"), n_ctx=256, vocab_only=True, verbose=False)
    strings = tokenizer_strings(tokenizer)
    differing = [
        text for text in strings
        if llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) != tokenizer(text, add_special_tokens=False)["input_ids"]
    ]
    print(f"llama.cpp tokenizer: {len(strings) - len(differing)}/{len(strings)} strings give the project tokenizer's ids; differing: {differing[:5]}")
    assert len(differing) <= len(strings) // 50, differing[:5]


# The adapter `make run` trained on 2026-12-05 at 453d0cb (the cpu preset: SFT, then the preference stage;
# the README's results), committed so that CI, which has no runs/ folder, checks that an export keeps
# what the preference stage taught the model itself.
CPU_ADAPTER = Path(__file__).resolve().parent / "fixtures" / "cpu_adapter"
ROUTE_PROMPTS = {"out_of_domain": 8, "medical": 6, "emergency": 3, "personal_dose": 3}  # 20 held-out scope prompts
ROUTE_FLOOR = 18  # of the 20 routed the same way


def spread_scope_prompts(counts: dict[str, int]):
    """counts[kind] prompts of each kind of data/scope_heldout.jsonl, evenly spaced through that kind's
    prompts (the file keeps each category's prompts together, so this spreads over the categories)."""
    from data.scope_set import load_heldout

    prompts = load_heldout()
    picked = []
    for kind, count in counts.items():
        of_kind = [p for p in prompts if p.kind == kind]
        picked += [of_kind[i * len(of_kind) // count] for i in range(count)]
    return picked


def route(answer: str, kind: str) -> str:
    """What an answer does, by medlora.scope's judge: "decline", "referral" (the one a prompt of this
    kind needs: is_referral), or "answer"."""
    from medlora.scope import REFERRAL_KINDS, is_decline, is_referral

    if is_decline(answer):
        return "decline"
    if kind in REFERRAL_KINDS and is_referral(answer, kind):
        return "referral"
    return "answer"


@pytest.mark.skipif(not (CPU_ADAPTER / "adapter_model.safetensors").is_file(), reason=f"no committed cpu-preset adapter in {CPU_ADAPTER}")
def test_llama_cpp_f16_gguf_of_the_cpu_adapter_routes_scope_prompts_as_transformers(llama_cpp, tmp_path):
    """The model alone, as every export carries it: the f16 GGUF under llama.cpp declines, refers and
    answers 20 held-out scope prompts (8 out-of-domain, 6 medical, 3 emergencies, 3 personal doses) as
    the merged model under transformers does. Both decode greedily with no repetition penalty, up to
    evaluate.py's 64 new tokens, and each answer is read to the end of its second sentence, as
    evaluate.py's model-only scope column reads it."""
    import torch

    from medlora.evaluation.settings import SCOPE_MAX_NEW_TOKENS, SCOPE_SENTENCES
    from medlora.export import export_adapter
    from medlora.generation import GenerationSettings, generate_answers, load_for_inference
    from medlora.scope import first_sentences

    prompts = spread_scope_prompts(ROUTE_PROMPTS)
    questions = [p.question for p in prompts]
    gguf_file = tmp_path / "cpu-f16.gguf"
    export_adapter(CPU_ADAPTER, "gguf", gguf_file, "f16")
    model, tokenizer, _ = load_for_inference(None, CPU_ADAPTER)
    settings = GenerationSettings(max_new_tokens=SCOPE_MAX_NEW_TOKENS, repetition_penalty=1.0)
    with torch.no_grad():
        expected = generate_answers(model, tokenizer, questions, settings, stop_after_sentences=SCOPE_SENTENCES)
    got = [first_sentences(answer, SCOPE_SENTENCES)
           for answer in llama_cpp_answers(llama_cpp, tokenizer, questions, gguf_file, max_new_tokens=SCOPE_MAX_NEW_TOKENS,
                                             f32_cache=False)]  # as a user's llama.cpp runs it
    routes = [(p.kind, route(a, p.kind), route(b, p.kind)) for p, a, b in zip(prompts, expected, got)]
    same = sum(hf == cpp for _, hf, cpp in routes)
    for kind in ROUTE_PROMPTS:
        print(f"{kind}: transformers {[hf for k, hf, _ in routes if k == kind]}, llama.cpp f16 {[cpp for k, _, cpp in routes if k == kind]}")
    parted = [f"{p.question!r} ({hf} vs {cpp}): {a[:80]!r} | {b[:80]!r}"
              for p, a, b, (_, hf, cpp) in zip(prompts, expected, got, routes) if hf != cpp]
    print(f"llama.cpp f16 GGUF of {CPU_ADAPTER.name}: {same}/{len(prompts)} held-out scope prompts routed as transformers routes them")
    assert same >= ROUTE_FLOOR, (
        f"llama.cpp f16 routed {same}/{len(prompts)} held-out scope prompts as transformers did (floor {ROUTE_FLOOR}); differing: "
        + "; ".join(parted)
    )
