"""Field kinds and strict decoding for protocol v1 frames (sans-IO).

Each attrs field of a frame carries a ``kind`` in its metadata: a function that
checks a decoded JSON value and converts it. Every kind raises
``RemoteProtocolError("invalid_field")`` for a wrong type. ``_from_object`` and
``_to_object`` turn a JSON object into such a class and back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, TypeAlias

import attrs

from .._errors import LocalProtocolError, RemoteProtocolError
from ._json import reject_constant
from ._subjects import validate_pattern, validate_subject

MAX_ID_LENGTH = 128
MAX_NESTING = 64
"""Deepest nesting of arrays/objects in a frame (the frame object itself is level 1)."""
MAX_SAFE_INTEGER = 2**53 - 1
"""Largest value of an integer field the hub reads (``seq``, ``protocol``): every client
(JavaScript's numbers included) can represent every such value exactly."""

JSON: TypeAlias = Any
"""Any value that ``json`` can encode: dict, list, str, int, float, bool, None."""


# --- field kinds -----------------------------------------------------------


def _bad(name: str, expected: str, value: object, frame_id: str | None) -> RemoteProtocolError:
    return RemoteProtocolError(
        "invalid_field",
        f"field {name!r} must be {expected}, got {type(value).__name__}",
        frame_id=frame_id,
    )


def _k_str(name: str, value: object, frame_id: str | None) -> str:
    if not isinstance(value, str):
        raise _bad(name, "a string", value, frame_id)
    return value


def _k_id(name: str, value: object, frame_id: str | None) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_LENGTH:
        raise RemoteProtocolError(
            "invalid_field",
            f"field {name!r} must be a string of 1 to {MAX_ID_LENGTH} characters",
            frame_id=frame_id,
        )
    return value


def _k_int(name: str, value: object, frame_id: str | None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _bad(name, "a non-negative integer", value, frame_id)
    if value > MAX_SAFE_INTEGER:
        raise RemoteProtocolError(
            "invalid_field",
            f"field {name!r} must be at most 2^53 - 1 ({MAX_SAFE_INTEGER})",
            frame_id=frame_id,
        )
    return value


def _k_number(name: str, value: object, frame_id: str | None) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _bad(name, "a non-negative number", value, frame_id)
    try:
        number = float(value)  # a huge int overflows here
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or number < 0:
        raise RemoteProtocolError(
            "invalid_field",
            f"field {name!r} must be a finite non-negative number",
            frame_id=frame_id,
        )
    return number


def _k_bool(name: str, value: object, frame_id: str | None) -> bool:
    if not isinstance(value, bool):
        raise _bad(name, "true or false", value, frame_id)
    return value


def _k_json(name: str, value: object, frame_id: str | None) -> JSON:
    return value


def _k_object(name: str, value: object, frame_id: str | None) -> dict[str, JSON]:
    if not isinstance(value, dict):
        raise _bad(name, "an object", value, frame_id)
    return value


def _k_strings(name: str, value: object, frame_id: str | None) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _bad(name, "a list of strings", value, frame_id)
    return tuple(value)


MAX_CONNECT_URLS = 64
MAX_URL_LENGTH = 2048


def _k_urls(name: str, value: object, frame_id: str | None) -> tuple[str, ...]:
    urls = _k_strings(name, value, frame_id)
    if len(urls) > MAX_CONNECT_URLS or any(len(url) > MAX_URL_LENGTH for url in urls):
        raise RemoteProtocolError(
            "invalid_field",
            f"field {name!r} allows at most {MAX_CONNECT_URLS} strings of at most "
            f"{MAX_URL_LENGTH} characters",
            frame_id=frame_id,
        )
    return urls


MAX_METADATA_BYTES = 8192
MAX_METADATA_DEPTH = 16
MAX_CAPABILITIES = 64


def _depth(value: object) -> int:
    """Nesting depth of a decoded JSON value (iterative: no recursion limit)."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def _k_metadata(name: str, value: object, frame_id: str | None) -> dict[str, JSON]:
    """An agent's metadata: an object, small and shallow (it is echoed to every watcher)."""
    metadata = _k_object(name, value, frame_id)
    if _depth(metadata) > MAX_METADATA_DEPTH:
        raise RemoteProtocolError(
            "invalid_field",
            f"field {name!r} is nested deeper than {MAX_METADATA_DEPTH} levels",
            frame_id=frame_id,
        )
    try:
        size = len(json.dumps(metadata, allow_nan=False).encode("utf-8"))
    except ValueError:  # 1e999 parses as infinity, which JSON cannot carry back out
        raise RemoteProtocolError(
            "invalid_field", f"field {name!r} holds a number out of range", frame_id=frame_id
        ) from None
    if size > MAX_METADATA_BYTES:
        raise RemoteProtocolError(
            "invalid_field",
            f"field {name!r} is larger than {MAX_METADATA_BYTES} bytes of JSON",
            frame_id=frame_id,
        )
    return metadata


def _k_capabilities(name: str, value: object, frame_id: str | None) -> tuple[str, ...]:
    capabilities = _k_strings(name, value, frame_id)
    if len(capabilities) > MAX_CAPABILITIES or any(len(c) > MAX_ID_LENGTH for c in capabilities):
        raise RemoteProtocolError(
            "invalid_field",
            f"field {name!r} allows at most {MAX_CAPABILITIES} strings of at most "
            f"{MAX_ID_LENGTH} characters",
            frame_id=frame_id,
        )
    return capabilities


def _k_subject(name: str, value: object, frame_id: str | None) -> str:
    try:
        return validate_subject(value, frame_id=frame_id)
    except LocalProtocolError as exc:  # the validator speaks to callers; this came in
        raise _remote(exc) from None


def _k_pattern(name: str, value: object, frame_id: str | None) -> str:
    try:
        return validate_pattern(value, frame_id=frame_id)
    except LocalProtocolError as exc:
        raise _remote(exc) from None


def _remote(exc: LocalProtocolError) -> RemoteProtocolError:
    return RemoteProtocolError(exc.code, exc.message, frame_id=exc.frame_id)


_Kind: TypeAlias = Callable[[str, object, "str | None"], Any]


def _field(kind: _Kind, *, optional: bool = False, default: object = attrs.NOTHING) -> Any:
    """An attrs field decoded with ``kind``; ``optional`` fields may be absent or null."""
    if optional and default is attrs.NOTHING:
        default = None
    return attrs.field(default=default, metadata={"kind": kind, "optional": optional})


# --- conversion ---------------------------------------------------------------


_Spec: TypeAlias = "tuple[tuple[str, _Kind, bool, bool], ...]"
_SPECS: dict[type[Any], _Spec] = {}


def _spec(cls: type[Any]) -> _Spec:
    """``(name, kind, optional, required)`` of each field of ``cls``, read once per class."""
    spec = _SPECS.get(cls)
    if spec is None:
        spec = _SPECS[cls] = tuple(
            (f.name, f.metadata["kind"], f.metadata["optional"], f.default is attrs.NOTHING)
            for f in attrs.fields(cls)
        )
    return spec


def _to_object(value: Any) -> dict[str, JSON]:
    out: dict[str, JSON] = {}
    for name, _kind_of, optional, _required in _spec(type(value)):
        item = getattr(value, name)
        if item is None and optional:
            continue
        if isinstance(item, tuple):
            item = [_to_object(x) if attrs.has(type(x)) else x for x in item]
        out[name] = item
    return out


_reject_constant = reject_constant


def _from_object(cls: type[Any], obj: object, frame_id: str | None, where: str) -> Any:
    if not isinstance(obj, dict):
        raise RemoteProtocolError("invalid_field", f"{where} must be an object", frame_id=frame_id)
    kwargs: dict[str, Any] = {}
    for name, kind, optional, required in _spec(cls):
        if name not in obj:
            if required:
                raise RemoteProtocolError(
                    "missing_field",
                    f"{getattr(cls, 'type', '') or where} frame is missing field {name!r}",
                    frame_id=frame_id,
                )
            continue
        value = obj[name]
        if value is None and optional:
            continue
        kwargs[name] = kind(name, value, frame_id)
    return cls(**kwargs)


def _too_deep() -> RemoteProtocolError:
    return RemoteProtocolError("invalid_json", f"JSON is nested deeper than {MAX_NESTING} levels")


def _deeper_than(value: object, limit: int) -> bool:
    """Whether arrays/objects nest deeper than ``limit`` (iterative: no recursion limit)."""
    stack: list[tuple[dict[str, Any] | list[Any], int]] = []
    if isinstance(value, dict | list):
        stack.append((value, 1))
    while stack:
        item, level = stack.pop()
        if level > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, level + 1) for c in children if isinstance(c, dict | list))
    return False


def _kind(obj: object) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(obj), "a number"
    )
