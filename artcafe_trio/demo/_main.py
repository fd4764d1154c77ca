"""``artcafe-trio demo``: the whole system in one process, in about 25 seconds.

A real hub on a localhost TCP port, a temporary SQLite registry, fresh
ed25519 keys and a handful of agents, all in one trio process. The script
stages what honest presence is for::

    1/5 online   every agent connects and heartbeats; a monitor watches $presence.>
    2/5 hang     one agent's connection goes silent both ways, socket still open:
                 the hub says offline (timeout); the agent's own ACK watchdog fires too
    3/5 blip     one agent's TCP connection is reset; it is back within the
                 disconnect grace, so presence does not flap
    4/5 outage   the same agent loses its network for longer than the grace:
                 offline (disconnected), then back through exponential backoff
    5/5 leave    one agent leaves: offline (left) at once

On a terminal a live table is redrawn four times a second; otherwise (CI
logs, pipes) only timestamped event lines are printed. The summary compares
each detection time with its configured expectation, and the exit code is 0
only if all of them were met (1 otherwise, 2 for bad options, 130 on Ctrl+C).

``demo --cluster`` (:mod:`._cluster`, :mod:`._clusterstages`, :mod:`._natsserver`) stages
a story on three hubs over an embedded nats-server instead; event lines only.

The modules: ``_plan`` (settings, timeline), ``_cast`` (agents and their faulty links),
``_observe`` (presence events, presence table and health, sampled), ``_stages`` (the five
stages and their checks), ``_judge`` (the summary), ``_output`` and ``_screen`` (plain lines
or the live view), ``_runner`` (hub, agents, dashboard; the whole run). All of it is built on
the public API (the few private helpers it still needs: ``tests/test_cli_layout.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from typing import TextIO

import trio

from artcafe_trio import ArtcafeError

from .._util import collapse_exception_groups, flatten_exceptions
from ._output import _library_logs_to, _Output
from ._plan import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, make_plan
from ._runner import Demo

__all__ = ["main"]


def _interrupted(exc: BaseException) -> bool:
    return any(isinstance(e, KeyboardInterrupt) for e in flatten_exceptions(exc))


def main(args: argparse.Namespace) -> int:
    """Run the demo (``artcafe-trio demo``); returns the exit code."""
    try:
        plan = make_plan(
            duration=getattr(args, "duration", None),
            workers=getattr(args, "agents", 3),
            interval=getattr(args, "interval", 1.0),
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    stream = sys.stdout
    cluster = bool(getattr(args, "cluster", False))
    if cluster:
        from ._natsserver import MissingNatsServer, nats_server_binary

        try:
            nats_server_binary()
        except MissingNatsServer as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    live = _is_terminal(stream) and not cluster  # the cluster demo prints event lines only
    output = _Output(stream, live=live, color=live and "NO_COLOR" not in os.environ)
    try:
        with (
            _library_logs_to(output),
            tempfile.TemporaryDirectory(prefix="artcafe-demo-") as tmp,
        ):
            demo = Demo(plan, output, tmp)
            if cluster:
                from ._cluster import ClusterDemo

                demo = ClusterDemo(plan, output, tmp)
            try:
                with collapse_exception_groups():
                    return trio.run(demo.run)
            except BrokenPipeError:
                _silence_stdout()  # the reader went away (``| head``): stop quietly
                return EXIT_FAILED
            except (ArtcafeError, OSError) as exc:
                output.leave_screen()
                print(f"error: the demo failed: {exc}", file=sys.stderr)
                return EXIT_FAILED
    except KeyboardInterrupt:
        pass
    except BaseExceptionGroup as group:
        if not _interrupted(group):
            raise
    finally:
        output.leave_screen()
    print("interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


def _silence_stdout() -> None:
    """Point stdout at /dev/null so Python's final flush does not complain again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False
