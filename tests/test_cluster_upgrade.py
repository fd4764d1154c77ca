"""Upgrades: what the bucket's records and the routed messages promise across versions
(sans-IO, no NATS; docs/cluster.md, "Upgrades").

The values are versionless JSON. A reader ignores the fields it does not know (a newer
version's additions) and gives the optional ones it knows a default when they are
missing (an older version's records). These tests write records as a newer and as an
older version would — the older one byte for byte as the first cluster release wrote
claims, before capabilities and metadata — and check that this version reads them and
applies its rules to them. The mixed pair of real hubs: tests/nats/test_cluster_mixed_versions.py.
"""

from __future__ import annotations

import json

import pytest

from artcafe_trio.cli._natscli import _lease_row
from artcafe_trio.cluster._credentials import CredentialsMirror, decode_credentials
from artcafe_trio.cluster._records import (
    HUB_LOST,
    HubLease,
    PresenceClaim,
    next_claim,
    reap_claim,
    release_claim,
)
from artcafe_trio.cluster._routes import RouteEnvelope
from artcafe_trio.nats import KvEntry, KvOp
from artcafe_trio.protocol._keys import generate_private_key

#: Fields a future version might add (to the top level and in nested objects).
FUTURE = {"zone": "eu-1", "schema": 7, "lease_hint": {"ttl": 30, "tags": ["a"]}, "x": None}

#: A claim as the first cluster release wrote it (attrs.asdict of 8 fields, no
#: capabilities, no metadata).
OLD_CLAIM = (
    b'{"tenant_id":"acme","agent_id":"w1","hub":"h-old","epoch":4,"status":"online",'
    b'"reason":"connected","since":100.5,"session_id":"s-9"}'
)


def _claim() -> PresenceClaim:
    return PresenceClaim(
        tenant_id="acme", agent_id="w1", hub="h-new", epoch=4, status="online",
        reason="connected", since=100.5, session_id="s-9", capabilities=("gpu",),
        metadata={"rack": "r2"},
    )  # fmt: skip


def _with(value: bytes, **fields: object) -> bytes:
    obj = json.loads(value)
    obj.update(fields)
    return json.dumps(obj).encode()


def test_a_newer_claim_s_unknown_fields_are_ignored() -> None:
    claim = _claim()
    newer = _with(claim.encode(), **FUTURE)
    assert PresenceClaim.decode(newer) == claim
    # Re-written by this version (a release, a take-over), the unknown fields are not
    # kept: a newer version must not depend on them surviving an older hub's write.
    released = release_claim(
        PresenceClaim.decode(newer), hub="h-new", epoch=4, reason="timeout", now=200.0
    )
    assert released is not None
    assert set(json.loads(released.encode())) == set(json.loads(claim.encode()))


def test_an_older_claim_s_missing_fields_default_and_the_rules_apply() -> None:
    old = PresenceClaim.decode(OLD_CLAIM)
    assert (old.hub, old.epoch, old.status, old.session_id) == ("h-old", 4, "online", "s-9")
    assert (old.capabilities, old.metadata) == ((), {})
    taken = next_claim(
        old, tenant_id="acme", agent_id="w1", hub="h-new", session_id="s-10", now=150.0,
        capabilities=("gpu",),
    )  # fmt: skip
    assert (taken.epoch, taken.since, taken.hub, taken.capabilities) == (
        5,
        100.5,
        "h-new",
        ("gpu",),
    )
    assert release_claim(old, hub="h-new", epoch=4, reason="timeout", now=1.0) is None  # not its
    released = release_claim(old, hub="h-old", epoch=4, reason="timeout", now=160.0)
    assert released is not None and (released.status, released.reason) == ("offline", "timeout")
    reaped = reap_claim(old, lost_hub="h-old", now=170.0)
    assert reaped is not None and (reaped.reason, reaped.epoch) == (HUB_LOST, 4)
    # The smallest claim: session_id was always optional too.
    minimal = json.loads(OLD_CLAIM)
    del minimal["session_id"]
    assert PresenceClaim.decode(json.dumps(minimal).encode()).session_id is None


def test_changes_that_are_not_compatible_are_refused_not_misread() -> None:
    """The boundary the docs state: a new status value, a changed type or a renamed
    required field is not a compatible change — the reader refuses the record (the hub
    treats the claim as unreadable) rather than guessing."""
    for bad, why in (
        (_with(OLD_CLAIM, status="draining"), "unknown status"),
        (_with(OLD_CLAIM, epoch="5"), "epoch"),
        (_with(OLD_CLAIM, capabilities="gpu"), "capabilities"),
        (OLD_CLAIM.replace(b'"hub"', b'"hub_id"'), "hub"),
    ):
        with pytest.raises(ValueError, match=why):
            PresenceClaim.decode(bad)


def test_leases_newer_and_older() -> None:
    lease = HubLease("h-new", ("ws://h:8765",), 50.0, draining=True)
    assert HubLease.decode(_with(lease.encode(), **FUTURE)) == lease
    assert HubLease.decode(b'{"hub":"h-old"}') == HubLease("h-old", (), 0.0, False)
    # status --nats reads both.
    newer = KvEntry("b", "h.h-new", _with(lease.encode(), **FUTURE), 3, KvOp.PUT, 10.0, 9.0)
    older = KvEntry("b", "h.h-old", b'{"hub":"h-old"}', 4, KvOp.PUT, 10.0, 9.0)
    rows = [_lease_row(entry, 12.0) for entry in (newer, older)]
    assert [(r["hub_id"], r["urls"], r["draining"], r["state"]) for r in rows if r] == [
        ("h-new", ["ws://h:8765"], True, "live"), ("h-old", [], False, "live"),
    ]  # fmt: skip


def test_credentials_newer_and_older_and_a_bad_key_fails_closed() -> None:
    key = generate_private_key("ed25519").public_key
    current = json.dumps({"keys": [key.to_openssh()], "disabled": False}).encode()
    newer = _with(current, **FUTURE, expires=None)
    assert decode_credentials(newer) == ((key,), False)
    older = json.dumps({"keys": [key.to_openssh()]}).encode()  # no "disabled": enabled
    assert decode_credentials(older) == ((key,), False)
    mirror = CredentialsMirror(kv=None)  # type: ignore[arg-type]  # apply() is sans-IO
    for agent, value in (("n1", newer), ("o1", older)):
        change = mirror.apply(KvEntry("b", f"k.acme.{agent}", value, 1, KvOp.PUT))
        assert change is not None and change.keys == (key,)
    # Regression: a value whose key does not parse raised KeyLoadError (not a
    # ValueError) out of the mirror, i.e. out of the hub's backplane.
    bad = json.dumps({"keys": ["ssh-ed25519 not-base64"]}).encode()
    with pytest.raises(ValueError, match="public key"):
        decode_credentials(bad)
    change = mirror.apply(KvEntry("b", "k.acme.o1", bad, 2, KvOp.PUT))
    assert change is not None and change.revoked == {key.fingerprint}  # refused
    assert mirror.keys_for("acme", "o1") == ()


def test_a_routed_message_s_unknown_headers_are_ignored_and_optional_ones_default() -> None:
    envelope = RouteEnvelope("h-new", "m-1", "w1", '{"n":1}', 12.5, publish_id="f-1")
    payload, headers = envelope.to_nats()
    assert RouteEnvelope.from_nats(payload, {**headers, "Ac-Priority": "high"}) == envelope
    older = {name: value for name, value in headers.items() if "ublish" not in name}
    assert len(older) == len(headers) - 1  # the publish id header (dedupe) is optional
    assert RouteEnvelope.from_nats(payload, older).publish_id is None
