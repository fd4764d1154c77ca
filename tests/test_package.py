"""Packaging tests: public names, the trio-free protocol core, py.typed."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

import artcafe_trio
import artcafe_trio.protocol


def isort_key(name: str) -> tuple[int, str]:
    """The order ruff's RUF022 uses for ``__all__``: CONSTANTS, then Classes, then functions."""
    if name.isupper():
        return (0, name)
    if name[0].isupper():
        return (1, name)
    return (2, name)


@pytest.mark.parametrize("module", [artcafe_trio, artcafe_trio.protocol], ids=lambda m: m.__name__)
def test_all_is_sorted_unique_and_resolvable(module: ModuleType) -> None:
    names = list(module.__all__)
    assert names == sorted(names, key=isort_key)
    assert len(set(names)) == len(names)
    for name in names:
        assert getattr(module, name) is not None, name
        assert name in dir(module)


def test_lazy_names_resolve_to_the_private_modules() -> None:
    from artcafe_trio.agent import _agent, _compat
    from artcafe_trio.hub import _hub

    assert artcafe_trio.open_agent is _agent.open_agent
    assert artcafe_trio.Hub is _hub.Hub
    assert artcafe_trio.CloseCode is _hub.CloseCode
    assert artcafe_trio.HeartbeatAgent is _compat.HeartbeatAgent
    with pytest.raises(AttributeError, match="no_such_name"):
        artcafe_trio.no_such_name  # noqa: B018


def test_protocol_reexports_the_same_objects() -> None:
    from artcafe_trio.protocol import _backoff, _codes, _frames, _keys, _subjects, client, server

    private = [_backoff, _codes, _frames, _keys, _subjects, client, server]
    for name in artcafe_trio.protocol.__all__:
        obj = getattr(artcafe_trio.protocol, name)
        assert any(getattr(m, name, None) is obj for m in private), name


def test_public_errors_share_one_root() -> None:
    errors = [
        getattr(artcafe_trio, name) for name in artcafe_trio.__all__
        if isinstance(getattr(artcafe_trio, name), type)
        and issubclass(getattr(artcafe_trio, name), Exception)
    ]  # fmt: skip
    assert len(errors) >= 15
    for error in errors:
        assert issubclass(error, artcafe_trio.ArtcafeError), error


def test_every_public_name_reports_its_public_home() -> None:
    for name in artcafe_trio.__all__:
        obj = getattr(artcafe_trio, name)
        module = getattr(obj, "__module__", None)
        if module is not None and module.startswith("artcafe_trio"):
            assert module == "artcafe_trio", (name, module)
    assert repr(artcafe_trio.ConnectionLost) == "<class 'artcafe_trio.ConnectionLost'>"


def test_version_matches_the_distribution() -> None:
    assert artcafe_trio.__version__ == importlib.metadata.version("artcafe-trio")


def test_py_typed_is_shipped() -> None:
    marker = importlib.resources.files("artcafe_trio") / "py.typed"
    assert marker.is_file()


