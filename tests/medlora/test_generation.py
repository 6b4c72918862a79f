"""medlora/generation.py: batched and streamed generation, history fitting, loading with a merged adapter."""

import pytest
import torch
from transformers import LlamaForCausalLM

from data.format import prompt_ids
from lora import AdapterError, load_adapter, lora_layers
from medlora import generation
from medlora.generation import (
    GenerationSettings,
    PromptTooLongError,
    context_budget,
    fit_history,
    generate_answers,
    left_pad,
    load_for_inference,
    stop_token_ids,
    stream_answer,
)
from medlora.scope import first_sentences
from tests.conftest import chatty_tiny_model, generate_kwargs, record_prompts, save_tiny_adapter

QUESTIONS = [
    "What is the mechanism of action of metformin?",
    "Why?",
    "Describe the stages of wound healing, from hemostasis to remodeling.",
    "What is hypertension?",
    "Name one beta blocker.",
]
SHORT = GenerationSettings(max_new_tokens=10)


@pytest.mark.parametrize(
    "field, value",
    [("max_new_tokens", 0), ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("repetition_penalty", 0.0)],
)
def test_settings_reject_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        GenerationSettings(**{field: value})


@pytest.mark.parametrize("count", [0, -1, 1.5, True])
def test_sentence_limit_must_be_a_positive_integer(tokenizer, count):
    with pytest.raises(ValueError, match="stop_after_sentences must be a positive integer or None"):
        generate_answers(chatty_tiny_model(), tokenizer, QUESTIONS[:1], SHORT, stop_after_sentences=count)


def test_left_pad_puts_padding_before_each_prompt():
    input_ids, attention_mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_stop_tokens_include_the_chatml_end_of_turn(tokenizer):
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(chatty_tiny_model(), tokenizer)


def test_left_padded_batches_equal_one_at_a_time_greedy(tokenizer):
    model = chatty_tiny_model()
    batched = generate_answers(model, tokenizer, QUESTIONS, SHORT, batch_size=3)
    one_at_a_time = [generate_answers(model, tokenizer, [question], SHORT)[0] for question in QUESTIONS]
    assert batched == one_at_a_time
    assert all(batched) and len(set(batched)) > 1  # real, prompt-dependent answers, in input order


def ending_tiny_model() -> LlamaForCausalLM:
    """chatty_tiny_model with a strong random end-of-turn row in its output layer: its answers end
    at different steps (4 to 12 tokens for QUESTIONS), so a batch loses rows as it decodes."""
    model = chatty_tiny_model()
    torch.manual_seed(3)
    with torch.no_grad():
        row = model.lm_head.weight[2]  # the tokenizer's <|im_end|>
        row.copy_(torch.randn_like(row) * 3.0 * model.lm_head.weight.std())
    return model


def answers_of_generate(model, tokenizer, questions, settings, bad_words_ids=None) -> list[str]:
    """The reference: transformers' model.generate over one left-padded batch."""
    input_ids, attention_mask = left_pad([prompt_ids(tokenizer, q) for q in questions], tokenizer.pad_token_id)
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                **generate_kwargs(model, tokenizer, settings, bad_words_ids))
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in output[:, input_ids.shape[1]:]]


@pytest.mark.parametrize("penalty, banned", [(1.1, None), (1.0, None), (1.3, [[30], [31, 32]])])
def test_own_decode_loop_equals_generate_while_rows_leave_the_batch(tokenizer, penalty, banned):
    model = ending_tiny_model()
    settings = GenerationSettings(max_new_tokens=12, repetition_penalty=penalty)
    rows_per_call = []
    hook = model.model.register_forward_pre_hook(  # the decoder: the prefix pass and every decoding step go through it
        lambda _, args, kwargs: rows_per_call.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    ours = generate_answers(model, tokenizer, QUESTIONS, settings, batch_size=8, bad_words_ids=banned)
    hook.remove()
    assert ours == answers_of_generate(model, tokenizer, QUESTIONS, settings, banned)
    assert rows_per_call[0] == 1 and rows_per_call[1] == len(QUESTIONS)  # the shared system prompt once, then the batch
    assert rows_per_call[-1] < len(QUESTIONS) and rows_per_call == rows_per_call[:2] + sorted(rows_per_call[2:], reverse=True)


def test_shared_prefix_length_leaves_each_prompt_a_token_of_its_own():
    from medlora.generation import prefix_then_left_pad
    from medlora.model import shared_prefix_length

    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # identical prompts: the last token stays uncached
    assert shared_prefix_length([[1, 2], [3]]) == 0
    input_ids, attention_mask = prefix_then_left_pad([[1, 2, 3, 4], [1, 2, 5]], 2, pad_id=0)
    assert input_ids.tolist() == [[1, 2, 3, 4], [1, 2, 0, 5]]
    assert attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 1]]


