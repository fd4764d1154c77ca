"""The package's layers, as docs/design.md draws them: each subpackage imports only
the layers below it (checked on the source, so a new import that crosses a layer
fails here before it becomes a tangle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "artcafe_trio"

#: What each part may import from the rest of the package (shared private modules
#: at the top: _errors, _util, _logsafe, _faulty; "artcafe_trio" is the root's
#: public names and version).
ALLOWED: dict[str, set[str]] = {
    "protocol": {"_errors", "_logsafe"},
    "registry": {"_errors", "protocol"},
    "agent": {"_errors", "_logsafe", "_util", "protocol"},
    "hub": {"_errors", "_logsafe", "_util", "protocol", "registry"},
    "nats": {"_errors", "_util", "protocol", "artcafe_trio"},
    "cluster": {"_errors", "_util", "nats", "protocol", "registry", "hub"},
    "dashboard": {"_errors", "_logsafe", "_util", "hub", "protocol", "registry"},
    "testing": {"_errors", "_faulty", "_util", "agent", "hub", "protocol", "registry"},
}
#: Never imported by any other part of the package (entry points and the test kit).
LEAVES = {"__main__", "cli", "demo", "testing"}


def _imports(path: Path) -> set[str]:
    """The top-level parts of the package that ``path`` imports."""
    rel = path.relative_to(PACKAGE).parts
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(rel[:-1])
            base = base[: len(base) - (node.level - 1)]
            target = base + (node.module.split(".") if node.module else [])
            found.add(target[0] if target else "artcafe_trio")
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [
                alias.name for alias in node.names
            ]  # fmt: skip
            for name in names:
                if name and (name == "artcafe_trio" or name.startswith("artcafe_trio.")):
                    parts = name.split(".")
                    found.add(parts[1] if len(parts) > 1 else "artcafe_trio")
    return found


def _part_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE).parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_imports_only_the_layers_below(path: Path) -> None:
    part = _part_of(path)
    imported = _imports(path) - {part}
    if part in ALLOWED:
        assert imported <= ALLOWED[part], f"{part} must not import {imported - ALLOWED[part]}"
    if part not in LEAVES:
        assert not imported & LEAVES, f"{part} imports {imported & LEAVES}"


def test_every_subpackage_has_a_rule() -> None:
    parts = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert parts <= set(ALLOWED) | LEAVES, parts - set(ALLOWED) - LEAVES


#: The most a module or a class may hold, as issue 10 set them: a part that grows past
#: these is doing two things and should be split along its seam.
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 300


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_classes_stay_small_enough_to_read_in_one_sitting(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_MODULE_LINES
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            assert node.end_lineno is not None
            size = node.end_lineno - node.lineno + 1
            assert size <= MAX_CLASS_LINES, f"class {node.name}: {size} lines"
