"""The command line's side of a cluster's NATS: the ``--nats*`` options (servers, TLS),
one bounded connection to the cluster's bucket, and the bucket as ``agents list --nats``
and ``status --nats`` read it (:class:`BucketView`, fed by a key-value watch)."""

from __future__ import annotations

import argparse
import math
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs

from ._common import EXIT_USAGE, CliError, _client_tls_context, _iso, _note, log

if TYPE_CHECKING:
    import trio

    from artcafe_trio.cluster import PresenceClaim
    from artcafe_trio.nats import KeyValue, KvEntry

__all__ = [
    "NATS_BOUND",
    "BucketView",
    "follow_bucket",
    "nats_servers",
    "nats_tls",
    "open_bucket",
    "read_bucket",
]

NATS_BOUND = 15.0
"""The most one command waits for NATS (connect, bind the bucket, read or write it)."""

LEASES, CLAIMS, CREDENTIALS = "h.", "p.", "k."
"""The bucket's key families the commands read: ``cluster._records``' and
``cluster._credentials``' prefixes (not imported: importing the cluster loads trio and
the NATS client, which ``--help`` and the SQLite commands do not need; a test checks
that they agree)."""


def nats_servers(text: str) -> list[str]:
    """``--nats``: comma-separated NATS URLs (at least one)."""
    servers = [part.strip() for part in text.split(",") if part.strip()]
    if not servers:
        raise CliError("--nats needs at least one NATS server URL", EXIT_USAGE)
    return servers


def nats_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """``--nats-ca`` and ``--nats-cert``/``--nats-key`` as a client TLS context, or
    ``None`` (plain ``nats://``; ``tls://`` URLs then verify with the system CAs)."""
    if (args.nats_cert is None) != (args.nats_key is None):
        raise CliError("--nats-cert and --nats-key go together")
    if args.nats_ca is None and args.nats_cert is None:
        return None
    tls = _client_tls_context("--nats-ca", args.nats_ca)
    if args.nats_cert is not None:
        try:
            tls.load_cert_chain(args.nats_cert, args.nats_key)
        except (OSError, ssl.SSLError) as exc:
            raise CliError(
                f"--nats-cert {os.path.abspath(args.nats_cert)} /"
                f" --nats-key {os.path.abspath(args.nats_key)}: {exc}"
            ) from None
    return tls


@attrs.define
class Bucket:
    """The cluster's bucket, opened by :func:`open_bucket`."""

    kv: KeyValue
    bound: trio.CancelScope

    def answered(self) -> None:
        """NATS has answered: lift the bound (a ``--watch`` then runs until Ctrl+C)."""
        self.bound.deadline = math.inf


@asynccontextmanager
async def open_bucket(
    args: argparse.Namespace, client: str, *, create: bool
) -> AsyncIterator[Bucket]:
    """Connect to ``--nats`` (with its TLS options) and bind ``--nats-bucket``, created
    (``--nats-replicas``) only with ``create``; everything within :data:`NATS_BOUND`
    until :meth:`Bucket.answered`. NATS errors become one ``CliError`` line."""
    import trio

    from artcafe_trio.nats import BucketNotFoundError, NatsError, open_nats

    servers, tls = nats_servers(args.nats), nats_tls(args)
    with trio.move_on_after(NATS_BOUND) as bound:
        try:
            async with open_nats(servers, name=client, tls=tls) as nc:
                if create:
                    from artcafe_trio.cluster._store import open_cluster_store

                    store = await open_cluster_store(
                        nc, "admin", bucket=args.nats_bucket, replicas=args.nats_replicas
                    )
                    kv = store.kv
                else:
                    kv = await nc.key_value(args.nats_bucket, create=False)
                yield Bucket(kv, bound)
        except BucketNotFoundError:
            raise CliError(
                f"no cluster bucket {args.nats_bucket!r} on {args.nats}"
                " (no hub ran with --nats and this --nats-bucket)"
            ) from None
        except NatsError as exc:
            raise CliError(f"NATS ({args.nats}): {exc}") from None
    if bound.cancelled_caught:
        raise CliError(f"NATS ({args.nats}) did not answer within {NATS_BOUND:g} s")


