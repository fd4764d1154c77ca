"""``artcafe-trio agents ... --nats``: the credentials in a real nats-server's bucket."""

from __future__ import annotations

import functools
import json
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from artcafe_trio import AuthenticationError, HubConfig, Registry, open_agent
from artcafe_trio.cli import _main as _cli
from artcafe_trio.cluster import ClusterConfig, open_cluster_hub
from artcafe_trio.cluster._credentials import credentials_key, decode_credentials
from artcafe_trio.cluster._store import open_cluster_store
from artcafe_trio.nats import KvOp, open_nats
from artcafe_trio.protocol import load_public_key
from artcafe_trio.protocol._keys import generate_private_key

from .servers import NatsNode

pytestmark = pytest.mark.timeout(60)


def _bucket_entry(url: str, bucket: str) -> tuple[list[str], bool] | None:
    """The fingerprints and disabled flag of demo/worker in ``bucket``, or None."""

    async def read() -> tuple[list[str], bool] | None:
        async with open_nats(url) as nc:
            kv = await nc.key_value(bucket)
            entry = await kv.entry(credentials_key("demo", "worker"))
            if entry is None or entry.op is not KvOp.PUT:
                return None
            keys, disabled = decode_credentials(entry.value)
            return [key.fingerprint for key in keys], disabled

    return trio.run(read)


