"""chat.py: one-shot answers, the terminal session, one-line errors, and the web page's chat function."""

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import chat
from data.format import prompt_ids
from medlora.answer import AnswerPath
from medlora.generation import GenerationSettings, generate_answers, load_for_inference
from tests.conftest import chatty_tiny_model, record_prompts, save_tiny_adapter

REPO = Path(__file__).resolve().parents[1]
FAST = ["--max-new-tokens", "8"]


def run_chat(*args, stdin: str = "") -> subprocess.CompletedProcess:
    """Run `python chat.py ARGS` as a user would, with `stdin` piped in."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "chat.py", *map(str, args)],
        cwd=REPO, input=stdin, capture_output=True, text=True, timeout=180, env=env,
    )


def run_main(*args, stdin: str = "", monkeypatch) -> tuple[int, str, str]:
    """Call chat.main in this process (faster than a subprocess): exit code, stdout, stderr."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = chat.main([str(arg) for arg in args])
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_prompt_prints_only_the_answer(tiny_adapter_dir):
    result = run_chat("--adapter", tiny_adapter_dir, "--prompt", "What is hypertension?", *FAST)
    assert result.returncode == 0, result.stderr
    model, tokenizer, _ = load_for_inference(None, tiny_adapter_dir)
    [expected] = generate_answers(model, tokenizer, ["What is hypertension?"], GenerationSettings(max_new_tokens=8))
    assert expected and result.stdout == expected + "\n"


def test_missing_adapter_is_one_line_and_exit_2(tmp_path):
    assert_one_line_error(run_chat("--adapter", tmp_path / "nowhere", "--prompt", "hi"), "nowhere: adapter folder not found")


def test_adapter_for_another_base_model_is_one_line_and_exit_2(tmp_path, chatty_model_dir):
    other = save_tiny_adapter(chatty_model_dir, tmp_path / "other", hidden_size=32)
    assert_one_line_error(
        run_chat("--adapter", other, "--prompt", "hi"),
        "adapter_model.safetensors", "[4, 32] in the adapter but [4, 64] in the model",
    )


def test_piped_session_with_commands_then_end_of_input(tiny_adapter_dir, chatty_model_dir):
    session = "\n/help\nWhat is hypertension?\n" + "x" * 2500 + "\n/reset\n"
    result = run_chat("--adapter", tiny_adapter_dir, *FAST, stdin=session)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    out = result.stdout
    assert out.startswith(chat.DISCLAIMER)
    assert f"model: {chatty_model_dir} + adapter {tiny_adapter_dir} (merged)" in out
    assert "running the base model" not in out
    assert out.count(chat.HELP) == 2  # at start and for /help
    assert out.count("assistant> ") == 2
    assert "(your message has 2500 characters: only the first 2000 are used)" in out
    assert "(conversation cleared)" in out


def test_base_model_session_says_so(chatty_model_dir, monkeypatch):
    code, out, err = run_main("--model", chatty_model_dir, *FAST, stdin="/bogus\n/exit\nnever asked\n", monkeypatch=monkeypatch)
    assert code == 0, err
    assert "note: running the base model (no --adapter)" in out
    assert "unknown command /bogus" in out
    assert "assistant> " not in out  # /exit left before the next line


def test_full_context_drops_the_oldest_turn_with_a_notice(chatty_model_dir, tokenizer, monkeypatch):
    # Room for one question and its template, but not for any earlier turn as well.
    budget = len(prompt_ids(tokenizer, "What is hypertension?")) + 5
    session = "What is hypertension?\nWhat is hypertension?\n"
    code, out, err = run_main("--model", chatty_model_dir, *FAST, "--max-context-tokens", budget, stdin=session, monkeypatch=monkeypatch)
    assert code == 0, err
    assert out.count("(context full: the oldest turn of the conversation dropped)") == 1
    assert out.count("assistant> ") == 2


def test_question_over_the_context_is_refused_and_the_session_goes_on(chatty_model_dir, monkeypatch):
    code, out, err = run_main("--model", chatty_model_dir, *FAST, "--max-context-tokens", 20, stdin="What is hypertension?\nhi\n", monkeypatch=monkeypatch)
    assert code == 0, err
    assert "error: the question makes a" in out and "over the context budget of 20 tokens" in out


