"""The hub's authentication slow-down, per remote address.

Rules (``docs/security.md`` and ``docs/protocol.md`` §3 describe them for clients):

- Every handshake answer counts: a refused ``auth``/``admin_auth``, a first frame
  that is not valid, a wrong protocol version. A challenge that expires unanswered
  does not count.
- The checks of one address run **one at a time**, in arrival order. Once the
  address has ``free`` failures or more, each check waits until
  ``min(cap, 0.25 s x 2^(f-free))`` after the previous check of that address began,
  where ``f`` is its number of failures (with ``free`` = 3: the 4th attempt waits
  0.25 s, the 5th 0.5 s, ... up to ``cap``). The wait comes *before*
  the check, so a good key waits as long as a bad one (no timing oracle), and
  parallel connections queue instead of multiplying the rate.
- A success forgives only the failures of the identity that succeeded
  (``tenant/agent``, or the admin channel); failures of other identities stay.
  Failures that name no identity (invalid frames), and those of identities beyond
  ``max_identities`` per address, are only forgiven by time.
- An address is forgiven entirely ``memory`` seconds after its last failure. At
  most ``max_addresses`` addresses are remembered; beyond that the ones whose last
  failure is oldest are forgotten first.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

__all__ = ["AuthThrottle", "Attempt"]

BASE_DELAY = 0.25


class _Address:
    __slots__ = ("by_identity", "failures", "last_check", "last_failure", "lock", "users")

    def __init__(self) -> None:
        self.failures = 0
        self.by_identity: dict[str, int] = {}
        self.last_failure = -math.inf
        self.last_check = -math.inf
        self.lock = trio.Lock()  # fair: checks run in arrival order
        self.users = 0  # attempts holding or waiting for the lock


class Attempt:
    """One authentication check at an address; report its outcome exactly once."""

    def __init__(self, throttle: AuthThrottle, state: _Address) -> None:
        self._throttle = throttle
        self._state = state
        self.waited = 0.0

    def failed(self, identity: str = "") -> None:
        """Count a refusal (``identity`` empty when the frame named none)."""
        state = self._state
        state.failures += 1
        state.last_failure = trio.current_time()
        if identity and (
            identity in state.by_identity or len(state.by_identity) < self._throttle.max_identities
        ):
            state.by_identity[identity] = state.by_identity.get(identity, 0) + 1

    def succeeded(self, identity: str) -> None:
        """Forgive this identity's own failures at the address (and no one else's)."""
        state = self._state
        state.failures -= state.by_identity.pop(identity, 0)


class AuthThrottle:
    """Serialises and slows authentication checks per address (see the module docstring)."""

    def __init__(
        self,
        *,
        free: int,
        cap: float,
        memory: float,
        max_addresses: int = 10_000,
        max_identities: int = 16,
    ) -> None:
        self.free = free
        self.cap = cap
        self.memory = memory
        self.max_addresses = max_addresses
        self.max_identities = max_identities
        self._addresses: dict[str, _Address] = {}

    def __len__(self) -> int:
        return len(self._addresses)

    def failures(self, address: str) -> int:
        """Unforgiven failures of ``address`` (0 if it is not remembered)."""
        state = self._addresses.get(address)
        if state is None or trio.current_time() - state.last_failure > self.memory:
            return 0
        return state.failures

    def gap(self, failures: int) -> float:
        """Seconds between two checks of an address with this many failures."""
        extra = failures - self.free
        if extra < 0 or self.cap <= 0:
            return 0.0
        return min(self.cap, BASE_DELAY * 2.0 ** min(extra, 64))

    @asynccontextmanager
    async def attempt(self, address: str) -> AsyncIterator[Attempt]:
        """Wait for this address's turn (and its slow-down), then yield the :class:`Attempt`.

        The body is the check; it runs while the address's other attempts wait.
        """
        state = self._address(address)
        state.users += 1
        try:
            async with state.lock:
                now = trio.current_time()
                if now - state.last_failure > self.memory:
                    state.failures = 0  # forgiven
                    state.by_identity.clear()
                gap = self.gap(state.failures)
                if gap > 0:
                    await trio.sleep_until(state.last_check + gap)
                attempt = Attempt(self, state)
                attempt.waited = trio.current_time() - now
                state.last_check = trio.current_time()
                yield attempt
        finally:
            state.users -= 1
            if not state.users and state.failures <= 0:
                self._addresses.pop(address, None)

    def _address(self, address: str) -> _Address:
        state = self._addresses.get(address)
        if state is None:
            if len(self._addresses) >= self.max_addresses:
                self._prune()
            state = self._addresses[address] = _Address()
        return state

    def _prune(self) -> None:
        """Forget forgiven addresses, then the idle ones whose last failure is oldest."""
        now = trio.current_time()
        idle = [(s.last_failure, a) for a, s in self._addresses.items() if not s.users]
        for last_failure, address in idle:
            if now - last_failure > self.memory:
                del self._addresses[address]
        excess = len(self._addresses) - self.max_addresses * 9 // 10
        if excess > 0:
            idle = sorted((s.last_failure, a) for a, s in self._addresses.items() if not s.users)
            for _, address in idle[:excess]:
                del self._addresses[address]
