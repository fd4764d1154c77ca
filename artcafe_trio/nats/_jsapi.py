"""One JetStream API call: a JSON request on ``$JS.API.…``, its JSON answer, errors
raised as :class:`JetStreamError` (the key-value layer's transport)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import trio

from ._errors import JetStreamError, NatsTimeoutError
from ._protocol import Msg

if TYPE_CHECKING:
    from ._client import NatsClient

__all__ = ["_api", "_api_resent", "_decode_answer"]


async def _api(nc: NatsClient, subject: str, body: Mapping[str, Any] | None, limit: float) -> Any:
    """One JetStream API call: JSON in, JSON out, errors as :class:`JetStreamError`."""
    payload = json.dumps(body).encode() if body is not None else b""
    with trio.move_on_after(limit) as scope:
        msg = await nc.request(subject, payload)
    if scope.cancelled_caught:
        raise NatsTimeoutError(f"no answer on {subject} within {limit:g} s")
    return _decode_answer(msg)


async def _api_resent(
    nc: NatsClient, subject: str, body: Mapping[str, Any] | None, limit: float
) -> Any:
    """An idempotent call, sent again when unanswered for a quarter of ``limit`` (at
    least 1 s), until ``limit``. A clustered server answers nothing while the leader a
    request needs is being elected (the stream's for an info, the meta leader's for a
    create): the request is lost, not late."""
    deadline = trio.current_time() + limit
    patience = max(limit / 4, 1.0)
    while True:
        remaining = deadline - trio.current_time()
        try:
            return await _api(nc, subject, body, max(min(remaining, patience), 0.001))
        except NatsTimeoutError:
            if trio.current_time() >= deadline:
                raise NatsTimeoutError(f"no answer on {subject} within {limit:g} s") from None


def _decode_answer(msg: Msg) -> Any:
    try:
        answer = json.loads(msg.data)
    except ValueError:
        raise JetStreamError(0, 0, f"answer is not JSON: {msg.data[:80]!r}") from None
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        err = answer["error"]
        raise JetStreamError(
            int(err.get("code", 0)), int(err.get("err_code", 0)), str(err.get("description"))
        )
    return answer
