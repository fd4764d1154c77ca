"""docs/protocol.md and the hub agree on what a delivery looks like (issue 9, item 1a).

The hub sends one ``message`` per publish per connection and no ``subscription`` field;
an independent client written from the document alone must not expect one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from artcafe_trio.hub._backplane import Route
from artcafe_trio.hub._router import Router

PROTOCOL_MD = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def json_examples() -> list[dict[str, Any]]:
    """Every JSON object of the document's ```json blocks (one frame per line)."""
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    frames = []
    for block in re.findall(r"```json\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                value = json.loads(line)
            except ValueError:
                continue  # a multi-line or annotated example: not a frame line
            if isinstance(value, dict) and "type" in value:
                frames.append(value)
    return frames


def hub_message_fields(example: dict[str, Any]) -> set[str]:
    """The fields of the ``message`` frame the hub sends for the example's values."""
    route = Route(
        "t", example["subject"], json.dumps(example.get("data")), example["sender"],
        example["message_id"], example["time"], example.get("reply_to"),
    )  # fmt: skip
    frame = Router._frame(route).frame
    start = frame.index(b"{")  # after the WebSocket frame header
    return set(json.loads(frame[start:]))


def test_no_message_example_carries_a_subscription() -> None:
    messages = [frame for frame in json_examples() if frame["type"] == "message"]
    assert len(messages) >= 2  # the delivery example and the presence event
    for example in messages:
        assert "subscription" not in example, example
        # And every field it shows is one the hub sends for those values.
        assert set(example) == hub_message_fields(example), example


def test_the_client_checklist_dispatches_by_subject() -> None:
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    assert '"subscription":' not in text
    checklist = text[text.index("7. Dispatch `message`") :][:600]
    assert "by its `subject`" in checklist
    assert "by its `subscription`" not in checklist