def test_agents_write_the_cluster_bucket(
    nats_node: NatsNode,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # where the default --db would be
    bucket = "cli_test"
    nats = ["--nats", nats_node.url, "--nats-bucket", bucket, "--nats-replicas", "1"]
    who = ["--tenant", "demo", "--agent", "worker"]
    fingerprints = []
    for name in ("k1", "k2"):
        assert _cli.main(["keygen", "--out", str(tmp_path / name)]) == 0
        capsys.readouterr()
        add = ["agents", "add", *who, "--public-key", str(tmp_path / f"{name}.pub"), *nats]
        assert _cli.main(add) == 0
        fingerprints.append(capsys.readouterr().out.strip())
    assert _bucket_entry(nats_node.url, bucket) == (fingerprints, False)
    assert not (tmp_path / "artcafe-hub.db").exists()  # the bucket instead of the registry
    assert _cli.main(add) == 0  # the same key again: nothing changes
    assert _bucket_entry(nats_node.url, bucket) == (fingerprints, False)

    assert _cli.main(["agents", "disable", *who, *nats]) == 0
    assert _bucket_entry(nats_node.url, bucket) == (fingerprints, True)
    assert _cli.main(["agents", "enable", *who, *nats]) == 0
    assert _bucket_entry(nats_node.url, bucket) == (fingerprints, False)

    remove_one = ["agents", "remove", *who, "--fingerprint", fingerprints[0], *nats]
    assert _cli.main(remove_one) == 0
    assert _bucket_entry(nats_node.url, bucket) == (fingerprints[1:], False)
    capsys.readouterr()
    assert _cli.main(remove_one) == 1  # that key is gone now
    assert f"no key {fingerprints[0]}" in capsys.readouterr().err

    assert _cli.main(["agents", "remove", *who, *nats]) == 0
    assert _bucket_entry(nats_node.url, bucket) is None
    assert _cli.main(["agents", "disable", *who, *nats]) == 1
    assert "no agent demo/worker in bucket 'cli_test'" in capsys.readouterr().err


def test_agents_nats_unreachable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No server at the URL: one error line, exit 1, no traceback."""
    from .servers import free_ports

    (port,) = free_ports(1)
    code = _cli.main(
        ["agents", "disable", "--tenant", "t", "--agent", "a", "--nats", f"nats://127.0.0.1:{port}"]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and "Traceback" not in err


async def test_a_key_added_by_the_cli_admits_the_agent_on_a_shared_credentials_hub(
    nats_node: NatsNode, tmp_path: Path
) -> None:
    """End to end: ``agents add --nats`` admits an agent on a hub serving the bucket's
    credentials; ``agents disable --nats`` closes its session there."""
    bucket = f"cli_{secrets.token_hex(4)}"
    key = tmp_path / "k"
    assert await trio.to_thread.run_sync(_cli.main, ["keygen", "--out", str(key)]) == 0
    nats = ["--nats", nats_node.url, "--nats-bucket", bucket, "--nats-replicas", "1"]
    who = ["--tenant", "demo", "--agent", "worker"]
    cluster = ClusterConfig(
        servers=nats_node.url, bucket=bucket, replicas=1, shared_credentials=True
    )
    config = HubConfig(hub_id="h1", close_timeout=0.5)
    with trio.fail_after(30), Registry.open(":memory:") as registry:
        async with open_cluster_hub(cluster=cluster, registry=registry, config=config) as hub:
            add = ["agents", "add", *who, "--public-key", f"{key}.pub", *nats]
            assert await trio.to_thread.run_sync(_cli.main, add) == 0
            assert hub.url is not None
            # Disabled, the session is closed (4005) and the agent's reconnection is
            # refused: it gives up at once. (The test used to leave the block once the
            # agent was disconnected, which raced the refused reconnection 10 ms later.)
            with pytest.raises(AuthenticationError):
                async with open_agent(
                    agent_id="worker", tenant_id="demo", private_key_path=str(key), url=hub.url
                ) as agent:
                    assert agent.health().connected
                    disable = ["agents", "disable", *who, *nats]
                    assert await trio.to_thread.run_sync(_cli.main, disable) == 0
                    await trio.sleep_forever()
            assert "4005" in (agent.health().last_disconnect_reason or "")


# --- agents list --nats ------------------------------------------------------------


def _columns(*cells: str) -> str:
    return "  ".join(cells).rstrip()


def test_agents_list_reads_the_cluster_bucket(
    nats_node: NatsNode,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``agents list --nats``: the bucket's credentials (tenants, agents, fingerprints,
    disabled) with each agent's status and reason from its claim, the SQLite listing's
    table and JSON shape; ``--tenant`` filters; an unreadable value is listed refused."""
    monkeypatch.chdir(tmp_path)
    bucket = f"list_{secrets.token_hex(4)}"
    nats = ["--nats", nats_node.url, "--nats-bucket", bucket]
    assert _cli.main(["agents", "list", *nats]) == 1  # no bucket: never created by a listing
    assert capsys.readouterr().err == (
        f"error: no cluster bucket {bucket!r} on {nats_node.url} (no hub ran with --nats and"
        " this --nats-bucket)\n"
    )
    fingerprints = {}
    for name in ("k1", "k2"):
        assert _cli.main(["keygen", "--out", str(tmp_path / name)]) == 0
        fingerprints[name] = capsys.readouterr().out.strip()
    for tenant, agent, key in (("acme", "w2", "k1"), ("acme", "w1", "k1"), ("acme", "w1", "k2"),
                               ("acme-2", "z", "k2"), ("beta", "b", "k2")):  # fmt: skip
        add = ["agents", "add", "--tenant", tenant, "--agent", agent,
               "--public-key", str(tmp_path / f"{key}.pub"), *nats, "--nats-replicas", "1"]  # fmt: skip
        assert _cli.main(add) == 0
    assert _cli.main(["agents", "disable", "--tenant", "acme", "--agent", "w2", *nats]) == 0
    assert _cli.main(["agents", "remove", "--tenant", "beta", "--agent", "b", *nats]) == 0
    capsys.readouterr()

    async def write_claims() -> None:
        async with open_nats(nats_node.url) as nc:
            store = await open_cluster_store(nc, "hub-1", bucket=bucket, replicas=1)
            claim = await store.claim("acme", "w1", "s1")
            await store.claim("acme-2", "z", "s2")
            await store.release(claim, "timeout")  # w1: offline, timeout
            await store.kv.put(credentials_key("gamma", "bad"), b'{"keys": ["not a key"]}')

    trio.run(write_claims)
    assert _cli.main(["agents", "list", *nats]) == 0
    k1, k2 = fingerprints["k1"], fingerprints["k2"]
    both = f"{k1},{k2}"
    width = len(both)
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        _columns("TENANT", "AGENT", "DISABLED", "KEYS".ljust(width), "STATUS ", "REASON   ",
                 "LAST SEEN"),
        _columns("acme  ", "w1   ", "no      ", both, "offline", "timeout  ", "-"),
        _columns("acme  ", "w2   ", "yes     ", k1.ljust(width), "-      ", "-        ", "-"),
        _columns("acme-2", "z    ", "no      ", k2.ljust(width), "online ", "connected", "-"),
        _columns("gamma ", "bad  ", "yes     ", "-".ljust(width), "-      ", "-        ", "-"),
    ]  # fmt: skip
    assert captured.err.startswith("warning: unreadable credentials for gamma/bad (")
    assert captured.err.endswith("): the hubs refuse this agent\n")

    assert _cli.main(["agents", "list", *nats, "--tenant", "acme", "--json"]) == 0
    empty = {"created_at": None, "last_seen": None, "last_heartbeat_ack": None}
    assert json.loads(capsys.readouterr().out) == [
        {"tenant_id": "acme", "agent_id": "w1", "disabled": False, "fingerprints": [k1, k2],
         "status": "offline", "reason": "timeout", **empty},
        {"tenant_id": "acme", "agent_id": "w2", "disabled": True, "fingerprints": [k1],
         "status": None, "reason": None, **empty},
    ]  # fmt: skip
    # The same keys as the SQLite listing has (one shape for both).
    with Registry.open(tmp_path / "r.db") as registry:
        registry.add_key("acme", "w1", load_public_key(str(tmp_path / "k1.pub")))
    assert _cli.main(["agents", "list", "--db", str(tmp_path / "r.db"), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)[0]) == {
        "tenant_id", "agent_id", "disabled", "fingerprints", *empty, "status", "reason"
    }  # fmt: skip
    assert _cli.main(["agents", "list", *nats, "--tenant", "nobody"]) == 0
    assert capsys.readouterr().err == f"no agents in bucket {bucket!r}\n"


