"""The docs site (mkdocs.yml): every page of docs/ is in the navigation, every public package has an
API page, the README's links resolve, and (with the `docs` extra) the strict build passes."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
API_PACKAGES = ("mnv4", "models", "weights", "train", "distill", "nas", "deploy", "perf", "hub")


def _nav_pages(nav) -> list[str]:
    out = []
    for item in nav:
        for value in item.values() if isinstance(item, dict) else [item]:
            out += _nav_pages(value) if isinstance(value, list) else [value]
    return out


def _mkdocs_config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def test_every_docs_page_and_public_package_is_in_the_site():
    nav = _nav_pages(_mkdocs_config()["nav"])
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md") if ".hooks" not in p.parts}
    assert set(nav) == pages
    assert {f"api/{name}.md" for name in API_PACKAGES} <= set(nav)
    for name in API_PACKAGES[1:]:  # each API page documents modules of its package
        text = (ROOT / "docs" / "api" / f"{name}.md").read_text()
        assert re.search(rf"^::: mnv4\.{name}\b", text, re.M), name


def test_readme_links_point_at_files_that_exist():
    readme = (ROOT / "README.md").read_text()
    links = [t for t in re.findall(r"\]\(([^)#\s]+)", readme) if "://" not in t]
    for target in links:
        assert (ROOT / target).exists(), target


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip("the docs extra is not installed (pip install 'mnv4[docs]')")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    home = (tmp_path / "site" / "index.html").read_text()
    assert "Quick start" in home  # the README is the home page
    api = (tmp_path / "site" / "api" / "mnv4" / "index.html").read_text()
    assert 'id="mnv4.create_model"' in api and 'id="mnv4.push_to_hub"' in api
