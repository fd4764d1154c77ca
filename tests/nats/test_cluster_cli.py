"""``artcafe-trio agents ... --nats``: the credentials in a real nats-server's bucket."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import trio

from artcafe_trio import HubConfig, Registry, open_agent
from artcafe_trio.cli import _main as _cli
from artcafe_trio.cluster import ClusterConfig, open_cluster_hub
from artcafe_trio.cluster._credentials import credentials_key, decode_credentials
from artcafe_trio.nats import KvOp, open_nats

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
            async with open_agent(
                agent_id="worker", tenant_id="demo", private_key_path=str(key), url=hub.url
            ) as agent:
                assert agent.health().connected
                disable = ["agents", "disable", *who, *nats]
                assert await trio.to_thread.run_sync(_cli.main, disable) == 0
                while agent.health().connected:
                    await trio.sleep(0.02)
