"""Why a connection attempt failed, in words, and whether retrying can help.

One table for the agent (which retries only what can succeed later) and the
command line (which prints the same words). ``docs/troubleshooting.md`` lists it.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
from collections.abc import Iterator
from urllib.parse import urlsplit

import trio
import trio_websocket

from .._errors import ConnectFailed, ConnectionLost

__all__ = ["RETRYABLE_HTTP", "connect_failed", "describe_failure"]

RETRYABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
"""HTTP answers to the WebSocket upgrade that a later attempt may not get (a proxy or a
hub restarting, rate limits). Every other status (404, 400, 401, 403...) is permanent."""

_PERMANENT_DNS = frozenset(
    code
    for code in (getattr(socket, "EAI_NONAME", None), getattr(socket, "EAI_NODATA", None))
    if code is not None
)
"""getaddrinfo's "this name does not exist"; EAI_AGAIN ("temporary failure") is retried."""

_TLS_EOF = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _os_errors(exc: OSError) -> list[BaseException]:
    """trio's ``open_tcp_stream`` raises ``OSError('all attempts to connect to ... failed')``
    caused by one error per address tried: those are the real causes."""
    if isinstance(exc.__cause__, BaseExceptionGroup):
        return list(_leaves(exc.__cause__)) or [exc]
    return [exc]


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _os_text(error: BaseException) -> str:
    if isinstance(error, socket.gaierror):
        return _lower_first(error.strerror or str(error))
    if isinstance(error, OSError) and isinstance(error.errno, int) and error.errno > 0:
        return _lower_first(os.strerror(error.errno))
    if isinstance(error, OSError) and error.strerror:
        return _lower_first(error.strerror)
    return str(error) or type(error).__name__


def _ssl_cause(exc: BaseException | None) -> ssl.SSLError | None:
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, ssl.SSLError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _host(url: str) -> str:
    return urlsplit(url).hostname or url


def describe_failure(exc: BaseException, url: str, *, hint: bool = True) -> tuple[str, bool]:
    """``(what happened, permanent)`` for a failed attempt to connect to ``url``.

    The text starts with ``cannot connect to URL: ``. ``hint=False`` leaves out
    "(is the hub running?)" for callers that say so already.
    """
    prefix = f"cannot connect to {url}: "
    if isinstance(exc, ConnectFailed):
        return str(exc), exc.permanent
    if isinstance(exc, trio_websocket.ConnectionRejected):
        status = exc.status_code
        body = (exc.body or b"").decode("utf-8", "replace").strip()
        text = f"the hub answered HTTP {status}"
        if body and len(body) <= 200 and body.isprintable():
            text += f": {body}"
        if status == 404:
            text += " (check the URL: it is the hub's base URL, without a path)"
        return prefix + text, status not in RETRYABLE_HTTP
    tls = _ssl_cause(exc)
    if tls is not None and not isinstance(tls, _TLS_EOF):
        if tls.reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST"):
            text = "TLS handshake failed: the hub speaks plain ws://? (use ws:// instead of wss://)"
        else:
            text = f"TLS handshake failed: {tls.reason or tls}"
        return prefix + text, True
    if isinstance(exc, OSError):
        errors = _os_errors(exc)
        texts: list[str] = []
        for error in errors:
            text = _os_text(error)
            if text not in texts:
                texts.append(text)
        joined = "; ".join(texts)
        if any(isinstance(e, socket.gaierror) and e.errno in _PERMANENT_DNS for e in errors):
            return prefix + f"cannot resolve host {_host(url)!r} ({joined})", True
        if any(isinstance(e, socket.gaierror) for e in errors):
            return prefix + f"cannot resolve host {_host(url)!r} ({joined})", False
        if hint and any(getattr(e, "errno", None) == errno.ECONNREFUSED for e in errors):
            joined += " (is the hub running?)"
        return prefix + joined, False
    if tls is not None or isinstance(exc, trio.BrokenResourceError):
        return prefix + "the hub hung up during the TLS handshake", False
    if isinstance(exc, trio_websocket.ConnectionTimeout):
        return prefix + "the WebSocket handshake timed out", False
    if isinstance(exc, trio_websocket.HandshakeError):
        return prefix + f"the WebSocket handshake failed ({type(exc).__name__})", False
    return prefix + (str(exc) or type(exc).__name__), False


def connect_failed(exc: BaseException, url: str) -> ConnectFailed:
    """The :class:`ConnectFailed` for a failed attempt (``exc`` becomes its cause)."""
    if isinstance(exc, ConnectFailed):
        return exc
    text, permanent = describe_failure(exc, url)
    code, reason = (exc.code, exc.reason) if isinstance(exc, ConnectionLost) else (None, "")
    error = ConnectFailed(text, url=url, permanent=permanent, code=code, reason=reason)
    error.__cause__ = exc
    return error
