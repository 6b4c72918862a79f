"""The real llama.cpp runs our GGUF files: merged f32/f16/q8_0, and the base GGUF with the LoRA GGUF.

Runs only in CI (CI=true): llama.cpp is compiled from the `llama-cpp-python` source package on
PyPI (CPU only; about 24 minutes on 2 busy cores the first time, then pip's wheel cache makes
the install take seconds). It is installed into its own folder, outside the project's venv, and
is used only here. Greedy decoding with no repetition penalty on both sides, so the two engines
follow the same rule; prompts are given to llama.cpp as the project tokenizer's ids.
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
CPU_ONLY = "-DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF"
MAX_NEW_TOKENS = 64


def install_llama_cpp():
    """Import llama_cpp from its own folder, building it first if that folder does not hold it."""
    target = Path.home() / ".cache" / "medlora" / f"llama-cpp-python-{LLAMA_CPP_VERSION}"
    if not (target / "llama_cpp" / "lib").is_dir():
        if not all(shutil.which(tool) for tool in ("cmake", "gcc", "g++")) and shutil.which("apt-get"):
            subprocess.run(["apt-get", "update", "-qq"], check=True)
            subprocess.run(["apt-get", "install", "-y", "-qq", "cmake", "gcc", "g++"], check=True)
        environment = {**os.environ, "CMAKE_ARGS": CPU_ONLY, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        subprocess.run(
            ["nice", "-n", "10", sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
             f"llama-cpp-python=={LLAMA_CPP_VERSION}", "diskcache"],
            check=True, env=environment,
        )
    sys.path.insert(0, str(target))
    return importlib.import_module("llama_cpp")


@pytest.fixture(scope="module")
def llama_cpp():
    return install_llama_cpp()


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
    return folder, tokenizer, questions, expected


def llama_cpp_answers(llama_cpp, tokenizer, questions, model_path, lora_path=None) -> list[str]:
    from data.format import prompt_ids

    llm = llama_cpp.Llama(
        model_path=str(model_path), lora_path=str(lora_path) if lora_path else None,
        n_ctx=1024, n_threads=2, n_batch=512, verbose=False, seed=0,
    )
    answers = []
    for question in questions:
        llm.reset()
        generated = []
        for token in llm.generate(prompt_ids(tokenizer, question), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            if token == tokenizer.eos_token_id or len(generated) == MAX_NEW_TOKENS:
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


def test_llama_cpp_merged_f32_answers_equal_transformers(llama_cpp, exports):
    folder, tokenizer, questions, expected = exports
    assert agreement("merged f32", expected, llama_cpp_answers(llama_cpp, tokenizer, questions, folder / "merged-f32.gguf")) == 8


def test_llama_cpp_base_plus_lora_gguf_answers_equal_transformers(llama_cpp, exports):
    folder, tokenizer, questions, expected = exports
    got = llama_cpp_answers(llama_cpp, tokenizer, questions, folder / "lora" / "base.gguf", folder / "lora" / "adapter.gguf")
    assert agreement("base f32 + LoRA GGUF", expected, got) == 8



@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_llama_cpp_f16_and_q8_0_agreement_is_reported(llama_cpp, exports, dtype):
    folder, tokenizer, questions, expected = exports
    got = llama_cpp_answers(llama_cpp, tokenizer, questions, folder / f"merged-{dtype}.gguf")
    agreement(f"merged {dtype}", expected, got)
    # Rounding moves near-tied tokens, and a greedy answer then takes another path (q8_0 here: 1 of 8
    # answers identical over 64 tokens); a broken file would not even begin the answers the same way.
    same_start = sum(a.split()[:3] == b.split()[:3] for a, b in zip(expected, got))
    print(f"llama.cpp merged {dtype}: {same_start}/{len(questions)} answers begin with the same 3 words")
    assert same_start >= len(questions) // 2


def test_llama_cpp_tokenizes_as_the_project_tokenizer(llama_cpp, exports):
    from tests.test_export import tokenizer_strings

    folder, tokenizer, _, _ = exports
    llm = llama_cpp.Llama(model_path=str(folder / "merged-q8_0.gguf"), n_ctx=256, vocab_only=True, verbose=False)
    strings = tokenizer_strings(tokenizer)
    differing = [
        text for text in strings
        if llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) != tokenizer(text, add_special_tokens=False)["input_ids"]
    ]
    print(f"llama.cpp tokenizer: {len(strings) - len(differing)}/{len(strings)} strings give the project tokenizer's ids; differing: {differing[:5]}")
    assert len(differing) <= len(strings) // 50, differing[:5]
