"""MkDocs hook: render reStructuredText leftovers in docstrings cleanly.

The package's docstrings use Sphinx roles such as ``:class:`Backoff``` and end a
paragraph with ``::`` before a literal block. mkdocstrings shows both literally
(``:class:Backoff``, ``milliseconds::``); this hook drops the role prefix and
the doubled colon in the rendered HTML.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj|term):(?=<code>)")
_LITERAL_MARKER = re.compile(r"::</p>")


def on_page_content(html: str, **kwargs: Any) -> str:
    return _LITERAL_MARKER.sub(":</p>", _ROLE.sub("", html))