TRIO_FREE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["trio"] = None
    sys.modules["trio_websocket"] = None

    import artcafe_trio.protocol as p
    import artcafe_trio

    assert sys.modules["trio"] is None, "trio was really imported"
    assert sys.modules["trio_websocket"] is None
    assert not any(
        name.startswith(("trio.", "trio_websocket.")) for name in sys.modules
    ), "a trio submodule was imported"
    assert "artcafe_trio.hub._hub" not in sys.modules
    assert "artcafe_trio.agent._agent" not in sys.modules

    frame = p.decode('{"type":"publish","subject":"tasks.new","data":{"n":1},"id":"p1"}')
    assert frame == p.Publish(subject="tasks.new", data={"n": 1}, id="p1"), frame
    assert p.decode(p.encode(p.Heartbeat(seq=3))) == p.Heartbeat(seq=3)
    try:
        p.decode("{")
    except artcafe_trio.ProtocolError as exc:
        assert exc.code == "invalid_json"
    else:
        raise AssertionError("decode accepted '{'")

    key = p.generate_private_key(p.ALGORITHM_ED25519)
    signature = key.sign_auth(tenant_id="acme", agent_id="worker-1", nonce="n0nce")
    public = p.parse_public_key(key.public_key.to_openssh("worker-1"))
    assert public.verify_auth(signature, tenant_id="acme", agent_id="worker-1", nonce="n0nce")
    assert not public.verify_auth(signature, tenant_id="acme", agent_id="worker-2", nonce="n0nce")
    assert p.auth_payload("acme", "worker-1", "n0nce") == (
        b"artcafe-trio/v1 auth\\nacme\\nworker-1\\nn0nce"
    )
    assert p.subject_matches("tasks.*", "tasks.new")
    assert list(p.Backoff(jitter=False, max_attempts=3).delays(__import__("random").Random()))

    # The names that need trio fail loudly, and only when used.
    try:
        artcafe_trio.open_hub
    except ImportError:
        pass
    else:
        raise AssertionError("open_hub imported without trio")
    print("trio-free ok")
    """
)


def test_protocol_core_imports_without_trio() -> None:
    result = subprocess.run(
        [sys.executable, "-c", TRIO_FREE_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "trio-free ok"


def test_hub_names_report_their_public_home() -> None:
    for name in ("Hub", "HubConfig", "open_hub", "serve_hub"):
        assert getattr(artcafe_trio, name).__module__ == "artcafe_trio", name
    assert repr(artcafe_trio.Hub) == "<class 'artcafe_trio.Hub'>"


def test_hub_is_made_by_its_factories_only() -> None:
    with pytest.raises(TypeError, match=r"open_hub\(\).*serve_hub\(\)"):
        artcafe_trio.Hub()
    with pytest.raises(TypeError, match="not constructed directly"):
        artcafe_trio.Hub(artcafe_trio.Registry.open(":memory:"), artcafe_trio.HubConfig())


def test_open_hub_and_serve_hub_have_the_same_typed_keyword_only_signature() -> None:
    import inspect

    import attrs

    opened = inspect.signature(artcafe_trio.open_hub)
    served = inspect.signature(artcafe_trio.serve_hub)
    assert [p for p in served.parameters if p not in opened.parameters] == ["task_status"]
    for name, param in opened.parameters.items():
        assert param.kind is inspect.Parameter.KEYWORD_ONLY, name
        assert param.annotation is not inspect.Parameter.empty, name
        assert param.default is not inspect.Parameter.empty, name
        assert served.parameters[name].default == param.default, name
        assert served.parameters[name].annotation == param.annotation, name
    assert opened.parameters["port"].default == 0
    assert opened.parameters["host"].default == "127.0.0.1"
    config = artcafe_trio.HubConfig()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.hub_id = "other"  # type: ignore[misc]


# --------------------------------------------------------------------------- typed public API

REHOMED = [
    "Agent",
    "AgentHealth",
    "AgentState",
    "FullMessageHandler",
    "HeartbeatAgent",
    "MessageHandler",
    "SimpleAgent",
    "Transport",
    "open_agent",
    "run_agent",
]


@pytest.mark.parametrize("name", REHOMED)
def test_public_agent_names_live_in_the_package_root(name: str) -> None:
    assert getattr(artcafe_trio, name).__module__ == "artcafe_trio"


def test_agent_is_built_by_factories_only() -> None:
    with pytest.raises(TypeError, match="open_agent"):
        artcafe_trio.Agent()
    with pytest.raises(TypeError, match="run_agent"):
        artcafe_trio.Agent(agent_id="a1", tenant_id="t")  # the old constructor's keywords


def _keywords(function: object) -> dict[str, object]:
    import inspect

    params = inspect.signature(function).parameters.values()  # type: ignore[arg-type]
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}


def test_the_agent_entry_points_take_the_same_options() -> None:
    from artcafe_trio.testing import TestHub

    options = _keywords(artcafe_trio.open_agent)
    assert "heartbeat_interval" in options and options["heartbeat_interval"] == 30.0
    assert not any(
        p.kind is p.VAR_KEYWORD
        for p in __import__("inspect").signature(artcafe_trio.open_agent).parameters.values()
    )
    run = _keywords(artcafe_trio.run_agent)
    assert run.pop("task_status") is not None
    assert run == {k: v for k, v in options.items() if k != "stop_on_signals"}
    kit = _keywords(TestHub.open_agent)
    assert kit["tenant_id"] == "test"
    assert {k: v for k, v in kit.items() if k != "tenant_id"} == {
        k: v for k, v in options.items() if k not in ("agent_id", "tenant_id")
    }
    # HeartbeatAgent: the SDK's names positionally, every other option as a keyword.
    import inspect

    sdk = inspect.signature(artcafe_trio.HeartbeatAgent).parameters
    assert list(sdk)[:7] == [
        "agent_id", "private_key_path", "organization_id", "url", "heartbeat_interval",
        "heartbeat_timeout_multiplier", "auto_reconnect",
    ]  # fmt: skip
    assert set(sdk) == set(options) - {"stop_on_signals"}
    simple = inspect.signature(artcafe_trio.SimpleAgent).parameters
    assert list(simple)[:5] == [
        "agent_id", "private_key_path", "organization_id", "url", "auto_reconnect",
    ]  # fmt: skip
    assert "heartbeat_interval" not in simple


def test_open_test_hub_takes_every_hub_config_field() -> None:
    import attrs

    from artcafe_trio.testing import open_test_hub

    fields = {f.name for f in attrs.fields(artcafe_trio.HubConfig)}
    keywords = _keywords(open_test_hub)
    assert keywords.pop("registry") is None
    assert set(keywords) == fields
    assert set(keywords.values()) == {None}  # HubConfig's own defaults apply


BAD_SNIPPET = """
from artcafe_trio import generate_private_key, open_agent