def test_no_questions_gives_no_answers(tokenizer):
    assert generate_answers(chatty_tiny_model(), tokenizer, [], SHORT) == []


def test_each_context_goes_before_its_own_question(tokenizer):
    model = chatty_tiny_model()
    grounded = generate_answers(model, tokenizer, QUESTIONS[:2], SHORT, contexts=["Flashcard: heparin binds antithrombin.", ""])
    assert grounded[1] == generate_answers(model, tokenizer, QUESTIONS[1:2], SHORT)[0]  # "" = the plain question
    with pytest.raises(ValueError, match="need one context per question, got 1 contexts for 2 questions"):
        generate_answers(model, tokenizer, QUESTIONS[:2], SHORT, contexts=[""])


def test_an_answer_start_is_continued_greedily_and_returned_with_the_answer(tokenizer):
    model = chatty_tiny_model()
    start = "I can only answer"
    started = generate_answers(model, tokenizer, QUESTIONS[:3], SHORT, answer_starts=[start, "", start])
    assert started[1] == generate_answers(model, tokenizer, QUESTIONS[1:2], SHORT)[0]  # "" = no start
    ids = prompt_ids(tokenizer, QUESTIONS[0]) + tokenizer(start, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        continued = model.generate(torch.tensor([ids]), **generate_kwargs(model, tokenizer, SHORT))[0, len(ids):]
    assert started[0] == tokenizer.decode(tokenizer(start, add_special_tokens=False)["input_ids"] + continued.tolist(),
                                          skip_special_tokens=True).strip()  # the start, then the greedy continuation
    assert started[0].startswith(start) and started[2].startswith(start)
    with pytest.raises(ValueError, match="need one answer start per question, got 1 for 2 questions"):
        generate_answers(model, tokenizer, QUESTIONS[:2], SHORT, answer_starts=[start])


def test_sampling_with_a_seed_is_reproducible(tokenizer):
    model = chatty_tiny_model()
    sampled = GenerationSettings(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    assert generate_answers(model, tokenizer, QUESTIONS[:2], sampled) == generate_answers(model, tokenizer, QUESTIONS[:2], sampled)


def test_streamed_pieces_join_to_the_batched_answer(tokenizer):
    model = chatty_tiny_model()
    pieces = list(stream_answer(model, tokenizer, QUESTIONS[0], [], SHORT))
    assert len(pieces) > 1
    assert "".join(pieces).strip() == generate_answers(model, tokenizer, QUESTIONS[:1], SHORT)[0]


def test_history_goes_into_the_prompt(tokenizer, monkeypatch):
    model = chatty_tiny_model()
    prompts = record_prompts(model, tokenizer, monkeypatch)
    history = [("What is metformin?", "A biguanide that lowers hepatic glucose output.")]
    "".join(stream_answer(model, tokenizer, "What are its side effects?", history, SHORT))
    assert prompts == [tokenizer.decode(prompt_ids(tokenizer, "What are its side effects?", history))]
    assert "What is metformin?" in prompts[0] and "hepatic glucose output" in prompts[0]


def test_reader_leaving_early_stops_decoding(tokenizer):
    model = chatty_tiny_model()
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    stream = stream_answer(model, tokenizer, QUESTIONS[0], [], GenerationSettings(max_new_tokens=500))
    next(stream)
    made = len(calls)
    stream.close()
    assert made < 500 and len(calls) == made  # no step runs after the reader leaves


def test_error_while_decoding_reaches_the_reader(tokenizer, monkeypatch):
    model = chatty_tiny_model()

    def broken_forward(**kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model, "forward", broken_forward)
    with pytest.raises(RuntimeError, match="out of memory"):
        list(stream_answer(model, tokenizer, QUESTIONS[0], [], SHORT))


def test_streamed_greedy_answer_equals_generate(tokenizer):
    model = ending_tiny_model()
    settings = GenerationSettings(max_new_tokens=12)
    for question in QUESTIONS[:3]:
        streamed = "".join(stream_answer(model, tokenizer, question, [], settings)).strip()
        assert streamed == answers_of_generate(model, tokenizer, [question], settings)[0]


def test_context_budget_leaves_room_for_the_answer():
    model = chatty_tiny_model()  # 1024 positions
    assert context_budget(model, GenerationSettings(max_new_tokens=200)) == 824
    assert context_budget(model, GenerationSettings(max_new_tokens=200), max_context_tokens=300) == 300
    with pytest.raises(ValueError, match="max_new_tokens=1024 leaves no room"):
        context_budget(model, GenerationSettings(max_new_tokens=1024))


def test_fit_history_drops_the_oldest_turns_first(tokenizer):
    history = [(f"Question number {i}?", f"Answer number {i}.") for i in range(5)]
    question = "And now?"
    budget = len(prompt_ids(tokenizer, question, history[-2:]))
    assert fit_history(tokenizer, question, history, budget) == (history[-2:], 3)
    assert fit_history(tokenizer, question, history, budget - 1) == (history[-1:], 4)
    assert fit_history(tokenizer, question, history, 10_000) == (history, 0)


def test_fit_history_refuses_a_question_that_alone_is_too_long(tokenizer):
    with pytest.raises(PromptTooLongError, match="over the context budget of 20 tokens"):
        fit_history(tokenizer, "What is hypertension?", [], budget=20)


def test_stream_drops_old_turns_to_fit_the_context(tokenizer, monkeypatch):
    model = chatty_tiny_model()
    prompt_lengths = []
    real_forward = model.forward

    def recording_forward(**kwargs):
        if kwargs.get("cache") is None:  # the prompt's own pass
            prompt_lengths.append(kwargs["input_ids"].shape[1])
        return real_forward(**kwargs)

    monkeypatch.setattr(model, "forward", recording_forward)
    history = [(f"Question number {i}?", f"Answer number {i}.") for i in range(20)]
    budget = len(prompt_ids(tokenizer, "And now?", history[-3:]))
    "".join(stream_answer(model, tokenizer, "And now?", history, SHORT, max_context_tokens=budget))
    assert prompt_lengths == [budget]


def test_merged_adapter_gives_the_unmerged_logits(chatty_model_dir, tiny_adapter_dir):
    merged, _, description = load_for_inference(None, tiny_adapter_dir)  # base model read from the adapter config
    assert description == f"{chatty_model_dir} + adapter {tiny_adapter_dir} (merged)"
    assert all(layer.merged for _, layer in lora_layers(merged))
    unmerged = LlamaForCausalLM.from_pretrained(chatty_model_dir).eval()
    base_ids = torch.randint(0, 49152, (2, 9))
    with torch.no_grad():
        base_logits = unmerged(base_ids).logits
    load_adapter(unmerged, tiny_adapter_dir)
    with torch.no_grad():
        expected = unmerged(base_ids).logits
        actual = merged(base_ids).logits
    assert not torch.allclose(expected, base_logits, atol=1e-4)  # the adapter changes the model
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


def test_base_model_only(chatty_model_dir):
    model, tokenizer, description = load_for_inference(str(chatty_model_dir), None)
    assert description == f"base model {chatty_model_dir}"
    assert not list(lora_layers(model))
    assert tokenizer.pad_token is not None


def test_adapter_is_checked_before_the_model_loads(tmp_path, tiny_adapter_dir, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the adapter was checked")

    monkeypatch.setattr(generation, "load_model_and_tokenizer", must_not_load)
    with pytest.raises(AdapterError, match="adapter folder not found"):
        load_for_inference(None, tmp_path / "missing")
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "adapter_config.json").write_text((tiny_adapter_dir / "adapter_config.json").read_text())
    with pytest.raises(AdapterError, match="adapter_model.safetensors: missing"):
        load_for_inference(None, config_only)


def test_adapter_for_another_base_model_is_refused(tmp_path, chatty_model_dir):
    other = save_tiny_adapter(chatty_model_dir, tmp_path / "other", hidden_size=32)
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: key .* has shape \[4, 32\] in the adapter but \[4, 64\]"):
        load_for_inference(None, other)


@pytest.mark.slow
def test_sentence_limit_gives_the_unlimited_greedy_answers_cut_at_the_second_sentence():
    model, tokenizer, _ = load_for_inference(None, None)
    questions = ["What is the mechanism of action of metformin?", "What is hypertension?", "What is 2 + 2?", "Hello"]
    settings = GenerationSettings(max_new_tokens=64)
    unlimited = generate_answers(model, tokenizer, questions, settings, batch_size=4)
    limited = generate_answers(model, tokenizer, questions, settings, batch_size=4, stop_after_sentences=2)
    assert limited == [first_sentences(answer, 2) for answer in unlimited]
    assert any(len(cut) < len(answer) for cut, answer in zip(limited, unlimited))  # the limit did cut


@pytest.mark.slow
def test_embedded_model_answers_a_medical_question_coherently():
    model, tokenizer, description = load_for_inference(None, None)
    assert description == "base model SmolLM2-135M-Instruct"
    [answer] = generate_answers(model, tokenizer, ["What is the mechanism of action of metformin?"], GenerationSettings(max_new_tokens=48))
    assert "metformin" in answer.lower()
    assert any(word in answer.lower() for word in ("glucose", "insulin", "liver", "diabetes")), answer
