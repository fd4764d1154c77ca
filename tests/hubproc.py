"""Run ``artcafe-trio hub`` as a subprocess from trio tests: start, SIGKILL,
SIGSTOP/SIGCONT, restart on the same port and database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from .ports import free_port

HUB = [
    sys.executable,
    "-c",
    "from artcafe_trio.cli import main; raise SystemExit(main())",
    "hub",
]


class HubProcess:
    """One ``artcafe-trio hub`` process on a fixed port and database."""

    def __init__(self, db: Path, port: int | None = None, *extra: str) -> None:
        self.db = db
        self.port = port or free_port()
        self.extra = extra
        self.url = f"ws://127.0.0.1:{self.port}"
        self.process: trio.Process | None = None
        self.log = db.with_suffix(".log")

    async def start(self) -> None:
        """Start the hub and wait (bounded) until it listens."""
        args = [*HUB, "--host", "127.0.0.1", "--port", str(self.port), "--db", str(self.db)]
        log = self.log.open("ab")
        self.process = await trio.lowlevel.open_process(
            [*args, *self.extra], stdout=subprocess.PIPE, stderr=log
        )
        log.close()
        assert self.process.stdout is not None
        seen = b""
        with trio.fail_after(15):
            while b"hub listening on" not in seen:
                chunk = await self.process.stdout.receive_some()
                if not chunk:
                    raise RuntimeError(f"hub exited early; see {self.log}")
                seen += chunk

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)

    async def kill(self) -> None:
        """SIGKILL: no goodbye to anyone."""
        self.signal(signal.SIGKILL)
        await self.wait()

    async def terminate(self) -> int:
        """SIGTERM: graceful shutdown; returns the exit code."""
        self.signal(signal.SIGTERM)
        return await self.wait()

    async def wait(self) -> int:
        assert self.process is not None
        with trio.fail_after(15):
            code = await self.process.wait()
        if self.process.stdout is not None:
            await self.process.stdout.aclose()
        return code

    async def aclose(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.wait()
