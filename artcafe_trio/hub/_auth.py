"""The hub's authenticator: judges a connection's first frame, in its address's turn.

:meth:`Authenticator.authenticate` feeds the first frame to the sans-IO
:class:`~artcafe_trio.protocol.server.ServerConnection` inside the address's
:class:`~._throttle.AuthThrottle` attempt, then verifies the claim: the admin token
(constant-time compare), or the signature against each of the claimed agent's keys of
its algorithm, with a dummy key when there is none (every refusal costs one signature
check: no timing oracle), reloading the registry's keys once if none verifies.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac

import attrs

from .._logsafe import printable as _printable
from ..protocol._codes import CloseCode
from ..protocol._frames import AdminAuth, Auth
from ..protocol._keys import ALGORITHM_RSA, PublicKey, auth_payload, parse_public_key
from ..protocol.server import AuthRequested, HandshakeRefused, Refusal, ServerConnection
from ._persist import CredentialSource
from ._throttle import AuthThrottle

__all__ = ["Authenticator", "Verified"]

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


@functools.cache
def _dummy_key(algorithm: str) -> PublicKey:
    return parse_public_key(_DUMMY_KEYS.get(algorithm, _DUMMY_KEYS["ed25519"]))


@attrs.frozen
class Verified:
    """The claim verified: ``key`` is the agent's key (``None`` for the admin channel)."""

    key: PublicKey | None


class Authenticator:
    """Judges first frames (see the module docstring)."""

    def __init__(self, keys: CredentialSource, admin_token: str, throttle: AuthThrottle) -> None:
        self.keys = keys
        self.admin_token = admin_token
        self.throttle = throttle

    async def authenticate(
        self, conn: ServerConnection, text: str | bytes, remote: str, now: float
    ) -> Verified | Refusal:
        """Judge ``text``, the first frame of ``conn`` (AWAITING_AUTH → AUTHENTICATING),
        counting the outcome in the address's throttle. The caller then calls
        ``conn.accept`` (:class:`Verified`) or ``conn.refuse`` (:class:`Refusal`)."""
        async with self.throttle.attempt(remote) as attempt:
            event = conn.receive_auth(text, now)
            if isinstance(event, HandshakeRefused):
                attempt.failed(event.refusal.identity)
                return event.refusal
            outcome = await self._verify_claim(conn, event)
            if isinstance(outcome, Refusal):
                attempt.failed(event.identity)
            else:
                attempt.succeeded(event.identity)
            return outcome

    async def _verify_claim(
        self, conn: ServerConnection, event: AuthRequested
    ) -> Verified | Refusal:
        claim = event.claim
        if isinstance(claim, AdminAuth):
            if hmac.compare_digest(
                claim.token.encode("utf-8", "surrogatepass"), self.admin_token.encode()
            ):
                return Verified(None)
            return Refusal(
                code="authentication_failed", message="bad admin token", frame_id=event.frame_id,
                close=CloseCode.AUTHENTICATION_FAILED, who="admin", cause="wrong token",
                identity=event.identity,
            )  # fmt: skip
        url = (conn.url_agent_id, conn.url_tenant_id)
        generation = self.keys.generation
        key = self.verify(claim, conn.nonce, *url)
        if key is None:
            await self.keys.reload_safely()
            if self.keys.generation != generation:  # keys loaded since: try them
                key = self.verify(claim, conn.nonce, *url)
        if key is not None:
            return Verified(key)
        # Unknown agent, wrong tenant, mismatched ids and bad signatures all answer
        # alike, after the same work; only the hub's own log tells them apart.
        return Refusal(
            code="authentication_failed", message="unknown agent or signature does not verify",
            frame_id=event.frame_id, close=CloseCode.AUTHENTICATION_FAILED, who=event.who,
            cause=self.refusal_cause(claim, *url), identity=event.identity,
        )  # fmt: skip

    def verify(
        self, frame: Auth, nonce: str, agent_id: str | None, tenant_id: str | None
    ) -> PublicKey | None:
        """Check the signature against each of the claimed agent's keys of its algorithm.

        When there is none (unknown agent or tenant, ids that differ from the URL, no key
        of that algorithm, an unknown algorithm), a dummy key of the same type is checked
        instead: every refusal costs at least one signature check.
        """
        keys: tuple[PublicKey, ...] = ()
        if (frame.agent_id, frame.tenant_id) == (agent_id, tenant_id):
            keys = self.keys.credentials.get((frame.tenant_id, frame.agent_id), ())
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

    def refusal_cause(self, frame: Auth, agent_id: str | None, tenant_id: str | None) -> str:
        """Why an ``auth`` was refused, for the operator's log only (never sent)."""
        if (frame.agent_id, frame.tenant_id) != (agent_id, tenant_id):
            return "the ids in the URL differ from the auth frame"
        keys = self.keys.credentials.get((frame.tenant_id, frame.agent_id))
        if keys is None:
            if frame.tenant_id not in self.keys.tenants:
                return "unknown tenant"
            return "unknown agent, disabled, or no keys"
        same = [k for k in keys if k.algorithm == frame.algorithm]
        if not same:
            return f"no {_printable(frame.algorithm, 40)} key registered for it"
        return f"signature does not verify with its {len(same)} {frame.algorithm} key(s)"
