"""JSON codecs on the hub's real per-publish work: stdlib ``json`` against orjson and msgspec.

Per routed publish the hub (1) decodes and validates the ``publish`` frame
(``_frames.decode_with_id``: parse, nesting count, field kinds), (2) re-encodes
its ``data`` once, (3) builds the ``message`` frame around it
(``encode_message``) and (4) encodes the ``published`` answer (``encode``).
This script times exactly those four steps with each codec, on frames of
three sizes (``data`` of ~120 bytes, 1 KiB and 64 KiB), in interleaved rounds
(stdlib, orjson, msgspec, stdlib, ...), and prints medians and ratios.

The orjson and msgspec variants keep every refusal the protocol documents the
way an adoption would have to: an input the fast parser refuses or cannot
represent exactly goes to the stdlib path, which decides (a lone surrogate,
``1e999``, a 4301-digit integer, more than 1024 levels); orjson also needs a
guard for integers beyond 64 bits, which it would otherwise turn into floats
(any run of 19 or more digits sends the frame to the stdlib path). Validation
(field kinds, the hub's own nesting count) is the hub's own code in all three.

Needs ``pip install orjson msgspec`` (benchmark-only; not dependencies)::

    python bench/json_codecs.py               # about a minute
    python bench/json_codecs.py --rounds 9 --write json_codecs.json
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import orjson

from artcafe_trio._errors import ProtocolError
from artcafe_trio.protocol import _frames
from artcafe_trio.protocol._frames import (
    FRAME_TYPES,
    MAX_ID_LENGTH,
    MAX_NESTING,
    Frame,
    Published,
    decode_with_id,
    encode,
    encode_message,
)

Work = Callable[[str], tuple[str, str]]


# --- the three codecs ---------------------------------------------------------


def stdlib_work(text: str) -> tuple[str, str]:
    """What the hub does today (``_hub._handle_publish`` / ``_delivery`` / ``send_frame``)."""
    frame, _raw_id = decode_with_id(text)
    data_json = json.dumps(frame.data, separators=(",", ":"), allow_nan=False)  # type: ignore[attr-defined]
    message = encode_message(
        subject=frame.subject,  # type: ignore[attr-defined]
        subscription=None,
        data_json=data_json,
        sender="agent-1",
        message_id="hub-1234",
        time=1764625000.123456,
    )
    answer = encode(Published(id=frame.id, message_id="hub-1234"))  # type: ignore[attr-defined]
    return message, answer


def _validated(obj: Any, text: str) -> Frame:
    """``decode_with_id`` after the parse: the hub's own nesting count and field kinds."""
    if text.count("[") + text.count("{") > MAX_NESTING and _frames._deeper_than(obj, MAX_NESTING):
        raise _frames._too_deep()
    if not isinstance(obj, dict):
        raise ProtocolError("not_an_object", "a frame must be a JSON object")
    raw_id = obj.get("id")
    frame_id = raw_id if isinstance(raw_id, str) and len(raw_id) <= MAX_ID_LENGTH else None
    cls = FRAME_TYPES[obj["type"]]
    frame: Frame = _frames._from_object(cls, obj, frame_id, obj["type"])
    return frame


_BIG_INT = re.compile(r"\d{19}")


def _make_fast(
    loads: Callable[[str], Any],
    dumps: Callable[[Any], bytes],
    errors: tuple[type[BaseException], ...],
    int_guard: bool,
) -> Work:
    def decode_fast(text: str) -> Frame:
        if len(text) > _frames.DEFAULT_MAX_FRAME_BYTES:
            raise ProtocolError("frame_too_large", "too large")
        if int_guard and _BIG_INT.search(text):
            return decode_with_id(text)[0]
        try:
            obj = loads(text)
        except errors:
            return decode_with_id(text)[0]  # the stdlib decides, with its own message
        return _validated(obj, text)

    def dump(value: Any) -> str:
        try:
            return dumps(value).decode()
        except (TypeError, UnicodeEncodeError, OverflowError):
            return json.dumps(value, separators=(",", ":"), allow_nan=False)

    def work(text: str) -> tuple[str, str]:
        frame = decode_fast(text)
        data_json = dump(frame.data)  # type: ignore[attr-defined]
        head: dict[str, Any] = {"type": "message", "subject": frame.subject}  # type: ignore[attr-defined]
        tail = {"sender": "agent-1", "message_id": "hub-1234", "time": 1764625000.123456}
        message = dump(head)[:-1] + ',"data":' + data_json + "," + dump(tail)[1:]
        answer = dump(
            {"type": "published", "id": frame.id, "message_id": "hub-1234", "duplicate": False}  # type: ignore[attr-defined]
        )
        return message, answer

    return work


