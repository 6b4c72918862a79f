"""Answer questions with a base model (plus a merged LoRA adapter): batched for evaluation, streamed for chat.

    model, tokenizer, description = load_for_inference(None, "runs/cpu/adapter")
    answers = generate_answers(model, tokenizer, ["What is the mechanism of action of metformin?"], GenerationSettings())
    for piece in stream_answer(model, tokenizer, "And its side effects?", history, GenerationSettings()):
        print(piece, end="", flush=True)

Every prompt is built by `data.format.prompt_ids`, the formatter training uses, so the model is asked
in exactly the form it was trained on. The adapter is merged into the base weights at load time
(W <- W0 + (alpha/r) B A), so generation costs the same as with the base model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm
from transformers import (
    LogitsProcessorList,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from data.format import prompt_ids
from lora import AdapterError, load_adapter, merge_lora, read_adapter_config
from lora.adapter_files import WEIGHTS_NAME
from medlora.model import expanded_cache, load_model_and_tokenizer, model_display_name, prefix_cache, shared_prefix_length
from medlora.scope import first_sentences, sentence_ends  # the one definition of a sentence


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are decoded. The defaults are deterministic (greedy)."""

    max_new_tokens: int = 200  # most tokens generated per answer; generation stops earlier at end-of-turn
    temperature: float = 0.0  # 0 = greedy (always the most likely token); > 0 samples, higher = more varied
    top_p: float = 1.0  # sampling only: keep the smallest set of tokens whose probabilities sum to top_p
    repetition_penalty: float = 1.1  # > 1 divides the logits of tokens already in the text (1 = off)
    seed: int | None = None  # sampling only: seeds torch so a sampled answer can be reproduced

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100] (0 = greedy), got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise ValueError(f"repetition_penalty must be in (0, 10] (1 = off), got {self.repetition_penalty!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# Questions per generation batch when answering many (evaluation). On a CPU a decoding step reads
# every weight whatever the batch, so a larger batch costs little more per step, and `decode` lets
# finished rows leave it: evaluate.py's 296 scope prompts took 45-51 s per model at 128, 56 s at 64,
# and 122-125 s at 16 with model.generate; the answers are the same in float32 (docs/performance.md).
GENERATION_BATCH_SIZE = 128

def check_sentence_count(stop_after_sentences: int | None) -> None:
    """Raise ValueError unless `stop_after_sentences` is None (no limit) or a positive integer."""
    if stop_after_sentences is None:
        return
    if isinstance(stop_after_sentences, bool) or not isinstance(stop_after_sentences, int) or stop_after_sentences < 1:
        raise ValueError(f"stop_after_sentences must be a positive integer or None (no limit), got {stop_after_sentences!r}")


class PromptTooLongError(ValueError):
    """The question alone does not fit in the model's context, even with no earlier turns."""


def load_for_inference(
    model: str | None,
    adapter: str | os.PathLike | None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """Load the base model and tokenizer, then load and merge `adapter` into it.

    The adapter's files are checked before the (slow) model load, so a missing or broken adapter
    fails at once. With `model` None, the base model named in the adapter's config is used (the
    embedded model when there is no adapter).

    Returns:
        (model in eval mode, tokenizer, one-line description such as
        "SmolLM2-135M-Instruct + adapter runs/cpu/adapter (merged)").

    Raises:
        AdapterError: the adapter folder, its config or its weights do not fit the model.
        ModelLoadError: the base model could not be loaded.
    """
    if adapter is not None:
        config = read_adapter_config(adapter)
        if not (Path(adapter) / WEIGHTS_NAME).is_file():
            raise AdapterError(f"{Path(adapter) / WEIGHTS_NAME}: missing")
        if model is None:
            model = config.get("base_model_name_or_path") or None
    net, tokenizer = load_model_and_tokenizer(model, dtype=dtype, device=device)
    name = model_display_name(model)
    if adapter is None:
        return net, tokenizer, f"base model {name}"
    load_adapter(net, adapter)
    merge_lora(net)
    return net, tokenizer, f"{name} + adapter {adapter} (merged)"


def stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end an answer: the model's generation EOS ids and the tokenizer's EOS.

    For ChatML models (SmolLM2) the tokenizer's EOS is the end-of-turn token `<|im_end|>`.
    """
    configured = model.generation_config.eos_token_id
    ids = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def context_budget(model, settings: GenerationSettings, max_context_tokens: int | None = None) -> int:
    """Most prompt tokens that leave room for `settings.max_new_tokens` in the model's positions.

    `max_context_tokens`, when given, lowers the budget further (to keep answers fast, or in tests).
    """
    positions = getattr(model.config, "max_position_embeddings", None)
    budget = positions - settings.max_new_tokens if positions else None
    if max_context_tokens is not None:
        if max_context_tokens < 1:
            raise ValueError(f"max_context_tokens must be a positive integer, got {max_context_tokens!r}")
        budget = max_context_tokens if budget is None else min(budget, max_context_tokens)
    if budget is None:
        raise ValueError("the model config has no max_position_embeddings: pass max_context_tokens")
    if budget < 1:
        raise ValueError(
            f"max_new_tokens={settings.max_new_tokens} leaves no room for a prompt in the model's {positions} positions"
        )
    return budget


def fit_history(
    tokenizer, question: str, history: Sequence[tuple[str, str]], budget: int
) -> tuple[list[tuple[str, str]], int]:
    """Drop the oldest (user, assistant) turns until the prompt fits in `budget` tokens.

    Returns:
        (the turns kept, oldest first; how many turns were dropped).

    Raises:
        PromptTooLongError: the question alone, with no history, is over the budget.
    """
    history = list(history)
    for dropped in range(len(history) + 1):
        kept = history[dropped:]
        if len(prompt_ids(tokenizer, question, kept)) <= budget:
            return kept, dropped
    length = len(prompt_ids(tokenizer, question))
    raise PromptTooLongError(
        f"the question makes a {length}-token prompt, over the context budget of {budget} tokens: shorten it"
    )


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token id lists into [batch, longest] tensors, padding on the LEFT.

    Left padding puts every prompt's last token in the last column, so the first generated token
    of every row follows its own prompt directly. The attention mask is 0 on padding.
    """
    longest = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if ids:
            input_ids[row, longest - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, longest - len(ids):] = 1
    return input_ids, attention_mask


def prefix_then_left_pad(sequences: Sequence[Sequence[int]], shared: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `left_pad`, but the `shared` tokens all rows start with stay first and the padding goes after them.

    [prefix | padding | rest of the prompt]: the prefix's keys and values, computed once, serve every
    row (the cache `decode` starts from), and each row's last prompt token is still in the last column.
    Positions come from the attention mask (its running count), so a row's own tokens sit right
    after the prefix, as in the unpadded prompt.
    """
    rest_ids, rest_mask = left_pad([ids[shared:] for ids in sequences], pad_id)
    prefix = torch.tensor([list(sequences[0][:shared])], dtype=torch.long).expand(len(sequences), -1)
    return torch.cat([prefix, rest_ids], dim=1), torch.cat([torch.ones_like(prefix), rest_mask], dim=1)


def generate_answers(
    model,
    tokenizer,
    questions: list[str],
    settings: GenerationSettings,
    batch_size: int = GENERATION_BATCH_SIZE,
    progress: bool = False,
    bad_words_ids: Sequence[Sequence[int]] | None = None,
    *,
    stop_after_sentences: int | None = None,
    contexts: Sequence[str] | None = None,
    answer_starts: Sequence[str] | None = None,
) -> list[str]:
    """Answer each question on its own (no history), in batches; answers come back in input order.

    `answer_starts`, one per question ("" for none), is text the answer is made to begin with: its
    tokens follow the prompt, the model continues from them, and the answer returned includes it
    (medlora.preference draws the model's own decline of a question this way).

    `contexts`, one per question ("" for none), is put in the prompt before its question
    (data.format.prompt_ids), as evaluate.py's grounding rows put the closest flashcards there.

    Prompts are sorted by length before batching so each batch pads little. The tokens every prompt
    starts with (the system prompt: 48 of a scope prompt's ~67 tokens) are run through the model
    once, and each batch attends to their keys and values (`prefix_then_left_pad`). Decoding is greedy by
    default; in float32 the answers are then the same whatever the batch size (16 of 16 test
    questions at batch 1, 8 and 16, 42 of 42 at 16 and 64; bench/results/generation_batched_fp32*.log), while in bf16 the rounding changes with
    the batch's shape and so do the answers (0 of 16 equal). With temperature > 0 the sampler is
    seeded with `settings.seed` (when set).

    `stop_after_sentences=N` ends each answer at the end of its N-th sentence (medlora.scope.first_sentences):
    a row stops generating once N sentence ends are followed by a space, and the batch stops when
    every row has (or has reached end of turn or max_new_tokens). Up to that cut the answer is the
    same as without the limit: the rows still running decode exactly as before.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    check_sentence_count(stop_after_sentences)
    if contexts is not None and len(contexts) != len(questions):
        raise ValueError(f"need one context per question, got {len(contexts)} contexts for {len(questions)} questions")
    if answer_starts is not None and len(answer_starts) != len(questions):
        raise ValueError(f"need one answer start per question, got {len(answer_starts)} for {len(questions)} questions")
    starts = [tokenizer(start, add_special_tokens=False)["input_ids"] if start else [] for start in answer_starts or [""] * len(questions)]
    prompts = [prompt_ids(tokenizer, question, context=context) + start
               for question, context, start in zip(questions, contexts or [""] * len(questions), starts)]
    budget = context_budget(model, settings)
    for question, ids in zip(questions, prompts):
        if len(ids) > budget:
            raise PromptTooLongError(
                f"question {question[:40]!r}... makes a {len(ids)}-token prompt, over the context budget of {budget} tokens"
            )
    if not settings.greedy and settings.seed is not None:
        torch.manual_seed(settings.seed)
    order = sorted(range(len(questions)), key=lambda index: len(prompts[index]))
    answers = [""] * len(questions)
    shared = shared_prefix_length(prompts) if len(prompts) > 1 else 0  # one prompt: nothing to share
    prefix = prefix_cache(model, prompts[0][:shared]) if shared else None
    with tqdm(total=len(questions), desc="generating", unit="answer", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            input_ids, attention_mask = prefix_then_left_pad([prompts[index] for index in batch], shared, tokenizer.pad_token_id)
            cache = None if prefix is None else expanded_cache(prefix, len(batch))
            for new_tokens in decode(model, tokenizer, input_ids.to(model.device), attention_mask.to(model.device), settings,
                                     cache, bad_words_ids, stop_after_sentences):
                pass  # every step grows the same lists: after the last, each row's whole answer
            for index, row in zip(batch, new_tokens):
                answer = tokenizer.decode(starts[index] + list(row), skip_special_tokens=True).strip()
                answers[index] = answer if stop_after_sentences is None else first_sentences(answer, stop_after_sentences)
            bar.update(len(batch))
    return answers


def logits_processors(model, tokenizer, settings: GenerationSettings, bad_words_ids: Sequence[Sequence[int]] | None = None):
    """The transformers logits processors `model.generate` applies for `settings`, in its order:
    repetition penalty, banned words, then (sampling only) temperature and top-p."""
    processors = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if bad_words_ids:
        processors.append(NoBadWordsLogitsProcessor([list(ids) for ids in bad_words_ids], stop_token_ids(model, tokenizer)))
    if not settings.greedy:
        if settings.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(settings.top_p))
    return processors


@torch.no_grad()
def decode(
    model,
    tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    settings: GenerationSettings,
    cache=None,
    bad_words_ids: Sequence[Sequence[int]] | None = None,
    stop_after_sentences: int | None = None,
) -> Iterator[list[list[int]]]:
    """Decode a padded batch of prompts one token per step; after each step, yield every row's new tokens
    so far (end of turn left out). The project's one decoding loop: batched answers and chat's stream.

    A row leaves the batch as soon as it ends: at an end-of-turn token, at the end of its
    `stop_after_sentences`-th sentence, or after settings.max_new_tokens. `model.generate` keeps
    finished rows in the batch until the last one ends; dropping them makes the rows still going
    decode at the batch size they need. The scores pass through the same logits processors as in
    `generate` (`logits_processors`), so greedy answers are generate's, token for token.

    Args:
        input_ids, attention_mask: [batch, prompt], 0 on padding (`left_pad`, `prefix_then_left_pad`).
        cache: keys and values of the prompts' first columns (`prefix_cache` + `expanded_cache`), or None.
    """
    processors = logits_processors(model, tokenizer, settings, bad_words_ids)
    stop_ids = torch.tensor(stop_token_ids(model, tokenizer), device=input_ids.device)
    rows = list(range(input_ids.shape[0]))  # which input row each row still decoding is
    generated: list[list[int]] = [[] for _ in rows]
    sequences, mask = input_ids, attention_mask  # [rows still decoding, prompt + new tokens so far]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # a token's position counts the real tokens before it
    cached = 0 if cache is None else cache.get_seq_length()
    step_ids, step_positions = sequences[:, cached:], positions[:, cached:]
    for step in range(settings.max_new_tokens):
        output = model(input_ids=step_ids, attention_mask=mask, position_ids=step_positions, cache=cache, use_cache=True,
                       logits_to_keep=1)
        cache = output.cache
        scores = processors(sequences, output.logits[:, -1, :].float())  # [rows, vocab]; the processors see the whole text
        tokens = scores.argmax(-1) if settings.greedy else torch.multinomial(scores.softmax(-1), 1)[:, 0]
        sequences = torch.cat([sequences, tokens[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        ended = torch.isin(tokens, stop_ids).tolist()
        for row, token, end in zip(rows, tokens.tolist(), ended):
            if not end:
                generated[row].append(token)
        yield generated
        if stop_after_sentences is not None:
            texts = tokenizer.batch_decode([generated[row] for row in rows], skip_special_tokens=True)
            ended = [end or len(sentence_ends(text)) >= stop_after_sentences for end, text in zip(ended, texts)]
        keep = [live for live, end in enumerate(ended) if not end]
        if not keep or step == settings.max_new_tokens - 1:
            break
        if len(keep) < len(rows):  # drop the finished rows: from the text, the mask and every layer's cache
            index = torch.tensor(keep, device=sequences.device)
            rows, sequences, mask, tokens = [rows[live] for live in keep], sequences[index], mask[index], tokens[index]
            cache.batch_select_indices(index)
        step_ids, step_positions = tokens[:, None], mask.sum(-1, keepdim=True) - 1


def stream_answer(
    model,
    tokenizer,
    question: str,
    history: Sequence[tuple[str, str]],
    settings: GenerationSettings,
    max_context_tokens: int | None = None,
    bad_words_ids: Sequence[Sequence[int]] | None = None,
) -> Iterator[str]:
    """Yield the answer to `question` piece by piece while it is generated.

    `history` holds the earlier (user, assistant) turns, oldest first; they go into the prompt.
    Turns that do not fit the context budget (see `context_budget`) are dropped oldest first;
    callers that want to tell the user call `fit_history` with the same budget beforehand.

    The answer comes from `decode`, the loop evaluate.py's answers come from (one row, no
    shared prefix), so a greedy streamed answer is the batched one. After each token the new text
    is yielded; a character whose bytes span tokens waits for its last byte. When the reader stops
    early (Ctrl-C, a closed page), decoding stops with it: nothing runs in the background.
    """
    budget = context_budget(model, settings, max_context_tokens)
    kept, _ = fit_history(tokenizer, question, history, budget)
    input_ids = torch.tensor([prompt_ids(tokenizer, question, kept)], device=model.device)  # [1, prompt]
    if not settings.greedy and settings.seed is not None:
        torch.manual_seed(settings.seed)
    shown = ""
    for (new_tokens,) in decode(model, tokenizer, input_ids, torch.ones_like(input_ids), settings, None, bad_words_ids):
        text = tokenizer.decode(new_tokens, skip_special_tokens=True).lstrip()
        if len(text) > len(shown) and not text.endswith("\ufffd"):  # U+FFFD: a character still missing bytes
            yield text[len(shown) :]
            shown = text
