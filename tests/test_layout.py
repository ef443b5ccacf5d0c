"""The package's shape: no two modules import each other (at top level, inside functions, or for types)."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "mnv4"


def _imports() -> dict[str, set[str]]:
    """module -> the mnv4 modules it imports anywhere in its file."""
    files = {}
    for f in SRC.rglob("*.py"):
        parts = f.relative_to(SRC.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    deps: dict[str, set[str]] = {}
    for name, f in files.items():
        package = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join([*base, *([node.module] if node.module else [])])
                found |= {target, *(f"{target}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        deps[name] = {m for m in found if m in files and m != name}
    return deps


def test_no_two_file_import_circles():
    deps = _imports()
    assert len(deps) > 50 and "mnv4.deploy.formats" in deps["mnv4.deploy.export"]  # the scan sees the package
    circles = [f"{a} <-> {b}" for a, b in itertools.combinations(sorted(deps), 2) if b in deps[a] and a in deps[b]]
    assert circles == []
