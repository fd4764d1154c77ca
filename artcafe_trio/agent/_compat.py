"""``HeartbeatAgent`` and ``SimpleAgent``: the original ArtCafe SDK's classes over trio.

They keep the original constructor (``agent_id, private_key_path, organization_id,
url, heartbeat_interval, heartbeat_timeout_multiplier, auto_reconnect``, positional or
keyword, in that order) and methods (``on_message``, ``publish``, ``run``, ``stop``,
``setup``, ``get_connection_health``); every other :func:`open_agent` option is a
keyword. They run on :meth:`Agent.serve`, so they get its structured concurrency,
honest heartbeat-ACK deadlines, jittered backoff and loud give-up.
"""

from __future__ import annotations

import os
import random
import signal
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import trio

from .._util import collapse_exception_groups
from ..protocol._backoff import Backoff
from ..protocol._keys import PrivateKey
from ._agent import FROM_BACKOFF, Agent, FromBackoff, build_agent
from ._health import AgentHealth
from ._subscriptions import HandlerT
from ._transport import Dialer, Transport

__all__ = ["HeartbeatAgent", "SimpleAgent"]


class HeartbeatAgent:
    """An agent with heartbeats, shaped like the original SDK's ``HeartbeatAgent``.

    Subclass it and override ``setup()`` to register handlers; ``run()``
    connects and serves until :meth:`stop`, Ctrl+C or ``ReconnectFailed``.
    The keyword-only options are :func:`open_agent`'s.
    """

    def __init__(
        self,
        agent_id: str,
        private_key_path: str | os.PathLike[str] | None = None,
        organization_id: str | None = None,
        url: str | Sequence[str] | None = None,
        heartbeat_interval: float = 30.0,
        heartbeat_timeout_multiplier: float = 3.0,
        auto_reconnect: bool = True,
        *,
        tenant_id: str | None = None,
        private_key: PrivateKey | None = None,
        private_key_password: str | bytes | None = None,
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
    ) -> None:
        self.agent_id = agent_id
        self._agent: Agent = build_agent(
            agent_id=agent_id,
            private_key_path=private_key_path,
            organization_id=organization_id,
            url=url,
            heartbeat_interval=self._heartbeat_interval(heartbeat_interval),
            heartbeat_timeout_multiplier=heartbeat_timeout_multiplier,
            auto_reconnect=auto_reconnect,
            tenant_id=tenant_id,
            private_key=private_key,
            private_key_password=private_key_password,
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
        self.organization_id = self._agent.tenant_id
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout_multiplier = heartbeat_timeout_multiplier
        self.auto_reconnect = auto_reconnect

    @staticmethod
    def _heartbeat_interval(interval: float) -> float | None:
        return interval

    @property
    def agent(self) -> Agent:
        """The underlying :class:`Agent` (for ``health()``, ``request()``, ``presence()``...)."""
        return self._agent

    async def setup(self) -> None:
        """Hook for subclasses: register handlers here. Called by ``run()`` unless a
        subclass overrides ``run()`` itself (and then calls ``setup()`` as in the guide)."""

    def on_message(self, pattern: str) -> Callable[[HandlerT], HandlerT]:
        """Decorator: ``handler(subject, data)`` for messages matching ``pattern``."""
        return self._agent.on_message(pattern)

    def on_reconnect(self, callback: Callable[[], object]) -> Callable[[], object]:
        """Decorator: run ``callback`` after every reconnection (restore state there)."""
        return self._agent.on_reconnect(callback)

    async def publish(
        self, subject: str, data: Any = None, *, confirm: bool = False, reply_to: str | None = None
    ) -> str | None:
        """Publish ``data`` to ``subject`` (waits while disconnected; see ``Agent.publish``)."""
        return await self._agent.publish(subject, data, confirm=confirm, reply_to=reply_to)

    async def run(self) -> None:
        """Connect and serve until :meth:`stop` or SIGTERM (returns), Ctrl+C (leaves
        gracefully, then raises ``KeyboardInterrupt``), or ``ReconnectFailed`` /
        ``AuthenticationError`` (raised)."""
        if type(self).run is HeartbeatAgent.run:
            await self.setup()
        await self._serve()

    async def _serve(self) -> None:
        interrupted = False

        async def stop_on_signals() -> None:
            nonlocal interrupted
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    interrupted = interrupted or signum == signal.SIGINT
                    self._agent.stop()

        with collapse_exception_groups():
            async with trio.open_nursery() as nursery:
                if threading.current_thread() is threading.main_thread():
                    nursery.start_soon(stop_on_signals)
                await self._agent.serve()
                nursery.cancel_scope.cancel()
        if interrupted:
            raise KeyboardInterrupt

    async def stop(self) -> None:
        """Ask ``run()`` to finish: handlers complete, publishes flush, the agent leaves.

        Returns at once (safe to call from a handler); ``run()`` returns when done.
        """
        self._agent.stop()
        await trio.lowlevel.checkpoint()

    def health(self) -> AgentHealth:
        return self._agent.health()

    def get_connection_health(self) -> dict[str, Any]:
        """``healthy``, ``connected``, ``last_heartbeat_ack`` (ISO-8601 or None),
        ``seconds_since_ack`` and ``reconnect_attempts``, as in the original SDK.

        Callable from anywhere, also before ``run()`` (a not-connected snapshot)."""
        return self._agent.get_connection_health()


class SimpleAgent(HeartbeatAgent):
    """An agent without heartbeats: its presence ends only when its connection does.

    Prefer :class:`HeartbeatAgent` in production: a hung ``SimpleAgent``
    whose socket stays open is never marked offline.
    """

    def __init__(
        self,
        agent_id: str,
        private_key_path: str | os.PathLike[str] | None = None,
        organization_id: str | None = None,
        url: str | Sequence[str] | None = None,
        auto_reconnect: bool = True,
        *,
        tenant_id: str | None = None,
        private_key: PrivateKey | None = None,
        private_key_password: str | bytes | None = None,
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
    ) -> None:
        super().__init__(
            agent_id,
            private_key_path,
            organization_id,
            url,
            auto_reconnect=auto_reconnect,
            tenant_id=tenant_id,
            private_key=private_key,
            private_key_password=private_key_password,
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

    @staticmethod
    def _heartbeat_interval(interval: float) -> float | None:
        return None

    async def run(self) -> None:
        if type(self).run is SimpleAgent.run:
            await self.setup()
        await self._serve()


for _public in (HeartbeatAgent, SimpleAgent):
    _public.__module__ = "artcafe_trio"
