"""The hub's authenticator (``hub/_auth.py``) on its own: a fake key store, no sockets."""

from __future__ import annotations

import json

import trio

from artcafe_trio.hub._auth import Authenticator, Verified
from artcafe_trio.hub._throttle import AuthThrottle
from artcafe_trio.protocol import AdminAuth, Auth, PublicKey, encode, generate_private_key
from artcafe_trio.protocol.server import ConnectionState, Refusal, ServerConnection, ServerLimits

NONCE = "n0nce"
KEY = generate_private_key()


class Keys:
    """A KeyStore whose ``reload`` can load keys (like a registry changed meanwhile)."""

    def __init__(self, credentials: dict[tuple[str, str], tuple[PublicKey, ...]]) -> None:
        self.credentials = credentials
        self.tenants = frozenset(t for t, _ in credentials)
        self.generation = 1
        self.reloads = 0
        self.on_reload: dict[tuple[str, str], tuple[PublicKey, ...]] | None = None

    async def reload_safely(self) -> bool:
        self.reloads += 1
        if self.on_reload is None:
            return False
        self.credentials = self.on_reload
        self.tenants = frozenset(t for t, _ in self.on_reload)
        self.generation += 1
        return True


def authenticator(keys: Keys) -> Authenticator:
    return Authenticator(keys, "the-token", AuthThrottle(free=3, cap=10.0, memory=300.0))


def connection(agent_id: str | None = "a", tenant_id: str | None = "t") -> ServerConnection:
    conn = ServerConnection(
        ServerLimits(hub_id="h"), agent_id=agent_id, tenant_id=tenant_id, nonce=NONCE
    )
    conn.challenge(0.0)
    return conn


def signed(agent_id: str = "a", tenant_id: str = "t") -> str:
    signature = KEY.sign_auth(tenant_id=tenant_id, agent_id=agent_id, nonce=NONCE)
    return encode(
        Auth(agent_id=agent_id, tenant_id=tenant_id, algorithm="ed25519", signature=signature)
    )


async def test_a_good_signature_verifies_without_a_reload() -> None:
    keys = Keys({("t", "a"): (KEY.public_key,)})
    conn = connection()
    outcome = await authenticator(keys).authenticate(conn, signed(), "addr", 0.0)
    assert outcome == Verified(KEY.public_key)
    assert (conn.state, keys.reloads) == (ConnectionState.AUTHENTICATING, 0)


async def test_keys_loaded_by_the_one_reload_are_tried() -> None:
    keys = Keys({})
    keys.on_reload = {("t", "a"): (KEY.public_key,)}
    outcome = await authenticator(keys).authenticate(connection(), signed(), "addr", 0.0)
    assert outcome == Verified(KEY.public_key)
    assert keys.reloads == 1


async def test_refusals_answer_alike_and_name_the_cause_for_the_log() -> None:
    other = generate_private_key()
    cases = [
        ({}, connection(), "unknown tenant"),
        ({("t", "b"): (KEY.public_key,)}, connection(), "unknown agent, disabled, or no keys"),
        ({("t", "a"): (other.public_key,)}, connection(),
         "signature does not verify with its 1 ed25519 key(s)"),
        ({("t", "a"): (KEY.public_key,)}, connection("b"),
         "the ids in the URL differ from the auth frame"),
    ]  # fmt: skip
    for credentials, conn, cause in cases:
        keys = Keys(credentials)
        auth = authenticator(keys)
        outcome = await auth.authenticate(conn, signed(), "addr", 0.0)
        assert isinstance(outcome, Refusal), cause
        assert (outcome.code, outcome.message, outcome.close, outcome.cause) == (
            "authentication_failed", "unknown agent or signature does not verify", 4001, cause,
        )  # fmt: skip
        assert keys.reloads == 1  # no key verified: the registry is asked once
        assert auth.throttle.failures("addr") == 1


async def test_the_admin_token_is_compared_and_failures_counted(
    autojump_clock: trio.abc.Clock,
) -> None:
    auth = authenticator(Keys({}))
    good = await auth.authenticate(
        connection(None, None), encode(AdminAuth(token="the-token")), "addr", 0.0
    )
    assert good == Verified(None)
    for _ in range(4):
        start = trio.current_time()
        bad = await auth.authenticate(
            connection(None, None), encode(AdminAuth(token="nope")), "addr", 0.0
        )
        assert isinstance(bad, Refusal)
        assert (bad.code, bad.message, bad.cause, bad.identity) == (
            "authentication_failed", "bad admin token", "wrong token", "$admin",
        )  # fmt: skip
    # the fourth check waited for the slow-down (3 free failures, then 0.25 s)
    assert trio.current_time() - start == 0.25
    assert auth.throttle.failures("addr") == 4


async def test_a_first_frame_the_connection_refuses_is_counted_without_an_identity() -> None:
    auth = authenticator(Keys({}))
    conn = connection()
    outcome = await auth.authenticate(conn, json.dumps({"type": "leave"}), "addr", 0.0)
    assert isinstance(outcome, Refusal) and outcome.code == "not_authenticated"
    assert outcome.identity == ""
    assert auth.throttle.failures("addr") == 1
    # a success of t/a later forgives only t/a's own failures: this one stays
    keys = Keys({("t", "a"): (KEY.public_key,)})
    auth.keys = keys
    assert isinstance(await auth.authenticate(connection(), signed(), "addr", 0.0), Verified)
    assert auth.throttle.failures("addr") == 1
