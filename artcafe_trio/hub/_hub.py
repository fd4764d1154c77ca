"""The :class:`Hub` facade, and the per-connection side of the hub.

``serve_hub`` (for ``nursery.start``) and ``open_hub`` (an async context
manager), in ``_serve``, compose the hub-wide components and run a :class:`Hub`
over TCP (ws:// or wss://); ``Hub.serve_stream`` serves one more connection over
any byte stream (the test kit's in-memory pairs).

Per connection: challenge → auth → welcome, then one reader loop and one
writer task. Everything a connection sends goes through its bounded outbox;
a consumer whose outbox is full is cut off alone. Presence deadlines live in
one :class:`DeadlineQueue`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import logging
import math
import secrets
from collections.abc import Callable
from typing import Any, NoReturn
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
import trio
from trio_websocket import ConnectionClosed

from .._errors import ProtocolError
from .._logsafe import printable as _printable
from ..protocol._codes import CloseCode
from ..protocol._frames import (
    CLIENT_FRAME_TYPES,
    PROTOCOL_VERSION,
    AdminAuth,
    Auth,
    Challenge,
    Error,
    Frame,
    Heartbeat,
    HeartbeatAck,
    Leave,
    PresenceQuery,
    PresenceRecord,
    PresenceState,
    Publish,
    Subscribe,
    Unsubscribe,
    Unsubscribed,
    Welcome,
    decode_with_id,
    encode,
)
from ..protocol._keys import ALGORITHM_RSA, PublicKey, auth_payload, parse_public_key
from ..registry._registry import Registry
from ._backplane import Backplane, SessionClaim
from ._config import HubConfig, HubStats
from ._flow import Delivery, Outbox, OutputBudget, PreAuthLimiter, PreAuthTicket
from ._hubevents import HubEvents
from ._persist import CredentialSource, PresenceWriter, RegistryWatch
from ._presence import PresenceEntry as _Presence
from ._presence import PresenceTable
from ._router import Router
from ._sessions import Connections, SessionDirectory
from ._stores import BucketStore
from ._throttle import AuthThrottle
from ._wsserver import ServerWebSocket, UpgradeRequest, frame_text, read_upgrade_request

__all__ = ["CloseCode", "Hub", "HubConfig", "HubParts", "HubStats"]

log = logging.getLogger("artcafe_trio.hub")

AGENT_PATH_PREFIX = "/api/v1/ws/agent/"
ADMIN_PATH = "/api/v1/ws/admin"
ADMIN_AGENT_ID = "$admin"
WRITE_BATCH_BYTES = 256 * 1024  # about the most one write of a connection's writer sends
# Verified when the claimed agent has no key of the frame's algorithm, so that every
# refusal costs one signature check (no timing oracle). Nobody holds their private keys.
_DUMMY_KEYS = {
    "ed25519": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtU1KzEIa3Rr2td7xzxFO7//64auh4UeW89+O3cySng",
    ALGORITHM_RSA: (
        "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABgQDH5LBd0YUvjyxuF3mn6vyMn3cB5e/DNJs0HtPJbWHP6xMvcEuC"
        "sRv3HCoEBzBFb7mFKRkq+PT+SIO0ckUYbxJmwnvF7Zn4xfuyFe/VpHPppcUjE2EAcjn4cL4QRWeuqK2EpIlq0msA"
        "zrFMcRysPp9vFDHeN7RhtuSfPI/6SbE6p7QnXQHgj00pFzk9HLFq3ZH4WnMinRh1V1SR2syLCnYUYAZHNu24VtbL"
        "Mkndy8NcVSGMAUQEN0waC27e1/nE/+FMS5pc2F1CDw2PL3fLeC2vW0/jYZwLpJ3N3RKu3hJtbVd4gHvB+PWINQKo"
        "D7Zj7d8WQr6pNQgAc1v2ykAif8htWaMB3AfCC+CLrWoh2rlOzzklO2+We8FP6IhFiS8pml8GxIXjKWZAdSM5hqmn"
        "vOLXBlFhG8wnM26vMY8YO7rdh2GCh8o2rtucUl9UExw4HD0id/nwIDDueZc4/TBTViTgUeC5B/2JP1jlmhblE0wy"
        "j4emsphWtq5x4/L6+rbngu0="
    ),
}


@attrs.frozen
class HubParts:
    """The components a :class:`Hub` is a facade over, composed by ``_serve.compose_hub``."""

    registry: Registry
    config: HubConfig
    stats: HubStats
    events: HubEvents
    wall_clock: Callable[[], float]
    backplane: Backplane
    connections: Connections
    directory: SessionDirectory
    router: Router
    presence: PresenceTable
    keys: RegistryWatch
    writer: PresenceWriter
    buckets: BucketStore


@attrs.frozen
class _Refusal:
    """A handshake answer that refuses: the error frame's fields, the close code, and
    the operator-side ``cause`` (logged, never sent)."""

    code: str
    message: str
    frame_id: str | None
    close: int
    who: str
    cause: str
    reason: str | None = None  # the close reason, if not ``message`` (never client text)


@functools.cache
def _dummy_key(algorithm: str) -> PublicKey:
    return parse_public_key(_DUMMY_KEYS.get(algorithm, _DUMMY_KEYS["ed25519"]))


class _Refused(Exception):
    """A connection refused before authentication completed: close with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _Session:
    """One authenticated connection (private, mutable)."""

    def __init__(
        self,
        hub: Hub,
        ws: ServerWebSocket,
        *,
        tenant_id: str,
        agent_id: str,
        remote: str,
        auth: Auth | None,
        key: PublicKey | None,
        heartbeat_interval: float | None,
        heartbeat_timeout: float | None,
    ) -> None:
        self.hub = hub
        self.ws = ws
        self.session_id = "s-" + secrets.token_hex(8)
        self.tenant_id = tenant_id
        self.agent_id = agent_id
        self.remote = remote
        self.key = key
        self.capabilities = auth.capabilities if auth else ()
        self.metadata = dict(auth.metadata) if auth else {}
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.is_admin = auth is None
        self.subscriptions: set[str] = set()
        self.outbox = Outbox(
            hub.output_budget,
            max_frames=hub.config.send_queue_size,
            max_bytes=hub.config.send_queue_bytes,
            reply_window=hub.config.reply_window,
            on_overflow=self._cut_off,
        )
        self.open_requests: dict[str, None] = {}  # its $reply subjects awaiting an answer
        self.scope = trio.CancelScope()
        self.reader_scope = trio.CancelScope()
        self.reading = True
        self.writing = False
        self.draining = False
        self.close_code: int = CloseCode.NORMAL
        self.close_reason = ""
        self.closing = False
        self.left = False
        self.timed_out = False
        self.ended = False
        self.presence: _Presence | None = None  # its presence row, set when attached
        self.last_frame_wall = 0.0
        self.bucket = hub._buckets.bucket(tenant_id, agent_id)
        now = trio.current_time()
        self.deadline = now + heartbeat_timeout if heartbeat_timeout is not None else math.inf

    def __repr__(self) -> str:
        return f"<session {self.session_id} {self.tenant_id}/{self.agent_id} from {self.remote}>"

    def send_frame(self, frame: Frame) -> None:
        """Queue an answer to this connection's own frame (bounded by back-pressure)."""
        if not self.closing:
            self.outbox.reply(encode(frame))

    def deliver(self, item: Delivery) -> None:
        """Queue a delivery; a consumer over its limits is cut off (never blocks the caller)."""
        if not self.closing:
            self.outbox.deliver(item)

    def _cut_off(self, reason: str) -> None:
        self.hub.stats.slow_consumers += 1
        self.hub._slow_consumer_event(self, reason)
        log.warning("%r: cutting off slow consumer: %s", self, reason)
        self.close(CloseCode.SLOW_CONSUMER, reason)

    def close(self, code: int, reason: str, *, drain: bool = False) -> None:
        """End the session with ``code``. A frame being written is finished first (within
        ``close_timeout``): cutting one in half would corrupt the stream, and the peer
        would never see the close code. With ``drain`` (a graceful shutdown), every
        frame already queued is sent too, within the same bound: a delivery the hub
        confirmed to its publisher is not dropped."""
        if not self.closing:
            self.closing = True
            self.close_code = code
            self.close_reason = reason
            if drain:
                self.draining = True
                self.outbox.close()  # the writer ends once the queue is empty
            else:
                self.outbox.discard()  # never to be written: free it now
        self.reader_scope.cancel()
        if self.writing or self.draining:
            deadline = trio.current_time() + self.hub.config.close_timeout
            self.scope.deadline = min(self.scope.deadline, deadline)
        else:
            self.scope.cancel()

    def may_write(self) -> bool:
        return self.draining or (self.reading and not self.closing)

    def owned_presence(self) -> _Presence | None:
        """Its presence row, while this session is the one that row belongs to."""
        entry = self.presence
        return entry if entry is not None and entry.session is self else None

    def touch(self, now: float) -> None:
        if self.heartbeat_timeout is not None:
            self.deadline = now + self.heartbeat_timeout

    def expire(self, now: float) -> float | None:
        """DeadlineQueue callback: the heartbeat deadline came due."""
        if self.closing or self.ended:
            return None
        if self.deadline > now:
            return self.deadline
        self.hub._presence.heartbeat_timed_out(self)
        return None


