"""The agent: :func:`open_agent`, :func:`run_agent` and the :class:`Agent` facade.

The agent is made of components, each in its own module::

    Agent (facade: the public methods, the lifecycle)
    ├── Supervisor      _supervisor.py   dial → handshake → serve → back off; the state,
    │   └── Session     _session.py      one connection: receiver, sender, subscriber,
    │                                    heartbeat; ClientConnection (protocol/_client.py)
    ├── Transport       _transport.py    WebSocket (TCP, TLS), in-memory, a dial function
    ├── Outbox          _outbox.py       accepted publishes until confirmed; pending replies
    ├── Subscriptions   _subscriptions.py handlers, subject index, ordered dispatchers
    └── HealthStats     _health.py       counters behind AgentHealth

Task tree while ``async with open_agent(...) as agent:`` runs::

    agent nursery
    ├── supervisor               connect → auth → restore → run → back off → retry
    │   └── connection nursery   its cancel scope's deadline is the heartbeat-ACK watchdog
    │       └── ...              see _session.py
    └── dispatch nursery         one ordered dispatcher per subscription; handlers run here,
                                 so a slow handler never stalls the receiver or the heartbeat
"""

from __future__ import annotations

import enum
import logging
import os
import random
import signal
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal

import attrs
import trio

from .._errors import KeyLoadError
from .._util import collapse_exception_groups
from ..protocol._backoff import Backoff
from ..protocol._keys import PrivateKey, load_private_key
from ._config import DEFAULT_URL, AgentConfig, hub_urls
from ._facade import Agent, fresh_copy, short_traceback
from ._health import AgentHealth
from ._subscriptions import Handler
from ._transport import (
    MAX_RECEIVE_BYTES,
    Dialer,
    DialerTransport,
    Transport,
    Transports,
)

__all__ = [
    "DEFAULT_URL",
    "FROM_BACKOFF",
    "MAX_RECEIVE_BYTES",
    "Agent",
    "AgentHealth",
    "Dialer",
    "FromBackoff",
    "Handler",
    "build_agent",
    "open_agent",
    "run_agent",
]

log = logging.getLogger("artcafe_trio.agent")


class FromBackoff(enum.Enum):
    """``max_reconnect_attempts``'s default: take the ``backoff``'s own ``max_attempts``
    (10 for the default :class:`Backoff`)."""

    FROM_BACKOFF = "from backoff"


FROM_BACKOFF: Literal[FromBackoff.FROM_BACKOFF] = FromBackoff.FROM_BACKOFF


_SHARED_RNG = random.Random()
"""The jitter source of agents not given an ``rng``: one for the process (a Mersenne
Twister's state is 2.5 KiB; jitter needs no stream per agent), reseeded in a forked
child as the ``random`` module's own is, so that forked workers do not jitter alike."""
if hasattr(os, "register_at_fork"):  # POSIX (Windows has no fork)
    os.register_at_fork(after_in_child=_SHARED_RNG.seed)


def _backoff_policy(backoff: Backoff | None, max_attempts: int | FromBackoff | None) -> Backoff:
    """``max_reconnect_attempts`` when given, else the policy's own ``max_attempts``."""
    policy = backoff or Backoff()
    if isinstance(max_attempts, FromBackoff):
        return policy
    return attrs.evolve(policy, max_attempts=max_attempts)


def _resolve_tenant(organization_id: str | None, tenant_id: str | None) -> str:
    if organization_id and tenant_id and organization_id != tenant_id:
        raise ValueError("organization_id and tenant_id are aliases; give one of them")
    tenant = organization_id or tenant_id
    if not tenant:
        raise ValueError("organization_id (or its alias tenant_id) is required")
    return tenant


