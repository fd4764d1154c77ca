"""A failed connection to the hub told in words (not reprs), for ``status`` and the agents."""

from __future__ import annotations

import ssl
from typing import Any

from artcafe_trio import ConnectFailed, ConnectionLost, ConnectTimeout, ReconnectFailed

__all__ = ["_close_text", "_connection_problem", "_not_tls"]


def _not_tls(exc: BaseException | None) -> bool:
    """Whether a TLS handshake failed because the server answered in plain text."""
    while exc is not None:
        if isinstance(exc, ssl.SSLError) and exc.reason == "WRONG_VERSION_NUMBER":
            return True
        exc = exc.__cause__
    return False


def _close_text(reason: Any) -> str:
    """A trio-websocket ``CloseReason`` as ``1012 hub shutting down`` (not its repr)."""
    code = getattr(reason, "code", None)
    text = getattr(reason, "reason", None) or ""
    if code is None:
        return "no close code"
    if code == 1006:
        return "1006, without a close frame"
    return f"{code} {text}".rstrip()


def _connection_problem(exc: BaseException, url: str, *, hint: bool = True) -> str:
    """One line for a failed connection to the hub at ``url``: the library's words.

    ``exc`` is what the agent raised (:class:`ConnectFailed`, ``ReconnectFailed`` with
    ``last_cause``, or ``ConnectionLost`` for an established connection) or a raw cause
    (``status``). ``hint=False`` leaves out "(is the hub running?)" where the caller says
    so already.
    """
    from ..agent._connfail import describe_failure

    if isinstance(exc, ReconnectFailed):
        if exc.last_cause is None:
            return str(exc)
        text = _connection_problem(exc.last_cause, url, hint=hint)
        return f"{text} (gave up after {exc.attempts} attempts over {exc.elapsed:.0f} s)"
    if isinstance(exc, ConnectionLost) and not isinstance(exc, ConnectFailed):
        return str(exc)
    text = describe_failure(exc, url, hint=hint)[0]
    if hint and isinstance(exc, ConnectTimeout):
        text += " (is that port a hub?)"  # TCP connected, but no welcome came
    return text
