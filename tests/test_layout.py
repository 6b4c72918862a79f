"""The layout's rules, read from the source with `ast`: which package may import what, and no test
scaffolding in product code."""

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {path.stem for path in ROOT.glob("*.py")}  # train, evaluate, chat (and any later one)
PACKAGES = ("medlora", "lora", "data", "experiments", "bench")
PRODUCT = ("medlora", "lora", "data", "experiments")  # with the scripts: what users run
LOCAL = SCRIPTS | {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".") and any(p.rglob("*.py"))}
ENTRY_POINTS = {ROOT / "data" / "__main__.py"}  # `python -m data`: a command line, free to use the model loader
REFERENCE_ONLY = {"peft", "trl", "sacrebleu", "llama_cpp"}  # allowed in tests/ and bench/ only
ENVIRONMENT_SETTINGS = {"MEDLORA_CACHE", "WORLD_SIZE", "RANK", "LOCAL_RANK"}  # documented user settings (and torchrun's); anything else would be a hook


def python_files(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (ROOT / folder).rglob("*.py"))


def product_files() -> list[Path]:
    return sorted(ROOT / f"{name}.py" for name in SCRIPTS) + python_files(*PRODUCT)


def imported_modules(path: Path, top_level_only: bool = False) -> set[str]:
    """Top-level names of every module `path` imports (relative imports count as its own package).

    With `top_level_only`, only the imports at module level (not those inside a function).
    """
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(path.relative_to(ROOT).parts[0] if node.level else node.module.split(".")[0])
    return names


def test_the_rules_see_every_script_and_package():
    assert {"train", "evaluate", "chat"} <= SCRIPTS
    assert set(PACKAGES) | {"tests"} <= LOCAL
    assert all(python_files(package) for package in PACKAGES)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_no_script_imports_another_script(script):
    assert imported_modules(ROOT / f"{script}.py") & (SCRIPTS - {script}) == set()


@pytest.mark.parametrize("path", python_files(*PACKAGES), ids=lambda path: str(path.relative_to(ROOT)))
def test_no_package_imports_a_script(path):
    assert imported_modules(path) & SCRIPTS == set()


@pytest.mark.parametrize("path", python_files("lora"), ids=lambda path: str(path.relative_to(ROOT)))
def test_lora_imports_only_torch_safetensors_and_the_standard_library(path):
    """matplotlib is the one exception, and only lazily: inside the inspector's --plot function."""
    allowed = {"torch", "safetensors", "lora", "__future__"} | set(sys.stdlib_module_names)
    assert imported_modules(path) - allowed <= {"matplotlib"}
    assert imported_modules(path, top_level_only=True) - allowed == set()


@pytest.mark.parametrize("path", sorted(set(python_files("data")) - ENTRY_POINTS), ids=lambda path: str(path.relative_to(ROOT)))
def test_data_imports_no_other_part_of_the_project(path):
    assert imported_modules(path) & (LOCAL - {"data"}) == set()


def test_the_data_command_line_uses_only_the_library_s_model_loader():
    assert imported_modules(ROOT / "data" / "__main__.py") & (LOCAL - {"data"}) == {"medlora"}


@pytest.mark.parametrize("path", python_files("medlora"), ids=lambda path: str(path.relative_to(ROOT)))
def test_the_library_imports_only_lora_and_data_of_the_project(path):
    assert imported_modules(path) & (LOCAL - {"medlora", "lora", "data"}) == set()


@pytest.mark.parametrize("path", product_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_product_code_never_imports_a_reference_implementation_or_the_tests(path):
    assert imported_modules(path) & (REFERENCE_ONLY | {"tests", "bench"}) == set()


@pytest.mark.parametrize("path", product_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_product_code_has_no_test_hooks(path):
    """Faults are injected from tests/ by wrapping functions: product code reads no environment
    variable but the documented ones, never sleeps, and names nothing after tests or faults."""
    tree = ast.parse(path.read_text(), str(path))
    variables, sleeps, names = set(), [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            called = ast.unparse(node.func)
            if called in ("os.environ.get", "os.getenv") and node.args and isinstance(node.args[0], ast.Constant):
                variables.add(node.args[0].value)
            if called.endswith("sleep"):
                sleeps.append(node.lineno)
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            variables.add(ast.unparse(node.slice))
        elif isinstance(node, (ast.FunctionDef, ast.arg, ast.Name)):
            names.add(getattr(node, "name", None) or getattr(node, "arg", None) or node.id)
    assert variables <= ENVIRONMENT_SETTINGS
    assert sleeps == []
    assert {name for name in names if re.search(r"(^test_|(^|_)faults?(_|$)|_hook$)", name)} == set()


README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCUMENTED_PACKAGES = ("lora", "data", "medlora")  # each module is named by the README's table or its package's docstring map


@pytest.mark.parametrize("page", sorted(path.name for path in (ROOT / "docs").glob("*.md")))
def test_every_docs_page_is_linked_from_the_readme(page):
    assert f"(docs/{page})" in README, f"README.md has no link to docs/{page}"


def top_level_modules() -> list[tuple[str, str]]:
    """(package, name) of every script ("", `train.py`), and of every module (`lora`, `layer.py`) or
    subpackage (`medlora`, `evaluation/`) directly inside a documented package."""
    names = [("", f"{name}.py") for name in sorted(SCRIPTS)]
    for package in DOCUMENTED_PACKAGES:
        for path in sorted((ROOT / package).iterdir()):
            if path.suffix == ".py" and not path.name.startswith("__"):
                names.append((package, path.name))
            elif path.is_dir() and (path / "__init__.py").exists():
                names.append((package, f"{path.name}/"))
    return names


@pytest.mark.parametrize("package, module", top_level_modules())
def test_every_script_and_top_level_module_is_named_in_the_readme_or_its_package_map(package, module):
    """The README's table names the scripts and lora/ and data/ modules; medlora/'s row points to the
    module map in medlora/__init__.py's docstring (tests/test_docs.py holds that map complete)."""
    package_map = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text())) if package else ""
    assert f"`{module}`" in README or f"    {module}" in (package_map or ""), f"neither README.md nor {package}/__init__.py names `{module}`"
