"""``agents add|list|remove|disable|enable --nats URLS``: the credentials in a cluster's
bucket (for hubs run with ``--nats-shared-credentials``), instead of a SQLite registry."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from artcafe_trio.cluster import publish_agent, remove_agent
from artcafe_trio.cluster._credentials import credentials_key, decode_credentials
from artcafe_trio.nats import KeyValue, KvOp
from artcafe_trio.protocol import PublicKey

from ._common import CliError, _note
from ._natscli import CLAIMS, CREDENTIALS, BucketView, open_bucket, read_bucket

__all__ = ["bucket_add", "bucket_list", "bucket_remove", "bucket_set_disabled"]

Credentials = tuple[tuple[PublicKey, ...], bool]


def _in_bucket(args: argparse.Namespace, action: Callable[[KeyValue], Awaitable[None]]) -> None:
    """Run ``action`` on the cluster's bucket (created if missing, as the hubs create it)."""

    async def run() -> None:
        async with open_bucket(args, "artcafe-trio agents", create=True) as bucket:
            await action(bucket.kv)

    trio.run(run)


def bucket_list(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The agents in the bucket's shared credentials (``agents list --json`` rows)."""
    view = BucketView((CREDENTIALS, CLAIMS))

    async def run() -> None:
        async with open_bucket(args, "artcafe-trio agents", create=False) as bucket:
            await read_bucket(bucket.kv, view)

    trio.run(run)
    return view.agent_rows(args.tenant)


async def _read(kv: KeyValue, args: argparse.Namespace) -> Credentials | None:
    """The agent's keys and disabled flag in the bucket, or None if it has no entry."""
    entry = await kv.entry(credentials_key(args.tenant, args.agent))
    if entry is None or entry.op is not KvOp.PUT:
        return None
    return decode_credentials(entry.value)


def _where(args: argparse.Namespace) -> str:
    return f"bucket {args.nats_bucket!r}"


def bucket_add(args: argparse.Namespace, public_key: PublicKey) -> None:
    """Add ``public_key`` to the agent's keys (keeping the others and its disabled flag)."""

    async def add(kv: KeyValue) -> None:
        keys, disabled = await _read(kv, args) or ((), False)
        if any(key.fingerprint == public_key.fingerprint for key in keys):
            _note(f"{args.tenant}/{args.agent} already has this key in {_where(args)}")
            return
        await publish_agent(kv, args.tenant, args.agent, (*keys, public_key), disabled=disabled)
        _note(f"added key for {args.tenant}/{args.agent} to {_where(args)}")

    _in_bucket(args, add)
    print(public_key.fingerprint)


def bucket_set_disabled(args: argparse.Namespace, disabled: bool) -> None:
    async def change(kv: KeyValue) -> None:
        found = await _read(kv, args)
        if found is None:
            raise CliError(f"no agent {args.tenant}/{args.agent} in {_where(args)}")
        await publish_agent(kv, args.tenant, args.agent, found[0], disabled=disabled)

    _in_bucket(args, change)
    _note(f"{'disabled' if disabled else 'enabled'} {args.tenant}/{args.agent} in {_where(args)}")


def bucket_remove(args: argparse.Namespace) -> None:
    """One key (``--fingerprint``), or the agent's entry (its keys, its disabled flag)."""

    async def remove(kv: KeyValue) -> None:
        found = await _read(kv, args)
        if found is None:
            raise CliError(f"no agent {args.tenant}/{args.agent} in {_where(args)}")
        keys, disabled = found
        if args.fingerprint is None:
            await remove_agent(kv, args.tenant, args.agent)
            _note(f"removed {args.tenant}/{args.agent} from {_where(args)}")
            return
        left = tuple(key for key in keys if key.fingerprint != args.fingerprint)
        if len(left) == len(keys):
            raise CliError(
                f"no key {args.fingerprint} for agent {args.tenant}/{args.agent} in {_where(args)}"
            )
        await publish_agent(kv, args.tenant, args.agent, left, disabled=disabled)
        _note(f"removed 1 key of {args.tenant}/{args.agent} from {_where(args)}")
        if not left:
            _note("the agent has no key left: it can no longer authenticate")

    _in_bucket(args, remove)
