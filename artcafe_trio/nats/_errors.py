"""The NATS client's errors, one small tree under ``ArtcafeError``::

    ArtcafeError
    └── NatsError                    root of everything artcafe_trio.nats raises
        ├── NatsProtocolError        the server sent bytes that break the protocol (.reason)
        ├── NatsServerError          the server sent ``-ERR`` (.message)
        │   └── NatsAuthError        ... an authorization/authentication violation
        ├── NatsConnectError         no server of the pool accepted the first connection
        ├── NatsConnectionLost       a flush or request was in flight on a dead connection
        ├── NatsClosed               the client is closed (or gave up reconnecting)
        │   └── NatsReconnectFailed  gave up after max_attempts (.attempts, .last_cause)
        ├── OutboundBufferFull       publishing while disconnected overflowed the buffer
        ├── NoRespondersError        a request found no subscriber (status 503)
        ├── NatsTimeoutError         a JetStream/KV call took longer than its timeout
        ├── BadSubjectError          a subject, queue or header would break framing (ValueError)
        ├── MaxPayloadExceeded       a message is larger than the server's max_payload
        └── JetStreamError           the JetStream API refused (.code, .err_code, .description)
            ├── BucketNotFoundError  the key-value bucket does not exist
            └── WrongLastRevisionError   compare-and-set lost (.key)
                └── KeyExistsError   ``create`` found a live value

The module imports neither trio nor any socket library.
"""

from __future__ import annotations

from .._errors import ArtcafeError

__all__ = [
    "BadSubjectError",
    "BucketNotFoundError",
    "JetStreamError",
    "KeyExistsError",
    "MaxPayloadExceeded",
    "NatsAuthError",
    "NatsClosed",
    "NatsConnectError",
    "NatsConnectionLost",
    "NatsError",
    "NatsProtocolError",
    "NatsReconnectFailed",
    "NatsServerError",
    "NatsTimeoutError",
    "NoRespondersError",
    "OutboundBufferFull",
    "WrongLastRevisionError",
]


class NatsError(ArtcafeError):
    """Root of every error raised by :mod:`artcafe_trio.nats`."""


class NatsProtocolError(NatsError):
    """The server's byte stream broke the NATS protocol; ``reason`` says how.

    Reasons: ``line_too_long``, ``unknown_operation``, ``bad_arguments``,
    ``bad_size``, ``payload_too_large``, ``missing_crlf``, ``bad_json``,
    ``bad_header``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class NatsServerError(NatsError):
    """The server sent ``-ERR '<message>'``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NatsAuthError(NatsServerError):
    """The server refused our credentials (never retried on the first connect)."""


class NatsConnectError(NatsError):
    """No server in the pool could be connected to on the first attempt."""

    def __init__(self, message: str, *, last_cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.last_cause = last_cause


class NatsConnectionLost(NatsError):
    """The connection died while a flush or request depended on it."""


class NatsClosed(NatsError):
    """The client is closed; no further operations are possible."""


class NatsReconnectFailed(NatsClosed):
    """The client gave up after ``attempts`` consecutive failed reconnect attempts."""

    def __init__(self, attempts: int, last_cause: BaseException | None) -> None:
        super().__init__(
            f"gave up after {attempts} consecutive failed reconnect attempts; "
            f"last cause: {last_cause!r}"
        )
        self.attempts = attempts
        self.last_cause = last_cause


class OutboundBufferFull(NatsError):
    """Publishing while disconnected would exceed ``reconnect_buffer_size`` bytes."""


class NoRespondersError(NatsError):
    """A request's subject has no subscribers (the server answered with status 503)."""


class NatsTimeoutError(NatsError, TimeoutError):
    """A JetStream or key-value call did not complete within its timeout."""


class BadSubjectError(NatsError, ValueError):
    """A subject, queue group, reply or header would break the protocol's framing."""


class MaxPayloadExceeded(NatsError, ValueError):
    """The message (headers + payload) is larger than the server's ``max_payload``."""


class JetStreamError(NatsError):
    """The JetStream API answered with an error.

    ``code`` is the HTTP-like status, ``err_code`` JetStream's stable error number
    (for example 10071 for a wrong last sequence).
    """

    def __init__(self, code: int, err_code: int, description: str) -> None:
        super().__init__(f"{code}/{err_code}: {description}")
        self.code = code
        self.err_code = err_code
        self.description = description


class BucketNotFoundError(JetStreamError):
    """The key-value bucket does not exist (and ``create`` was not asked for)."""


class WrongLastRevisionError(JetStreamError):
    """An ``update`` (or ``create``) expected another last revision of ``key``."""

    def __init__(self, code: int, err_code: int, description: str, *, key: str) -> None:
        super().__init__(code, err_code, description)
        self.key = key


class KeyExistsError(WrongLastRevisionError):
    """``create`` found that the key already has a live value."""