class _RateLimitedLog:
    """Logs refused frames at a bounded rate, counting what it suppressed."""

    def __init__(self, per_second: float) -> None:
        self.per_second = per_second
        self.window_start = -math.inf
        self.count = 0
        self.suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = trio.current_time()
        if now - self.window_start >= 1.0:
            if self.suppressed:
                log.warning("%d refused-frame log lines suppressed", self.suppressed)
            self.window_start, self.count, self.suppressed = now, 0, 0
        if self.count < self.per_second:
            self.count += 1
            log.warning(message, *args)
        else:
            self.suppressed += 1


def _claimed(frame: Auth, tenant_id: str | None, agent_id: str | None) -> str:
    """Who an auth frame claims to be, for the log (ids are not secrets)."""
    who = f"{_printable(frame.tenant_id)}/{_printable(frame.agent_id)}"
    if (frame.tenant_id, frame.agent_id) != (tenant_id, agent_id):
        who += f" (URL says {_printable(tenant_id)}/{_printable(agent_id)})"
    return who


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


class Hub:
    """A running hub: a facade over its components (session directory, router,
    presence table, registry watch and presence writer, backplane).

    Made only by :func:`open_hub` and :func:`serve_hub`, which compose and run it:
    ``Hub(...)`` raises ``TypeError``, so there is never a hub that is not running
    (or, after its block, stopped).
    """

    registry: Registry
    """The registry it authenticates agents with and writes presence to."""
    config: HubConfig
    """Its settings."""
    stats: HubStats
    """Its counters (exported as Prometheus metrics when enabled)."""
    events: HubEvents
    """The observation seam: event feed and per-agent measurements."""
    admin_token: str
    """The admin channel's token (in the admin file, for ``artcafe-trio status``)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError(
            "Hub is not constructed directly: run one with open_hub() (async with) or "
            "serve_hub() (nursery.start)"
        )

    @classmethod
    def _compose(cls, parts: HubParts) -> Hub:
        """The factories' way in (``_serve.compose_hub``): a hub over its components."""
        hub = object.__new__(cls)
        hub._setup(parts)
        return hub

    def _setup(self, parts: HubParts) -> None:
        self.registry = parts.registry
        self.config = config = parts.config
        self.stats = parts.stats
        self.events = parts.events
        self.admin_token = secrets.token_urlsafe(32)
        self._wall_clock = parts.wall_clock
        self._connections = parts.connections
        self._directory = parts.directory
        self._router = parts.router
        self._presence = parts.presence
        self._keys: CredentialSource = parts.keys
        self._presence_writer = parts.writer
        self._buckets = parts.buckets
        self._backplane = parts.backplane
        # The per-connection side's own state (authenticator, limits, logs).
        self.output_budget = OutputBudget(config.output_budget_bytes)
        self.unauthenticated = PreAuthLimiter(
            config.max_unauthenticated_per_address, config.max_unauthenticated
        )
        self._auth_throttle = AuthThrottle(
            free=config.auth_failures_free,
            cap=config.auth_failure_delay_cap,
            memory=config.auth_failure_memory,
        )
        self._auth_log = _RateLimitedLog(config.refused_log_per_second)
        self._refused_log = _RateLimitedLog(config.refused_log_per_second)

    @property
    def url(self) -> str | None:
        """The ws:// or wss:// base URL agents connect to (``None``: memory only)."""
        return self._connections.url

    @property
    def port(self) -> int | None:
        """The TCP port it listens on (``None``: memory only)."""
        return self._connections.port

    def presence_table(self, tenant_id: str | None = None) -> list[PresenceRecord]:
        """The live presence table, for one tenant or all, sorted by tenant and agent."""
        return self._presence.records(tenant_id)

    def close_all(self, code: int = CloseCode.SERVICE_RESTART, reason: str = "") -> None:
        """Close every authenticated session with ``code`` (agents will reconnect), after
        sending what is already queued for it (within ``close_timeout``)."""
        self._directory.close_all(code, reason)

    def _slow_consumer_event(self, session: _Session, reason: str) -> None:
        self.events.slow_consumer(
            session.tenant_id, session.agent_id, session.session_id, reason, self._wall_clock()
        )

    # --- a session's place in the hub: directory, backplane claim, presence, router ----

    async def _attach(self, session: _Session) -> None:
        """Make ``session`` the agent's live session: take-over, claim, presence."""
        older = self._directory.attach(session)
        if session.is_admin:
            return
        replaced = older.session_id if older is not None else None
        claim = SessionClaim(
            session.tenant_id, session.agent_id, session.session_id, self.config.hub_id, replaced
        )
        await self._backplane.claim_session(claim)  # LocalBackplane: no checkpoint
        self._presence.connected(session, self.config.hub_id)

    def _detach(self, session: _Session) -> None:
        """Forget a finished session; its presence ends unless it was replaced."""
        session.ended = True
        session.outbox.discard()
        self._router.forget_session(session)
        if self._directory.detach(session):
            self._presence.session_ended(session, stopping=self._connections.stopping)

    # --- connections ----------------------------------------------------------

    async def handle_request(
        self, request: UpgradeRequest, remote: str = "?", ticket: PreAuthTicket | None = None
    ) -> None:
        """Serve one WebSocket handshake request to its end (the server handler).

        A barrier: nothing that happens on one connection escapes to the hub.
        ``ticket`` is the connection's unauthenticated slot, given up once it authenticates.
        """
        try:
            await self._handle_request(request, remote, ticket)
        except (ConnectionClosed, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away
        except Exception:
            log.exception("unexpected error on a connection from %s; connection dropped", remote)

    async def _handle_request(
        self, request: UpgradeRequest, remote: str, ticket: PreAuthTicket | None
    ) -> None:
        if self._connections.stopping:
            await request.reject(503, body=b"hub shutting down")
            return
        split = urlsplit(request.path)
        path = split.path
        self.stats.connections += 1
        agent_part = path[len(AGENT_PATH_PREFIX) :]
        if path == ADMIN_PATH:
            ws = await request.accept()
            await self._serve(ws, None, None, remote, ticket)
        elif path.startswith(AGENT_PATH_PREFIX) and agent_part and "/" not in agent_part:
            agent_id = unquote(agent_part)
            tenant_ids = parse_qs(split.query).get("tenant_id", [])
            ws = await request.accept()
            await self._serve(ws, agent_id, tenant_ids[0] if tenant_ids else "", remote, ticket)
        else:
            await request.reject(404, body=b"unknown path; agents use /api/v1/ws/agent/{id}")

    async def _serve(
        self,
        ws: ServerWebSocket,
        agent_id: str | None,
        tenant_id: str | None,
        remote: str,
        ticket: PreAuthTicket | None,
    ) -> None:
        session: _Session | None = None
        code: int = CloseCode.NORMAL
        reason = ""
        self._connections.opened()
        try:
            session = await self._authenticate(ws, agent_id, tenant_id, remote)
            if ticket is not None:
                self.unauthenticated.release(ticket)
            await self._run_session(session)
            code, reason = session.close_code, session.close_reason
        except _Refused as refusal:
            code, reason = refusal.code, refusal.reason
        finally:
            # The only close of a connection, always bounded: a peer that never answers
            # the close handshake cannot hold a hub task. One closed to make room for
            # newer unauthenticated connections is dropped at once (its socket closes).
            try:
                if ticket is None or not ticket.scope.cancel_called:
                    with (
                        trio.CancelScope(shield=True),
                        trio.move_on_after(self.config.close_timeout),
                    ):
                        await ws.aclose(code, reason)
            finally:
                self._connections.closed()

    async def _authenticate(
        self, ws: ServerWebSocket, agent_id: str | None, tenant_id: str | None, remote: str
    ) -> _Session:
        """Challenge, then check the answer; raise ``_Refused`` (after the error frame).

        The whole check (waiting for the frame, the slow-down, the registry) is bounded
        by the challenge's expiry: past it, the answer is ``challenge_expired``/4002.
        """
        nonce = secrets.token_urlsafe(32)
        timeout = self.config.challenge_timeout
        deadline = trio.current_time() + timeout
        await ws.send_message(
            encode(Challenge(nonce=nonce, expires_in=timeout, hub_id=self.config.hub_id))
        )
        outcome: _Session | _Refusal | None = None
        with trio.move_on_at(deadline):
            text = await ws.get_message()
            outcome = await self._check_auth(ws, text, nonce, agent_id, tenant_id, remote)
        if outcome is None:
            expired = Error(
                code="challenge_expired",
                message="no auth frame checked before the challenge expired",
                fatal=True,
            )
            await ws.send_message(encode(expired))
            raise _Refused(CloseCode.CHALLENGE_EXPIRED, "challenge expired")
        if isinstance(outcome, _Refusal):
            await self._refuse_auth(ws, remote, outcome)
        return outcome

    async def _refuse_auth(self, ws: ServerWebSocket, remote: str, refusal: _Refusal) -> NoReturn:
        """Count and log a refused handshake, send its error frame, raise ``_Refused``."""
        self.stats.auth_failures += 1
        self._auth_log.warning(
            "authentication refused for %s from %s: %s (%s)",
            refusal.who, _printable(remote), refusal.code, refusal.cause,
        )  # fmt: skip
        failures = self._auth_throttle.failures(remote)
        self.events.auth_failure(remote, refusal.code, failures, self._wall_clock())
        error = Error(code=refusal.code, message=refusal.message, id=refusal.frame_id, fatal=True)
        await ws.send_message(encode(error))
        raise _Refused(refusal.close, refusal.reason or refusal.message)

    async def _check_auth(
        self,
        ws: ServerWebSocket,
        text: str | bytes,
        nonce: str,
        agent_id: str | None,
        tenant_id: str | None,
        remote: str,
    ) -> _Session | _Refusal:
        """Decode and check the first frame, in the address's turn (``AuthThrottle``)."""
        async with self._auth_throttle.attempt(remote) as attempt:
            try:
                frame, raw_id = decode_with_id(text, max_bytes=self.config.max_frame_bytes)
            except ProtocolError as exc:
                attempt.failed()
                return _Refusal(
                    exc.code, exc.message, exc.frame_id, CloseCode.PROTOCOL_VIOLATION,
                    who="?", cause="invalid first frame", reason="expected auth",
                )  # fmt: skip
            if agent_id is None:  # admin path
                if isinstance(frame, AdminAuth) and hmac.compare_digest(
                    frame.token.encode("utf-8", "surrogatepass"), self.admin_token.encode()
                ):
                    attempt.succeeded(ADMIN_AGENT_ID)
                    return _Session(
                        self, ws, tenant_id="*", agent_id=ADMIN_AGENT_ID, remote=remote,
                        auth=None, key=None, heartbeat_interval=None, heartbeat_timeout=None,
                    )  # fmt: skip
                attempt.failed(ADMIN_AGENT_ID)
                cause = "wrong token" if isinstance(frame, AdminAuth) else f"a {frame.type} frame"
                return _Refusal(
                    "authentication_failed", "bad admin token", raw_id,
                    CloseCode.AUTHENTICATION_FAILED, who="admin", cause=cause,
                )  # fmt: skip
            if not isinstance(frame, Auth):
                attempt.failed()
                return _Refusal(
                    "not_authenticated", f"expected an auth frame, got {frame.type!r}", raw_id,
                    CloseCode.PROTOCOL_VIOLATION, who="?", cause=f"a {frame.type} frame",
                    reason="expected auth",
                )  # fmt: skip
            identity = f"{frame.tenant_id}/{frame.agent_id}"
            who = _claimed(frame, tenant_id, agent_id)
            if frame.protocol != PROTOCOL_VERSION:
                attempt.failed(identity)
                return _Refusal(
                    "unsupported_protocol", f"this hub speaks protocol {PROTOCOL_VERSION}",
                    raw_id, CloseCode.PROTOCOL_VIOLATION, who=who,
                    cause=f"protocol {frame.protocol}",
                )  # fmt: skip
            key = await self._verify_claim(frame, nonce, agent_id, tenant_id)
            if key is None:
                attempt.failed(identity)
                # Unknown agent, wrong tenant, mismatched ids and bad signatures all answer
                # alike, after the same work; only the hub's own log tells them apart.
                return _Refusal(
                    "authentication_failed", "unknown agent or signature does not verify",
                    raw_id, CloseCode.AUTHENTICATION_FAILED, who=who,
                    cause=self._refusal_cause(frame, agent_id, tenant_id),
                )  # fmt: skip
            attempt.succeeded(identity)
        config = self.config
        interval: float | None = None
        timeout: float | None = None
        if frame.heartbeat_interval is not None:
            interval = _clamp(
                frame.heartbeat_interval, config.min_heartbeat_interval,
                config.max_heartbeat_interval,
            )  # fmt: skip
            multiplier = _clamp(
                frame.heartbeat_timeout_multiplier, config.min_timeout_multiplier,
                config.max_timeout_multiplier,
            )  # fmt: skip
            timeout = interval * multiplier
        return _Session(
            self, ws, tenant_id=frame.tenant_id, agent_id=frame.agent_id, remote=remote,
            auth=frame, key=key, heartbeat_interval=interval, heartbeat_timeout=timeout,
        )  # fmt: skip

    async def _verify_claim(
        self, frame: Auth, nonce: str, agent_id: str | None, tenant_id: str | None
    ) -> PublicKey | None:
        """The key that verifies ``frame``, reloading the registry once if none does."""
        generation = self._keys.generation
        key = self._verify(frame, nonce, agent_id, tenant_id)
        if key is None:
            await self._keys.reload_safely()
            if self._keys.generation != generation:  # keys loaded since: try them
                key = self._verify(frame, nonce, agent_id, tenant_id)
        return key

    def _verify(
        self, frame: Auth, nonce: str, agent_id: str | None, tenant_id: str | None
    ) -> PublicKey | None:
        """Check the signature against each of the claimed agent's keys of its algorithm.

        When there is none (unknown agent or tenant, ids that differ from the URL, no key
        of that algorithm, an unknown algorithm), a dummy key of the same type is checked
        instead: every refusal costs at least one signature check.
        """
        keys: tuple[PublicKey, ...] = ()
        if (frame.agent_id, frame.tenant_id) == (agent_id, tenant_id):
            keys = self._keys.credentials.get((frame.tenant_id, frame.agent_id), ())
        candidates = [k for k in keys if k.algorithm == frame.algorithm]
        dummy = _dummy_key(frame.algorithm)
        try:
            signature = base64.b64decode(frame.signature, validate=True)
        except (binascii.Error, ValueError):
            signature = b""
        try:
            payload = auth_payload(frame.tenant_id, frame.agent_id, nonce)
        except UnicodeEncodeError:  # a lone surrogate: no registered id has one
            payload, candidates = b"", []
        found = None
        for candidate in candidates or [dummy]:
            if candidate.verify(signature, payload) and candidate is not dummy:
                found = candidate
        return found

    def _refusal_cause(self, frame: Auth, agent_id: str | None, tenant_id: str | None) -> str:
        """Why an ``auth`` was refused, for the operator's log only (never sent)."""
        if (frame.agent_id, frame.tenant_id) != (agent_id, tenant_id):
            return "the ids in the URL differ from the auth frame"
        keys = self._keys.credentials.get((frame.tenant_id, frame.agent_id))
        if keys is None:
            if frame.tenant_id not in self._keys.tenants:
                return "unknown tenant"
            return "unknown agent, disabled, or no keys"
        same = [k for k in keys if k.algorithm == frame.algorithm]
        if not same:
            return f"no {_printable(frame.algorithm, 40)} key registered for it"
        return f"signature does not verify with its {len(same)} {frame.algorithm} key(s)"

    async def _run_session(self, session: _Session) -> None:
        # Admin sessions (``status``: one query, then close) are routine: DEBUG.
        level = logging.DEBUG if session.is_admin else logging.INFO
        log.log(level, "%r connected", session)
        welcome = Welcome(
            session_id=session.session_id,
            agent_id=session.agent_id,
            tenant_id=session.tenant_id,
            hub_id=self.config.hub_id,
            hub_time=self._wall_clock(),
            heartbeat_interval=session.heartbeat_interval,
            heartbeat_timeout=session.heartbeat_timeout,
            max_frame_bytes=self.config.max_frame_bytes,
        )
        session.send_frame(welcome)
        try:
            await self._attach(session)
            with session.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, session)
                    with session.reader_scope:
                        await self._reader(session)
                    # Reading is over (peer gone, left, or closed by the hub): the writer
                    # may finish the frame it is writing, within close_timeout, no more.
                    session.reading = False
                    if session.writing or session.draining:
                        deadline = trio.current_time() + self.config.close_timeout
                        session.scope.deadline = min(session.scope.deadline, deadline)
                    else:
                        session.scope.cancel()
        finally:
            self._detach(session)
            if session.closing:
                log.log(
                    level, "%r closed: %d %s", session, session.close_code, session.close_reason
                )
            else:
                log.log(level, "%r connection lost", session)

    async def _writer(self, session: _Session) -> None:
        outbox = session.outbox
        try:
            while session.may_write():
                batch = await outbox.take(WRITE_BATCH_BYTES)
                if not batch or not session.may_write():
                    break
                # One write for the whole batch; a delivery is framed once for all receivers.
                data = b"".join(
                    frame_text(entry) if isinstance(entry, str) else entry.frame for entry in batch
                )
                session.writing = True
                try:
                    await session.ws.send_frames(data)
                finally:
                    session.writing = False
                    outbox.sent(batch)
        except ConnectionClosed:
            pass
        finally:
            session.writing = False
            session.scope.cancel()

    async def _reader(self, session: _Session) -> None:
        ws = session.ws
        max_bytes = self.config.max_frame_bytes
        while True:
            # Back-pressure: answers to this connection's own frames that it has not read
            # yet pause reading it; they never count against it as a slow consumer.
            await session.outbox.wait_for_reply_window()
            try:
                text = await ws.get_message()
            except ConnectionClosed:
                return
            session.touch(trio.current_time())
            session.last_frame_wall = self._wall_clock()
            entry = session.owned_presence()
            if entry is not None:
                entry.last_seen = session.last_frame_wall
            raw_id = None
            try:
                frame, raw_id = decode_with_id(text, max_bytes=max_bytes)
                if frame.type not in CLIENT_FRAME_TYPES:
                    raise ProtocolError(
                        "unexpected_type",
                        f"a hub does not accept {frame.type!r} frames",
                        frame_id=raw_id,
                    )
                if isinstance(frame, Publish):
                    await self._router.publish(session, frame)
                else:
                    self._handle_frame(session, frame)
            except ProtocolError as exc:
                if exc.frame_id is None:
                    exc.frame_id = raw_id
                self.stats.refused_frames += 1
                self._refused_log.warning("%r: refused frame: %s", session, _printable(exc))
                session.send_frame(Error(code=exc.code, message=exc.message, id=exc.frame_id))
            if session.left:
                session.close(CloseCode.NORMAL, "left")

    def _handle_frame(self, session: _Session, frame: Frame) -> None:
        if isinstance(frame, Heartbeat):
            self.stats.heartbeats += 1
            self.events.heartbeat(session.presence, session.session_id, frame.rtt)
            wall = session.last_frame_wall
            entry = session.owned_presence()
            if entry is not None:
                entry.last_heartbeat = wall
            session.send_frame(HeartbeatAck(seq=frame.seq, hub_time=wall))
        elif isinstance(frame, Subscribe):
            self._router.subscribe(session, frame)
        elif isinstance(frame, Unsubscribe):
            self._router.unsubscribe(session, frame.subject)
            session.send_frame(Unsubscribed(id=frame.id, subject=frame.subject))
        elif isinstance(frame, PresenceQuery):
            tenant = None if session.is_admin else session.tenant_id
            session.send_frame(
                PresenceState(id=frame.id, agents=tuple(self.presence_table(tenant)))
            )
        elif isinstance(frame, Leave):
            session.left = True
        elif isinstance(frame, Error):
            log.info(
                "%r reported error %s: %s", session, _printable(frame.code),
                _printable(frame.message),
            )  # fmt: skip
        else:  # auth, admin_auth
            raise ProtocolError("already_authenticated", "this connection is already authenticated")

    # --- in-memory transport ---------------------------------------------------

    def serve_stream(self, stream: trio.abc.Stream, remote: str = "memory") -> None:
        """Serve one more connection over ``stream``, a byte stream to an agent (e.g. the
        server end of an in-memory pair: see ``TestHub.connect_in_memory``), as the
        listeners serve TCP: HTTP upgrade, then the session, in the hub's own tasks.

        ``remote`` is the address the hub sees (its limits and logs are per address).
        """
        nursery = self._connections.nursery
        if nursery is None:
            raise RuntimeError("the hub is not running")
        nursery.start_soon(self._serve_stream, stream, remote)

    async def _serve_stream(self, stream: trio.abc.Stream, remote: str) -> None:
        """Serve one byte stream (TCP, TLS or in-memory): HTTP upgrade, then the session.

        Until it authenticates, the connection holds one of the limited unauthenticated
        slots; the upgrade must finish within ``handshake_timeout``.
        """
        ticket = self.unauthenticated.admit(remote)
        try:
            with ticket.scope:
                request = None
                with trio.move_on_after(self.config.handshake_timeout) as upgrade:
                    request = await read_upgrade_request(
                        stream, max_message_size=self._hard_frame_limit
                    )
                if upgrade.cancelled_caught:
                    self.stats.handshake_timeouts += 1
                elif request is not None:
                    await self.handle_request(request, remote=remote, ticket=ticket)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away during the upgrade
        finally:
            self.unauthenticated.release(ticket)
            with trio.CancelScope(shield=True), trio.move_on_after(self.config.close_timeout):
                await stream.aclose()

    async def _serve_accepted(self, stream: trio.SocketStream | trio.SSLStream[Any]) -> None:
        """Serve a TCP (or TLS over TCP) connection from the listeners."""
        transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        try:
            address = str(transport.socket.getpeername()[0])
        except OSError:  # reset before we asked who it was
            address = "?"
        await self._serve_stream(stream, address)

    @property
    def _hard_frame_limit(self) -> int:
        """Frames above ``max_frame_bytes`` get an error; above this, close 1009."""
        return self.config.max_frame_bytes * 4 + 65536