def test_ctrl_c_leaves_cleanly(chatty_model_dir, monkeypatch):
    def interrupted(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", interrupted)
    code, out, err = run_main("--model", chatty_model_dir, *FAST, monkeypatch=monkeypatch)
    assert code == 0 and err == ""


def corrupted_copy(adapter_dir, folder, file_name, content: bytes):
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_bytes((Path(adapter_dir) / name).read_bytes())
    (folder / file_name).write_bytes(content)
    return folder


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1"], "temperature must be in [0, 100]"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--prompt", "  "], "--prompt is empty"),
        (["--prompt", "hi", "--web"], "--prompt and --web are two different modes"),
        (["--share"], "--share, --host and --port only apply with --web"),
        (["--max-input-chars", "0"], "--max-input-chars must be a positive integer"),
        (["--max-context-tokens", "0"], "--max-context-tokens must be a positive integer"),
        (["--web", "--port", "0"], "--port must be in [1, 65535]"),
        (["--json"], "--json only applies with --prompt"),
        (["--sources", "-1"], "--sources must be 0 (off) or a positive number of cards, got -1"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(args, message, chatty_model_dir, monkeypatch):
    code, out, err = run_main("--model", chatty_model_dir, *args, monkeypatch=monkeypatch)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_corrupt_files_and_unloadable_model_give_one_line_and_exit_2(tmp_path, tiny_adapter_dir, monkeypatch):
    broken_weights = corrupted_copy(tiny_adapter_dir, tmp_path / "weights", "adapter_model.safetensors", b"not safetensors")
    broken_config = corrupted_copy(tiny_adapter_dir, tmp_path / "config", "adapter_config.json", b"{ r: 4")
    (tmp_path / "not-a-model").mkdir()
    cases = [
        (["--adapter", broken_weights], f"{broken_weights / 'adapter_model.safetensors'}: not a readable safetensors file"),
        (["--adapter", broken_config], f"{broken_config / 'adapter_config.json'}: not valid JSON"),
        (["--model", tmp_path / "not-a-model"], "folder has no config.json"),
    ]
    for args, message in cases:
        code, out, err = run_main(*args, "--prompt", "hi", monkeypatch=monkeypatch)
        assert code == 2 and out == ""
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@contextlib.contextmanager
def serving(app):
    """Serve a gradio app on a free loopback port for the duration of the block; yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app.queue().launch(server_name="127.0.0.1", server_port=port, share=False, prevent_thread_lock=True, quiet=True)
    try:
        yield app.local_url
    finally:
        app.close()


def test_web_chat_streams_and_feeds_the_history_back(tokenizer, monkeypatch):
    from gradio_client import Client

    model = chatty_tiny_model()
    prompts = record_prompts(model, tokenizer, monkeypatch)
    app = chat.build_app(AnswerPath(model, tokenizer, None, GenerationSettings(max_new_tokens=8)), "tiny test model", max_input_chars=100)
    with serving(app) as url:
        client = Client(url, verbose=False)
        first, cleared, label, related = client.predict("What is hypertension?", 8, 0, api_name="/respond")
        second, _, _, _ = client.predict("And its causes?" + "x" * 200, 8, 0, api_name="/respond")
    assert label == ""  # no gate: the guard never acts
    assert related == ""  # no sources given: no panel text
    texts = [message["content"][0]["text"] for message in second]
    assert cleared == ""
    assert [message["role"] for message in second] == ["user", "assistant"] * 2
    assert texts[0] == "What is hypertension?" and texts[1] and texts[1] == first[1]["content"][0]["text"]
    assert len(texts[2]) == 100  # the message was cut to max_input_chars
    assert "What is hypertension?" in prompts[1] and texts[1] in prompts[1]  # the first turn was in the second prompt


def test_prompt_json_carries_the_answer_route_and_related_flashcards(tiny_adapter_dir):
    from medlora.sources import build_sources

    result = run_chat("--adapter", tiny_adapter_dir, "--prompt", "What is the mechanism of action of heparin?", "--json", *FAST)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["route"] == "answer" and shown["answer"]
    expected = build_sources(None).search("What is the mechanism of action of heparin?", 2)
    assert [card["question"] for card in shown["sources"]] == [card.question for card in expected]
    assert any("antithrombin" in (card["question"] + card["answer"]).lower() for card in shown["sources"])
    assert shown["sources"][0]["score"] >= build_sources(None).index.min_score  # the best card clears the threshold (a further one may by its words)


def test_prompt_prints_cards_on_stderr_and_sources_0_turns_them_off(tiny_adapter_dir):
    question = "What is the mechanism of action of heparin?"
    with_cards = run_chat("--adapter", tiny_adapter_dir, "--prompt", question, *FAST)
    assert with_cards.returncode == 0, with_cards.stderr
    assert "Related flashcards" in with_cards.stderr and "antithrombin" in with_cards.stderr
    assert "Related flashcards" not in with_cards.stdout
    without = run_chat("--adapter", tiny_adapter_dir, "--prompt", question, "--sources", "0", *FAST)
    assert "Related flashcards" not in without.stderr and without.stdout == with_cards.stdout


def test_web_panel_shows_the_cards_of_the_last_answer(tokenizer):
    from gradio_client import Client

    from medlora.sources import build_sources, cards_text

    sources = build_sources(None)
    path = AnswerPath(chatty_tiny_model(), tokenizer, None, GenerationSettings(max_new_tokens=8), sources)
    app = chat.build_app(path, "tiny test model")
    question = "What is the mechanism of action of heparin?"
    with serving(app) as url:
        client = Client(url, verbose=False)
        _, _, _, related = client.predict(question, 8, 0, api_name="/respond")
        _, _, _, nothing = client.predict("zzzz qqqq", 8, 0, api_name="/respond")
    assert related == cards_text(sources.search(question, 2)) and "antithrombin" in related
    assert nothing == ""  # no word in common with any card: the panel empties