class BucketView:
    """The last revision of each key of some families of the bucket, as a watch of it
    delivers them (sans-IO: :func:`read_bucket` and :func:`follow_bucket` feed it), and
    the rows the commands print from them."""

    def __init__(self, families: Sequence[str], *, marker_ttl: float | None = None) -> None:
        self.families = tuple(families)
        #: How long the server keeps an expiry marker (the bucket's
        #: ``subject_delete_marker_ttl``): an expired lease is listed that long.
        self.marker_ttl = marker_ttl
        self.entries: dict[str, KvEntry] = {}
        self._decoded: dict[str, tuple[int, PresenceClaim | None]] = {}

    def apply(self, entry: KvEntry) -> bool:
        """Keep ``entry`` if it is of a watched family; whether it was."""
        if not entry.key.startswith(self.families):
            return False
        self.entries[entry.key] = entry
        return True

    def _family(self, prefix: str) -> list[KvEntry]:
        return [entry for key, entry in sorted(self.entries.items()) if key.startswith(prefix)]

    def hub_rows(self, now: float | None = None) -> list[dict[str, Any]]:
        """The hubs from their leases, lease ages as of ``now`` (default: the clock)."""
        moment = time.time() if now is None else now
        rows = [_lease_row(entry, moment) for entry in self._family(LEASES)]
        return [row for row in rows if row is not None and not self._forgotten(row)]

    def _forgotten(self, row: dict[str, Any]) -> bool:
        """An expired lease whose marker the server has removed meanwhile (a one-shot
        read would no longer see it either)."""
        age = row["lease_age"]
        limit = self.marker_ttl
        return row["state"] == "expired" and None not in (age, limit) and age > limit

    def live_hubs(self) -> int:
        return sum(row["state"] == "live" for row in self.hub_rows())

    def claims(self) -> dict[tuple[str, str], PresenceClaim]:
        """Every agent's presence claim (``PresenceClaim``), by (tenant, agent)."""
        from artcafe_trio.cluster import PresenceClaim
        from artcafe_trio.nats import KvOp

        found: dict[tuple[str, str], PresenceClaim] = {}
        for entry in self._family(CLAIMS):
            if entry.op is not KvOp.PUT:
                continue
            cached = self._decoded.get(entry.key)
            if cached is None or cached[0] != entry.revision:  # a --watch redraws often
                try:
                    cached = (entry.revision, PresenceClaim.decode(entry.value))
                except ValueError as exc:
                    log.debug("unreadable claim %s: %s", entry.key, exc)
                    cached = (entry.revision, None)
                self._decoded[entry.key] = cached
            if cached[1] is not None:
                found[cached[1].tenant_id, cached[1].agent_id] = cached[1]
        return found

    def presence_rows(self) -> list[dict[str, Any]]:
        """The cluster's presence table from the claims, as ``status --json`` rows
        (``source`` ``cluster``; the bucket keeps no last-seen or heartbeat times)."""
        return [
            {
                "tenant_id": claim.tenant_id, "agent_id": claim.agent_id,
                "status": claim.status, "reason": claim.reason,
                "session_id": claim.session_id, "since": _iso(claim.since),
                "last_seen": None, "last_heartbeat_ack": None, "heartbeat_timeout": None,
                "hub_id": claim.hub, "source": "cluster",
            }
            for _ident, claim in sorted(self.claims().items())
        ]  # fmt: skip

    def agent_rows(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """The shared credentials as ``agents list --json`` rows, with each agent's
        status and reason from its claim (by tenant, then agent)."""
        from artcafe_trio.cluster._credentials import decode_credentials
        from artcafe_trio.nats import KvOp

        claims = self.claims()
        rows = []
        for entry in self._family(CREDENTIALS):
            tenant_id, _, agent_id = entry.key.removeprefix(CREDENTIALS).partition(".")
            if entry.op is not KvOp.PUT or tenant not in (None, tenant_id):
                continue
            try:
                keys, disabled = decode_credentials(entry.value)
            except ValueError as exc:
                _note(f"warning: unreadable credentials for {tenant_id}/{agent_id} ({exc}):"
                      " the hubs refuse this agent")  # fmt: skip
                keys, disabled = (), True
            claim = claims.get((tenant_id, agent_id))
            status, reason = (None, None) if claim is None else (claim.status, claim.reason)
            rows.append({
                "tenant_id": tenant_id, "agent_id": agent_id, "disabled": disabled,
                "fingerprints": [key.fingerprint for key in keys], "created_at": None,
                "status": status, "reason": reason,
                "last_seen": None, "last_heartbeat_ack": None,
            })  # fmt: skip
        return sorted(rows, key=lambda row: (row["tenant_id"], row["agent_id"]))


def _lease_row(entry: KvEntry, now: float) -> dict[str, Any] | None:
    """One hub lease (a ``KvEntry`` of ``h.<hub>``) as ``status --nats`` shows it;
    ``None`` for a lease deleted by a graceful stop (that hub has left)."""
    from artcafe_trio.cluster import HubLease
    from artcafe_trio.nats import KvOp

    hub_id = entry.key.removeprefix(LEASES)
    age = None if entry.time is None else round(max(0.0, now - entry.time), 3)
    row: dict[str, Any] = {
        "hub_id": hub_id, "urls": [], "draining": False, "started": None,
        "lease_age": age, "lease_ttl": entry.ttl, "state": "live",
    }  # fmt: skip
    if entry.op is KvOp.EXPIRED:
        row["state"] = "expired"
        return row
    if entry.op is not KvOp.PUT:
        return None
    try:
        lease = HubLease.decode(entry.value)
    except ValueError as exc:
        log.debug("unreadable lease %s: %s", entry.key, exc)
        _note(f"warning: ignoring an unreadable lease for hub {hub_id!r}")
        return None
    row.update(urls=list(lease.urls), draining=lease.draining, started=_iso(lease.started))
    if age is not None and entry.ttl is not None and age > entry.ttl:
        row["state"] = "past_ttl"  # the server has not removed it yet: dead or frozen
    return row


def _marker_ttl(kv: KeyValue) -> float | None:
    value = kv.config.get("subject_delete_marker_ttl")
    return value / 1e9 if isinstance(value, int) and value > 0 else None


async def read_bucket(kv: KeyValue, view: BucketView) -> None:
    """Fill ``view`` with the bucket as of one moment (a watch, until caught up)."""
    view.marker_ttl = _marker_ttl(kv)
    async with kv.watch(">") as watcher:
        while not watcher.caught_up:  # set with the last initial value (or if none)
            view.apply(await watcher.__anext__())


async def follow_bucket(
    kv: KeyValue,
    view: BucketView,
    on_change: Callable[[KvEntry], None],
    *,
    task_status: trio.TaskStatus[None],
) -> None:
    """Keep ``view`` current until cancelled; ``task_status.started()`` once it holds
    the bucket as of the start, then ``on_change`` for every later change it keeps."""
    view.marker_ttl = _marker_ttl(kv)
    started = False
    async with kv.watch(">") as watcher:
        if watcher.caught_up:
            started = True
            task_status.started()
        async for entry in watcher:
            if view.apply(entry) and started:
                on_change(entry)
            if not started and watcher.caught_up:
                started = True
                task_status.started()
