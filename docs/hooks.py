"""mkdocs hook: the site's home page is README.md (the GitHub page, kept as the one source), put in place of the
`<!-- README.md -->` line of docs/index.md with its `docs/...` links made relative to the docs folder."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- README.md -->"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    readme = re.sub(r"\]\(docs/", "](", README.read_text(encoding="utf-8"))
    return markdown.replace(MARKER, readme)
