"""Credentials in the cluster bucket reach another hub's mirror, revocations included."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable

import trio

from artcafe_trio import generate_private_key
from artcafe_trio.cluster._credentials import (
    CredentialsChange,
    CredentialsMirror,
    credentials_key,
    publish_agent,
    remove_agent,
)
from artcafe_trio.nats import open_nats

from .servers import API_TIMEOUT, NatsNode

_buckets = itertools.count()


async def test_a_mirror_follows_adds_rotations_disables_and_removals(
    nats_cluster: list[NatsNode],
) -> None:
    old, new = generate_private_key().public_key, generate_private_key().public_key
    async with (
        open_nats(nats_cluster[0].url) as cli,
        open_nats(nats_cluster[2].url) as hub,
    ):
        name = f"creds{next(_buckets)}"
        writer = await cli.key_value(name, replicas=3, api_timeout=API_TIMEOUT)
        await publish_agent(writer, "acme", "before", (old,))  # there before the hub starts
        mirror = CredentialsMirror(await hub.key_value(name))
        send, receive = trio.open_memory_channel[CredentialsChange](16)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(mirror.run, send)
                assert mirror.credentials() == {("acme", "before"): (old,)}
                change = await receive.receive()  # the initial value is reported too
                assert change.revoked == frozenset()

                async def step(action: Awaitable[int]) -> CredentialsChange:
                    revision = mirror.revision
                    await action
                    started = trio.current_time()
                    await mirror.wait_changed(revision)
                    assert trio.current_time() - started < 1.0  # on every hub within 1 s
                    return await receive.receive()

                added = await step(publish_agent(writer, "acme", "w1", (old,)))
                assert (added.agent_id, added.keys, added.revoked) == ("w1", (old,), frozenset())
                rotated = await step(publish_agent(writer, "acme", "w1", (new,)))
                assert rotated.revoked == {old.fingerprint}  # sessions on the old key close
                assert mirror.keys_for("acme", "w1") == (new,)
                disabled = await step(publish_agent(writer, "acme", "w1", (new,), disabled=True))
                assert disabled.revoked == {new.fingerprint} and disabled.keys == ()
                assert ("acme", "w1") not in mirror.credentials()
                await publish_agent(writer, "acme", "w1", (new,))
                await receive.receive()
                removed = await step(remove_agent(writer, "acme", "w1"))
                assert removed.revoked == {new.fingerprint}
                # A value no hub can read refuses the agent (fail closed), loudly.
                broken = await step(writer.put(credentials_key("acme", "before"), b"{oops"))
                assert broken.revoked == {old.fingerprint}
                assert mirror.credentials() == {}
                nursery.cancel_scope.cancel()