def test_the_cli_reads_the_bucket_s_key_families_under_the_cluster_s_names() -> None:
    from artcafe_trio.cli import _natscli
    from artcafe_trio.cluster._credentials import CREDENTIALS_PREFIX
    from artcafe_trio.cluster._records import LEASE_PREFIX, PRESENCE_PREFIX

    families = (_natscli.LEASES, _natscli.CLAIMS, _natscli.CREDENTIALS)
    assert families == (LEASE_PREFIX, PRESENCE_PREFIX, CREDENTIALS_PREFIX)


def test_agents_and_status_with_nats_mutual_tls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``agents ... --nats-ca --nats-cert --nats-key`` and ``status --nats`` with them, on
    a JetStream nats-server that requires client certificates (``--tlsverify``)."""
    import trustme

    from .servers import run_single

    ca = trustme.CA()
    files = {"ca.pem": ca.cert_pem.bytes()}
    for name, cert in (("server", ca.issue_cert("127.0.0.1")), ("client", ca.issue_cert("cli"))):
        files[f"{name}.pem"] = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
        files[f"{name}.key"] = cert.private_key_pem.bytes()
    paths = {}
    for name, blob in files.items():
        (tmp_path / name).write_bytes(blob)
        paths[name] = str(tmp_path / name)
    extra = ["--tlsverify", "--tlscert", paths["server.pem"], "--tlskey", paths["server.key"],
             "--tlscacert", paths["ca.pem"]]  # fmt: skip
    assert _cli.main(["keygen", "--out", str(tmp_path / "k")]) == 0
    fingerprint = capsys.readouterr().out.strip()
    with run_single(tmp_path, extra=extra) as node:
        tls = ["--nats-ca", paths["ca.pem"], "--nats-cert", paths["client.pem"],
               "--nats-key", paths["client.key"]]  # fmt: skip
        nats = ["--nats", f"tls://127.0.0.1:{node.port}", "--nats-bucket", "tls_b", *tls]
        who = ["--tenant", "acme", "--agent", "w1"]
        add = ["agents", "add", *who, "--public-key", str(tmp_path / "k.pub"), "--nats-replicas",
               "1", *nats]  # fmt: skip
        assert _cli.main(add) == 0
        assert capsys.readouterr().out == f"{fingerprint}\n"
        assert _cli.main(["agents", "list", *nats, "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert [(r["agent_id"], r["fingerprints"]) for r in listed] == [("w1", [fingerprint])]
        assert _cli.main(["status", *nats, "--db", str(tmp_path / "none.db"), "--json"]) == 3
        assert json.loads(capsys.readouterr().out) == {"agents": [], "hubs": [], "degraded": []}
        # Without the client certificate the server refuses the connection: one line.
        assert _cli.main(["agents", "list", *nats[:-4]]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: NATS (tls://127.0.0.1:{node.port}): ") and err[-1] == "\n"
        assert err.count("\n") == 1
        assert _cli.main(["agents", "list", *nats[:-2]]) == 1  # a certificate without its key
        assert capsys.readouterr().err == "error: --nats-cert and --nats-key go together\n"


# --- status --nats [--watch] ----------------------------------------------------------


class Lines:
    """The stdout lines of a child process, read by a task (``status --watch --json``)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.frames: list[dict[str, Any]] = []

    async def read(self) -> None:
        assert self.proc.stdout is not None
        while line := await trio.to_thread.run_sync(self.proc.stdout.readline):
            self.frames.append(json.loads(line))

    async def until(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first frame from now on (the last one shown counts) that satisfies it."""
        seen = max(0, len(self.frames) - 1)
        await trio.lowlevel.checkpoint()
        with trio.fail_after(15):
            while True:
                for frame in self.frames[seen:]:
                    if predicate(frame):
                        return frame
                seen = len(self.frames)
                assert self.proc.poll() is None, self.proc.stderr and self.proc.stderr.read()
                await trio.sleep(0.02)


def _hubs(frame: dict[str, Any]) -> dict[str, str]:
    return {hub["hub_id"]: hub["state"] for hub in frame["hubs"]}


def _agents(frame: dict[str, Any]) -> dict[str, tuple[str, str, str, str]]:
    return {
        r["agent_id"]: (r["status"], r["reason"], r["hub_id"], r["source"]) for r in frame["agents"]
    }


async def test_status_nats_watch_follows_the_hubs_and_outlives_its_hub(
    nats_node: NatsNode, tmp_path: Path
) -> None:
    """``status --nats --watch`` (a real process, JSON Lines): the hubs and their lease
    ages are read again at every redraw — ages tick, a new hub appears, a SIGKILLed
    hub's lease goes past its TTL and expires, its agent is reaped; when the watched
    hub stops, the watch goes on from the bucket's claims. ``status --nats`` without an
    admin file prints the cluster's claims (exact table)."""
    from .test_cluster_hubs import GRACE, LEASE_TTL, real_connect, start_hub_process

    bucket = f"watch_{secrets.token_hex(4)}"
    keys = {agent: generate_private_key("ed25519") for agent in ("x", "y")}
    db, k_db = tmp_path / "a.db", tmp_path / "k.db"
    for path in (db, k_db):
        with Registry.open(path) as registry:
            for agent, key in keys.items():
                registry.add_key("t1", agent, key.public_key)
    cluster = ClusterConfig(servers=nats_node.url, bucket=bucket, replicas=1, lease_ttl=LEASE_TTL)
    config = HubConfig(hub_id="hub-a", disconnect_grace=GRACE, close_timeout=0.5)
    status = [sys.executable, "-m", "artcafe_trio", "status", "--nats", nats_node.url,
              "--nats-bucket", bucket]  # fmt: skip
    watch = await trio.to_thread.run_sync(
        functools.partial(subprocess.Popen, [*status, "--db", str(db), "--watch", "--json"],
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    )  # fmt: skip
    hub_k: subprocess.Popen[str] | None = None
    try:
        async with trio.open_nursery() as nursery:
            lines = Lines(watch)
            nursery.start_soon(lines.read)
            async with open_cluster_hub(cluster=cluster, config=config, db=str(db),
                                        admin_file=f"{db}.admin") as hub_a:  # fmt: skip
                assert hub_a.url is not None
                first = await lines.until(lambda f: _hubs(f) == {"hub-a": "live"})
                assert first["agents"] == [] or all(r["source"] == "hub" for r in first["agents"])
                # The ages tick: every redraw reads them anew (refreshed every TTL / 3).
                ages = set()
                while len(ages) < 3:
                    frame = await lines.until(lambda f: "hub-a" in _hubs(f))
                    ages.add(frame["hubs"][0]["lease_age"])
                    await trio.sleep(0.3)
                assert all(0 <= age < LEASE_TTL for age in ages), ages

                hub_k, k_url = await trio.to_thread.run_sync(
                    start_hub_process, k_db, nats_node, bucket, "--nats-replicas", "1"
                )
                await lines.until(lambda f: _hubs(f) == {"hub-a": "live", "hub-k": "live"})
                await real_connect(k_url, nursery, "x", keys["x"])
                await real_connect(hub_a.url, nursery, "y", keys["y"])
                frame = await lines.until(lambda f: len(f["agents"]) == 2)
                assert _agents(frame) == {
                    "x": ("online", "connected", "hub-k", "hub"),
                    "y": ("online", "connected", "hub-a", "hub"),
                }  # fmt: skip
                await lines.until(
                    lambda f: [h["urls"] for h in f["hubs"]] == [[hub_a.url], [k_url]]
                )

                # One shot, no admin file: the cluster's presence from the bucket's claims.
                code, out, err = await trio.to_thread.run_sync(
                    _run_cli, [*status[3:], "--db", str(tmp_path / "none.db")]
                )
                assert (code, err) == (
                    0,
                    "presence from the cluster's claims in bucket"
                    f" {bucket!r} (no admin file {tmp_path}/none.db.admin)\n",
                )
                width = max(len(hub_a.url), len(k_url))
                assert re.sub(r"\d+\.\d s", "N s", out).splitlines() == [
                    "TENANT  AGENT  STATUS  REASON     HUB    LAST SEEN  LAST HEARTBEAT ACK",
                    "t1      x      online  connected  hub-k  -          -",
                    "t1      y      online  connected  hub-a  -          -",
                    "",
                    f"HUB    {'URLS'.ljust(width)}  DRAINING  LEASE AGE",
                    f"hub-a  {hub_a.url.ljust(width)}  no        N s",
                    f"hub-k  {k_url.ljust(width)}  no        N s",
                ]

                killed, since = trio.current_time(), len(lines.frames)
                hub_k.kill()  # no handover: its lease runs out, hub-a reaps its agent
                frame = await lines.until(lambda f: _hubs(f).get("hub-k") == "expired")
                assert frame["hubs"][1]["lease_age"] < 2.0  # since the expiry marker
                states = [_hubs(f)["hub-k"] for f in lines.frames[since:]]
                order = {"live": 0, "past_ttl": 1, "expired": 2}  # never back
                assert states == sorted(states, key=order.__getitem__), states
                frame = await lines.until(lambda f: _agents(f).get("x", ("",))[0] == "offline")
                assert _agents(frame)["x"] == ("offline", "hub_lost", "hub-k", "hub")
                assert trio.current_time() - killed < LEASE_TTL + GRACE + 1.5
            # hub-a stopped gracefully: its lease is deleted, and the watch goes on from
            # the bucket's claims (y offline, disconnected, as its hub wrote it).
            frame = await lines.until(lambda f: "hub-a" not in _hubs(f))
            frame = await lines.until(lambda f: all(r["source"] == "cluster" for r in f["agents"]))
            assert _hubs(frame) == {"hub-k": "expired"}
            assert _agents(frame) == {
                "x": ("offline", "hub_lost", "hub-k", "cluster"),
                "y": ("offline", "disconnected", "hub-a", "cluster"),
            }  # fmt: skip
            watch.send_signal(signal.SIGINT)
            assert await trio.to_thread.run_sync(watch.wait) == 0
            nursery.cancel_scope.cancel()
    finally:
        for proc in (watch, hub_k):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert watch.stderr is not None
    assert "presence from the cluster's claims" in watch.stderr.read()


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` in this process with its stdout and stderr captured."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = _cli.main(argv)
    return code, out.getvalue(), err.getvalue()
