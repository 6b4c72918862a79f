"""Chat with the medical assistant: a base model plus a LoRA adapter (merged), in the terminal or a web page.

    python chat.py --adapter runs/cpu/adapter             # terminal chat, answers streamed as they are generated
    python chat.py                                        # the embedded base model, no adapter
    python chat.py --adapter runs/cpu/adapter --prompt "What is the mechanism of action of metformin?"
    python chat.py --adapter runs/cpu/adapter --web       # web page on http://127.0.0.1:7860
    python chat.py --model TinyLlama/TinyLlama-1.1B-Chat-v1.0 --adapter runs/tinyllama/adapter

In the terminal: /reset forgets the conversation, /help lists the commands, /exit (or Ctrl-D) leaves.
`--prompt` prints only the answer on stdout (notices go to stderr), for scripts; --json prints one JSON object instead.
Every answer comes from the answer path (medlora/answer.py), which loads the model, the scope gate and
the sources together and decides the route: answer, decline, emergency (the referral first) or clinician.
Beside an answer, up to --sources K (default 2; 0 = off) related training flashcards, verbatim with their
BM25 score (medlora/sources.py): under the answer in the terminal, on stderr (or in the JSON) with
--prompt, in a "Related flashcards" panel on the web page. A clinician referral shows its cards in its
text; declines and emergency referrals show none.
The base model defaults to the one named in the adapter's adapter_config.json.
For education only: the answers are not medical advice.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import replace

from transformers.utils.logging import disable_progress_bar

from medlora.answer import CARD_COUNT, AnswerPath
from medlora.errors import USER_FAILURES, report_failure
from medlora.generation import GenerationSettings, PromptTooLongError, context_budget, fit_history
from medlora.model import PRECISIONS, TORCH_DTYPES, choose_device, resolve_precision
from medlora.sources import cards_text

DISCLAIMER = (
    "For education only: this assistant is a small language model and can be wrong. "
    "It is not medical advice; consult a qualified health professional about your health."
)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
HELP = "commands: /reset forget the conversation · /help this text · /exit leave (or Ctrl-D)"
EXAMPLE_QUESTIONS = [
    "What is the mechanism of action of metformin?",
    "What are the classic symptoms of diabetic ketoacidosis?",
    "How does aspirin reduce the risk of a heart attack?",
    "What is the difference between type 1 and type 2 diabetes?",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Chat with the medical assistant (base model + merged LoRA adapter).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", help="base model: local folder or hub id (default: the adapter's base model, else the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", help="adapter folder written by train.py (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--prompt", help="answer this one question, print only the answer and exit (the scope check's line goes to stderr)")
    parser.add_argument("--json", action="store_true", help="with --prompt: print one JSON object (answer, route, label, sources) on stdout")
    parser.add_argument("--sources", type=int, default=CARD_COUNT, help="related training flashcards beside a medical answer and in a clinician referral; 0 = none")
    parser.add_argument("--no-scope-gate", action="store_true", help="answer with the model alone, without the scope gate saved next to the adapter (for study)")
    parser.add_argument("--max-new-tokens", type=int, default=GenerationSettings.max_new_tokens, help="most tokens per answer")
    parser.add_argument("--temperature", type=float, default=GenerationSettings.temperature, help="0 = greedy (deterministic); > 0 samples")
    parser.add_argument("--top-p", type=float, default=GenerationSettings.top_p, help="nucleus sampling mass, used when temperature > 0")
    parser.add_argument("--repetition-penalty", type=float, default=GenerationSettings.repetition_penalty, help="> 1 discourages repeating tokens; 1 = off")
    parser.add_argument("--seed", type=int, help="seed for sampling, to reproduce a sampled answer")
    parser.add_argument("--max-input-chars", type=int, default=2000, help="longer messages are cut to this many characters")
    parser.add_argument("--max-context-tokens", type=int, help="prompt budget in tokens (default: the model's positions minus --max-new-tokens); older turns are dropped beyond it")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="weight dtype; auto = bf16/fp16 on a GPU, bf16 on a CPU with native bf16 matmuls, else fp32")
    parser.add_argument("--web", action="store_true", help="serve a chat web page instead of the terminal chat")
    parser.add_argument("--host", default="127.0.0.1", help="web: address to bind; 0.0.0.0 opens the page to your network")
    parser.add_argument("--port", type=int, default=7860, help="web: port")
    parser.add_argument("--share", action="store_true", help="web: also open a public gradio.live link (off unless given)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse combinations that make no sense, naming the flag (ValueError, caught in main)."""
    if args.prompt is not None and args.web:
        raise ValueError("--prompt and --web are two different modes: pass one of them")
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt is empty: pass the question to answer")
    if (args.share or args.host != "127.0.0.1" or args.port != 7860) and not args.web:
        raise ValueError("--share, --host and --port only apply with --web")
    if args.json and args.prompt is None:
        raise ValueError("--json only applies with --prompt")
    if args.sources < 0:
        raise ValueError(f"--sources must be 0 (off) or a positive number of cards, got {args.sources}")
    if args.max_input_chars < 1:
        raise ValueError(f"--max-input-chars must be a positive integer, got {args.max_input_chars}")
    if args.max_context_tokens is not None and args.max_context_tokens < 1:
        raise ValueError(f"--max-context-tokens must be a positive integer, got {args.max_context_tokens}")
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in [1, 65535], got {args.port}")


