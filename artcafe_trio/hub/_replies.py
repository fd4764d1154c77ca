"""The reply-grant table: who may answer an open request, bounded.

A request is a publish whose ``reply_to`` is under its requester's
``$reply.<session_id>.`` prefix. Each agent it is delivered to may publish one
answer there; the first answer closes the request. A request with ``reply_from``
narrows that to the named agents (an answer routed from another hub is held to it
too, by :meth:`ReplyTable.accepts`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ._sessions import Session

__all__ = ["ReplyTable", "requester_id"]


def requester_id(reply_subject: str) -> str:
    """The session id a ``$reply.<session_id>.…`` subject names."""
    return reply_subject.split(".", 2)[1]


class ReplyTable:
    """Open requests: ``$reply`` subject -> agents (of the requester's tenant) that were
    delivered the request. Insertion order is age."""

    def __init__(
        self,
        max_open_requests: int,
        max_reply_grants: int,
        find_session: Callable[[str], Session | None],
    ) -> None:
        self.max_open_requests = max_open_requests
        self.max_reply_grants = max_reply_grants
        self._find_session = find_session
        self.grants: dict[str, set[str]] = {}
        self.granted = 0  # responders held in all grants together
        self.restricted: dict[str, frozenset[str]] = {}  # reply_from of open requests

    def may_answer(self, reply_subject: str, agent_id: str) -> bool:
        responders = self.grants.get(reply_subject)
        return responders is not None and agent_id in responders

    def accepts(self, reply_subject: str, sender: str) -> bool:
        """Whether an answer from ``sender`` (accepted on another hub) may close the
        open request: it is open and ``sender`` is allowed by its ``reply_from``."""
        if reply_subject not in self.grants:
            return False
        allowed = self.restricted.get(reply_subject)
        return allowed is None or sender in allowed

    def expect(
        self,
        requester: Session,
        reply_to: str,
        responders: Iterable[str],
        reply_from: Iterable[str] | None = None,
    ) -> None:
        """Allow one answer on ``reply_to``, from one of ``responders`` (only those also
        in ``reply_from``, if given).

        Bounded per requester session (``max_open_requests``) and hub-wide in responders
        held (``max_reply_grants``): over either, the oldest open requests are forgotten.
        """
        self.forget(reply_to)  # re-used: it becomes the newest
        open_requests = requester.open_requests
        if len(open_requests) >= self.max_open_requests:
            self.forget(next(iter(open_requests)))
        agents = set(responders)
        if reply_from is not None:
            allowed = frozenset(reply_from)
            agents &= allowed
        while self.grants and self.granted + len(agents) > self.max_reply_grants:
            self.forget(next(iter(self.grants)))
        open_requests[reply_to] = None
        self.grants[reply_to] = agents
        self.granted += len(agents)
        if reply_from is not None:
            self.restricted[reply_to] = allowed

    def expect_remote(
        self, reply_to: str, responders: Iterable[str], reply_from: Iterable[str] | None = None
    ) -> None:
        """Allow one answer on ``reply_to`` from one of ``responders`` (only those also
        in ``reply_from``, if given), for a request routed here from another hub (its
        requester's bound is kept there)."""
        self.forget(reply_to)
        agents = set(responders)
        if reply_from is not None:
            agents &= set(reply_from)
        while self.grants and self.granted + len(agents) > self.max_reply_grants:
            self.forget(next(iter(self.grants)))
        self.grants[reply_to] = agents
        self.granted += len(agents)

    def is_open(self, reply_subject: str) -> bool:
        return reply_subject in self.grants

    def forget(self, reply_subject: str) -> None:
        """Close an open request (answered, evicted, or its requester gone)."""
        responders = self.grants.pop(reply_subject, None)
        if responders is None:
            return
        self.granted -= len(responders)
        if self.restricted:
            self.restricted.pop(reply_subject, None)
        requester = self._find_session(requester_id(reply_subject))
        if requester is not None:
            requester.open_requests.pop(reply_subject, None)

    def forget_session(self, session: Session) -> None:
        """Close every request ``session`` has open (it ended)."""
        for reply_subject in list(session.open_requests):
            self.forget(reply_subject)
        session.open_requests.clear()
