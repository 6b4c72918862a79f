"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, so tests run in seconds."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from base_model import load_tokenizer


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