def bounded(message: str, max_chars: int) -> tuple[str, str | None]:
    """`message` stripped and cut to `max_chars`, with a notice when it was cut."""
    message = message.strip()
    if len(message) <= max_chars:
        return message, None
    return message[:max_chars], f"(your message has {len(message)} characters: only the first {max_chars} are used)"


def dropped_notice(dropped: int) -> str:
    oldest = "the oldest turn" if dropped == 1 else f"the {dropped} oldest turns"
    return f"(context full: {oldest} of the conversation dropped)"


def answer_once(path: AnswerPath, args: argparse.Namespace) -> None:
    """--prompt: print only the answer on stdout; the scope check's line and the cards beside it on stderr.

    With --json, stdout holds one object instead: {"answer", "route", "label", "sources": [{question, answer, score}]}
    (a clinician referral's cards are both in its answer and in "sources").
    """
    question, notice = bounded(args.prompt, args.max_input_chars)
    if notice:
        print(notice, file=sys.stderr)
    answer = path.answer(question)
    if args.json:
        shown = [{"question": card.question, "answer": card.answer, "score": card.score} for card in answer.cards]
        print(json.dumps({"answer": answer.text, "route": answer.route, "label": answer.label, "sources": shown}))
        return
    if answer.label:
        print(f"[{answer.label}]", file=sys.stderr)
    print(answer.text)
    if answer.cards_beside:
        print(cards_text(list(answer.cards_beside)), file=sys.stderr)


def chat_in_terminal(path: AnswerPath, args: argparse.Namespace) -> None:
    """Read questions from stdin, stream answers to stdout, keep the conversation as history."""
    tokenizer = path.tokenizer
    budget = context_budget(path.model, path.settings, args.max_context_tokens)
    history: list[tuple[str, str]] = []
    print(HELP)
    while True:
        try:
            line = input("\nyou> ")
        except EOFError:
            print()
            return
        message, notice = bounded(line, args.max_input_chars)
        if not message:
            continue
        if message in ("/exit", "/quit"):
            return
        if message == "/reset":
            history = []
            print("(conversation cleared)")
            continue
        if message == "/help":
            print(HELP)
            continue
        if message.startswith("/") and " " not in message:
            print(f"unknown command {message}; {HELP}")
            continue
        if notice:
            print(notice)
        try:
            history, dropped = fit_history(tokenizer, message, history, budget)
        except PromptTooLongError as error:
            print(f"error: {error}")
            continue
        if dropped:
            print(dropped_notice(dropped))
        print("assistant> ", end="", flush=True)
        answer = yield_to_terminal(path.stream(message, history, budget))
        if answer.label:
            print(f"  [{answer.label}]")
        if answer.cards_beside:
            print(cards_text(list(answer.cards_beside)))
        history.append((message, answer.text))


def yield_to_terminal(pieces):
    """Print streamed pieces as they come; return the generator's Answer."""
    while True:
        try:
            print(next(pieces), end="", flush=True)
        except StopIteration as done:
            print()
            return done.value


def as_chat_messages(history: list[tuple[str, str]]) -> list[dict]:
    """(user, assistant) turns as the role/content messages gr.Chatbot shows."""
    return [
        message
        for user, assistant in history
        for message in ({"role": "user", "content": user}, {"role": "assistant", "content": assistant})
    ]


