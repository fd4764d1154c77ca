"""The agent's lifecycle: start the internals, wait for the first connection, run the
user's block, then stop gracefully (handlers finish, publishes flush, ``leave``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio

from .._util import collapse_exception_groups
from ._health import AgentState
from ._outbox import Outbox
from ._subscriptions import Subscriptions
from ._supervisor import Supervisor

if TYPE_CHECKING:
    from ._facade import Agent

__all__ = ["Lifecycle"]

log = logging.getLogger("artcafe_trio.agent")


class Lifecycle:
    """Runs an agent's components once, and stops them in order."""

    def __init__(
        self, supervisor: Supervisor, subscriptions: Subscriptions, outbox: Outbox
    ) -> None:
        self._sup = supervisor
        self._subs = subscriptions
        self._outbox = outbox
        self._started = False
        self._stop_early = False
        self._body_scope: trio.CancelScope | None = None
        self._entry_scope = trio.CancelScope()

    def stop(self) -> None:
        """Cancel the user's block (or the wait for the first connection)."""
        if self._body_scope is not None:
            self._body_scope.cancel()
        else:
            self._stop_early = True
            self._entry_scope.cancel()

    @asynccontextmanager
    async def running(self, agent: Agent) -> AsyncIterator[Agent]:
        if self._started:
            raise RuntimeError("an Agent can run only once")
        self._started = True
        self._sup.set_state(AgentState.CONNECTING)  # from NOT_STARTED
        # The agent's own tasks run under a shielded scope: a cancellation from
        # outside reaches only the user's block, so the agent can still leave
        # gracefully (briefly) before its tasks are cancelled.
        internals = trio.CancelScope(shield=True)
        with collapse_exception_groups():
            async with trio.open_nursery() as nursery:
                await nursery.start(self._run_internals, internals)
                try:
                    # stop() or an outside cancellation may end the wait for a first
                    # connection; the shielded internals must then be stopped by hand.
                    with self._entry_scope:
                        await self._sup.ever_connected.wait()
                except BaseException:
                    internals.cancel()
                    raise
                cancelled_from_outside = False
                try:
                    with trio.CancelScope() as self._body_scope:
                        if self._stop_early:
                            self._body_scope.cancel()
                        yield agent
                except trio.Cancelled:
                    cancelled_from_outside = True
                    raise
                finally:
                    try:
                        with trio.CancelScope(shield=True):
                            await self.graceful_stop(quick=cancelled_from_outside)
                    finally:
                        internals.cancel()

    @trio.lowlevel.enable_ki_protection
    async def _run_internals(
        self, scope: trio.CancelScope, task_status: trio.TaskStatus[None]
    ) -> None:
        with scope:
            async with trio.open_nursery() as internals:
                await internals.start(self._subs.run)
                internals.start_soon(self._sup.run)
                task_status.started()

    async def graceful_stop(self, *, quick: bool) -> None:
        """Stop taking messages, let handlers finish, flush publishes, leave, close.

        All the waiting together is bounded by ``stop_timeout``. When the block was
        cancelled from outside (``quick``), only the one-second ``leave`` is attempted;
        the caller re-raises the ``Cancelled``.
        """
        self._subs.stop_taking()
        stop_timeout = self._sup.config.stop_timeout
        try:
            with trio.move_on_after(0 if quick else stop_timeout) as grace:
                await self._subs.wait_done()
                if len(self._outbox) and self._sup.state is not AgentState.CLOSED:
                    await self._outbox.wait_flushed()
            if grace.cancelled_caught:
                self._subs.cancel()
                if not quick:
                    log.warning("stop: handlers or publishes still busy after %g s", stop_timeout)
        finally:
            self._outbox.closed = True
            self._sup.close()
            if len(self._outbox):
                log.error(
                    "%s/%s stopped with %d publishes not acknowledged by the hub",
                    self._sup.config.tenant_id,
                    self._sup.config.agent_id,
                    len(self._outbox),
                )
            self._outbox.fail_all()
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self._sup.leave()
            self._sup.set_state(AgentState.CLOSED)
