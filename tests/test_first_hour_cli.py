"""Issue 15's command-line messages, checked on the real command in subprocesses.

Each case runs ``python -m artcafe_trio`` (or the installed ``artcafe-trio`` script) in
a fresh interpreter, as a new user would, against one ``hub --port 0`` process for the
whole module: the exact stderr, the exit code, no traceback and no line twice (the
library's logger and the command's own ``error:``/``warning:`` line would both print an
in-process run hides). About half a second each.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from artcafe_trio import generate_private_key, parse_public_key

from .ports import free_port
from .test_cli import _processes, _run_main, _start_hub

pytestmark = pytest.mark.timeout(120)

MODULE = [sys.executable, "-m", "artcafe_trio"]
SCRIPT = Path(sys.executable).with_name("artcafe-trio")
BOUND = 15.0  # seconds any one command may take before the test fails


@attrs.frozen
class Setup:
    dir: Path  # the commands' working directory: the key files are given relative to it
    hub: str  # ws://127.0.0.1:PORT of the hub process
    down: str  # a ws:// URL nothing listens on
    fingerprint: str  # of the registered key "ops"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    here = tmp_path_factory.mktemp("first-hour-cli")
    db = here / "hub.db"
    for args in (
        ["keygen", "--out", str(here / "ops")],
        ["keygen", "--out", str(here / "enc"), "--password-env", "KEY_PW"],
        ["agents", "add", "--create", "--db", str(db), "--tenant", "acme", "--agent", "ops",
         "--public-key", str(here / "ops.pub")],
    ):  # fmt: skip
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("KEY_PW", "s3cret")
            code, _out, err = _run_main(*args)
        assert code == 0, err
    (here / "junk.pem").write_text("not a certificate\n")
    (here / "wss.admin").write_text('{"url": "wss://127.0.0.1:1", "token": "t0k3n"}')
    fingerprint = parse_public_key((here / "ops.pub").read_text()).fingerprint
    with _processes() as start:
        _hub, url = _start_hub(start, db)
        yield Setup(here, url, f"ws://127.0.0.1:{free_port()}", fingerprint)


def _command(*args: str, cwd: Path, env: dict[str, str] | None = None,
             binary: list[str] = MODULE) -> tuple[subprocess.CompletedProcess[str], float]:  # fmt: skip
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ARTCAFE_")}
    environment.update(env or {})
    start = time.monotonic()
    result = subprocess.run(
        [*binary, *args], cwd=cwd, env=environment, capture_output=True, text=True,
        timeout=BOUND, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return result, time.monotonic() - start


def _clean(stderr: str) -> None:
    """No traceback, no exception class name, no line twice."""
    assert "Traceback" not in stderr
    assert not re.search(r"\b\w+(Error|Exception|Group):", stderr), stderr
    lines = stderr.splitlines()
    assert len(lines) == len(set(lines)), stderr


AGENT = ["--tenant", "acme", "--agent", "ops"]

# name: (arguments, environment, exit code, the exact stderr); {hub}, {down}, {dir}: Setup's
CASES: dict[str, tuple[list[str], dict[str, str], int, str]] = {
    "listen-refused": (
        ["listen", "--url", "{down}", *AGENT, "--key", "ops", "results.>"],
        {},
        1,
        "error: cannot connect to {down}: connection refused (is the hub running?)\n",
    ),
    "wss-to-a-ws-hub": (
        ["listen", "--url", "{wss}", *AGENT, "--key", "ops", "results.>"],
        {},
        1,
        "error: cannot connect to {wss}: TLS handshake failed: the hub speaks plain ws://?"
        " (use ws:// instead of wss://)\n",
    ),
    "wrong-path": (
        ["listen", "--url", "{hub}/foo", *AGENT, "--key", "ops", "results.>"],
        {},
        1,
        "error: cannot connect to {hub}/foo: the hub answered HTTP 404: unknown path; agents"
        " use /api/v1/ws/agent/{{id}} (check the URL: it is the hub's base URL, without a"
        " path)\n",
    ),
    "auth-failure": (
        [
            "publish",
            "--url",
            "{hub}",
            "--tenant",
            "acme",
            "--agent",
            "stranger",
            "--key",
            "ops",
            "x.y",
            "1",
        ],
        {},
        1,
        "error: the hub refused agent 'stranger' of tenant 'acme': unknown agent or"
        " signature does not verify\n"
        "hint: check 'artcafe-trio agents list --tenant acme' on the hub and the key's"
        " fingerprint ('artcafe-trio keygen --fingerprint {dir}/ops')\n",
    ),
    "encrypted-key-without-password": (
        ["publish", "--url", "{hub}", *AGENT, "--key", "enc", "x.y", "1"],
        {},
        1,
        "error: private key {dir}/enc is encrypted: give its password with --password-env"
        " VAR (VAR: an environment variable that holds it)\n",
    ),
    "password-for-an-unencrypted-key": (
        [
            "publish",
            "--url",
            "{hub}",
            *AGENT,
            "--key",
            "ops",
            "--password-env",
            "KEY_PW",
            "x.y",
            "1",
        ],
        {"KEY_PW": "s3cret"},
        0,
        "warning: private key {dir}/ops is not encrypted; --password-env KEY_PW is ignored\n",
    ),
    "keygen-fingerprint": (["keygen", "--fingerprint", "ops"], {}, 0, ""),
    "cafile-missing": (
        ["publish", "--url", "{wss}", *AGENT, "--key", "ops", "--cafile", "nope.pem", "x.y", "1"],
        {},
        1,
        "error: --cafile {dir}/nope.pem: no such file\n",
    ),
    "cafile-not-a-bundle": (
        ["listen", "--url", "{wss}", *AGENT, "--key", "ops", "--cafile", "junk.pem", "x.>"],
        {},
        1,
        "error: --cafile {dir}/junk.pem: no certificate found (a PEM CA bundle is expected)\n",
    ),
    "status-cafile-missing": (
        ["status", "--admin-file", "wss.admin", "--cafile", "nope.pem"],
        {},
        1,
        "error: --cafile {dir}/nope.pem: no such file\n",
    ),
    "nats-ca-not-a-bundle": (
        [
            "hub",
            "--port",
            "0",
            "--db",
            "unused.db",
            "--nats",
            "nats://127.0.0.1:1",
            "--hub-id",
            "h1",
            "--nats-ca",
            "junk.pem",
        ],
        {},
        1,
        "error: --nats-ca {dir}/junk.pem: no certificate found (a PEM CA bundle is expected)\n",
    ),
    "no-registry-database": (
        ["agents", "list", "--db", "other.db"],
        {},
        1,
        "error: no registry database at '{dir}/other.db': create one with 'agents add"
        " --create' (if a running hub uses this path, its file was deleted: restart that"
        " hub)\n",
    ),
    "status-without-admin-file-or-database": (
        ["status", "--db", "other.db"],
        {},
        3,
        "error: hub not running (no admin file {dir}/other.db.admin) and no registry"
        " database at '{dir}/other.db'\n",
    ),
    "tls-cert-missing": (
        ["hub", "--port", "0", "--db", "hub.db", "--tls-cert", "nope.pem"],
        {},
        1,
        "error: --tls-cert {dir}/nope.pem: no such file or not readable\n",
    ),
}


def _fill(text: str, setup: Setup) -> str:
    return text.format(
        hub=setup.hub, down=setup.down, dir=setup.dir, wss=setup.hub.replace("ws://", "wss://")
    )


@pytest.mark.parametrize("name", list(CASES))
def test_first_hour_messages_of_the_real_command(setup: Setup, name: str) -> None:
    args, env, code, stderr = CASES[name]
    result, elapsed = _command(*(_fill(a, setup) for a in args), cwd=setup.dir, env=env)
    assert (result.returncode, result.stderr) == (code, _fill(stderr, setup))
    _clean(result.stderr)
    if name == "keygen-fingerprint":
        assert result.stdout == setup.fingerprint + "\n"
    else:
        assert result.stdout == ""
    assert elapsed < 5  # interpreter start-up included; listen: one attempt, not 181 s
    assert not (setup.dir / "unused.db").exists()  # hub: refused before opening anything


@pytest.mark.skipif(not SCRIPT.exists(), reason="the artcafe-trio script is not installed")
def test_the_installed_script_fails_fast_against_a_down_hub(setup: Setup) -> None:
    """``artcafe-trio listen`` itself (the console script), the issue's first complaint."""
    result, elapsed = _command(
        "listen", "--url", setup.down, *AGENT, "--key", "ops", "results.>",
        cwd=setup.dir, binary=[str(SCRIPT)],
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == (
        f"error: cannot connect to {setup.down}: connection refused (is the hub running?)\n"
    )
    assert elapsed < 5


def test_a_port_that_is_not_a_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A port that accepts TCP but never answers: the welcome times out, and the message
    asks whether that port is a hub. (In process, with the connect timeout shortened:
    the real 10 s would make this the slowest test here.)"""
    import socket

    from artcafe_trio.cli import _agentio

    (tmp_path / "k").write_bytes(generate_private_key().to_pem())
    real = _agentio._agent_kwargs

    def quick(args: Any) -> dict[str, Any]:
        return {**real(args), "connect_timeout": 0.3}

    monkeypatch.setattr(_agentio, "_agent_kwargs", quick)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; nobody reads
        url = f"ws://127.0.0.1:{silent.getsockname()[1]}"
        code, out, err = _run_main(
            "listen", "--url", url, *AGENT, "--key", str(tmp_path / "k"), "x.>"
        )
    assert (code, out) == (1, "")
    assert err == (
        f"error: cannot connect to {url}: no welcome from the hub within 0.3 s"
        " (is that port a hub?)\n"
    )
