"""mkdocs hook: the site's home page is README.md (included by docs/index.md); README links to
``docs/X.md`` from the repository root, which on the site are the pages ``X.md``."""

from __future__ import annotations


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    if page.file.src_uri == "index.md":
        return markdown.replace("](docs/", "](")
    return markdown
