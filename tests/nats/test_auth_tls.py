"""Credentials and TLS against a real nats-server."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trustme

from artcafe_trio.nats import NatsAuthError, NatsConnectError, open_nats

from .servers import NatsNode, run_single


@pytest.fixture
def password_node(tmp_path: Path) -> Iterator[NatsNode]:
    with run_single(
        tmp_path, jetstream=False, extra=["--user", "alice", "--pass", "s3cret"]
    ) as node:
        yield node


@pytest.fixture
def token_node(tmp_path: Path) -> Iterator[NatsNode]:
    with run_single(tmp_path, jetstream=False, extra=["--auth", "tok3n"]) as node:
        yield node


@pytest.fixture
def tls_node(tmp_path: Path) -> Iterator[tuple[NatsNode, trustme.CA]]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server.key"
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key_file.write_bytes(cert.private_key_pem.bytes())
    extra = ["--tls", "--tlscert", str(cert_file), "--tlskey", str(key_file)]
    with run_single(tmp_path, jetstream=False, extra=extra) as node:
        yield node, ca


async def test_user_password_and_a_refused_password(password_node: NatsNode) -> None:
    node = password_node
    async with open_nats(node.url, user="alice", password="s3cret") as nc:
        sub = await nc.subscribe("auth.ok")
        await nc.publish("auth.ok", b"in")
        await nc.flush()
        assert (await sub.next_msg()).data == b"in"
    async with open_nats(f"nats://alice:s3cret@127.0.0.1:{node.port}") as nc:
        await nc.flush()
    with pytest.raises(NatsAuthError):
        async with open_nats(node.url, user="alice", password="wrong"):
            pass  # pragma: no cover


async def test_token_auth(token_node: NatsNode) -> None:
    node = token_node
    async with open_nats(f"nats://tok3n@127.0.0.1:{node.port}") as nc:
        await nc.flush()
    with pytest.raises(NatsAuthError):
        async with open_nats(node.url, token="nope"):
            pass  # pragma: no cover


async def test_tls_upgrade_after_info(tls_node: tuple[NatsNode, trustme.CA]) -> None:
    node, ca = tls_node
    context = ssl.create_default_context()
    ca.configure_trust(context)
    async with open_nats(node.url, tls=context) as nc:
        sub = await nc.subscribe("tls.x")
        await nc.publish("tls.x", b"secret", headers={"H": "1"})
        await nc.flush()
        msg = await sub.next_msg()
        assert (msg.data, msg.headers["H"]) == (b"secret", "1")  # type: ignore[index]
    # Without our CA the server's certificate is refused.
    with pytest.raises(NatsConnectError) as caught:
        async with open_nats(node.url, tls=ssl.create_default_context()):
            pass  # pragma: no cover
    assert isinstance(caught.value.last_cause, trio.BrokenResourceError)
    assert isinstance(caught.value.last_cause.__cause__, ssl.SSLCertVerificationError)


async def test_mutual_tls_with_the_hub_command_s_client_certificate(tmp_path: Path) -> None:
    """`hub --nats-ca --nats-cert --nats-key` makes a context a --tlsverify server accepts."""
    from artcafe_trio.cli._hubcmd import CliError, _cluster_config
    from artcafe_trio.cli._parser import build_parser

    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("hub-h1.example")
    files = {}
    for name, blob in {
        "ca.pem": ca.cert_pem.bytes(),
        "server.pem": b"".join(b.bytes() for b in server.cert_chain_pems),
        "server.key": server.private_key_pem.bytes(),
        "client.pem": b"".join(b.bytes() for b in client.cert_chain_pems),
        "client.key": client.private_key_pem.bytes(),
    }.items():
        (tmp_path / name).write_bytes(blob)
        files[name] = str(tmp_path / name)
    extra = ["--tlsverify", "--tlscert", files["server.pem"], "--tlskey", files["server.key"],
             "--tlscacert", files["ca.pem"]]  # fmt: skip

    def config(*flags: str) -> object:
        args = build_parser().parse_args(
            ["hub", "--hub-id", "h1", "--nats", "tls://127.0.0.1:1", *flags]
        )
        return _cluster_config(args)

    with run_single(tmp_path, jetstream=False, extra=extra) as node:
        mutual = config("--nats-ca", files["ca.pem"], "--nats-cert", files["client.pem"],
                        "--nats-key", files["client.key"], "--nats-api-timeout", "12")  # fmt: skip
        assert mutual.api_timeout == 12.0  # type: ignore[attr-defined]
        async with open_nats(node.url, tls=mutual.tls) as nc:  # type: ignore[attr-defined]
            sub = await nc.subscribe("mtls.x")
            await nc.publish("mtls.x", b"in")
            await nc.flush()
            assert (await sub.next_msg()).data == b"in"
        # The CA alone (no client certificate) is refused by the server.
        ca_only = config("--nats-ca", files["ca.pem"])
        with pytest.raises(NatsConnectError):
            async with open_nats(node.url, tls=ca_only.tls):  # type: ignore[attr-defined]
                pass  # pragma: no cover
    with pytest.raises(CliError, match="--nats-cert and --nats-key go together"):
        config("--nats-cert", files["client.pem"])
    with pytest.raises(CliError, match=r"--nats-cert .*client\.pem / --nats-key"):
        config("--nats-cert", files["client.pem"], "--nats-key", files["ca.pem"])
