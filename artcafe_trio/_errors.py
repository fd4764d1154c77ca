"""The exception tree. Every error the public API raises is an ``ArtcafeError``::

    ArtcafeError
    ├── ProtocolError            a frame broke protocol v1 (has .code and .frame_id)
    │   ├── LocalProtocolError   we were about to send it: a bad subject, an oversized
    │   │                        publish, a frame out of order (a bug in the caller)
    │   └── RemoteProtocolError  the peer sent it: invalid JSON, a wrong field, a frame
    │                            the state does not allow
    ├── KeyLoadError             a key file could not be loaded, parsed or used
    ├── AuthenticationError      the hub refused our key, or a signature did not verify
    ├── ConnectionLost           the connection to the hub ended (has .code and .reason)
    │   ├── ConnectFailed        an attempt to connect failed before the hub's welcome
    │   │   │                    (has .url and .permanent: never retried when True)
    │   │   └── ConnectTimeout   no welcome within connect_timeout
    │   ├── HeartbeatTimeout     no heartbeat ACK within the timeout (has .timeout)
    │   ├── SessionReplaced      the hub closed us with 4003: the same agent id connected
    │   │                        elsewhere; never retried
    │   └── ReconnectFailed      gave up after max_reconnect_attempts (has .attempts,
    │                            .elapsed, .last_cause)
    ├── HubError                 the hub answered a request with an ``error`` frame
    ├── RegistryError            the registry refused an operation (unknown tenant or
    │                            agent, duplicate, invalid id...); from artcafe_trio
    └── AgentClosed              the agent was stopped; the operation cannot proceed

``RegistryError`` is defined with the registry (:mod:`artcafe_trio.registry`), which
imports this module; everything else is here. WebSocket close codes are one
:class:`~artcafe_trio.CloseCode` enum shared by the hub and the agent.

The module imports neither trio nor any socket library.
"""

from __future__ import annotations

__all__ = [
    "AgentClosed",
    "ArtcafeError",
    "AuthenticationError",
    "ConnectFailed",
    "ConnectTimeout",
    "ConnectionLost",
    "HeartbeatTimeout",
    "HubError",
    "KeyLoadError",
    "LocalProtocolError",
    "ProtocolError",
    "ReconnectFailed",
    "RemoteProtocolError",
    "SessionReplaced",
]


class ArtcafeError(Exception):
    """Root of every error raised by artcafe-trio."""


class ProtocolError(ArtcafeError):
    """A frame violated protocol v1.

    ``code`` is the stable, machine-readable error code that also goes into the
    ``error`` frame (see ``docs/protocol.md``); ``frame_id`` is the ``id`` of the
    offending frame when it had a readable one.
    """

    def __init__(self, code: str, message: str, *, frame_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.frame_id = frame_id


class LocalProtocolError(ProtocolError):
    """This side was about to break protocol v1 (a bad subject or pattern, an
    oversized publish, a frame the connection's state does not allow): a bug or bad
    input in the calling code. Nothing was sent."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something that breaks protocol v1 (invalid JSON, a missing or
    mistyped field, a frame its state does not allow). ``code`` is what the hub puts
    in its ``error`` frame."""


class KeyLoadError(ArtcafeError):
    """A private or public key could not be loaded, parsed or used.

    ``reason`` is one of: ``missing_file``, ``unreadable_file``,
    ``unreadable_format``, ``password_required``, ``wrong_password``,
    ``unsupported_key_type``, ``rsa_key_too_small``, ``missing_dependency``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class AuthenticationError(ArtcafeError):
    """The hub refused the agent's credentials. Never retried automatically."""

    def __init__(self, message: str, *, code: str = "authentication_failed") -> None:
        super().__init__(message)
        self.code = code


class ConnectionLost(ArtcafeError):
    """The connection to the hub ended.

    ``code`` and ``reason`` are the WebSocket close code and reason when the
    hub closed the connection, otherwise ``None`` and a description.
    """

    def __init__(self, message: str, *, code: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class ConnectFailed(ConnectionLost):
    """An attempt to connect to the hub at ``url`` failed before the hub's welcome.

    The message says what happened in words (``cannot connect to ws://...: connection
    refused (is the hub running?)``). ``permanent`` failures (a TLS handshake with a
    plain hub, an HTTP 4xx answer, a host name that does not resolve) would fail the
    same way again: they are raised at once and never retried. The others (refused,
    reset, timed out, the hub closing during the handshake...) are retried with backoff.
    ``docs/troubleshooting.md`` lists them.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str,
        permanent: bool,
        code: int | None = None,
        reason: str = "",
    ) -> None:
        super().__init__(message, code=code, reason=reason)
        self.url = url
        self.permanent = permanent


class ConnectTimeout(ConnectFailed):
    """No ``welcome`` from the hub within ``connect_timeout``; retried with backoff."""

    def __init__(self, message: str, *, url: str, timeout: float) -> None:
        super().__init__(message, url=url, permanent=False)
        self.timeout = timeout


class HeartbeatTimeout(ConnectionLost):
    """No heartbeat ACK came within ``timeout`` seconds (interval x multiplier): the
    hub or the network is gone or frozen. The agent drops the connection and
    reconnects."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"no heartbeat ACK for {timeout:g} s")
        self.timeout = timeout


class SessionReplaced(ConnectionLost):
    """The hub closed the session with ``CloseCode.REPLACED`` (4003): a newer
    connection with the same agent id took over. The agent stops instead of
    reconnecting (two processes would take the id back from each other forever)."""


class ReconnectFailed(ConnectionLost):
    """The agent gave up after ``attempts`` consecutive failed connection attempts."""

    def __init__(self, attempts: int, elapsed: float, last_cause: BaseException | None) -> None:
        cause = str(last_cause) if isinstance(last_cause, ArtcafeError) else repr(last_cause)
        super().__init__(
            f"gave up after {attempts} consecutive failed connection attempts "
            f"over {elapsed:.1f} s; last cause: {cause}"
        )
        self.attempts = attempts
        self.elapsed = elapsed
        self.last_cause = last_cause


class HubError(ArtcafeError):
    """The hub refused a request (``subscribe``, ``publish``...) with an ``error`` frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class AgentClosed(ArtcafeError):
    """The agent has been stopped; no further operations are possible."""
