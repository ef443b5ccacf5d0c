"""Every reference to the repo's own docs and modules resolves: "docs/X.md", "docs/X.md §N",
'docs/X.md "Heading"' and dotted ``mnv4.module.name`` paths, in src/, docs/ and README.md."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [*sorted((ROOT / "src").rglob("*.py")), *sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
DOC_REF = re.compile(r'docs/([\w-]+\.md)(?: (§[\d.]*\d)| "([^"\n]+)")?')
MODULE_REF = re.compile(r"`(?:~)?(mnv4(?:\.[A-Za-z_]\w*)+)")


def _refs(pattern: re.Pattern) -> list[tuple[str, re.Match]]:
    return [(f"{p.relative_to(ROOT)}:{m.group(0)}", m) for p in TEXTS for m in pattern.finditer(p.read_text())]


def _headings(doc: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in doc.read_text().splitlines() if line.startswith("#")]


def test_the_scan_finds_references():
    assert len(_refs(DOC_REF)) > 50 and len(_refs(MODULE_REF)) > 50


@pytest.mark.parametrize(("where", "ref"), _refs(DOC_REF), ids=lambda v: v if isinstance(v, str) else "")
def test_doc_reference_resolves(where, ref):
    doc = ROOT / "docs" / ref.group(1)
    assert doc.is_file(), f"{where}: no such document"
    section, heading = ref.group(2), ref.group(3)
    if section:
        assert any(re.match(re.escape(section) + r"(\s|$)", h) for h in _headings(doc)), f"{where}: no {section}"
    if heading:
        assert any(heading in h for h in _headings(doc)), f"{where}: no heading {heading!r}"


def test_section_signs_in_code_name_their_document():
    """A "§" in the code cites docs/X.md or the paper, never a document outside the repo."""
    bad = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in (ROOT / "src").rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "§" in line and "docs/" not in line and "paper" not in line.lower()
    ]
    assert bad == []


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            return False
        return True
    return False


def test_module_references_resolve():
    missing = sorted({where for where, m in _refs(MODULE_REF) if not _resolves(m.group(1))})
    assert missing == []
