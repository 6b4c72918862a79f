"""A Hugging Face byte-level BPE tokenizer as GGUF metadata (`tokenizer.ggml.*`), for llama.cpp.

llama.cpp rebuilds the tokenizer from: the token strings in id order, each token's type (normal,
control for special tokens, user-defined for other added tokens), the BPE merges, and the name of
its pre-tokenizer (the regexes that split text before BPE runs). The pre-tokenizer cannot be read
off the tokenizer file reliably, so llama.cpp names it per tokenizer family; here a family is
recognised by a fingerprint of its vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import gguf

# sha256 of the token strings in id order, joined by "\n" -> llama.cpp's pre-tokenizer name.
# SmolLM/SmolLM2 (all sizes share the vocabulary): "smollm" splits every digit on its own, then
# applies GPT-2's regex; it is also what the embedded model's own GGUF file declares.
KNOWN_VOCABULARIES = {
    "d1f2ce856b324081b621d9e2e8dbd22879f462329f3fd4aa39fa758dddb2ce55": "smollm",
}


class UnknownTokenizerError(ValueError):
    """The tokenizer is not one the GGUF writer can describe to llama.cpp."""


@dataclass(frozen=True)
class GGUFTokenizer:
    """Everything llama.cpp needs to tokenize as the Hugging Face tokenizer does."""

    tokens: list[str]  # token strings, index = id (byte-level: a space is "Ġ")
    token_types: list[int]  # gguf.TokenType per id
    merges: list[str]  # BPE merges as "left right", in priority order
    pre_tokenizer: str  # llama.cpp's name for the pre-tokenizer regexes
    bos_id: int | None
    eos_id: int | None  # the end-of-turn token for chat models: generation stops on it
    pad_id: int | None
    unk_id: int | None
    add_bos: bool  # does tokenizing text prepend bos?
    chat_template: str | None

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        """Write the `tokenizer.ggml.*` keys and the chat template."""
        writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
        writer.add_tokenizer_pre(self.pre_tokenizer)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        writer.add_token_merges(self.merges)
        for add, token_id in (
            (writer.add_bos_token_id, self.bos_id),
            (writer.add_eos_token_id, self.eos_id),
            (writer.add_pad_token_id, self.pad_id),
            (writer.add_unk_token_id, self.unk_id),
        ):
            if token_id is not None:
                add(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_space_prefix(False)  # byte-level BPE encodes spaces itself
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def vocabulary_fingerprint(tokens: list[str]) -> str:
    """sha256 of the token strings in id order (the key of KNOWN_VOCABULARIES)."""
    return hashlib.sha256("\n".join(tokens).encode("utf-8")).hexdigest()


def gguf_tokenizer(tokenizer, vocab_size: int) -> GGUFTokenizer:
    """Describe a Hugging Face fast tokenizer for GGUF; the token list is padded to `vocab_size` rows.

    Raises:
        UnknownTokenizerError: not a byte-level BPE tokenizer, or one whose pre-tokenizer is unknown.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnknownTokenizerError(f"tokenizer {type(tokenizer).__name__} has no tokenizer.json: only fast byte-level BPE tokenizers are exported")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        kind = model.get("type", "unknown")
        raise UnknownTokenizerError(
            f"tokenizer type {kind} (pre-tokenizer {(spec.get('pre_tokenizer') or {}).get('type')}) is not "
            "byte-level BPE: the GGUF writer knows byte-level BPE tokenizers (SmolLM2's) only"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    special = {}
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        special[added["id"]] = added.get("special", False)
    if max(vocab.values()) >= vocab_size:
        raise UnknownTokenizerError(f"tokenizer has token id {max(vocab.values())}, beyond the model's {vocab_size} embeddings")
    by_id = {token_id: token for token, token_id in vocab.items()}
    tokens, token_types = [], []
    for token_id in range(vocab_size):
        if token_id not in by_id:  # embedding rows no token uses
            tokens.append(f"[PAD{token_id}]")
            token_types.append(gguf.TokenType.UNUSED)
        elif token_id in special:
            tokens.append(by_id[token_id])
            token_types.append(gguf.TokenType.CONTROL if special[token_id] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[token_id])
            token_types.append(gguf.TokenType.NORMAL)
    fingerprint = vocabulary_fingerprint([by_id.get(i, "") for i in range(len(by_id))])
    if fingerprint not in KNOWN_VOCABULARIES:
        raise UnknownTokenizerError(
            f"unknown byte-level BPE tokenizer (vocabulary fingerprint {fingerprint[:16]}...): "
            "llama.cpp needs its pre-tokenizer name; known: " + ", ".join(sorted(set(KNOWN_VOCABULARIES.values())))
        )
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    bos_id = tokenizer.bos_token_id
    return GGUFTokenizer(
        tokens=tokens,
        token_types=[int(t) for t in token_types],
        merges=merges,
        pre_tokenizer=KNOWN_VOCABULARIES[fingerprint],
        bos_id=bos_id,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        unk_id=tokenizer.unk_token_id,
        add_bos=bos_id is not None and probe[:1] == [bos_id] and len(probe) > 1,
        chat_template=tokenizer.chat_template,
    )
