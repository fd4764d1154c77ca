"""One escaping helper for every peer-supplied string that reaches a log line.

A peer (an agent talking to the hub, or the hub talking to an agent) controls
ids, subjects, error codes and messages. Logged raw, a newline or an ANSI escape
in them forges log lines or rewrites a terminal; :func:`printable` makes any
value one inert line of ASCII.
"""

from __future__ import annotations

__all__ = ["printable"]

DEFAULT_LIMIT = 200


def printable(value: object, limit: int = DEFAULT_LIMIT) -> str:
    """``value`` as one line of printable ASCII, at most ``limit`` characters before escaping.

    ``None`` is ``-``; anything else goes through ``str()``. Backslashes, control
    characters (newline, CR, ESC, NUL...), non-ASCII characters and lone
    surrogates are written as Python escapes (``\\n``, ``\\x1b``, ``\\ud800``),
    so an escaped string can never pass for another; a longer value is cut and ends in ``...``.
    """
    if value is None:
        return "-"
    text = value if isinstance(value, str) else str(value)
    cut = len(text) > limit
    if cut:
        text = text[:limit]
    escaped = text.encode("unicode_escape").decode("ascii")
    return escaped + "..." if cut else escaped
