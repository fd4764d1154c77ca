"""``artcafe-trio dashboard-token`` and the hub's ``--dashboard`` / ``--alert-*`` options.

In-process ``main([...])`` for parsing and errors; one end-to-end run of a real
hub process that POSTs signed alerts to a real local receiver.
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from artcafe_trio import Registry
from artcafe_trio.cli._main import build_parser, main
from artcafe_trio.dashboard._tokens import Access, hash_token, resolve_token

from .hubproc import free_port

pytestmark = pytest.mark.timeout(60)

CLI = [sys.executable, "-c", "from artcafe_trio.cli import main; raise SystemExit(main())"]


def test_dashboard_token_prints_a_token_and_stores_only_its_hash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "hub.db"
    assert main(["dashboard-token", "--db", str(db), "--tenant", "acme"]) == 1
    assert "no registry database" in capsys.readouterr().err  # never a new, unused file
    Registry.open(db).close()
    assert main(["dashboard-token", "--db", str(db), "--tenant", "acme"]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("actd_") and len(token) > 40
    with Registry.open(db) as registry:
        assert registry.dashboard_token_tenant(hash_token(token)) == "acme"
        assert resolve_token(registry, "admin-token", token) is not None
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert token.encode() not in raw and hash_token(token).encode() in raw
    assert main(["dashboard-token", "--db", str(db), "--tenant", "acme", "--revoke"]) == 0
    assert "revoked 1" in capsys.readouterr().err
    with Registry.open(db) as registry:
        assert resolve_token(registry, "admin-token", token) is None


def test_an_all_tenants_token_sees_every_tenant_and_is_revoked_on_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "hub.db")
    Registry.open(db).close()
    assert main(["dashboard-token", "--db", db, "--all-tenants"]) == 0
    everyone = capsys.readouterr().out.strip()
    assert main(["dashboard-token", "--db", db, "--tenant", "acme"]) == 0
    acme = capsys.readouterr().out.strip()
    with Registry.open(db) as registry:
        assert resolve_token(registry, "admin-token", everyone) == Access(None)
        assert resolve_token(registry, "admin-token", acme) == Access("acme")
    assert main(["dashboard-token", "--db", db, "--tenant", "*"]) == 1  # not a back door
    assert "--all-tenants" in capsys.readouterr().err
    assert main(["dashboard-token", "--db", db, "--all-tenants", "--tenant", "acme"]) == 2
    capsys.readouterr()
    assert main(["dashboard-token", "--db", db, "--all-tenants", "--revoke"]) == 0
    assert "revoked 1 dashboard token(s) of every tenant" in capsys.readouterr().err
    with Registry.open(db) as registry:
        assert resolve_token(registry, "admin-token", everyone) is None
        assert resolve_token(registry, "admin-token", acme) == Access("acme")


def test_dashboard_token_refuses_a_bad_tenant_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Registry.open(tmp_path / "d.db").close()
    assert main(["dashboard-token", "--db", str(tmp_path / "d.db"), "--tenant", "no spaces"]) == 1
    assert "invalid tenant id" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ("127.0.0.1", 8766)),
        ("9000", ("127.0.0.1", 9000)),
        (":9001", ("127.0.0.1", 9001)),
        ("0.0.0.0:9002", ("0.0.0.0", 9002)),
        ("[::1]:9003", ("::1", 9003)),
    ],
)
def test_dashboard_address(value: str | None, expected: tuple[str, int]) -> None:
    argv = ["hub", "--dashboard"] + ([value] if value else [])
    assert build_parser().parse_args(argv).dashboard == expected
    assert build_parser().parse_args(["hub"]).dashboard is None  # off unless given


def test_bad_dashboard_address_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hub", "--dashboard", "host:http"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--alert-reason", "timeout"], "--alert-reason needs --alert-webhook"),
        (["--alert-min-offline", "5"], "--alert-min-offline needs --alert-webhook"),
        (["--alert-webhook", "ftp://x/"], "not an http:// or https:// URL"),
        (
            ["--alert-webhook", "http://127.0.0.1:1/", "--alert-secret-env", "ARTCAFE_NO_SUCH"],
            "ARTCAFE_NO_SUCH: the environment variable is not set",
        ),
    ],
)
def test_alert_option_errors(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["hub", "--db", str(tmp_path / "d.db"), *argv]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "d.db").exists()  # refused before anything started


class _Recorder(http.server.BaseHTTPRequestHandler):
    posts: ClassVar[list[tuple[dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.posts.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[int, list[tuple[dict[str, str], bytes]]]]:
    posts: ClassVar[list[tuple[dict[str, str], bytes]]] = []
    handler = type("Handler", (_Recorder,), {"posts": posts})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], posts
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=30, env=env, check=False
    )


def test_a_hub_process_serves_the_dashboard_and_posts_signed_alerts(
    tmp_path: Path, recorder: tuple[int, list[tuple[dict[str, str], bytes]]]
) -> None:
    receiver_port, posts = recorder
    db, key = tmp_path / "hub.db", tmp_path / "w1"
    assert run("keygen", "--out", str(key)).returncode == 0
    added = run("agents", "add", "--create", "--db", str(db), "--tenant", "acme",
                "--agent", "w1", "--public-key", f"{key}.pub")  # fmt: skip
    assert added.returncode == 0, added.stderr
    port, dashboard, metrics = free_port(), free_port(), free_port()
    env = {**os.environ, "ALERT_SECRET": "s3cret"}
    hub = subprocess.Popen(
        [*CLI, "hub", "--port", str(port), "--db", str(db), "--dashboard", f":{dashboard}",
         "--metrics-port", str(metrics),
         "--alert-webhook", f"http://127.0.0.1:{receiver_port}/alerts",
         "--alert-secret-env", "ALERT_SECRET", "--alert-tenant", "acme"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    try:
        assert hub.stdout is not None
        first = hub.stdout.readline()
        assert first.startswith(f"dashboard at http://127.0.0.1:{dashboard}/"), first
        assert hub.stdout.readline().startswith("hub listening on")
        published = run("publish", "--url", f"ws://127.0.0.1:{port}", "--tenant", "acme",
                        "--agent", "w1", "--key", str(key), "tasks.new", "1")  # fmt: skip
        assert published.returncode == 0, published.stderr
        deadline = time.monotonic() + 10
        while len(posts) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        documents = [json.loads(body) for _h, body in posts]
        assert [(d["status"], d["reason"]) for d in documents] == [
            ("online", "connected"), ("offline", "left"),
        ]  # fmt: skip
        for headers, body in posts:
            expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
            assert headers["x-artcafe-signature"] == f"sha256={expected}"
        # The webhook's counters are in the hub's metrics.
        sent = 'artcafe_webhook_sent_total{host="127.0.0.1",webhook="0"} 2.0'
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as got:
                text = got.read().decode()
            if sent in text:
                break
            time.sleep(0.05)
        assert sent in text
        assert 'artcafe_webhook_dropped_total{host="127.0.0.1",webhook="0"} 0.0' in text
    finally:
        hub.terminate()
        assert hub.wait(15) == 0
        if hub.stdout is not None:
            hub.stdout.close()
