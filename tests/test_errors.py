"""The exception tree: every class is where the drawing in ``_errors`` puts it, and
local and remote protocol errors are told apart where they arise."""

from __future__ import annotations

import inspect
import re

import pytest
import trio

import artcafe_trio
from artcafe_trio import (
    ArtcafeError,
    CloseCode,
    ConnectFailed,
    ConnectionLost,
    ConnectTimeout,
    HeartbeatTimeout,
    LocalProtocolError,
    ProtocolError,
    RegistryError,
    RemoteProtocolError,
    SessionReplaced,
    _errors,
)
from artcafe_trio.protocol import decode, validate_subject
from artcafe_trio.testing import open_test_hub


def _drawn_tree() -> dict[str, str]:
    """child -> parent, read from the module docstring's drawing (by indentation)."""
    stack: list[tuple[int, str]] = []
    tree: dict[str, str] = {}
    for line in (_errors.__doc__ or "").splitlines():
        match = re.match(r"^([\s│├└─]*)([A-Z][A-Za-z]+)\b", line)
        if not match or not (match.group(1).strip() or match.group(2) == "ArtcafeError"):
            continue  # prose, or a continuation line of a description
        column = len(match.group(1))
        while stack and stack[-1][0] >= column:
            stack.pop()
        if stack:
            tree[match.group(2)] = stack[-1][1]
        stack.append((column, match.group(2)))
    return tree


def test_the_drawing_matches_the_classes() -> None:
    tree = _drawn_tree()
    exported = {
        name for name in artcafe_trio.__all__
        if inspect.isclass(getattr(artcafe_trio, name))
        and issubclass(getattr(artcafe_trio, name), BaseException)
    }  # fmt: skip
    assert set(tree) == exported - {"ArtcafeError"}
    for child, parent in tree.items():
        cls = getattr(artcafe_trio, child)
        assert cls.__mro__[1] is getattr(artcafe_trio, parent), (child, parent)


def test_new_classes_sit_under_the_old_ones() -> None:
    # Code written against the first tree keeps catching what it caught.
    assert issubclass(ConnectTimeout, ConnectFailed)
    assert issubclass(HeartbeatTimeout, ConnectionLost)
    assert issubclass(SessionReplaced, ConnectionLost)
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert issubclass(RegistryError, ArtcafeError)


def test_close_codes_are_one_int_enum() -> None:
    assert CloseCode.REPLACED == 4003
    assert isinstance(CloseCode.HEARTBEAT_TIMEOUT, int)
    assert CloseCode(4004) is CloseCode.SLOW_CONSUMER
    from artcafe_trio.hub import CloseCode as hub_codes
    from artcafe_trio.protocol import CloseCode as protocol_codes

    assert hub_codes is protocol_codes is CloseCode


def test_what_came_in_is_remote_and_what_we_send_is_local() -> None:
    with pytest.raises(RemoteProtocolError) as remote:
        decode('{"type": "publish", "id": "p1", "subject": "a..b", "data": 1}')
    assert remote.value.code == "invalid_subject"
    assert remote.value.frame_id == "p1"
    with pytest.raises(RemoteProtocolError, match="invalid_json"):
        decode("{nope")
    with pytest.raises(LocalProtocolError) as local:
        validate_subject("a..b")
    assert local.value.code == "invalid_subject"
    assert not isinstance(local.value, RemoteProtocolError)


async def test_an_invalid_publish_is_a_local_error_and_sends_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_test_hub() as hub, hub.open_agent("a1") as agent:
        before = agent.health().messages_out
        with pytest.raises(LocalProtocolError, match="invalid_subject"):
            await agent.publish("tasks..new", {"x": 1})
        with pytest.raises(LocalProtocolError, match="frame_too_large"):
            await agent.publish("tasks.new", "x" * (2 << 20))
        assert agent.health().messages_out == before