def build_agent(
    *,
    agent_id: str,
    organization_id: str | None = None,
    tenant_id: str | None = None,
    private_key_path: str | os.PathLike[str] | None = None,
    private_key: PrivateKey | None = None,
    private_key_password: str | bytes | None = None,
    url: str | Sequence[str] | None = None,
    heartbeat_interval: float | None = 30.0,
    heartbeat_timeout_multiplier: float = 3.0,
    auto_reconnect: bool = True,
    heartbeat_jitter: float = 0.1,
    max_reconnect_attempts: int | FromBackoff | None = FROM_BACKOFF,
    backoff: Backoff | None = None,
    retry_first_connect: bool = True,
    rng: random.Random | None = None,
    ssl_context: ssl.SSLContext | None = None,
    capabilities: Sequence[str] = (),
    metadata: Mapping[str, Any] | None = None,
    connect_timeout: float = 10.0,
    stop_timeout: float = 10.0,
    max_concurrent_handlers: int = 1,
    max_pending_messages: int = 10_000,
    max_pending_publishes: int = 10_000,
    raise_handler_errors: bool = False,
    dial: Dialer | None = None,
    transport: Transport | Mapping[str, Transport] | None = None,
    wall_clock: Callable[[], float] = time.time,
) -> Agent:
    """Validate ``open_agent``'s arguments and create the (not yet running) :class:`Agent`.

    Loads ``private_key_path`` here, synchronously (``open_agent`` loads it in a worker
    thread first)."""
    if not agent_id:
        raise ValueError("agent_id is required")
    if (private_key is None) == (private_key_path is None):
        raise ValueError("give exactly one of private_key_path and private_key")
    if dial is not None and transport is not None:
        raise ValueError("give at most one of dial and transport")
    if private_key is None:
        assert private_key_path is not None
        private_key = load_private_key(private_key_path, private_key_password)
    urls = hub_urls(url or os.environ.get("ARTCAFE_URL") or DEFAULT_URL)
    if isinstance(transport, Mapping):
        transports = Transports.mapping(transport)
        missing = [u for u in urls if transports.get(u) is None]
        if missing:
            raise ValueError(f"no transport for the hub url(s) {', '.join(missing)}")
    elif transport is not None:
        transports = Transports.one(transport)
    elif dial is not None:
        transports = Transports.one(DialerTransport(dial))
    else:
        transports = Transports.websocket(ssl_context)
    config = AgentConfig(
        agent_id=agent_id,
        tenant_id=_resolve_tenant(organization_id, tenant_id),
        urls=urls,
        heartbeat_interval=heartbeat_interval,
        heartbeat_timeout_multiplier=heartbeat_timeout_multiplier,
        heartbeat_jitter=heartbeat_jitter,
        auto_reconnect=auto_reconnect,
        retry_first_connect=retry_first_connect,
        backoff=_backoff_policy(backoff, max_reconnect_attempts),
        capabilities=tuple(capabilities),
        metadata=dict(metadata or {}),
        connect_timeout=connect_timeout,
        stop_timeout=stop_timeout,
        max_concurrent_handlers=max_concurrent_handlers,
        max_pending_messages=max_pending_messages,
        max_pending_publishes=max_pending_publishes,
        raise_handler_errors=raise_handler_errors,
    )
    return Agent._create(
        config, private_key, transports, rng=rng or _SHARED_RNG, wall_clock=wall_clock
    )


async def _build_off_the_loop(
    *,
    agent_id: str,
    organization_id: str | None = None,
    tenant_id: str | None = None,
    private_key_path: str | os.PathLike[str] | None = None,
    private_key: PrivateKey | None = None,
    private_key_password: str | bytes | None = None,
    url: str | Sequence[str] | None = None,
    heartbeat_interval: float | None = 30.0,
    heartbeat_timeout_multiplier: float = 3.0,
    auto_reconnect: bool = True,
    heartbeat_jitter: float = 0.1,
    max_reconnect_attempts: int | FromBackoff | None = FROM_BACKOFF,
    backoff: Backoff | None = None,
    retry_first_connect: bool = True,
    rng: random.Random | None = None,
    ssl_context: ssl.SSLContext | None = None,
    capabilities: Sequence[str] = (),
    metadata: Mapping[str, Any] | None = None,
    connect_timeout: float = 10.0,
    stop_timeout: float = 10.0,
    max_concurrent_handlers: int = 1,
    max_pending_messages: int = 10_000,
    max_pending_publishes: int = 10_000,
    raise_handler_errors: bool = False,
    dial: Dialer | None = None,
    transport: Transport | Mapping[str, Transport] | None = None,
    wall_clock: Callable[[], float] = time.time,
) -> Agent:
    """:func:`build_agent`, with ``private_key_path`` loaded (the KDF of an encrypted
    key takes a while) in a worker thread, off the event loop. Arguments
    ``build_agent`` refuses before loading are left for it to refuse."""
    if agent_id and private_key is None and private_key_path is not None:
        try:
            private_key = await trio.to_thread.run_sync(
                load_private_key, private_key_path, private_key_password
            )
        except KeyLoadError as exc:
            # Raised here, not through trio.to_thread's and outcome's frames: the
            # message names the file and what to do.
            raise fresh_copy(exc) from None
        private_key_path = None
    return build_agent(
        agent_id=agent_id,
        organization_id=organization_id,
        tenant_id=tenant_id,
        private_key_path=private_key_path,
        private_key=private_key,
        private_key_password=private_key_password,
        url=url,
        heartbeat_interval=heartbeat_interval,
        heartbeat_timeout_multiplier=heartbeat_timeout_multiplier,
        auto_reconnect=auto_reconnect,
        heartbeat_jitter=heartbeat_jitter,
        max_reconnect_attempts=max_reconnect_attempts,
        backoff=backoff,
        retry_first_connect=retry_first_connect,
        rng=rng,
        ssl_context=ssl_context,
        capabilities=capabilities,
        metadata=metadata,
        connect_timeout=connect_timeout,
        stop_timeout=stop_timeout,
        max_concurrent_handlers=max_concurrent_handlers,
        max_pending_messages=max_pending_messages,
        max_pending_publishes=max_pending_publishes,
        raise_handler_errors=raise_handler_errors,
        dial=dial,
        transport=transport,
        wall_clock=wall_clock,
    )