def build_app(path: AnswerPath, description: str, max_input_chars: int = 2000, max_context_tokens: int | None = None):
    """The chat web page: streamed answers, multi-turn history, examples, sliders, a clear button,
    a small "scope check" label under the conversation when the guard acted on the last turn, and
    a "Related flashcards" panel beside it with the cards the answer path gave the last answer
    (`Answer.cards_beside`; plain text: HTML in a card is shown, never rendered).

    The conversation fed to the model lives in a gr.State of (user, assistant) turns; the chat
    panel shows exactly those turns, so what you see is what the model is asked with.
    """
    import gradio as gr

    def respond(message: str, history: list[tuple[str, str]], max_new_tokens: float, temperature: float):
        history = [tuple(turn) for turn in history or []]
        message, notice = bounded(message or "", max_input_chars)
        if not message:
            yield as_chat_messages(history), history, "", "", ""
            return
        if notice:
            gr.Warning(notice.strip("()"))
        turn = replace(path, settings=replace(path.settings, max_new_tokens=int(max_new_tokens), temperature=float(temperature)))
        budget = context_budget(turn.model, turn.settings, max_context_tokens)
        try:
            history, dropped = fit_history(turn.tokenizer, message, history, budget)
        except PromptTooLongError as error:
            raise gr.Error(str(error)) from None
        if dropped:
            gr.Info(dropped_notice(dropped).strip("()"))
        text, pieces = "", turn.stream(message, history, budget)
        while True:
            try:
                text += next(pieces)
            except StopIteration as done:
                answer = done.value
                break
            yield as_chat_messages(history + [(message, text)]), history, "", "", ""
        history = history + [(message, answer.text)]
        yield as_chat_messages(history), history, "", f"*{answer.label}*" if answer.label else "", cards_text(list(answer.cards_beside))

    with gr.Blocks(title="Medical Q&A assistant (LoRA)", analytics_enabled=False) as app:
        gr.Markdown(f"## Medical Q&A assistant\n{description}\n\n**{DISCLAIMER}**")
        history = gr.State([])
        with gr.Row():
            chatbot = gr.Chatbot(label="Conversation", elem_id="chat", height=420, scale=3)
            related = gr.Textbox(label="Related flashcards", elem_id="sources", interactive=False, lines=16, scale=2)
        scope_check = gr.Markdown("", elem_id="scope-check")
        with gr.Row():
            question = gr.Textbox(
                placeholder=f"Ask a medical question (at most {max_input_chars} characters)",
                max_length=max_input_chars,
                show_label=False,
                max_lines=6,
                scale=5,
                elem_id="question",
            )
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
        with gr.Row():
            max_new_tokens = gr.Slider(1, max(512, path.settings.max_new_tokens), value=path.settings.max_new_tokens, step=1, label="Max new tokens")
            temperature = gr.Slider(0.0, 1.5, value=path.settings.temperature, step=0.05, label="Temperature (0 = greedy)")
        clear = gr.Button("Clear conversation", elem_id="clear")
        gr.Examples(examples=[[q] for q in EXAMPLE_QUESTIONS], inputs=[question], label="Example questions")

        inputs = [question, history, max_new_tokens, temperature]
        outputs = [chatbot, history, question, scope_check, related]
        gr.on([question.submit, send.click], respond, inputs, outputs, api_name="respond")
        clear.click(lambda: ([], [], "", "", ""), None, outputs, queue=False, api_visibility="private")
    return app


def serve(app, args: argparse.Namespace) -> None:
    """Serve the page on --host:--port until Ctrl-C; a public link only with --share."""
    if args.host not in LOOPBACK_HOSTS:
        print(f"warning: serving on {args.host}: anyone who can reach this machine can use the page", file=sys.stderr)
    try:
        app.queue().launch(
            server_name=args.host, server_port=args.port, share=args.share, prevent_thread_lock=True, quiet=True
        )
    except OSError as error:
        reason = str(error).split(". ")[0]
        raise ValueError(f"cannot serve on {args.host}:{args.port} ({reason}): pass another --port") from None
    print(f"web page: {app.local_url}" + (f" and {app.share_url}" if app.share_url else "") + " (Ctrl-C to stop)")
    app.block_thread()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        settings = GenerationSettings(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
        )
        device = choose_device(args.device)
        dtype = TORCH_DTYPES[resolve_precision(args.precision, device)]
        if args.prompt is None:
            print(DISCLAIMER)
        # Loading notices go to stderr, so that stdout holds only answers. A cached model loads in a
        # second: its per-weight progress bar would only bury a one-line error.
        disable_progress_bar()
        with contextlib.redirect_stdout(sys.stderr):  # a bad gate fails before the slow load (AnswerPath.from_adapter)
            path = AnswerPath.from_adapter(args.model, args.adapter, settings=settings, device=device, dtype=dtype,
                                           use_gate=not args.no_scope_gate, card_count=args.sources)
        if args.prompt is not None:
            if path.sources is not None and path.sources.index is None:
                print(path.sources.notice, file=sys.stderr)
            answer_once(path, args)
            return 0
        print(f"model: {path.description}")
        for notice in path.notices:
            print(f"note: {notice}")
        if args.adapter is None:
            print("note: running the base model (no --adapter): answers are not fine-tuned")
        if args.web:
            serve(build_app(path, path.description, args.max_input_chars, args.max_context_tokens), args)
        else:
            chat_in_terminal(path, args)
    except USER_FAILURES as error:  # a bad adapter, model or flag: one line, exit 2
        return report_failure(error)
    except KeyboardInterrupt:
        print()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
