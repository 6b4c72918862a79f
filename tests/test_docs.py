"""The commands in README.md and docs/*.md: every script, module, make target and --flag they name exists.

A command is a line of a fenced code block, or an inline `code` span, that starts with python,
.venv/bin/python, torchrun, .venv/bin/torchrun or make. Its script (X.py) or module (-m X) must
exist, and each --flag after the script must appear in that script's --help (argparse's own
output, produced in this process); an installed module (python -m pip) must be importable; a make
target must be a rule of the Makefile. The README's
commands must also run as written after `make install` with no venv activated: .venv/bin/python,
never a bare python.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import runpy
import shlex
import sys
import warnings
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LAUNCHERS = ("python", ".venv/bin/python", "torchrun", ".venv/bin/torchrun", "make")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
FLAG = re.compile(r"^--[a-z][a-z0-9-]*")


def command_lines(path: Path) -> list[str]:
    """The commands of one markdown file: code-block lines (continuations joined) and inline spans."""
    text = path.read_text()
    lines = []
    for block in FENCE.findall(text):
        lines += block.replace("\\\n", " ").splitlines()
    lines += INLINE.findall(FENCE.sub("", text))
    commands = []
    for line in lines:
        line = re.sub(r"^(?:[A-Z_]+=\S*\s+)+", "", line.strip())  # OMP_NUM_THREADS=1 python ...
        if line.split(" ", 1)[0] not in LAUNCHERS:
            continue
        lexer = shlex.shlex(line.replace("…", "..."), posix=True, punctuation_chars=";&|")
        lexer.commenters = "#"  # a trailing comment
        lexer.wordchars += "~-./:=,[]{}@*"
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token and set(token) <= set(";&|"):  # between two commands (&&, ;, |)
                if words and words[0] in LAUNCHERS and set(words[1:]) - {"..."}:  # not a bare `python ...`
                    commands.append(shlex.join(word for word in words if word != "..."))
                words = []
            else:
                words.append(token)
    return commands


def target_and_flags(command: str) -> tuple[str, str, list[str]]:
    """("script", path) / ("module", name) / ("make", target), and the --flags given to it."""
    words = shlex.split(command)
    if words[0] == "make":
        return "make", words[1] if len(words) > 1 else "", []
    for index, word in enumerate(words):
        if word.endswith(".py"):
            return "script", word, [FLAG.match(w).group() for w in words[index + 1:] if FLAG.match(w)]
        if word == "-c":
            return "inline", command, []
        if word == "-m":
            return "module", words[index + 1], [FLAG.match(w).group() for w in words[index + 2:] if FLAG.match(w)]
    return "none", command, []


@cache
def help_text(kind: str, name: str) -> str:
    """What `name --help` prints, run in this process (argparse exits after printing it)."""
    output = io.StringIO()
    argv = sys.argv
    sys.argv = [name, "--help"]
    try:
        with contextlib.redirect_stdout(output), pytest.raises(SystemExit), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: "found in sys.modules" for python -m lora.inspect
            if kind == "script":
                runpy.run_path(str(ROOT / name), run_name="__main__")
            else:
                runpy.run_module(name, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = argv
    return output.getvalue()


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))


def all_commands() -> list[tuple[str, str]]:
    """(file, command) of README.md and docs/*.md, each pair once."""
    pairs = [(path.relative_to(ROOT).as_posix(), command) for path in [README, *DOCS] for command in command_lines(path)]
    return list(dict.fromkeys(pairs))


def test_the_readme_names_commands():
    commands = command_lines(README)
    assert any("chat.py" in command for command in commands) and any(c.startswith("make run") for c in commands)


@pytest.mark.parametrize("where, command", all_commands(), ids=lambda value: value[:70])
def test_every_script_module_target_and_flag_exists(where, command):
    kind, name, flags = target_and_flags(command)
    if kind == "make":
        assert name in makefile_targets(), f"{where}: `{command}`: no make target {name!r}"
        return
    if kind == "inline":  # python -c "...": nothing to look up
        return
    assert kind != "none", f"{where}: `{command}`: names no script (X.py) and no module (-m X)"
    if kind == "script":
        assert (ROOT / name).is_file(), f"{where}: `{command}`: no script {name}"
    elif not ((ROOT / name.replace(".", "/")).with_suffix(".py").is_file() or (ROOT / name.replace(".", "/") / "__main__.py").is_file()):
        assert importlib.util.find_spec(name) is not None, f"{where}: `{command}`: no module {name}"
        return  # an installed tool (python -m pip ...): its own flags are not ours to check
    if not flags:
        return
    shown = help_text(kind, name)
    missing = [flag for flag in flags if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", shown)]
    assert not missing, f"{where}: `{command}`: {name} has no {', '.join(missing)}"


def test_a_flag_that_is_not_there_is_reported():
    assert target_and_flags("python evaluate.py --adapter runs/cpu/adapter --ground") == ("script", "evaluate.py", ["--adapter", "--ground"])
    shown = help_text("script", "evaluate.py")
    assert "--no-grounding" in shown and not re.search(r"(?<![\w-])--ground(?![\w-])", shown)


def test_readme_commands_run_without_an_activated_venv():
    bare = [command for command in command_lines(README) if command.split(" ")[0] in ("python", "torchrun")]
    assert not bare, f"README.md: use .venv/bin/python (or a make target), not a bare python: {bare}"


@pytest.mark.parametrize("package", ["medlora", "medlora/evaluation"])
def test_each_package_docstring_maps_every_module(package):
    """The module map at the top of a package's __init__.py names each of its modules and subpackages."""
    folder = ROOT / package
    docstring = (folder / "__init__.py").read_text().split('"""')[1]
    modules = {p.name for p in folder.glob("*.py") if p.name != "__init__.py"}
    modules |= {f"{p.name}/" for p in folder.iterdir() if (p / "__init__.py").is_file()}
    missing = sorted(name for name in modules if not re.search(rf"^\s+{re.escape(name)}\s", docstring, re.M))
    assert not missing, f"{package}/__init__.py does not map {', '.join(missing)}"
