"""The standard library's ``json``, without its per-call set-up (sans-IO).

``json.dumps(value, separators=..., allow_nan=False)`` builds a ``JSONEncoder`` and a C
encoder on every call, and ``json.loads(text, parse_constant=...)`` a ``JSONDecoder``:
on the hub's small frames that set-up costs more than the encoding. These functions
give exactly the same results (the same text, the same values, the same exceptions
with the same messages) from objects built once:

- :func:`dumps_compact` is ``json.dumps(value, separators=(",", ":"), allow_nan=False)``;
- :func:`loads_strict` is ``json.loads(text, parse_constant=reject)`` (``NaN`` and
  ``±Infinity`` refused), falling back to that very call for anything but a
  well-formed document with no surrounding whitespace, so every error (and the BOM
  check ``json.loads`` makes) is the standard library's own;
- :func:`quote` is the standard library's string encoder (``ensure_ascii``), for
  frames built from templates.
"""

from __future__ import annotations

import json
import json.encoder
from typing import Any

__all__ = ["dumps_compact", "loads_strict", "quote", "reject_constant"]

quote = json.encoder.encode_basestring_ascii
"""A ``str`` as a JSON string literal, exactly as ``json.dumps`` writes it."""

_c_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
_COMPACT = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_default = _COMPACT.default


def dumps_compact(value: Any) -> str:
    """``json.dumps(value, separators=(",", ":"), allow_nan=False)``."""
    if type(value) is str:
        return quote(value)
    if _c_make_encoder is None:  # pragma: no cover - CPython always has it
        return _COMPACT.encode(value)
    # What JSONEncoder.encode does, minus building the Python-level encoder: a fresh
    # markers dict per call keeps the circular-reference check (and after an error
    # no stale marker is left behind).
    encoder = _c_make_encoder({}, _default, quote, None, ":", ",", False, False, False)
    return "".join(encoder(value, 0))


def reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=reject_constant)
_scan_once: Any = _DECODER.scan_once  # type: ignore[attr-defined]  # set in __init__


def loads_strict(text: str) -> Any:
    """``json.loads(text, parse_constant=reject_constant)``."""
    try:
        value, end = _scan_once(text, 0)
    except (StopIteration, ValueError, RecursionError):
        end = -1
    if end == len(text):
        return value
    # Leading or trailing whitespace, trailing data, or an error: the standard call
    # decides, with its own message.
    return json.loads(text, parse_constant=reject_constant)
