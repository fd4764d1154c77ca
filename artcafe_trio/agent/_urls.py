"""The hub URLs an agent fails over through: :class:`HubUrls`.

The configured URLs come first, then the ones the hubs advertise in their ``welcome``
(``connect_urls``), de-duplicated and bounded by :data:`MAX_URLS`. A round (one
reconnect attempt) tries each URL still in use once, starting from the one that last
connected; a URL that failed permanently is dropped.
"""

from __future__ import annotations

import logging

from .._logsafe import printable
from ._config import MAX_URLS, check_url
from ._transport import Transport, Transports

__all__ = ["HubUrls"]

log = logging.getLogger("artcafe_trio.agent")


class HubUrls:
    """The agent's hub URLs and where the next round starts."""

    def __init__(self, configured: tuple[str, ...], transports: Transports) -> None:
        self.configured = configured
        self.transports = transports
        self.advertised: tuple[str, ...] = ()  # from the last welcome, bounded
        self.dropped: set[str] = set()  # URLs that failed permanently
        self.preferred = configured[0]  # where the next round starts

    @property
    def all(self) -> tuple[str, ...]:
        """Every hub URL the agent knows: the configured ones, then the advertised."""
        return self.configured + self.advertised

    def transport(self, url: str) -> Transport:
        transport = self.transports.get(url)
        assert transport is not None  # round() has only these
        return transport

    def round(self) -> list[str]:
        """The URLs of the next round, in order."""
        live = [
            url
            for url in self.all
            if url not in self.dropped and self.transports.get(url) is not None
        ]
        if self.preferred in live:
            start = live.index(self.preferred)
            live = live[start:] + live[:start]
        return live

    def connected(self, url: str, advertised: tuple[str, ...]) -> None:
        """``url`` connected and its welcome advertised ``advertised``: the next round
        starts at ``url``; the advertised URLs replace those of the previous welcome
        (``url`` itself kept)."""
        self.preferred = url
        if not self.transports.by_url:
            return  # one transport for every URL: other URLs would reach the same hub
        known = list(self.configured)
        learned: list[str] = []
        for candidate in (url, *advertised):
            try:
                candidate = check_url(candidate)
            except ValueError:
                log.debug("ignoring an advertised hub url %s", printable(repr(candidate), 200))
                continue
            if candidate not in known and len(known) < MAX_URLS:
                known.append(candidate)
                learned.append(candidate)
        self.advertised = tuple(learned)
