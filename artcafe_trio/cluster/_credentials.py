"""Agents' public keys in the cluster bucket, mirrored live by every hub.

In cluster mode the registry's credentials live in the key-value bucket, one key per
agent: ``k.<tenant>.<agent>`` holding ``{"keys": [OpenSSH public keys], "disabled":
bool}``. :func:`publish_agent` (the CLI's ``agents add/disable/remove`` in cluster
mode) writes it; every hub runs a :class:`CredentialsMirror`, which watches the
bucket and keeps the same table :meth:`Registry.all_credentials` gives a single hub
(enabled agents with at least one key), so a change reaches every hub as fast as the
watch delivers it. The mirror reports what each change revoked, so the hub can close
the sessions that authenticated with a key that is gone (4005).
"""

from __future__ import annotations

import json
import logging

import attrs
import trio

from .._errors import KeyLoadError
from ..nats import KeyValue, KvEntry, KvOp
from ..protocol._keys import PublicKey, parse_public_key
from ..registry._registry import validate_id

__all__ = [
    "CREDENTIALS_PREFIX",
    "CredentialsChange",
    "CredentialsMirror",
    "credentials_key",
    "decode_credentials",
    "encode_credentials",
    "publish_agent",
    "remove_agent",
]

log = logging.getLogger("artcafe_trio.cluster")

CREDENTIALS_PREFIX = "k."


def credentials_key(tenant_id: str, agent_id: str) -> str:
    return (
        f"{CREDENTIALS_PREFIX}{validate_id(tenant_id, 'tenant id')}."
        f"{validate_id(agent_id, 'agent id')}"
    )


def encode_credentials(keys: tuple[PublicKey, ...], *, disabled: bool) -> bytes:
    return json.dumps(
        {"keys": [key.to_openssh() for key in keys], "disabled": disabled},
        separators=(",", ":"),
    ).encode()


def decode_credentials(data: bytes) -> tuple[tuple[PublicKey, ...], bool]:
    """``(keys, disabled)``; ``ValueError`` for a malformed value (any bad key)."""
    obj = json.loads(data)
    if not isinstance(obj, dict) or not isinstance(obj.get("keys"), list):
        raise ValueError("credentials are an object with a 'keys' list")
    keys = []
    for text in obj["keys"]:
        if not isinstance(text, str):
            raise ValueError("every key is an OpenSSH public key string")
        try:
            keys.append(parse_public_key(text))
        except KeyLoadError as exc:  # not a ValueError: the mirror must see it as one
            raise ValueError(str(exc)) from None
    return tuple(keys), obj.get("disabled") is True


async def publish_agent(
    kv: KeyValue,
    tenant_id: str,
    agent_id: str,
    keys: tuple[PublicKey, ...],
    *,
    disabled: bool = False,
) -> int:
    """Write an agent's credentials for every hub (an empty ``keys``: no login)."""
    return await kv.put(
        credentials_key(tenant_id, agent_id), encode_credentials(keys, disabled=disabled)
    )


async def remove_agent(kv: KeyValue, tenant_id: str, agent_id: str) -> int:
    return await kv.delete(credentials_key(tenant_id, agent_id))


@attrs.frozen
class CredentialsChange:
    """One agent's credentials changed; ``revoked`` are the fingerprints no longer
    accepted (all of them when the agent was disabled or removed)."""

    tenant_id: str
    agent_id: str
    keys: tuple[PublicKey, ...]
    revoked: frozenset[str]


class CredentialsMirror:
    """The cluster's credential table, kept current by a watch (run :meth:`run`)."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._table: dict[tuple[str, str], tuple[PublicKey, ...]] = {}
        #: Increases with every applied change (like :meth:`Registry.revision`).
        self.revision = 0
        self._ready = trio.Event()
        self._changed = trio.Event()

    def credentials(self) -> dict[tuple[str, str], tuple[PublicKey, ...]]:
        """Every enabled agent's keys, the shape of :meth:`Registry.all_credentials`."""
        return dict(self._table)

    def keys_for(self, tenant_id: str, agent_id: str) -> tuple[PublicKey, ...]:
        return self._table.get((tenant_id, agent_id), ())

    async def wait_ready(self) -> None:
        """Until the table holds every agent the bucket held when the watch began."""
        await self._ready.wait()

    async def wait_changed(self, after: int) -> None:
        """Until :attr:`revision` is above ``after``."""
        while self.revision <= after:
            await self._changed.wait()

    def apply(self, entry: KvEntry) -> CredentialsChange | None:
        """Apply one watched revision; the change it made, if any (sans-IO core)."""
        if not entry.key.startswith(CREDENTIALS_PREFIX):
            return None
        tenant_id, _, agent_id = entry.key[len(CREDENTIALS_PREFIX) :].partition(".")
        ident = (tenant_id, agent_id)
        keys: tuple[PublicKey, ...] = ()
        if entry.op is KvOp.PUT:
            try:
                keys, disabled = decode_credentials(entry.value)
            except ValueError as exc:
                # Refuse the agent rather than keep stale keys: fail closed.
                log.error("unreadable credentials at %s (agent refused): %s", entry.key, exc)
                keys, disabled = (), True
            if disabled:
                keys = ()
        before = self._table.get(ident, ())
        if keys:
            self._table[ident] = keys
        else:
            self._table.pop(ident, None)
        if keys == before:
            return None
        self.revision += 1
        self._changed.set()
        self._changed = trio.Event()
        kept = {key.fingerprint for key in keys}
        return CredentialsChange(
            tenant_id, agent_id, keys, frozenset(k.fingerprint for k in before) - kept
        )

    async def run(
        self,
        on_change: trio.MemorySendChannel[CredentialsChange] | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Watch the bucket until cancelled; ``task_status.started()`` once the table
        is complete. Each change is also sent to ``on_change`` when given."""
        async with self._kv.watch(CREDENTIALS_PREFIX + ">") as watcher:
            if watcher.caught_up:
                self._ready.set()
                task_status.started()
            async for entry in watcher:
                change = self.apply(entry)
                if change is not None and on_change is not None:
                    await on_change.send(change)
                if watcher.caught_up and not self._ready.is_set():
                    self._ready.set()
                    task_status.started()
