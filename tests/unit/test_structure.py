"""The house stays small: no product module over 700 lines, no class over 30 methods, and
(almost) no code reaching into another object's private names. Counted from the sources,
so a change that breaks the rule fails here rather than in review."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = [p for d in ("hvtsm", "guest_agent") for p in sorted((ROOT / d).rglob("*.py"))]
MAX_LINES = 700
MAX_METHODS = 30
#: lxml's element type is spelled `etree._Element` (aliased once, in templates.py)
MAX_REACH_INS = 5


def _trees() -> list[tuple[Path, str, ast.Module]]:
    out = []
    for path in PRODUCT:
        text = path.read_text()
        out.append((path, text, ast.parse(text)))
    return out


def test_no_module_is_too_long() -> None:
    long = {str(p.relative_to(ROOT)): n for p, text, _ in _trees()
            if (n := len(text.splitlines())) > MAX_LINES}
    assert not long, long


def test_no_class_has_too_many_methods() -> None:
    big = {}
    for path, _, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                methods = [b for b in node.body
                           if isinstance(b, ast.FunctionDef | ast.AsyncFunctionDef)]
                if len(methods) > MAX_METHODS:
                    big[f"{path.relative_to(ROOT)}:{node.name}"] = len(methods)
    assert not big, big


def _own(value: ast.expr) -> bool:
    """self._x, cls._x and super()._x are an object's own names."""
    if isinstance(value, ast.Name):
        return value.id in ("self", "cls")
    return (isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
            and value.func.id == "super")


def test_hardly_any_reach_into_private_names() -> None:
    reaches = [f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}"
               for path, _, tree in _trees() for node in ast.walk(tree)
               if isinstance(node, ast.Attribute) and node.attr.startswith("_")
               and not node.attr.startswith("__") and not _own(node.value)]
    assert len(reaches) <= MAX_REACH_INS, reaches
