"""Every public module, class, function and method of the library and the pipelines has a docstring."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _public_defs(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            yield node.name, node
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and not sub.name.startswith("_"):
                        yield f"{node.name}.{sub.name}", sub


def test_every_public_definition_has_a_docstring():
    missing = []
    files = sorted((ROOT / "medmtl").rglob("*.py")) + sorted((ROOT / "pipelines").rglob("*.py"))
    assert len(files) > 40
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        rel = path.relative_to(ROOT)
        if ast.get_docstring(tree) is None and path.name != "__init__.py":
            missing.append(f"{rel} (module)")
        for name, node in _public_defs(tree):
            if ast.get_docstring(node) is None:
                missing.append(f"{rel}:{node.lineno} {name}")
    assert missing == [], "add docstrings:\n" + "\n".join(missing)