@asynccontextmanager
async def open_agent(
    *,
    agent_id: str,
    organization_id: str | None = None,
    tenant_id: str | None = None,
    private_key_path: str | os.PathLike[str] | None = None,
    private_key: PrivateKey | None = None,
    private_key_password: str | bytes | None = None,
    url: str | Sequence[str] | None = None,
    heartbeat_interval: float | None = 30.0,
    heartbeat_timeout_multiplier: float = 3.0,
    auto_reconnect: bool = True,
    heartbeat_jitter: float = 0.1,
    max_reconnect_attempts: int | FromBackoff | None = FROM_BACKOFF,
    backoff: Backoff | None = None,
    retry_first_connect: bool = True,
    rng: random.Random | None = None,
    ssl_context: ssl.SSLContext | None = None,
    capabilities: Sequence[str] = (),
    metadata: Mapping[str, Any] | None = None,
    connect_timeout: float = 10.0,
    stop_timeout: float = 10.0,
    max_concurrent_handlers: int = 1,
    max_pending_messages: int = 10_000,
    max_pending_publishes: int = 10_000,
    raise_handler_errors: bool = False,
    dial: Dialer | None = None,
    transport: Transport | Mapping[str, Transport] | None = None,
    wall_clock: Callable[[], float] = time.time,
    stop_on_signals: bool = False,
) -> AsyncIterator[Agent]:
    """Connect an agent to a hub for the duration of the block.

    - ``agent_id``, ``organization_id`` (alias ``tenant_id``): who the agent is.
    - ``private_key_path`` (+ ``private_key_password``) or ``private_key``: its key.
    - ``url``: the hub's base URL, or a sequence of them (several hubs of a cluster;
      default ``$ARTCAFE_URL``, comma-separated, or ``ws://127.0.0.1:8765``); the agent
      fails over through them, and through the URLs the hubs advertise in their
      ``welcome`` (see "Several hub URLs" in ``docs/concepts.md``). ``ssl_context`` for
      ``wss://``. ``transport`` (a :class:`Transport`, or a mapping URL → transport) or
      ``dial`` (``await dial(nursery, resource)`` returning a WebSocket) replaces how
      the agent reaches the hub (the test kit's in-memory hub).
    - ``heartbeat_interval`` (``None``: no heartbeats), ``heartbeat_timeout_multiplier``:
      the hub-ACK watchdog fires after interval x multiplier without an ACK;
      ``heartbeat_jitter``: a random phase for the second heartbeat and +/-10 %
      per period, so a fleet does not beat in step (0: exactly every interval).
    - ``auto_reconnect``, ``max_reconnect_attempts`` (default: the ``backoff``'s
      ``max_attempts``, 10), ``backoff`` (:class:`Backoff`, full jitter, base 1 s,
      cap 60 s), ``rng`` (the source of the backoff and heartbeat jitter).
    - ``capabilities``, ``metadata``: announced to the hub and in presence events.
    - ``connect_timeout``, ``stop_timeout``, ``max_concurrent_handlers`` (1: ordered per
      subscription), ``max_pending_messages``, ``max_pending_publishes``,
      ``raise_handler_errors``; ``wall_clock`` for the times in :meth:`Agent.health`.
    - ``retry_first_connect``: with False, a failed first connection raises at once
      (:class:`ConnectFailed`) instead of backing off; later losses still reconnect.
    - ``stop_on_signals``: with True, SIGTERM and SIGINT (Ctrl+C) stop the agent
      as :meth:`Agent.stop` does, so it leaves gracefully (presence ``left``, not
      ``disconnected``): the block is cancelled and ends; after SIGINT, leaving it raises
      ``KeyboardInterrupt``. Needs trio to run in the main thread.

    Entering returns once the first connection is authenticated. If the hub is
    unreachable, entering retries with backoff like any reconnect and raises
    :class:`ReconnectFailed` when the attempts run out (or
    :class:`ConnectionLost` at once with ``auto_reconnect=False``). A refused
    key raises :class:`AuthenticationError`, and a ``permanent`` :class:`ConnectFailed`
    (a TLS handshake with a plain hub, an HTTP 404...) raises, at once: never retried
    (with several URLs: that URL is dropped, and this raises once every URL is).
    Leaving the block stops gracefully: handlers finish, publishes flush, the
    agent sends ``leave``. To run an agent in your own nursery, see :func:`run_agent`.
    """
    if stop_on_signals and threading.current_thread() is not threading.main_thread():
        raise RuntimeError("stop_on_signals=True needs trio running in the main thread")
    agent = await _build_off_the_loop(
        agent_id=agent_id,
        organization_id=organization_id,
        tenant_id=tenant_id,
        private_key_path=private_key_path,
        private_key=private_key,
        private_key_password=private_key_password,
        url=url,
        heartbeat_interval=heartbeat_interval,
        heartbeat_timeout_multiplier=heartbeat_timeout_multiplier,
        auto_reconnect=auto_reconnect,
        heartbeat_jitter=heartbeat_jitter,
        max_reconnect_attempts=max_reconnect_attempts,
        backoff=backoff,
        retry_first_connect=retry_first_connect,
        rng=rng,
        ssl_context=ssl_context,
        capabilities=capabilities,
        metadata=metadata,
        connect_timeout=connect_timeout,
        stop_timeout=stop_timeout,
        max_concurrent_handlers=max_concurrent_handlers,
        max_pending_messages=max_pending_messages,
        max_pending_publishes=max_pending_publishes,
        raise_handler_errors=raise_handler_errors,
        dial=dial,
        transport=transport,
        wall_clock=wall_clock,
    )
    if not stop_on_signals:
        async with short_traceback(), agent._running():
            yield agent
        return
    interrupted = False

    async def stop_on(signals: AsyncIterator[int]) -> None:
        nonlocal interrupted
        async for signum in signals:
            interrupted = interrupted or signum == signal.SIGINT
            agent.stop()

    with (
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
        collapse_exception_groups(),
    ):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_on, signals)
            async with short_traceback(), agent._running():
                yield agent
            nursery.cancel_scope.cancel()
    if interrupted:
        raise KeyboardInterrupt


