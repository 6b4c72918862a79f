"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, so tests run in seconds."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lora import inject_lora, lora_layers, save_adapter
from medlora.config import TrainConfig
from medlora.model import load_tokenizer
from medlora.run_folder import write_config

# 12 prompts of data/scope_heldout.jsonl, 3 of each kind: evaluate.py --scope-set in tests, so a tiny
# model answers 12 scope prompts instead of all of them.
SCOPE_PROMPTS = Path(__file__).resolve().parent / "fixtures" / "scope_prompts.jsonl"


def tiny_llama_config(vocab_size: int = 49152) -> LlamaConfig:
    """Hidden 64, 2 layers, 4 query heads sharing 2 KV heads (GQA, as SmolLM2 and TinyLlama)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def make_tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture(autouse=True)
def evaluation_cache_in_tmp(tmp_path, monkeypatch):
    """Every test gets its own empty evaluation cache: no base-model results leak between tests or from ~/.cache."""
    from medlora.evaluation import cache

    monkeypatch.setattr(cache, "eval_cache_dir", lambda: tmp_path / "eval-cache")


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's real tokenizer (ChatML template, EOS = <|im_end|>)."""
    return load_tokenizer(None)


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A local Hugging Face model folder holding the tiny model and the real tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model().save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def chatty_tiny_model(seed: int = 0) -> LlamaForCausalLM:
    """The conftest tiny Llama with an output layer of its own.

    With tied embeddings, a random model's likeliest next token is the token it just read, so
    every answer is "\\n\\n\\n..." and tests could not tell two prompts apart. Untied, the answers
    are gibberish that depends on the prompt.
    """
    config = tiny_llama_config()
    config.tie_word_embeddings = False
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_tiny_adapter(model_dir, folder, hidden_size: int = 64):
    """Save a rank-4 q_proj/v_proj adapter with random, non-zero B, made for a tiny Llama of `hidden_size`."""
    config = tiny_llama_config()
    config.hidden_size = hidden_size
    torch.manual_seed(1)
    model = LlamaForCausalLM(config)
    inject_lora(model, rank=4, alpha=8, dropout=0.0)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    return save_adapter(model, folder, base_model=str(model_dir))


def save_chatty_model(folder: Path, tokenizer) -> Path:
    """Write `chatty_tiny_model()` and `tokenizer` into `folder` as a local Hugging Face model folder."""
    model = chatty_tiny_model()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def chatty_model_dir(tmp_path_factory, tokenizer):
    """A local Hugging Face folder holding `chatty_tiny_model()` and the real tokenizer."""
    return save_chatty_model(tmp_path_factory.mktemp("chatty-tiny-llama"), tokenizer)


@pytest.fixture(scope="session")
def tiny_adapter_dir(tmp_path_factory, chatty_model_dir):
    """An adapter for `chatty_model_dir`, whose config names that folder as its base model."""
    return save_tiny_adapter(chatty_model_dir, tmp_path_factory.mktemp("adapter") / "adapter")


def record_prompts(model, tokenizer, monkeypatch) -> list[str]:
    """Record every prompt the model is asked to answer (a decoding loop's first call), decoded."""
    prompts: list[str] = []
    real_forward = model.forward

    def recording_forward(*args, **kwargs):
        if kwargs.get("cache") is None:  # the prompt's own pass; the steps after it carry the cache
            prompts.append(tokenizer.decode(kwargs["input_ids"][0]))
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", recording_forward)
    return prompts


def generate_kwargs(model, tokenizer, settings, bad_words_ids=None) -> dict:
    """Keyword arguments that make transformers' `model.generate` decode as `settings` say: the
    reference medlora.generation.decode is compared against."""
    from medlora.generation import stop_token_ids

    kwargs = {
        "max_new_tokens": settings.max_new_tokens,
        "repetition_penalty": settings.repetition_penalty,
        "eos_token_id": stop_token_ids(model, tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "use_cache": True,
    }
    if bad_words_ids:
        kwargs["bad_words_ids"] = [list(ids) for ids in bad_words_ids]
    if settings.greedy:
        return {**kwargs, "do_sample": False}
    return {**kwargs, "do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}


def save_run_folder(folder, model_dir):
    """A train.py-shaped run folder in `folder`: config.json (model_dir, 140 rows, seed 7, max length 256)
    and adapter/ (rank 4, random B, so fine-tuned != base; its config names another base model)."""
    config = TrainConfig(model=str(model_dir), num_examples=140, seed=7, max_length=256, output_dir=str(folder))
    write_config(folder, config)
    model = make_tiny_model()
    inject_lora(model, rank=4, alpha=8, dropout=0.0)
    torch.manual_seed(1)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    save_adapter(model, folder / "adapter", base_model="an/adapter-config-name")
    return folder
