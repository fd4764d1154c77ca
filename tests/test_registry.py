"""Tests for artcafe_trio.registry._registry: credentials, revision, persisted presence, files."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from artcafe_trio._errors import ArtcafeError
from artcafe_trio.protocol._keys import PublicKey, generate_private_key
from artcafe_trio.registry._registry import (
    SCHEMA_VERSION,
    AgentRecord,
    PresenceChange,
    PresenceRow,
    Registry,
    RegistryError,
)

T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def pubkeys() -> list[PublicKey]:
    return [generate_private_key("ed25519").public_key for _ in range(4)]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "registry.db"


@pytest.fixture
def reg(db_path: Path) -> Iterator[Registry]:
    with Registry.open(db_path) as registry:
        yield registry


def change(
    agent: str, status: str, t: float, *, reason: str | None = None, **kw: float | None
) -> PresenceChange:
    return PresenceChange("acme", agent, status, reason, f"s-{agent}", t, **kw)


# --------------------------------------------------------------------------- opening


def test_open_creates_schema(db_path: Path) -> None:
    with Registry.open(db_path) as reg:
        assert not reg.inline
        assert reg.path == os.fspath(db_path)
    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 1
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        raw.close()
    assert {"tenants", "agents", "keys", "presence", "presence_log"} <= tables


def test_connection_settings(reg: Registry) -> None:
    conn = reg._conn
    assert conn is not None
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000


def test_reopen_existing(db_path: Path, pubkeys: list[PublicKey]) -> None:
    with Registry.open(db_path) as reg:
        reg.add_key("acme", "a1", pubkeys[0], now=T0)
    with Registry.open(str(db_path)) as reg:
        assert reg.keys_for("acme", "a1") == (pubkeys[0],)


def test_memory_registry_is_inline(pubkeys: list[PublicKey]) -> None:
    with Registry.open(":memory:") as reg:
        assert reg.inline
        reg.add_key("acme", "a1", pubkeys[0])
        assert reg.keys_for("acme", "a1") == (pubkeys[0],)


def test_file_created_private(db_path: Path, reg: Registry, pubkeys: list[PublicKey]) -> None:
    reg.add_key("acme", "a1", pubkeys[0], now=T0)
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    wal = Path(f"{db_path}-wal")
    if wal.exists():
        assert stat.S_IMODE(wal.stat().st_mode) & 0o077 == 0


def test_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "registry.db"
    with pytest.raises(RegistryError, match="does not exist") as info:
        Registry.open(path)
    assert str(tmp_path / "nope") in str(info.value)
    assert isinstance(info.value, ArtcafeError)


def test_corrupted_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is definitely not an sqlite database\n" * 50)
    with pytest.raises(RegistryError, match="not a usable registry") as info:
        Registry.open(path)
    assert str(path) in str(info.value)


def test_foreign_sqlite_database_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA application_id = 12345")
    raw.commit()
    raw.close()
    with pytest.raises(RegistryError, match="not an artcafe-trio registry"):
        Registry.open(path)


def test_newer_schema_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    Registry.open(path).close()
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.commit()
    raw.close()
    with pytest.raises(RegistryError, match="newer"):
        Registry.open(path)


def test_closed_registry_raises(db_path: Path) -> None:
    reg = Registry.open(db_path)
    reg.close()
    reg.close()  # idempotent
    assert reg.closed
    with pytest.raises(RegistryError, match="closed"):
        reg.list_agents()
    with pytest.raises(RegistryError, match="closed"):
        reg.revision()


# --------------------------------------------------------------------------- credentials


def test_add_list_remove(reg: Registry, pubkeys: list[PublicKey]) -> None:
    fp = reg.add_key("acme", "a1", pubkeys[0], now=T0)
    assert fp == pubkeys[0].fingerprint
    reg.add_key("acme", "a0", pubkeys[1], now=T0 + 1)
    reg.add_key("beta", "a0", pubkeys[2], now=T0 + 2)

    agents = reg.list_agents()
    assert [(a.tenant_id, a.agent_id) for a in agents] == [
        ("acme", "a0"),
        ("acme", "a1"),
        ("beta", "a0"),
    ]
    assert agents[1] == AgentRecord(
        tenant_id="acme",
        agent_id="a1",
        disabled=False,
        fingerprints=(fp,),
        created_at=T0,
        status=None,
        reason=None,
        last_seen=None,
        last_heartbeat=None,
    )
    assert [a.agent_id for a in reg.list_agents("beta")] == ["a0"]
    assert reg.list_agents("nobody") == []

    assert reg.remove_key("acme", "a1", fp) == 1
    assert reg.remove_key("acme", "a1", fp) == 0
    assert reg.keys_for("acme", "a1") == ()
    # The agent row stays, without keys.
    assert reg.list_agents("acme")[1].fingerprints == ()

    assert reg.remove_agent("acme", "a0") is True
    assert reg.remove_agent("acme", "a0") is False
    assert [a.agent_id for a in reg.list_agents("acme")] == ["a1"]


def test_add_same_key_is_idempotent(reg: Registry, pubkeys: list[PublicKey]) -> None:
    assert reg.add_key("acme", "a1", pubkeys[0], now=T0) == pubkeys[0].fingerprint
    assert reg.add_key("acme", "a1", pubkeys[0], now=T0 + 5) == pubkeys[0].fingerprint
    (agent,) = reg.list_agents()
    assert agent.fingerprints == (pubkeys[0].fingerprint,)
    assert agent.created_at == T0
    assert reg.keys_for("acme", "a1") == (pubkeys[0],)


def test_several_keys_per_agent(reg: Registry, pubkeys: list[PublicKey]) -> None:
    for i, key in enumerate(pubkeys[:3]):
        reg.add_key("acme", "a1", key, now=T0 + i)
    assert reg.keys_for("acme", "a1") == tuple(pubkeys[:3])
    assert reg.list_agents()[0].fingerprints == tuple(k.fingerprint for k in pubkeys[:3])
    # Rotation: drop the oldest key, the others still work.
    assert reg.remove_key("acme", "a1", pubkeys[0].fingerprint) == 1
    assert reg.keys_for("acme", "a1") == tuple(pubkeys[1:3])
    assert reg.remove_key("acme", "a1") == 2
    assert reg.keys_for("acme", "a1") == ()


def test_rsa_key_round_trip(reg: Registry) -> None:
    key = generate_private_key("rsa", rsa_bits=2048).public_key
    reg.add_key("acme", "rsa-agent", key, now=T0)
    assert reg.keys_for("acme", "rsa-agent") == (key,)


def test_same_key_for_different_agents(reg: Registry, pubkeys: list[PublicKey]) -> None:
    reg.add_key("acme", "a1", pubkeys[0], now=T0)
    reg.add_key("acme", "a2", pubkeys[0], now=T0)
    assert reg.keys_for("acme", "a1") == reg.keys_for("acme", "a2") == (pubkeys[0],)


def test_keys_for_unknown_or_disabled(reg: Registry, pubkeys: list[PublicKey]) -> None:
    assert reg.keys_for("acme", "ghost") == ()
    assert reg.keys_for("not valid!", "x") == ()
    reg.add_key("acme", "a1", pubkeys[0], now=T0)
    reg.add_key("acme", "a2", pubkeys[1], now=T0)
    assert reg.set_disabled("acme", "a1", True) is True
    assert reg.keys_for("acme", "a1") == ()
    assert reg.all_credentials() == {("acme", "a2"): (pubkeys[1],)}
    agents = {a.agent_id: a for a in reg.list_agents()}
    assert agents["a1"].disabled is True
    assert agents["a1"].fingerprints == (pubkeys[0].fingerprint,)
    assert reg.set_disabled("acme", "a1", False) is True
    assert reg.keys_for("acme", "a1") == (pubkeys[0],)
    assert reg.set_disabled("acme", "ghost", True) is False


def test_all_credentials(reg: Registry, pubkeys: list[PublicKey]) -> None:
    assert reg.all_credentials() == {}
    reg.add_key("acme", "a1", pubkeys[0], now=T0)
    reg.add_key("acme", "a1", pubkeys[1], now=T0 + 1)
    reg.add_key("beta", "b1", pubkeys[2], now=T0)
    reg.add_key("beta", "b2", pubkeys[3], now=T0)
    reg.remove_key("beta", "b2")
    assert reg.all_credentials() == {
        ("acme", "a1"): (pubkeys[0], pubkeys[1]),
        ("beta", "b1"): (pubkeys[2],),
    }


def test_damaged_key_row_is_skipped(
    db_path: Path, reg: Registry, pubkeys: list[PublicKey], caplog: pytest.LogCaptureFixture
) -> None:
    reg.add_key("acme", "a1", pubkeys[0], now=T0)
    reg.add_key("acme", "a1", pubkeys[1], now=T0 + 1)
    raw = sqlite3.connect(db_path)
    raw.execute(
        "UPDATE keys SET public_key = 'ssh-ed25519 !!!' WHERE fingerprint = ?",
        (pubkeys[0].fingerprint,),
    )
    raw.commit()
    raw.close()
    assert reg.keys_for("acme", "a1") == (pubkeys[1],)
    assert reg.all_credentials() == {("acme", "a1"): (pubkeys[1],)}
    assert "ignoring unreadable key" in caplog.text


@pytest.mark.parametrize(
    "bad",
    ["", "-lead", "_lead", "has space", "dot.ted", "x" * 129, "ünï", "a\n", "a/b"],
)
def test_id_validation(reg: Registry, pubkeys: list[PublicKey], bad: str) -> None:
    with pytest.raises(ValueError, match="tenant id"):
        reg.add_key(bad, "a1", pubkeys[0])
    with pytest.raises(ValueError, match="agent id"):
        reg.add_key("acme", bad, pubkeys[0])
    assert reg.list_agents() == []


@pytest.mark.parametrize("good", ["a", "A9", "0", "agent_1-b", "x" * 128])
def test_valid_ids(reg: Registry, pubkeys: list[PublicKey], good: str) -> None:
    reg.add_key(good, good, pubkeys[0])
    assert reg.keys_for(good, good) == (pubkeys[0],)


def test_add_key_rejects_non_key(reg: Registry) -> None:
    with pytest.raises(TypeError):
        reg.add_key("acme", "a1", "ssh-ed25519 AAAA")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- revision


def test_revision_own_writes(reg: Registry, pubkeys: list[PublicKey]) -> None:
    r0 = reg.revision()
    assert reg.revision() == r0  # nothing happened
    reg.list_agents()
    reg.keys_for("acme", "a1")
    assert reg.revision() == r0

    reg.add_key("acme", "a1", pubkeys[0], now=T0)
    r1 = reg.revision()
    assert r1 != r0
    reg.add_key("acme", "a1", pubkeys[0], now=T0)  # idempotent: no change
    assert reg.revision() == r1

    reg.set_disabled("acme", "a1", True)
    r2 = reg.revision()
    assert r2 != r1
    reg.remove_key("acme", "a1")
    r3 = reg.revision()
    assert r3 != r2
    reg.remove_agent("acme", "a1")
    r4 = reg.revision()
    assert r4 != r3
    assert reg.revision() == r4


def test_revision_sees_other_process(
    db_path: Path, reg: Registry, pubkeys: list[PublicKey]
) -> None:
    hub_rev = reg.revision()
    with Registry.open(db_path) as cli:  # what the CLI process does
        assert reg.revision() == hub_rev
        cli.add_key("acme", "a1", pubkeys[0], now=T0)
    new_rev = reg.revision()
    assert new_rev != hub_rev
    assert reg.revision() == new_rev
    assert reg.keys_for("acme", "a1") == (pubkeys[0],)

    with Registry.open(db_path) as cli:
        cli.set_disabled("acme", "a1", True)
    assert reg.revision() != new_rev
    assert reg.all_credentials() == {}


# --------------------------------------------------------------------------- presence


def test_presence_survives_restart(db_path: Path, pubkeys: list[PublicKey]) -> None:
    with Registry.open(db_path) as reg:
        reg.add_key("acme", "a1", pubkeys[0], now=T0)
        reg.add_key("acme", "a2", pubkeys[1], now=T0)
        reg.record_presence(
            [
                change("a1", "online", T0 + 10, last_seen=T0 + 10, last_heartbeat=T0 + 10),
                change("a2", "online", T0 + 11, last_seen=T0 + 11),
            ]
        )
        reg.record_presence(
            [change("a1", "offline", T0 + 20, reason="heartbeat_timeout", last_seen=T0 + 19)]
        )

    with Registry.open(db_path) as reg:
        rows = reg.presence_rows()
        assert rows == [
            PresenceRow(
                "acme", "a1", "offline", "heartbeat_timeout", "s-a1", T0 + 19, T0 + 10, T0 + 20
            ),
            PresenceRow("acme", "a2", "online", None, "s-a2", T0 + 11, None, T0 + 11),
        ]
        a1, a2 = reg.list_agents("acme")
        assert (a1.status, a1.reason, a1.last_seen, a1.last_heartbeat) == (
            "offline",
            "heartbeat_timeout",
            T0 + 19,
            T0 + 10,
        )
        assert (a2.status, a2.reason, a2.last_seen) == ("online", None, T0 + 11)


def test_record_presence_keeps_last_seen_when_none(reg: Registry) -> None:
    reg.record_presence([change("a1", "online", T0, last_seen=T0 + 1, last_heartbeat=T0 + 2)])
    reg.record_presence([change("a1", "stale", T0 + 30)])
    (row,) = reg.presence_rows()
    assert (row.status, row.last_seen, row.last_heartbeat, row.changed_at) == (
        "stale",
        T0 + 1,
        T0 + 2,
        T0 + 30,
    )


def test_presence_history_order(reg: Registry) -> None:
    statuses = ["online", "stale", "online", "offline"]
    for i, status in enumerate(statuses):
        reg.record_presence([change("a1", status, T0 + i)])
    reg.record_presence([change("a2", "online", T0 + 100)])

    history = reg.presence_history("acme", "a1")
    assert [h.status for h in history] == statuses[::-1]
    assert [h.time for h in history] == [T0 + 3, T0 + 2, T0 + 1, T0]
    assert history[0] == PresenceChange("acme", "a1", "offline", None, "s-a1", T0 + 3)
    assert [h.status for h in reg.presence_history("acme", "a1", limit=2)] == ["offline", "online"]
    assert reg.presence_history("acme", "a1", limit=0) == []
    assert reg.presence_history("acme", "ghost") == []
    with pytest.raises(ValueError, match="limit"):
        reg.presence_history("acme", "a1", limit=-1)


def test_record_presence_batch_is_one_transaction(reg: Registry) -> None:
    good = change("a1", "online", T0)
    bad = PresenceChange("acme", "a2", None, None, None, T0)  # type: ignore[arg-type]
    with pytest.raises(RegistryError):
        reg.record_presence([good, bad])  # status NOT NULL in the log
    assert reg.presence_rows() == []
    assert reg.presence_history("acme", "a1") == []


def test_record_last_seen_upsert(reg: Registry) -> None:
    reg.record_presence([change("a1", "online", T0, reason="connected", last_heartbeat=T0)])
    reg.record_last_seen(
        [
            ("acme", "a1", T0 + 5, T0 + 4),
            ("acme", "new", T0 + 6, None),
        ]
    )
    a1, new = reg.presence_rows()
    assert a1 == PresenceRow("acme", "a1", "online", "connected", "s-a1", T0 + 5, T0 + 4, T0)
    assert new == PresenceRow("acme", "new", None, None, None, T0 + 6, None, None)

    reg.record_last_seen([("acme", "a1", T0 + 9, None)])
    (a1, _) = reg.presence_rows()
    assert (a1.last_seen, a1.last_heartbeat, a1.status) == (T0 + 9, T0 + 4, "online")
    # record_last_seen does not touch the log.
    assert len(reg.presence_history("acme", "a1")) == 1
    assert reg.presence_history("acme", "new") == []


def test_remove_agent_keeps_presence_log(reg: Registry, pubkeys: list[PublicKey]) -> None:
    reg.add_key("acme", "a1", pubkeys[0], now=T0)
    reg.record_presence([change("a1", "online", T0 + 1), change("a1", "offline", T0 + 2)])
    assert reg.remove_key("acme", "a1") == 1
    assert len(reg.presence_rows()) == 1  # remove_key keeps presence
    assert reg.remove_agent("acme", "a1") is True
    assert reg.presence_rows() == []
    assert [h.status for h in reg.presence_history("acme", "a1")] == ["offline", "online"]


def test_prune_presence_log(reg: Registry) -> None:
    for i in range(5):
        reg.record_presence([change("a1", "online", T0 + i)])
    assert reg.prune_presence_log(before=T0 + 3) == 3
    assert [h.time for h in reg.presence_history("acme", "a1")] == [T0 + 4, T0 + 3]


# --------------------------------------------------------------------------- threads


def test_concurrent_record_presence(reg: Registry) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(n: int) -> None:
        try:
            start.wait()
            for i in range(50):
                reg.record_presence([change(f"w{n}", "online", T0 + i, last_seen=T0 + i)])
                if i % 10 == 0:
                    reg.revision()
                    reg.presence_rows()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    conn = reg._conn
    assert conn is not None
    assert conn.execute("SELECT count(*) FROM presence_log").fetchone()[0] == 200
    assert len(reg.presence_rows()) == 4
    assert all(len(reg.presence_history("acme", f"w{n}", limit=1000)) == 50 for n in range(4))


def test_concurrent_writers_two_connections(db_path: Path, pubkeys: list[PublicKey]) -> None:
    errors: list[BaseException] = []
    with Registry.open(db_path) as hub, Registry.open(db_path) as cli:

        def presence_writer() -> None:
            try:
                for i in range(50):
                    hub.record_presence([change("a1", "online", T0 + i)])
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        def key_writer() -> None:
            try:
                for i in range(50):
                    cli.add_key("acme", f"k{i}", pubkeys[i % len(pubkeys)], now=T0)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=presence_writer), threading.Thread(target=key_writer)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len(hub.all_credentials()) == 50
        assert len(cli.presence_history("acme", "a1", limit=100)) == 50