async def run_agent(
    *,
    agent_id: str,
    organization_id: str | None = None,
    tenant_id: str | None = None,
    private_key_path: str | os.PathLike[str] | None = None,
    private_key: PrivateKey | None = None,
    private_key_password: str | bytes | None = None,
    url: str | Sequence[str] | None = None,
    heartbeat_interval: float | None = 30.0,
    heartbeat_timeout_multiplier: float = 3.0,
    auto_reconnect: bool = True,
    heartbeat_jitter: float = 0.1,
    max_reconnect_attempts: int | FromBackoff | None = FROM_BACKOFF,
    backoff: Backoff | None = None,
    retry_first_connect: bool = True,
    rng: random.Random | None = None,
    ssl_context: ssl.SSLContext | None = None,
    capabilities: Sequence[str] = (),
    metadata: Mapping[str, Any] | None = None,
    connect_timeout: float = 10.0,
    stop_timeout: float = 10.0,
    max_concurrent_handlers: int = 1,
    max_pending_messages: int = 10_000,
    max_pending_publishes: int = 10_000,
    raise_handler_errors: bool = False,
    dial: Dialer | None = None,
    transport: Transport | Mapping[str, Transport] | None = None,
    wall_clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run an agent as a task of your nursery, until :meth:`Agent.stop` or until the
    nursery is cancelled; the same keywords as :func:`open_agent`::

        agent = await nursery.start(functools.partial(run_agent, agent_id="a1", ...))

    ``nursery.start`` returns the agent once its first connection is authenticated, and
    raises what :func:`open_agent` would raise on entry. After :meth:`Agent.stop` the
    agent stops gracefully (handlers finish, publishes flush, ``leave``) and the task
    returns; a connection error that ends the agent is raised in your nursery.
    """
    agent = await _build_off_the_loop(
        agent_id=agent_id,
        organization_id=organization_id,
        tenant_id=tenant_id,
        private_key_path=private_key_path,
        private_key=private_key,
        private_key_password=private_key_password,
        url=url,
        heartbeat_interval=heartbeat_interval,
        heartbeat_timeout_multiplier=heartbeat_timeout_multiplier,
        auto_reconnect=auto_reconnect,
        heartbeat_jitter=heartbeat_jitter,
        max_reconnect_attempts=max_reconnect_attempts,
        backoff=backoff,
        retry_first_connect=retry_first_connect,
        rng=rng,
        ssl_context=ssl_context,
        capabilities=capabilities,
        metadata=metadata,
        connect_timeout=connect_timeout,
        stop_timeout=stop_timeout,
        max_concurrent_handlers=max_concurrent_handlers,
        max_pending_messages=max_pending_messages,
        max_pending_publishes=max_pending_publishes,
        raise_handler_errors=raise_handler_errors,
        dial=dial,
        transport=transport,
        wall_clock=wall_clock,
    )
    await agent.serve(task_status=task_status)


for _public in (open_agent, run_agent):
    _public.__module__ = "artcafe_trio"