_msgspec_decoder = msgspec.json.Decoder()
_msgspec_encoder = msgspec.json.Encoder()

CODECS: dict[str, Work] = {
    "stdlib": stdlib_work,
    "orjson": _make_fast(orjson.loads, orjson.dumps, (orjson.JSONDecodeError,), int_guard=True),
    "msgspec": _make_fast(
        _msgspec_decoder.decode,
        _msgspec_encoder.encode,
        (msgspec.DecodeError, UnicodeEncodeError, RecursionError),
        int_guard=False,
    ),
}


# --- realistic frames ------------------------------------------------------------


def _record(i: int) -> dict[str, Any]:
    return {
        "id": f"order-{i:06d}",
        "sku": f"SKU-{(i * 7919) % 100000:05d}",
        "qty": i % 17 + 1,
        "price": round(3.75 + (i % 113) * 0.37, 2),
        "ok": i % 5 != 0,
        "note": None if i % 3 else "expédié — 2 colis",
        "tags": ["eu", "priority"] if i % 4 == 0 else ["us"],
    }


def _frame(data: Any) -> str:
    return json.dumps(
        {"type": "publish", "subject": "orders.eu.paris.created", "id": "p-000042", "data": data},
        separators=(",", ":"),
    )


def frames() -> dict[str, str]:
    small = {"seq": 42, "kind": "order.created", "body": "x" * 64, "at": 1764625000.25}
    out = {"small": _frame(small)}
    for name, size in (("1 KiB", 1024), ("64 KiB", 64 * 1024)):
        records: list[dict[str, Any]] = []
        while len(json.dumps({"records": records}, separators=(",", ":"))) < size:
            records.append(_record(len(records)))
        out[name] = _frame({"batch": 7, "records": records})
    return out


# --- measurement -------------------------------------------------------------------


def per_op(work: Work, text: str, seconds: float) -> float:
    """Microseconds per call of ``work(text)``, over at least ``seconds``."""
    n = 1
    while True:
        start = time.perf_counter()
        for _ in range(n):
            work(text)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return elapsed / n * 1e6
        n = max(n * 2, int(n * 1.2 * seconds / max(elapsed, 1e-9)))


def check_same(texts: dict[str, str]) -> None:
    """Every codec yields the same JSON values as the stdlib (the texts may differ in form)."""
    for name, text in texts.items():
        want = [json.loads(t) for t in stdlib_work(text)]
        for codec, work in CODECS.items():
            got = [json.loads(t) for t in work(text)]
            if got != want:
                sys.exit(f"{codec} differs from stdlib on {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.4, help="per measurement")
    parser.add_argument("--write", type=Path, help="write a JSON summary here")
    args = parser.parse_args()

    texts = frames()
    check_same(texts)
    results: dict[str, dict[str, list[float]]] = {n: {c: [] for c in CODECS} for n in texts}
    for _ in range(args.rounds):
        for name, text in texts.items():
            for codec, work in CODECS.items():
                results[name][codec].append(per_op(work, text, args.seconds))

    print(
        f"# JSON per publish (decode+validate, data re-encode, message, published); "
        f"{args.rounds} interleaved rounds, medians (min-max) in µs; "
        f"Python {platform.python_version()}, orjson {orjson.__version__}, "
        f"msgspec {msgspec.__version__}"
    )
    print("| frame | bytes | stdlib | orjson | msgspec | stdlib/orjson | stdlib/msgspec |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    summary: dict[str, Any] = {}
    for name, text in texts.items():
        med = {c: statistics.median(v) for c, v in results[name].items()}
        cells = [
            f"{med[c]:.1f} ({min(results[name][c]):.1f}–{max(results[name][c]):.1f})"
            for c in CODECS
        ]
        print(
            f"| {name} | {len(text.encode())} | {' | '.join(cells)} | "
            f"{med['stdlib'] / med['orjson']:.2f}× | {med['stdlib'] / med['msgspec']:.2f}× |"
        )
        summary[name] = {"bytes": len(text.encode()), "us": results[name], "median_us": med}
    if args.write:
        args.write.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
