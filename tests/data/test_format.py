"""data/format.py: chat-template prompts and completion-only labels."""

from data import IGNORE_INDEX, SYSTEM_PROMPT, encode_example, prompt_ids, prompt_text

QUESTION = "What is the mechanism of action of metformin?"
ANSWER = "It lowers hepatic glucose production."


def test_labels_mask_every_prompt_token_and_target_answer_plus_end_of_turn(tokenizer):
    example = encode_example(tokenizer, QUESTION, ANSWER, max_length=512)
    n = example.prompt_length
    assert example.input_ids[:n] == prompt_ids(tokenizer, QUESTION)
    assert example.labels[:n] == [IGNORE_INDEX] * n
    assert example.labels[n:] == example.input_ids[n:]
    # The last target is the end-of-turn token (SmolLM2's EOS, <|im_end|>): the model learns to stop.
    assert example.labels[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example.labels[n:-1]) == ANSWER
    # pad == eos for this tokenizer, and still the EOS is a target: labels are by position, not id.
    assert tokenizer.pad_token_id == tokenizer.eos_token_id


def test_prompt_uses_the_template_and_the_reference_system_prompt(tokenizer):
    text = prompt_text(tokenizer, QUESTION)
    assert text == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_history_goes_into_the_prompt(tokenizer):
    text = prompt_text(tokenizer, "And its main side effect?", history=[(QUESTION, ANSWER)])
    assert text.count("<|im_start|>user") == 2
    assert f"<|im_start|>assistant\n{ANSWER}<|im_end|>" in text


def test_context_goes_in_the_user_turn_before_the_question(tokenizer):
    context = "Flashcard question: What does heparin bind?\nFlashcard answer: Antithrombin."
    text = prompt_text(tokenizer, QUESTION, context=context)
    assert f"<|im_start|>user\n{context}\n\n{QUESTION}<|im_end|>" in text
    assert prompt_ids(tokenizer, QUESTION, context=context) == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert prompt_text(tokenizer, QUESTION, context="") == prompt_text(tokenizer, QUESTION)


def test_truncation_keeps_prompt_and_cuts_answer(tokenizer):
    full = encode_example(tokenizer, QUESTION, ANSWER * 20, max_length=512)
    n = full.prompt_length
    cut = encode_example(tokenizer, QUESTION, ANSWER * 20, max_length=n + 5)
    assert cut.input_ids == full.input_ids[: n + 5]
    assert cut.answer_token_count == 5
    assert encode_example(tokenizer, QUESTION, ANSWER, max_length=n) is None


def test_works_with_a_template_that_ends_turns_differently(tokenizer):
    # A TinyLlama/Zephyr-style template: <|user|>\n...</s>\n<|assistant|>\n...</s>
    class Zephyr:
        eos_token_id = tokenizer.eos_token_id
        template = (
            "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
        )

        def apply_chat_template(self, messages, tokenize, add_generation_prompt=False):
            return tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt)

        def __call__(self, text, add_special_tokens):
            return tokenizer(text, add_special_tokens=add_special_tokens)

    example = encode_example(Zephyr(), QUESTION, ANSWER, max_length=512)
    assert tokenizer.decode(example.input_ids[: example.prompt_length]).endswith("<|assistant|>\n")
    assert example.labels[-1] == tokenizer.eos_token_id