async def main() -> None:
    async with open_agent(
        agent_id=1, tenant_id="t", private_key=generate_private_key(), heartbeat_intervall=5
    ) as agent:
        await agent.publish("a.b", 1)
"""

GOOD_SNIPPET = """
import functools
from typing import Any

import trio

from artcafe_trio import (
    Agent, HeartbeatAgent, Message, generate_private_key, open_agent, run_agent,
)
from artcafe_trio.testing import open_test_hub


async def main() -> None:
    key = generate_private_key()
    async with open_agent(
        agent_id="a1", tenant_id="t", private_key=key, heartbeat_interval=5
    ) as agent:
        @agent.on_message("a.*")
        async def handler(subject: str, data: Any) -> None: ...

        def full(subject: str, data: Any, message: Message) -> None: ...

        await agent.subscribe("b.*", full)
        await agent.publish("a.b", 1)
    async with trio.open_nursery() as nursery:
        started: Agent = await nursery.start(
            functools.partial(run_agent, agent_id="a2", tenant_id="t", private_key=key)
        )
        started.stop()
    sdk = HeartbeatAgent("a3", None, "org", private_key=key, heartbeat_interval=10.0)
    await sdk.publish("a.b", {"x": 1})
    async with open_test_hub(disconnect_grace=0) as hub:
        async with hub.open_agent("a4", heartbeat_interval=None) as kit_agent:
            kit_agent.health()
"""


def test_mypy_strict_catches_a_misspelled_keyword_and_a_wrong_type(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text(BAD_SNIPPET)
    (tmp_path / "good.py").write_text(GOOD_SNIPPET)
    result = subprocess.run(
        [
            sys.executable, "-m", "mypy", "--strict", "--no-incremental",
            "--cache-dir", str(tmp_path / "cache"), "bad.py", "good.py",
        ],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
    )  # fmt: skip
    out = result.stdout
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert not [line for line in errors if line.startswith("good.py")], out
    bad = [line for line in errors if line.startswith("bad.py")]
    assert any('Unexpected keyword argument "heartbeat_intervall"' in line for line in bad), out
    assert any('"agent_id"' in line and '"int"' in line and '"str"' in line for line in bad), out
    assert result.returncode == 1


ROOT = Path(__file__).resolve().parent.parent


def test_the_docs_lead_to_the_examples_and_the_changelog() -> None:
    """Issue 15 item 12: the README links ``examples/`` and gives the quick test subset;
    the site's navigation has an Examples and a Changelog page, which say what they
    should (every example script; the changelog itself)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "[`examples/`](examples/)" in readme
    assert "(docs/examples.md)" in readme
    assert 'pytest -m "not slow"' in readme
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8").split("\nnav:\n", 1)[1]
    nav = nav.split("\n\n", 1)[0].split("\nplugins:", 1)[0]
    assert "  - Examples: examples.md\n" in nav
    assert nav.rstrip().endswith("  - Changelog: changelog.md")
    examples = (ROOT / "docs" / "examples.md").read_text(encoding="utf-8")
    scripts = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
    assert scripts and [s for s in scripts if f"`{s}`" not in examples] == []
    changelog = (ROOT / "docs" / "changelog.md").read_text(encoding="utf-8")
    assert changelog.strip() == "<!-- include: CHANGELOG.md -->"
