"""MkDocs hooks: render reStructuredText leftovers in docstrings cleanly, and include
repository files (CHANGELOG.md) in pages.

The package's docstrings use Sphinx roles such as ``:class:`Backoff``` and end a
paragraph with ``::`` before a literal block. mkdocstrings shows both literally
(``:class:Backoff``, ``milliseconds::``); this hook drops the role prefix and
the doubled colon in the rendered HTML.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj|term):(?=<code>)")
_LITERAL_MARKER = re.compile(r"::</p>")


def on_page_content(html: str, **kwargs: Any) -> str:
    return _LITERAL_MARKER.sub(":</p>", _ROLE.sub("", html))


_INCLUDE = re.compile(r"^<!-- include: (?P<path>[\w./-]+) -->$", re.MULTILINE)


def on_page_markdown(markdown: str, *, config: Any, **kwargs: Any) -> str:
    """Replace ``<!-- include: PATH -->`` (PATH relative to the repository root) with the
    file's text: the Changelog page shows CHANGELOG.md itself, so there is one copy."""
    root = Path(config["config_file_path"]).parent

    def include(match: re.Match[str]) -> str:
        return (root / match["path"]).read_text(encoding="utf-8")

    return _INCLUDE.sub(include, markdown)
