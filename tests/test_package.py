"""Packaging tests: public names, the trio-free protocol core, py.typed."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
import subprocess
import sys
import textwrap
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
    from artcafe_trio.protocol import _backoff, _codes, _frames, _keys, _subjects

    private = [_backoff, _codes, _frames, _keys, _subjects]
    for name in artcafe_trio.protocol.__all__:
        obj = getattr(artcafe_trio.protocol, name)
        assert any(getattr(m, name, None) is obj for m in private), name


def test_public_errors_share_one_root() -> None:
    for name in artcafe_trio.__all__:
        obj = getattr(artcafe_trio, name)
        if (
            isinstance(obj, type)
            and issubclass(obj, Exception)
            and obj.__module__.endswith("_errors")
        ):
            assert issubclass(obj, artcafe_trio.ArtcafeError), name


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
