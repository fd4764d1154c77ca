"""The ``artcafe-trio`` command line.

In-process tests call ``main([...])``; the end-to-end tests run the real
thing in subprocesses (a hub, agents, ``status``), with every wait bounded.
They are plain sync tests on purpose: they drive real processes.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio_websocket

from artcafe_trio import (
    ConnectionLost,
    HubConfig,
    KeyLoadError,
    ReconnectFailed,
    Registry,
    load_private_key,
    open_hub,
    parse_public_key,
)
from artcafe_trio.agent._connfail import connect_failed
from artcafe_trio.cli._common import DEFAULT_URL, _iso
from artcafe_trio.cli._hubcmd import _hub_config_kwargs
from artcafe_trio.cli._main import EXIT_INTERRUPTED, build_parser, main
from artcafe_trio.cli._problems import _close_text, _connection_problem

from .ports import free_port

CLI = [sys.executable, "-c", "from artcafe_trio.cli import main; raise SystemExit(main())"]

AGENT_SCRIPT = textwrap.dedent(
    """
    import sys

    import trio

    from artcafe_trio import open_agent


    async def run(url, tenant, agent, key):
        async with open_agent(
            url=url, tenant_id=tenant, agent_id=agent, private_key_path=key,
            heartbeat_interval=0.5,
        ):
            print("connected", flush=True)
            await trio.sleep_forever()


    trio.run(run, *sys.argv[1:])
    """
)


# --------------------------------------------------------------------------- helpers


def _keygen(tmp_path: Path, name: str = "agent.key", *extra: str) -> tuple[Path, str]:
    out = tmp_path / name
    assert main(["keygen", "--out", str(out), *extra]) == 0
    return out, parse_public_key((tmp_path / f"{name}.pub").read_text()).fingerprint


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _free_port() -> int:
    """A port nothing listens on (reserved: see ``tests/ports.py``)."""
    return free_port()


# --------------------------------------------------------------------------- top level


def test_no_arguments_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: artcafe-trio" in out
    for command in ("keygen", "agents", "hub", "status", "publish", "listen", "demo"):
        assert command in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("artcafe-trio 0.1.0")


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen"]) == 2  # --out is required
    assert "--out" in capsys.readouterr().err
    assert main(["hub", "--port", "70000"]) == 2


def test_no_command_and_no_action_print_help_on_stdout(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Both print their help on stdout; no command is fine (0), no action is a usage error."""
    assert main([]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("usage: artcafe-trio [-h]")
    assert captured.err == ""
    assert main(["agents"]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("usage: artcafe-trio agents")
    assert "manage registered agents and their keys" in captured.out
    for action in ("add", "list", "remove", "disable", "enable"):
        assert action in captured.out
    assert captured.err == ""


def _subparsers(parser: Any) -> dict[str, Any]:
    """``{name: parser}`` of a parser's sub-commands."""
    for action in parser._actions:
        if action.choices and isinstance(action.choices, dict):
            return dict(action.choices)
    return {}


def _help(capsys: pytest.CaptureFixture[str], *command: str) -> str:
    assert main([*command, "--help"]) == 0
    return " ".join(capsys.readouterr().out.split())  # unwrapped


def test_every_command_and_option_has_help(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    top = _subparsers(build_parser())
    commands = [((name,), sub) for name, sub in top.items()]
    commands += [(("agents", name), sub) for name, sub in _subparsers(top["agents"]).items()]
    assert len(commands) == 13  # with dashboard-token
    for command, parser in commands:
        # the one-line description of COMMAND --help is the help of the command list
        assert parser.description, command
        text = _help(capsys, *command)
        assert text.startswith("usage: artcafe-trio " + " ".join(command))
        assert f" {parser.description} " in text
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):  # each choice has help
                assert action.help, (command, action.dest)


def test_help_shows_defaults(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    keygen = _help(capsys, "keygen")
    assert "--type {ed25519,rsa} key type: ed25519 (small, fast) or rsa" in keygen
    assert "(default: ed25519)" in keygen
    assert "RSA key size, at least 2048 (default: 3072)" in keygen
    assert "(default: None)" not in keygen
    assert "(default: False)" not in keygen
    for action in ("add", "list", "remove", "disable", "enable"):
        assert "(default: artcafe-hub.db)" in _help(capsys, "agents", action), action
    hub = _help(capsys, "hub")
    assert "(default: 127.0.0.1)" in hub
    assert "(default: 8765)" in hub
    assert "(default: artcafe-hub.db)" in hub
    assert "(default: INFO)" in hub
    assert "(default: off" in hub  # --metrics-port
    assert "(default: plain ws://)" in hub  # --tls-cert
    assert "(default: None)" not in hub
    # The tuning flags show HubConfig's own defaults: they cannot drift.
    fields = attrs.fields_dict(HubConfig)
    flags = {
        "--heartbeat-min": "min_heartbeat_interval",
        "--heartbeat-max": "max_heartbeat_interval",
        "--disconnect-grace": "disconnect_grace",
        "--max-frame-bytes": "max_frame_bytes",
        "--max-subscriptions": "max_subscriptions",
        "--send-queue": "send_queue_size",
        "--publish-rate": "publish_rate",
        "--publish-burst": "publish_burst",
        "--send-queue-bytes": "send_queue_bytes",
        "--output-budget": "output_budget_bytes",
        "--max-unauthenticated": "max_unauthenticated",
        "--max-unauthenticated-per-address": "max_unauthenticated_per_address",
        "--handshake-timeout": "handshake_timeout",
    }
    for flag, field in flags.items():
        default = fields[field].default
        shown = format(default, "g") if isinstance(default, float) else str(default)
        assert f"HubConfig.{field} (default: {shown})" in hub, flag
    assert "(default: 1048576)" in hub
    assert "(default: 300)" in hub
    publish = _help(capsys, "publish")
    assert f"(default: $ARTCAFE_URL, else {DEFAULT_URL})" in publish
    assert "SUBJECT concrete subject" in publish
    assert "JSON_DATA any JSON value" in publish
    assert "PATTERN subject pattern" in _help(capsys, "listen")


def test_default_url_is_the_agents() -> None:
    from artcafe_trio.agent import _agent

    assert DEFAULT_URL == _agent.DEFAULT_URL


def test_hub_flags_left_out_keep_hubconfig_defaults() -> None:
    parser = build_parser()
    assert _hub_config_kwargs(parser.parse_args(["hub"])) == {}
    args = parser.parse_args(["hub", "--disconnect-grace", "0", "--send-queue", "7"])
    assert _hub_config_kwargs(args) == {"disconnect_grace": 0.0, "send_queue_size": 7}
    assert HubConfig(**_hub_config_kwargs(args)).send_queue_size == 7


def test_help_does_not_import_the_hub() -> None:
    """Defaults are read from HubConfig only for ``hub --help``: other commands stay light."""
    code = (
        "import sys; from artcafe_trio.cli import main; main(['agents', 'list', '--help']);"
        " assert 'artcafe_trio.hub._hub' not in sys.modules, 'hub imported';"
        " main(['hub', '--help']); assert 'artcafe_trio.hub._hub' in sys.modules"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- keygen


def test_keygen_ed25519(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bot.key"
    assert main(["keygen", "--type", "ed25519", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip()
    assert _mode(out) == 0o600
    assert out.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    line = (tmp_path / "bot.key.pub").read_text()
    assert line.endswith(" bot.key\n")
    public = parse_public_key(line)
    assert public.algorithm == "ed25519"
    assert printed == public.fingerprint
    assert load_private_key(out).public_key == public


def test_keygen_rsa(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rsa.key"
    assert main(["keygen", "--type", "rsa", "--bits", "2048", "--out", str(out)]) == 0
    public = parse_public_key((tmp_path / "rsa.key.pub").read_text())
    assert public.algorithm == "rsa-pkcs1-sha256"
    assert load_private_key(out).public_key == public
    assert _mode(out) == 0o600
    capsys.readouterr()
    assert main(["keygen", "--type", "rsa", "--bits", "1024", "--out", str(tmp_path / "s")]) == 1
    assert "2048" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_keygen_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = _keygen(tmp_path)
    before = out.read_bytes()
    capsys.readouterr()
    assert main(["keygen", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ")
    assert "already exists" in captured.err
    assert "--force" in captured.err
    assert "Traceback" not in captured.err
    assert out.read_bytes() == before
    # the .pub alone is protected too
    out.unlink()
    assert main(["keygen", "--out", str(out)]) == 1
    assert not out.exists()


def test_keygen_force_overwrites_with_mode_0600(tmp_path: Path) -> None:
    out, first = _keygen(tmp_path)
    os.chmod(out, 0o644)
    assert main(["keygen", "--out", str(out), "--force"]) == 0
    second = parse_public_key((tmp_path / "agent.key.pub").read_text()).fingerprint
    assert second != first
    assert _mode(out) == 0o600
    assert load_private_key(out).public_key.fingerprint == second
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_keygen_encrypted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_KEY_PASSWORD", "correct horse")
    out = tmp_path / "enc.key"
    assert main(["keygen", "--out", str(out), "--password-env", "AGENT_KEY_PASSWORD"]) == 0
    captured = capsys.readouterr()
    assert "correct horse" not in captured.out + captured.err
    assert b"ENCRYPTED" in out.read_bytes()
    with pytest.raises(KeyLoadError) as info:
        load_private_key(out)
    assert info.value.reason == "password_required"
    key = load_private_key(out, "correct horse")
    assert key.public_key == parse_public_key((tmp_path / "enc.key.pub").read_text())


def test_keygen_password_env_unset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NO_SUCH_PASSWORD_VAR", raising=False)
    out = tmp_path / "k"
    assert main(["keygen", "--out", str(out), "--password-env", "NO_SUCH_PASSWORD_VAR"]) == 1
    assert "NO_SUCH_PASSWORD_VAR" in capsys.readouterr().err
    assert not out.exists()


def test_keygen_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", "--out", str(tmp_path / "nope" / "k")]) == 1
    assert "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- agents


def test_agents_add_list_remove(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "hub.db")
    key1, fp1 = _keygen(tmp_path, "k1")
    key2, fp2 = _keygen(tmp_path, "k2")
    capsys.readouterr()
    base = ["agents", "add", "--create", "--db", db, "--tenant", "acme"]
    assert main([*base, "--agent", "bot", "--public-key", f"{key1}.pub"]) == 0
    assert capsys.readouterr().out.strip() == fp1
    assert main([*base, "--agent", "bot", "--public-key", f"{key2}.pub"]) == 0
    assert main([*base, "--agent", "other", "--public-key", f"{key2}.pub"]) == 0
    assert main(["agents", "add", "--db", db, "--tenant", "zeta", "--agent", "z",
                 "--public-key", f"{key1}.pub"]) == 0  # fmt: skip
    with Registry.open(db) as registry:
        assert {k.fingerprint for k in registry.keys_for("acme", "bot")} == {fp1, fp2}
    capsys.readouterr()

    assert main(["agents", "list", "--db", db]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["TENANT", "AGENT", "DISABLED", "KEYS"]
    assert "LAST SEEN" in table[0]
    assert len(table) == 4
    assert table[1].split()[:3] == ["acme", "bot", "no"]
    assert fp1 in table[1]
    assert fp2 in table[1]

    assert main(["agents", "list", "--db", db, "--json", "--tenant", "acme"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(a["tenant_id"], a["agent_id"]) for a in listed] == [("acme", "bot"), ("acme", "other")]
    assert set(listed[0]["fingerprints"]) == {fp1, fp2}
    assert listed[0]["disabled"] is False
    assert listed[0]["last_seen"] is None
    assert listed[0]["status"] is None

    rm = ["agents", "remove", "--db", db, "--tenant", "acme", "--agent", "bot"]
    assert main([*rm, "--fingerprint", fp1]) == 0
    with Registry.open(db) as registry:
        assert [k.fingerprint for k in registry.keys_for("acme", "bot")] == [fp2]
    assert main([*rm, "--fingerprint", fp1]) == 1  # already gone
    assert "no key" in capsys.readouterr().err
    assert main(rm) == 0
    assert "no key left" in capsys.readouterr().err
    with Registry.open(db) as registry:
        assert registry.keys_for("acme", "bot") == ()
        assert [a.agent_id for a in registry.list_agents("acme")] == ["bot", "other"]
    assert main(rm) == 1

    purge = ["agents", "remove", "--db", db, "--tenant", "acme", "--agent", "other", "--purge"]
    assert main(purge) == 0
    with Registry.open(db) as registry:
        assert [a.agent_id for a in registry.list_agents("acme")] == ["bot"]
    assert main(purge) == 1


def test_agents_disable_enable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "hub.db")
    key, fp = _keygen(tmp_path)
    ident = ["--db", db, "--tenant", "acme", "--agent", "bot"]
    assert main(["agents", "add", "--create", *ident, "--public-key", f"{key}.pub"]) == 0
    assert main(["agents", "disable", *ident]) == 0
    with Registry.open(db) as registry:
        assert registry.keys_for("acme", "bot") == ()
        assert registry.list_agents()[0].disabled
    capsys.readouterr()
    assert main(["agents", "list", "--db", db]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:3] == ["acme", "bot", "yes"]
    assert main(["agents", "enable", *ident]) == 0
    with Registry.open(db) as registry:
        assert [k.fingerprint for k in registry.keys_for("acme", "bot")] == [fp]
    capsys.readouterr()
    assert main(["agents", "disable", "--db", db, "--tenant", "acme", "--agent", "ghost"]) == 1
    assert "no agent acme/ghost" in capsys.readouterr().err


def test_agents_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "hub.db")
    missing = tmp_path / "missing.pub"
    add = ["agents", "add", "--create", "--db", db, "--tenant", "acme", "--agent", "bot"]
    assert main([*add, "--public-key", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "not found" in err
    assert str(missing) in err
    assert "Traceback" not in err
    assert not os.path.exists(db)  # nothing created on failure

    key, _ = _keygen(tmp_path)
    capsys.readouterr()
    assert main([*add, "--public-key", str(key)]) == 1  # a private key is not a .pub
    err = capsys.readouterr().err
    assert err == f"error: {key}: this looks like a private key; pass the .pub file ({key}.pub)\n"
    lone = tmp_path / "lone-private"
    lone.write_bytes(key.read_bytes())  # no .pub beside it
    assert main([*add, "--public-key", str(lone)]) == 1
    err = capsys.readouterr().err
    assert "this looks like a private key; pass its public key (.pub) file" in err
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("not a key\n")
    assert main([*add, "--public-key", str(garbage)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "private key" not in err  # only said of a private key
    assert not os.path.exists(db)
    bad_id = ["agents", "add", "--create", "--db", db, "--tenant", "a b", "--agent", "bot"]
    assert main([*bad_id, "--public-key", f"{key}.pub"]) == 1
    assert "invalid tenant id" in capsys.readouterr().err

    assert main(["agents", "list", "--db", str(tmp_path / "none.db")]) == 1
    assert "no registry database" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()

    junk = tmp_path / "junk.db"
    junk.write_text("this is not a database\n" * 100)
    assert main(["agents", "list", "--db", str(junk)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "Traceback" not in err
    assert main(["agents", "add", "--create", "--db", str(tmp_path / "no" / "dir.db"), "--tenant", "t",
                 "--agent", "a", "--public-key", f"{key}.pub"]) == 1  # fmt: skip
    assert "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- other commands


def test_publish_errors_without_a_hub(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key, _ = _keygen(tmp_path)
    capsys.readouterr()
    url = f"ws://127.0.0.1:{_free_port()}"
    base = ["publish", "--url", url, "--tenant", "t", "--agent", "a"]
    assert main([*base, "--key", str(tmp_path / "nokey"), "x.y", "1"]) == 1
    err = capsys.readouterr().err
    assert "private key file not found" in err
    assert "Traceback" not in err
    assert main([*base, "--key", str(key), "x.y", "{not json"]) == 1
    assert "not valid JSON" in capsys.readouterr().err
    assert main([*base, "--key", str(key), "x.y", '{"n": 1}']) == 1  # nobody listening
    err = capsys.readouterr().err
    assert err == f"error: cannot connect to {url}: connection refused (is the hub running?)\n"


def test_connection_problem_texts() -> None:
    """Failed connections are told in words: no exception reprs."""
    url = "ws://127.0.0.1:9"
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Error connecting to ('::1', 9): ...")
    group = OSError("all attempts to connect to 127.0.0.1:9 failed")
    group.__cause__ = ExceptionGroup("all attempts", [refused, refused])
    failed = connect_failed(group, url)
    assert _connection_problem(failed, url) == (
        f"cannot connect to {url}: connection refused (is the hub running?)"
    )
    assert _connection_problem(group, url, hint=False) == (
        f"cannot connect to {url}: connection refused"
    )
    gave_up = ReconnectFailed(10, 151.2, failed)
    assert _connection_problem(gave_up, url) == (
        f"cannot connect to {url}: connection refused (is the hub running?)"
        " (gave up after 10 attempts over 151 s)"
    )
    rejected = trio_websocket.ConnectionRejected(503, (), b"hub shutting down")
    assert _connection_problem(rejected, url) == (
        f"cannot connect to {url}: the hub answered HTTP 503: hub shutting down"
    )
    closed = ConnectionLost("the hub closed the connection (1012 hub shutting down)", code=1012)
    assert _connection_problem(closed, url) == str(closed)
    assert _close_text(trio_websocket.CloseReason(1012, "hub shutting down")) == (
        "1012 hub shutting down"
    )
    assert _close_text(trio_websocket.CloseReason(1000, None)) == "1000"


def test_subject_and_pattern_checked_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_connection(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("connected before checking the subject")

    monkeypatch.setattr(trio, "run", no_connection)
    key, _ = _keygen(tmp_path)
    capsys.readouterr()
    base = ["--url", f"ws://127.0.0.1:{_free_port()}", "--tenant", "t", "--agent", "a"]
    base += ["--key", str(key)]
    assert main(["listen", *base, "x..y"]) == 1
    assert capsys.readouterr().err == (
        "error: empty token at position 1 in pattern 'x..y' (no leading, trailing or doubled '.')\n"
    )
    assert main(["publish", *base, "tasks.*", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: wildcard '*' at index 6 is not allowed in a concrete subject")
    assert err.count("\n") == 1
    assert main(["publish", *base, "a b", "{not json"]) == 1  # the subject is checked first
    assert "bad character ' '" in capsys.readouterr().err


def test_times_are_utc_with_z(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _iso(0) == "1970-01-01T00:00:00.000Z"
    assert _iso(0, "seconds") == "1970-01-01T00:00:00Z"
    assert _iso(None) is None
    db = tmp_path / "hub.db"
    key, _ = _keygen(tmp_path)
    ident = ["--db", str(db), "--tenant", "acme", "--agent", "bot"]
    assert main(["agents", "add", "--create", *ident, "--public-key", f"{key}.pub"]) == 0
    seen = datetime.datetime(2026, 1, 5, 10, 0, 20, 500000, tzinfo=datetime.UTC).timestamp()
    with Registry.open(db) as registry:
        registry.record_last_seen([("acme", "bot", seen, seen + 0.25)])
    capsys.readouterr()

    assert main(["agents", "list", "--db", str(db)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-1] == "2026-01-05T10:00:20Z"
    assert main(["agents", "list", "--db", str(db), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["last_seen"] == "2026-01-05T10:00:20.500Z"
    assert row["last_heartbeat_ack"] == "2026-01-05T10:00:20.750Z"
    assert row["created_at"].endswith("Z")
    assert main(["status", "--db", str(db)]) == 3  # no hub: last known presence
    assert capsys.readouterr().out.splitlines()[1].split()[-2:] == ["2026-01-05T10:00:20Z"] * 2
    assert main(["status", "--db", str(db), "--json"]) == 3
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["last_seen"], row["last_heartbeat_ack"]) == (
        "2026-01-05T10:00:20.500Z", "2026-01-05T10:00:20.750Z",
    )  # fmt: skip


def test_ctrl_c_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl+C ends ``listen`` and ``status --watch`` normally (0); other commands: 130."""

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(trio, "run", interrupted)
    key, _ = _keygen(tmp_path)
    capsys.readouterr()
    agent = ["--tenant", "t", "--agent", "a", "--key", str(key)]
    assert main(["listen", *agent, "tasks.>"]) == 0
    assert capsys.readouterr().err == ""
    admin = tmp_path / "hub.db.admin"
    admin.write_text(json.dumps({"url": "ws://127.0.0.1:1", "token": "t0k3n"}))
    assert main(["status", "--admin-file", str(admin), "--watch"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["publish", *agent, "tasks.new", "1"]) == EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == "interrupted\n"
    assert main(["status", "--admin-file", str(admin)]) == 130
    assert capsys.readouterr().err == "interrupted\n"


async def test_friendly_messages_from_a_live_hub(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong URL path, wss:// to a plain hub, and the hub stopping under ``status --watch``."""
    key, _ = await trio.to_thread.run_sync(_keygen, tmp_path)
    db = tmp_path / "hub.db"
    agent = ["--tenant", "t", "--agent", "a", "--key", str(key)]
    shown = threading.Event()
    result: list[int] = []

    def watch() -> None:
        from artcafe_trio.cli import _presence as _cli

        show = _cli._StatusPrinter.show

        def show_and_tell(self: Any, rows: Any, degraded: Any = ()) -> None:
            show(self, rows, degraded)
            shown.set()

        _cli._StatusPrinter.show = show_and_tell  # type: ignore[method-assign]
        try:
            result.append(main(["status", "--db", str(db), "--watch"]))
        finally:
            _cli._StatusPrinter.show = show  # type: ignore[method-assign]

    async with trio.open_nursery() as nursery:
        async with open_hub(port=0, db=str(db), admin_file=f"{db}.admin") as hub:
            capsys.readouterr()
            wrong = hub.url + "/wrong/path"
            code = await trio.to_thread.run_sync(
                main, ["publish", "--url", wrong, *agent, "x", "1"]
            )
            assert code == 1
            assert capsys.readouterr().err == (
                f"error: cannot connect to {wrong}: the hub answered HTTP 404: unknown path;"
                " agents use /api/v1/ws/agent/{id} (check the URL: it is the hub's base URL,"
                " without a path)\n"
            )
            tls = hub.url.replace("ws://", "wss://")
            code = await trio.to_thread.run_sync(main, ["publish", "--url", tls, *agent, "x", "1"])
            assert code == 1
            assert capsys.readouterr().err == (
                f"error: cannot connect to {tls}: TLS handshake failed: the hub speaks plain"
                " ws://? (use ws:// instead of wss://)\n"
            )
            stale = tmp_path / "stale.admin"  # e.g. left by an earlier run of the hub
            stale.write_text(json.dumps({"url": hub.url, "token": "not-the-token"}))
            code = await trio.to_thread.run_sync(main, ["status", "--admin-file", str(stale)])
            assert code == 1
            assert capsys.readouterr().err == (
                "error: the hub refused the admin token: bad admin token"
                " (the token from the admin file)\n"
            )
            nursery.start_soon(trio.to_thread.run_sync, watch)
            with trio.fail_after(10):
                while not shown.is_set():
                    await trio.sleep(0.02)
        # the hub has stopped: the watch falls back to the database
    assert result == [3]
    err = capsys.readouterr().err
    assert "(hub closed the admin connection (1012 hub shutting down))" in err
    assert "CloseReason" not in err


def test_status_without_hub_or_db(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--db", str(tmp_path / "hub.db")]) == 3
    assert "hub not running" in capsys.readouterr().err
    admin = tmp_path / "x.admin"
    admin.write_text(json.dumps({"url": f"ws://127.0.0.1:{_free_port()}", "token": "t0k3n"}))
    assert main(["status", "--admin-file", str(admin)]) == 3
    err = capsys.readouterr().err
    assert "hub not running" in err
    assert "--db" in err
    assert "t0k3n" not in err


def test_status_falls_back_to_registry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "hub.db"
    key, _ = _keygen(tmp_path)
    ident = ["--db", str(db), "--tenant", "acme", "--agent", "bot"]
    assert main(["agents", "add", "--create", *ident, "--public-key", f"{key}.pub"]) == 0
    # A stale admin file (the hub was killed): nothing listens on its port.
    Path(f"{db}.admin").write_text(
        json.dumps({"url": f"ws://127.0.0.1:{_free_port()}", "token": "secret-token", "pid": 1})
    )
    capsys.readouterr()
    assert main(["status", "--db", str(db), "--json"]) == 3
    captured = capsys.readouterr()
    assert "hub not running; showing last known presence from DB" in captured.err
    assert "secret-token" not in captured.err + captured.out
    rows = json.loads(captured.out)
    assert rows == [
        {
            "tenant_id": "acme", "agent_id": "bot", "status": "offline", "reason": None,
            "session_id": None, "since": None, "last_seen": None, "last_heartbeat_ack": None,
            "heartbeat_timeout": None, "source": "registry",
        }
    ]  # fmt: skip
    assert main(["status", "--db", str(db)]) == 3
    assert capsys.readouterr().out.split()[:6] == [
        "TENANT", "AGENT", "STATUS", "REASON", "LAST", "SEEN",
    ]  # fmt: skip


def test_demo_not_available(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "artcafe_trio.demo._main", None)  # as if it did not exist
    assert main(["demo"]) == 2
    assert "demo not available yet" in capsys.readouterr().err


def test_demo_dispatches(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    fake = types.ModuleType("artcafe_trio.demo._main")

    def fake_main(args: Any) -> int:
        seen.append(args)
        return 0

    fake.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "artcafe_trio.demo._main", fake)
    assert main(["demo", "--duration", "2", "--agents", "4", "--interval", "0.5"]) == 0
    assert (seen[0].duration, seen[0].agents, seen[0].interval) == (2.0, 4, 0.5)


def test_hub_metrics_without_module(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "artcafe_trio.hub._metrics", None)
    db = str(tmp_path / "hub.db")
    assert main(["hub", "--port", "0", "--db", db, "--metrics-port", "0"]) == 1
    assert "pip install 'artcafe-trio[metrics]'" in capsys.readouterr().err
    assert not os.path.exists(db)  # failed before starting anything


# --------------------------------------------------------------------------- subprocesses


class _Process:
    """A subprocess whose stdout and stderr lines are collected by reader threads."""

    def __init__(self, args: list[str], **kwargs: Any) -> None:
        self.args = args
        self.popen = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **kwargs,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.popen.stdout, self.out), daemon=True),
            threading.Thread(target=self._pump, args=(self.popen.stderr, self.err), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _pump(stream: Any, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    def wait_line(self, text: str, timeout: float = 10.0, *, stream: str = "out") -> str:
        lines = self.out if stream == "out" else self.err
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(lines):
                if text in line:
                    return line
            if self.popen.poll() is not None and not any(t.is_alive() for t in self._threads):
                break
            time.sleep(0.02)
        raise AssertionError(f"no {text!r} from {self.args[-3:]}: {self.describe()}")

    def wait(self, timeout: float) -> int:
        code = self.popen.wait(timeout)
        for thread in self._threads:
            thread.join(2)
        return code

    def describe(self) -> str:
        return (
            f"exit={self.popen.poll()}\n--- stdout:\n{''.join(self.out)[-3000:]}"
            f"\n--- stderr:\n{''.join(self.err)[-3000:]}"
        )

    def kill(self) -> None:
        if self.popen.poll() is None:
            with suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGCONT)
            self.popen.kill()
        self.popen.wait(5)
        for thread in self._threads:
            thread.join(2)


@contextmanager
def _processes() -> Iterator[Callable[..., _Process]]:
    """Start processes with the returned function; all are killed on exit."""
    started: list[_Process] = []

    def start(args: list[str], **kwargs: Any) -> _Process:
        proc = _Process(args, **kwargs)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in reversed(started):
            proc.kill()


def _cli(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def _start_hub(start: Callable[..., _Process], db: Path, *extra: str) -> tuple[_Process, str]:
    hub = start([*CLI, "hub", "--port", "0", "--db", str(db), "--disconnect-grace", "0.5", *extra])
    line = hub.wait_line("hub listening on ")
    url = line.split("hub listening on ", 1)[1].strip()
    assert url.startswith("ws://127.0.0.1:")
    return hub, url


def _start_agent(
    start: Callable[..., _Process], tmp_path: Path, url: str, key: Path, agent: str
) -> _Process:
    script = tmp_path / "agent_script.py"
    if not script.exists():
        script.write_text(AGENT_SCRIPT)
    proc = start([sys.executable, str(script), url, "acme", agent, str(key)])
    proc.wait_line("connected")
    return proc


def _run_main(*args: str) -> tuple[int, str, str]:
    """``main([...])`` in this process (no interpreter start-up): exit code, stdout, stderr."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def _poll_status(
    db: Path, agent: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0
) -> dict[str, Any]:
    """Run ``status --json`` in process until the agent's row satisfies ``predicate`` (the
    real binary's ``status`` runs in ``test_end_to_end_presence`` and ``test_status_over_tls``)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = code, out, _err = _run_main("status", "--db", str(db), "--json")
        if code == 0:
            rows = {row["agent_id"]: row for row in json.loads(out)}
            row = rows.get(agent)
            if row is not None and predicate(row):
                found: dict[str, Any] = row
                return found
        time.sleep(0.05)
    raise AssertionError(f"status of {agent} never matched; last: {last}")


def _run(*args: str, binary: bool) -> tuple[int, str, str]:
    """The command by the real binary (``binary``) or in process: exit code, stdout, stderr."""
    if not binary:
        return _run_main(*args)
    result = _cli(*args)
    return result.returncode, result.stdout, result.stderr


def _register(tmp_path: Path, db: Path, *agents: str, binary: bool = False) -> Path:
    """One key for ``agents``; with ``binary``, made and registered by the real command."""
    key = tmp_path / "agent.key"
    code, _out, err = _run("keygen", "--out", str(key), binary=binary)
    assert code == 0, err
    for agent in agents:
        code, _out, err = _run("agents", "add", "--create", "--db", str(db), "--tenant", "acme",
                               "--agent", agent, "--public-key", f"{key}.pub", binary=binary)  # fmt: skip
        assert code == 0, err
    return key


@pytest.mark.slow
def test_end_to_end_presence(tmp_path: Path) -> None:
    """keygen → agents add → hub → agents → status: online, disconnected, timeout, restart."""
    db = tmp_path / "hub.db"
    key = _register(tmp_path, db, "crasher", "freezer", binary=True)
    with _processes() as start:
        hub, url = _start_hub(start, db)
        assert _mode(Path(f"{db}.admin")) == 0o600

        crasher = _start_agent(start, tmp_path, url, key, "crasher")
        row = _poll_status(db, "crasher", lambda r: r["status"] == "online")
        assert row["reason"] == "connected"
        assert row["tenant_id"] == "acme"
        assert row["last_seen"] is not None
        assert row["heartbeat_timeout"] == pytest.approx(1.5)
        row = _poll_status(db, "crasher", lambda r: r["last_heartbeat_ack"] is not None)

        crasher.popen.send_signal(signal.SIGKILL)  # crash: the socket goes away
        row = _poll_status(db, "crasher", lambda r: r["status"] == "offline")
        assert row["reason"] == "disconnected"

        freezer = _start_agent(start, tmp_path, url, key, "freezer")
        _poll_status(db, "freezer", lambda r: r["status"] == "online")
        freezer.popen.send_signal(signal.SIGSTOP)  # hang: the socket stays open
        frozen_at = time.monotonic()
        row = _poll_status(db, "freezer", lambda r: r["status"] == "offline")
        assert row["reason"] == "timeout"
        assert time.monotonic() - frozen_at >= 1.0  # 0.5 s interval x 3.0
        freezer.popen.send_signal(signal.SIGCONT)
        freezer.kill()

        table = _cli("status", "--db", str(db))
        assert table.returncode == 0
        assert "LAST HEARTBEAT ACK" in table.stdout
        assert "crasher" in table.stdout

        hub.popen.send_signal(signal.SIGTERM)
        assert hub.wait(5) == 0, hub.describe()
        assert "hub listening on" not in "".join(hub.err)
        assert not Path(f"{db}.admin").exists()

    code, out, err = _run_main("status", "--db", str(db), "--json")  # the binary ran above
    assert code == 3, (out, err)
    assert "hub not running; showing last known presence from DB" in err
    rows = {row["agent_id"]: row for row in json.loads(out)}
    assert set(rows) == {"crasher", "freezer"}
    for row in rows.values():
        assert row["status"] == "offline"
        assert row["last_seen"] is not None
        assert row["source"] == "registry"
    assert rows["crasher"]["reason"] == "disconnected"

    listed = _cli("agents", "list", "--db", str(db), "--json")
    assert listed.returncode == 0
    assert all(a["last_seen"] is not None for a in json.loads(listed.stdout))


@pytest.mark.slow
def test_removing_a_key_closes_the_live_session(tmp_path: Path) -> None:
    db = tmp_path / "hub.db"
    key = _register(tmp_path, db, "doomed")
    with _processes() as start:
        hub, url = _start_hub(start, db)
        agent = _start_agent(start, tmp_path, url, key, "doomed")
        _poll_status(db, "doomed", lambda r: r["status"] == "online")

        removed = _cli("agents", "remove", "--db", str(db), "--tenant", "acme", "--agent", "doomed")
        assert removed.returncode == 0, removed.stderr
        # The hub closes the session (key revoked); the agent's reconnect is refused.
        code = agent.wait(10)
        assert code != 0
        assert "AuthenticationError" in "".join(agent.err), agent.describe()
        row = _poll_status(db, "doomed", lambda r: r["status"] == "offline")
        assert row["reason"] == "disconnected"
        assert "key removed or agent disabled" in "".join(hub.err)

        hub.popen.send_signal(signal.SIGINT)
        assert hub.wait(5) == 0, hub.describe()


@pytest.mark.slow
def test_publish_listen_and_watch(tmp_path: Path) -> None:
    db = tmp_path / "hub.db"
    key = _register(tmp_path, db, "listener", "publisher", "watched")
    with _processes() as start:
        hub, url = _start_hub(start, db)
        agent_args = ["--url", url, "--tenant", "acme", "--key", str(key)]
        # Both start at once (each interpreter start-up takes a while).
        watch = start([*CLI, "status", "--db", str(db), "--watch", "--json"])
        listen = start([*CLI, "listen", *agent_args, "--agent", "listener", "tasks.>",
                        "--count", "2"])  # fmt: skip
        watch.wait_line("[")  # the first table (JSON Lines: stdout is not a TTY)
        listen.wait_line("listening on", stream="err")
        for n, binary in ((1, True), (2, False)):  # the real command once, then in process
            code, out, err = _run("publish", *agent_args, "--agent", "publisher", "tasks.new",
                                  json.dumps({"n": n}), "--confirm", binary=binary)  # fmt: skip
            assert code == 0, err
            assert out.strip()  # the hub's message id
        assert listen.wait(10) == 0, listen.describe()
        lines = [json.loads(line) for line in listen.out]
        assert [(m["subject"], m["data"], m["sender"]) for m in lines] == [
            ("tasks.new", {"n": 1}, "publisher"),
            ("tasks.new", {"n": 2}, "publisher"),
        ]
        assert all(m["time"].endswith("Z") and len(m["time"]) == 24 for m in lines)

        _start_agent(start, tmp_path, url, key, "watched")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            tables = [json.loads(line) for line in list(watch.out) if line.startswith("[")]
            if any(r["agent_id"] == "watched" and r["status"] == "online" for r in tables[-1]):
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"watch never showed the agent online: {watch.describe()}")
        watch.popen.send_signal(signal.SIGINT)
        assert watch.wait(5) == 0, watch.describe()

        hub.popen.send_signal(signal.SIGTERM)
        assert hub.wait(5) == 0, hub.describe()


@pytest.mark.slow
def test_status_over_tls(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    server = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(server))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    db = tmp_path / "hub.db"
    with _processes() as start:
        hub = start([*CLI, "hub", "--port", "0", "--db", str(db), "--tls-cert", str(server)])
        assert hub.wait_line("hub listening on ").startswith("hub listening on wss://127.0.0.1:")
        # An untrusted certificate fails at once with a clear message (not a 10 s timeout).
        started = time.monotonic()
        code, _out, err = _run_main("status", "--db", str(db))  # in process
        assert time.monotonic() - started < 8
        assert code == 1
        assert "CERTIFICATE_VERIFY_FAILED" in err
        assert "--cafile" in err
        trusted = _cli("status", "--db", str(db), "--cafile", str(ca_file), "--json")
        assert trusted.returncode == 0, trusted.stderr
        assert json.loads(trusted.stdout) == []
        hub.popen.send_signal(signal.SIGTERM)
        assert hub.wait(5) == 0, hub.describe()


def test_the_status_table_shows_hubs_only_for_a_clusters_table() -> None:
    from artcafe_trio import PresenceRecord
    from artcafe_trio.cli._presence import _presence_json, _presence_table

    def rows(*hubs: str | None) -> list[dict[str, object]]:
        return [
            _presence_json(PresenceRecord(tenant_id="t", agent_id=f"a{i}", status="online",
                                          hub_id=hub), "hub")
            for i, hub in enumerate(hubs)
        ]  # fmt: skip

    alone = rows("hub-1", "hub-1", None)
    assert [row["hub_id"] for row in alone] == ["hub-1", "hub-1", None]
    assert "HUB" not in _presence_table(alone).split()  # one hub: the table as before
    cluster = _presence_table(rows("hub-1", "hub-2", None)).splitlines()
    assert cluster[0].split()[:5] == ["TENANT", "AGENT", "STATUS", "REASON", "HUB"]
    assert [line.split()[4] for line in cluster[1:]] == ["hub-1", "hub-2", "-"]
    assert _presence_table(alone, hubs=True).splitlines()[1].split()[4] == "hub-1"


def test_status_nats_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--nats", " , "]) == 2
    assert "--nats needs at least one NATS server URL" in capsys.readouterr().err
    assert main(["agents", "list", "--nats", ","]) == 2
    assert "--nats needs at least one NATS server URL" in capsys.readouterr().err
    assert main(["status", "--nats", "nats://127.0.0.1:1", "--nats-cert", "c.pem"]) == 1
    assert capsys.readouterr().err == "error: --nats-cert and --nats-key go together\n"
    # --watch goes with --nats now: no server there is one error line, not a usage error
    assert main(["status", "--nats", "nats://127.0.0.1:1", "--watch"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: NATS (nats://127.0.0.1:1): ") and err.count("\n") == 1


def test_status_nats_lease_rows_say_when_a_lease_is_past_its_ttl_or_gone() -> None:
    from artcafe_trio.cli._natscli import _lease_row
    from artcafe_trio.cli._presence import _hubs_table
    from artcafe_trio.cluster._records import HubLease
    from artcafe_trio.nats import KvEntry, KvOp

    value = HubLease("hub-1", ("ws://h1:8765",), 100.0, draining=True).encode()
    live = _lease_row(KvEntry("b", "h.hub-1", value, 7, KvOp.PUT, 1000.0, 10.0), 1004.25)
    assert live is not None
    assert (live["state"], live["lease_age"], live["draining"], live["urls"]) == (
        "live", 4.25, True, ["ws://h1:8765"],
    )  # fmt: skip
    late = _lease_row(KvEntry("b", "h.hub-1", value, 7, KvOp.PUT, 1000.0, 10.0), 1012.0)
    assert late is not None and late["state"] == "past_ttl"
    expired = _lease_row(KvEntry("b", "h.hub-2", b"", 9, KvOp.EXPIRED, 1010.0, None), 1011.0)
    assert expired is not None and (expired["hub_id"], expired["state"]) == ("hub-2", "expired")
    assert _lease_row(KvEntry("b", "h.hub-3", b"", 9, KvOp.DELETE, 1010.0), 1011.0) is None
    assert _lease_row(KvEntry("b", "h.hub-4", b"{", 9, KvOp.PUT, 1010.0), 1011.0) is None
    lines = _hubs_table([live, late, expired]).splitlines()
    assert lines[1].split()[:4] == ["hub-1", "ws://h1:8765", "yes", "4.2"]
    assert "past its 10 s TTL" in lines[2]
    assert "lease expired" in lines[3]


def test_the_bucket_view_keeps_the_last_revision_and_forgets_old_expiry_markers() -> None:
    """What ``status --nats --watch`` redraws from: a key's last revision wins; a hub
    that stopped (its lease deleted) leaves; an expired lease is listed as long as the
    server keeps its marker (then a fresh read would not see it either)."""
    from artcafe_trio.cli._natscli import BucketView
    from artcafe_trio.cluster._records import HubLease, PresenceClaim
    from artcafe_trio.nats import KvEntry, KvOp

    view = BucketView(("h.", "p."), marker_ttl=60.0)
    lease = HubLease("hub-1", ("ws://h1:8765",)).encode()
    assert view.apply(KvEntry("b", "h.hub-1", lease, 1, KvOp.PUT, 1000.0, 10.0))
    assert view.apply(KvEntry("b", "h.hub-2", lease, 2, KvOp.PUT, 1000.0, 10.0))
    assert not view.apply(KvEntry("b", "k.t.a", b"{}", 3, KvOp.PUT, 1000.0))  # not watched
    assert [(h["hub_id"], h["lease_age"]) for h in view.hub_rows(1002.0)] == [
        ("hub-1", 2.0), ("hub-2", 2.0),
    ]  # fmt: skip
    assert [h["lease_age"] for h in view.hub_rows(1003.5)] == [3.5, 3.5]  # ages tick
    view.apply(KvEntry("b", "h.hub-1", lease, 4, KvOp.PUT, 1003.0, 10.0))  # refreshed
    view.apply(KvEntry("b", "h.hub-2", b"", 5, KvOp.EXPIRED, 1011.0, 60.0))
    assert [(h["hub_id"], h["state"], h["lease_age"]) for h in view.hub_rows(1012.0)] == [
        ("hub-1", "live", 9.0), ("hub-2", "expired", 1.0),
    ]  # fmt: skip
    assert [h["hub_id"] for h in view.hub_rows(1072.0)] == ["hub-1"]  # marker gone by now
    view.apply(KvEntry("b", "h.hub-1", b"", 6, KvOp.DELETE, 1013.0))  # a graceful stop
    assert [h["hub_id"] for h in view.hub_rows(1014.0)] == ["hub-2"]  # hub-1 has left
    assert view.live_hubs() == 0
    claim = PresenceClaim("t", "a", "hub-1", 3, "offline", "hub_lost", 1012.5)
    view.apply(KvEntry("b", "p.t.a", claim.encode(), 7, KvOp.PUT, 1012.5))
    view.apply(KvEntry("b", "p.t.broken", b"{", 8, KvOp.PUT, 1012.5))  # skipped
    assert view.presence_rows() == [
        {"tenant_id": "t", "agent_id": "a", "status": "offline", "reason": "hub_lost",
         "session_id": None, "since": "1970-01-01T00:16:52.500Z", "last_seen": None,
         "last_heartbeat_ack": None, "heartbeat_timeout": None, "hub_id": "hub-1",
         "source": "cluster"},
    ]  # fmt: skip
    back = PresenceClaim("t", "a", "hub-2", 4, "online", "connected", 1013.0, "s-2")
    view.apply(KvEntry("b", "p.t.a", back.encode(), 9, KvOp.PUT, 1013.0))  # a new revision
    assert [(r["status"], r["hub_id"]) for r in view.presence_rows()] == [("online", "hub-2")]


def test_status_says_when_the_hub_s_cluster_view_is_degraded(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``presence_state.degraded`` (a fenced cluster hub) is one line under the table;
    the JSON list form stays a list and says it on stderr; ``--nats`` JSON has a key."""
    import io

    from artcafe_trio.cli._presence import DEGRADED_NOTE, _StatusPrinter

    row = {"tenant_id": "t", "agent_id": "a", "status": "online", "reason": "connected",
           "since": None, "last_seen": None, "last_heartbeat_ack": None, "hub_id": None,
           "source": "hub"}  # fmt: skip
    out = io.StringIO()
    _StatusPrinter(False, False, out).show([row], ("fenced",))
    assert out.getvalue().rstrip().endswith(DEGRADED_NOTE + "fenced")
    out = io.StringIO()
    _StatusPrinter(False, False, out).show([row])
    assert "degraded" not in out.getvalue()
    out = io.StringIO()
    _StatusPrinter(True, False, out).show([row], ("fenced", "claims_pending"))
    assert json.loads(out.getvalue()) == [row]
    assert capsys.readouterr().err == DEGRADED_NOTE + "fenced, claims_pending\n"
    printer = _StatusPrinter(True, False, out := io.StringIO())
    printer.hubs = []
    printer.show([row], ("fenced",))
    assert json.loads(out.getvalue())["degraded"] == ["fenced"]


@asynccontextmanager
async def status_watch(
    db: Path, monkeypatch: pytest.MonkeyPatch, *, stall_close: bool
) -> AsyncIterator[tuple[trio.Nursery, list[Any]]]:
    """``status --watch``'s admin session against the hub whose admin file is next to
    ``db``, over recorded TCP streams (``StallingStream``), once its first table is out:
    the nursery it runs in, and its streams."""
    import io

    from artcafe_trio.cli._admin import _admin_session
    from artcafe_trio.cli._presence import _StatusPrinter
    from artcafe_trio.cli._status import _read_admin_file

    from .test_agent import StallingStream

    streams: list[StallingStream] = []
    open_tcp_stream = trio.open_tcp_stream

    async def recorded_tcp_stream(*args: Any, **kwargs: Any) -> trio.abc.Stream:
        streams.append(
            StallingStream(await open_tcp_stream(*args, **kwargs), stall_close=stall_close)
        )
        return streams[-1]

    admin = _read_admin_file(f"{db}.admin")
    assert admin is not None
    monkeypatch.setattr(trio, "open_tcp_stream", recorded_tcp_stream)
    out = io.StringIO()
    printer = _StatusPrinter(as_json=False, watch=True, stream=out)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_admin_session, admin[0], admin[1], None, printer)
            while not out.getvalue():  # the first table: the session is up
                await trio.sleep(0.01)
            yield nursery, streams
    finally:
        monkeypatch.undo()


async def test_status_watch_closes_its_socket_when_stopped_while_replying_to_the_hub_s_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bounded real-socket test: the hub closes the admin session; the CLI's reply is
    stuck (trio-websocket has recorded the close) when the watch is stopped (Ctrl+C):
    its socket is closed at once, the hub does not wait close_timeout for the reply."""
    db = tmp_path / "hub.db"
    config = HubConfig(close_timeout=5.0)
    with trio.fail_after(20):
        async with open_hub(port=0, db=str(db), admin_file=f"{db}.admin", config=config) as hub:
            async with status_watch(db, monkeypatch, stall_close=True) as (nursery, streams):
                hub.close_all(1012, "restart")
                await streams[0].stalled.wait()
                nursery.cancel_scope.cancel()  # Ctrl+C
            assert streams[0].closed_at is not None
            stopping = trio.current_time()
        assert trio.current_time() - stopping < 3  # not close_timeout (5 s)


async def test_status_watch_cancelled_sends_its_close_frame_and_does_not_wait_for_a_reply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bounded real-socket test: cancelled, the admin session's reader is cancelled too;
    nothing would read the hub's reply, so none is waited for (was: 1 s)."""
    db = tmp_path / "hub.db"
    with trio.fail_after(20):
        async with open_hub(port=0, db=str(db), admin_file=f"{db}.admin"):
            async with status_watch(db, monkeypatch, stall_close=False) as (nursery, streams):
                cancelled = trio.current_time()
                nursery.cancel_scope.cancel()
            assert trio.current_time() - cancelled < 0.8  # not CLOSE_PATIENCE (1 s)
            assert streams[0].log == ["sent close", "closed"]
