"""mkdocs hook: the site's home page is the repository's README.md. README links to ``docs/X.md`` from
the repository root; on the site those are the pages ``X.md``."""

from __future__ import annotations

from pathlib import Path


def on_page_markdown(markdown: str, page, config, **kwargs) -> str:
    if page.file.src_uri != "index.md":
        return markdown
    readme = Path(config.config_file_path).parent / "README.md"
    return readme.read_text(encoding="utf-8").replace("](docs/", "](")
