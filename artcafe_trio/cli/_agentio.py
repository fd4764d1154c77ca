"""``publish`` and ``listen``: poke at a running hub as an agent (``open_agent``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Callable
from typing import Any

from artcafe_trio import AuthenticationError, ConnectionLost, ProtocolError
from artcafe_trio.protocol import validate_pattern, validate_subject

from ._common import DEFAULT_URL, EXIT_OK, CliError, _iso, _note, _ssl_context
from ._keycmd import _load_key_for_cli
from ._problems import _connection_problem

__all__ = ["_cmd_listen", "_cmd_publish"]


def _agent_url(args: argparse.Namespace) -> str:
    """The hub URL the agent will use (as ``open_agent`` resolves it)."""
    url: str = args.url or os.environ.get("ARTCAFE_URL") or DEFAULT_URL
    return url


def _valid(check: Callable[[str], str], value: str) -> str:
    """``value`` checked before connecting: one ``error:`` line instead of a hub refusal."""
    try:
        return check(value)
    except ProtocolError as exc:
        raise CliError(exc.message) from None


def _run_agent(args: argparse.Namespace, run: Callable[[], Any]) -> Any:
    """``trio.run(run)``, with a failed connection told in words, not reprs, and a refused
    key followed by what to check."""
    import trio

    try:
        return trio.run(run)
    except ConnectionLost as exc:
        raise CliError(_connection_problem(exc, _agent_url(args))) from None
    except AuthenticationError as exc:
        if exc.code == "hub_certificate_invalid":
            raise CliError(f"{exc} (pass --cafile to trust its CA)") from None
        key = os.path.abspath(os.path.expanduser(args.key))
        raise CliError(
            f"{exc}\nhint: check 'artcafe-trio agents list --tenant {args.tenant}' on the hub"
            f" and the key's fingerprint ('artcafe-trio keygen --fingerprint {key}')"
        ) from None


def _agent_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    key = _load_key_for_cli(args.key, args.password_env)
    assert key is not None
    kwargs: dict[str, Any] = {
        "url": _agent_url(args),
        "tenant_id": args.tenant,
        "agent_id": args.agent,
        "private_key": key,
        "heartbeat_interval": 30,
    }
    context = _ssl_context(_agent_url(args), args.cafile)
    if context is not None:
        kwargs["ssl_context"] = context
    return kwargs


def _cmd_publish(args: argparse.Namespace) -> int:
    subject = _valid(validate_subject, args.subject)
    try:
        data = json.loads(args.data)
    except ValueError as exc:
        raise CliError(
            f"JSON_DATA is not valid JSON ({exc}); quote a string like this: '\"text\"'"
        ) from None
    kwargs = _agent_kwargs(args)

    async def run() -> str | None:
        from artcafe_trio import open_agent

        # One shot: fail at once if the hub is unreachable instead of backing off.
        async with open_agent(auto_reconnect=False, **kwargs) as agent:
            # Always wait for the hub's answer, so a refusal is an exit code, not a log line.
            return await agent.publish(subject, data, confirm=True)

    message_id = _run_agent(args, run)
    if args.confirm and message_id is not None:
        print(message_id)
    return EXIT_OK


def _cmd_listen(args: argparse.Namespace) -> int:
    pattern = _valid(validate_pattern, args.pattern)
    kwargs = _agent_kwargs(args)

    async def run() -> None:
        import trio

        from artcafe_trio import Message, open_agent

        done = trio.Event()
        seen = 0

        def handler(subject: str, data: Any, message: Message) -> None:
            # Handlers of one subscription run in order: the lines come out in order.
            nonlocal seen
            if done.is_set():
                return
            line = {
                "subject": message.subject,
                "data": message.data,
                "sender": message.sender,
                "time": _iso(message.time),
            }
            print(json.dumps(line), flush=True)
            seen += 1
            if args.count is not None and seen >= args.count:
                done.set()

        # The first connection fails fast (nothing to resume yet); once listening, a lost
        # connection is retried with backoff like any agent's.
        async with open_agent(retry_first_connect=False, **kwargs) as agent:
            await agent.subscribe(pattern, handler)
            _note(f"listening on {pattern!r} (Ctrl+C to stop)")
            await done.wait()

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C is how listen ends: exit 0
        _run_agent(args, run)
    return EXIT_OK
