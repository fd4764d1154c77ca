"""``agents add|list|remove|disable|enable`` and ``dashboard-token``: the registry database,
which works while a hub runs."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from artcafe_trio import KeyLoadError, Registry
from artcafe_trio.protocol import load_public_key
from artcafe_trio.registry import AgentRecord

from ._common import EXIT_OK, CliError, _iso, _note, _open_existing_registry, _table
from ._keycmd import _looks_private

__all__ = [
    "_cmd_agents_add",
    "_cmd_agents_list",
    "_cmd_agents_remove",
    "_cmd_agents_set_disabled",
    "_cmd_dashboard_token",
]


def _agent_json(record: AgentRecord) -> dict[str, Any]:
    return {
        "tenant_id": record.tenant_id,
        "agent_id": record.agent_id,
        "disabled": record.disabled,
        "fingerprints": list(record.fingerprints),
        "created_at": _iso(record.created_at),
        "status": record.status,
        "reason": record.reason,
        "last_seen": _iso(record.last_seen),
        "last_heartbeat_ack": _iso(record.last_heartbeat),
    }


def _cmd_agents_add(args: argparse.Namespace) -> int:
    path: str = args.public_key
    try:
        public_key = load_public_key(path)
    except KeyLoadError:
        if not _looks_private(path):
            raise
        pub = path + ".pub"
        which = f"the .pub file ({pub})" if os.path.exists(pub) else "its public key (.pub) file"
        raise CliError(f"{path}: this looks like a private key; pass {which}") from None
    if args.nats:
        from ._agentsnats import bucket_add

        bucket_add(args, public_key)
        return EXIT_OK
    with (Registry.open if args.create else _open_existing_registry)(args.db) as registry:
        try:
            fingerprint = registry.add_key(args.tenant, args.agent, public_key)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    print(fingerprint)
    _note(f"added key for {args.tenant}/{args.agent} to {args.db}")
    return EXIT_OK


def _cmd_agents_list(args: argparse.Namespace) -> int:
    if args.nats:
        from ._agentsnats import bucket_list

        rows = bucket_list(args)  # the cluster's shared credentials
        nobody = f"no agents in bucket {args.nats_bucket!r}"
    else:
        with _open_existing_registry(args.db) as registry:
            rows = [_agent_json(r) for r in registry.list_agents(args.tenant)]
        nobody = "no agents registered"
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        _note(nobody)
        return EXIT_OK
    headers = ("TENANT", "AGENT", "DISABLED", "KEYS", "STATUS", "REASON", "LAST SEEN")
    table = [
        (
            r["tenant_id"],
            r["agent_id"],
            "yes" if r["disabled"] else "no",
            ",".join(r["fingerprints"]) or "-",
            r["status"] or "-",
            r["reason"] or "-",
            r["last_seen"][:19] + "Z" if r["last_seen"] else "-",  # to the second
        )
        for r in rows
    ]
    print(_table(headers, table))
    return EXIT_OK


def _cmd_agents_remove(args: argparse.Namespace) -> int:
    if args.nats:
        from ._agentsnats import bucket_remove

        bucket_remove(args)
        return EXIT_OK
    with _open_existing_registry(args.db) as registry:
        if args.purge:
            if not registry.remove_agent(args.tenant, args.agent):
                raise CliError(f"no agent {args.tenant}/{args.agent} in {args.db}")
            _note(f"removed agent {args.tenant}/{args.agent}, its keys and its presence")
            return EXIT_OK
        removed = registry.remove_key(args.tenant, args.agent, args.fingerprint)
        if not removed:
            what = f"key {args.fingerprint}" if args.fingerprint else "keys"
            raise CliError(f"no {what} for agent {args.tenant}/{args.agent} in {args.db}")
        left = registry.keys_for(args.tenant, args.agent)
    _note(f"removed {removed} key(s) of {args.tenant}/{args.agent}")
    if not left:
        _note("the agent has no key left: it can no longer authenticate")
    return EXIT_OK


def _cmd_agents_set_disabled(args: argparse.Namespace, disabled: bool) -> int:
    if args.nats:
        from ._agentsnats import bucket_set_disabled

        bucket_set_disabled(args, disabled)
        return EXIT_OK
    with _open_existing_registry(args.db) as registry:
        if not registry.set_disabled(args.tenant, args.agent, disabled):
            raise CliError(f"no agent {args.tenant}/{args.agent} in {args.db}")
    _note(f"{'disabled' if disabled else 'enabled'} {args.tenant}/{args.agent}")
    return EXIT_OK


# --------------------------------------------------------------------------- dashboard-token


def _cmd_dashboard_token(args: argparse.Namespace) -> int:
    from artcafe_trio.dashboard import create_token
    from artcafe_trio.dashboard._tokens import ALL_TENANTS

    tenant: str | None = None if args.all_tenants else args.tenant
    if tenant == ALL_TENANTS:
        raise CliError("invalid tenant id '*': use --all-tenants")
    who = "every tenant" if tenant is None else f"tenant {tenant}"
    with _open_existing_registry(args.db) as registry:
        if args.revoke:
            removed = registry.remove_dashboard_tokens(tenant or ALL_TENANTS)
            _note(f"revoked {removed} dashboard token(s) of {who}")
            return EXIT_OK
        try:
            token = create_token(registry, tenant)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    print(token)
    _note(
        f"read-only dashboard token for {who} (only its hash is stored in"
        f" {args.db}); open the dashboard with ?token=<it>"
    )
    return EXIT_OK
