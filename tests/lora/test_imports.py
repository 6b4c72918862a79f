"""lora/ imports only torch, safetensors and the standard library (json included); matplotlib only
lazily, inside the inspector's --plot function."""

import ast
import sys
from pathlib import Path

import pytest

LORA = Path(__file__).resolve().parents[2] / "lora"
ALLOWED = {"torch", "safetensors", "lora"} | set(sys.stdlib_module_names)


def imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[0] for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0:
        return [node.module.split(".")[0]]
    return []


@pytest.mark.parametrize("file", sorted(LORA.glob("*.py")), ids=lambda f: f.name)
def test_module_level_imports_are_torch_safetensors_or_stdlib(file):
    tree = ast.parse(file.read_text())
    top = [name for node in tree.body for name in imported(node)]
    assert set(top) <= ALLOWED, f"{file.name} imports {sorted(set(top) - ALLOWED)}"
    everywhere = {name for node in ast.walk(tree) for name in imported(node)}
    assert everywhere <= ALLOWED | {"matplotlib"}, f"{file.name} imports {sorted(everywhere - ALLOWED)}"
