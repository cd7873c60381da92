"""signald as a real process, and a test-owned socket standing in for systemd's $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from ._clients import TIMEOUT

ROOT = Path(__file__).parent.parent
SIGNALD = (sys.executable, "-m", "signald")
#: What systemd may have set for the test runner itself; a daemon under test gets only the test's own.
SYSTEMD_VARIABLES = {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "JOURNAL_STREAM"}
#: Bound on messages read while waiting for one kind, so a chatty daemon cannot loop a test forever.
MAX_MESSAGES = 1000


class NotifySocket:
    """Receives what signald sends with sd_notify(3), as systemd would."""

    def __init__(self, sock: trio.socket.SocketType, address: str) -> None:
        self._sock = sock
        #: The value for $NOTIFY_SOCKET (a path, or ``@name`` for an abstract socket).
        self.address = address

    async def receive(self) -> dict[str, str]:
        """The next message, as its ``KEY=value`` assignments."""
        with trio.fail_after(TIMEOUT):
            data = await self._sock.recv(65536)
        return dict(line.split("=", 1) for line in data.decode().splitlines())

    async def wait_for(self, key: str) -> dict[str, str]:
        """The next message that has ``key``, skipping others (such as STATUS= updates)."""
        for _ in range(MAX_MESSAGES):
            message = await self.receive()
            if key in message:
                return message
        raise AssertionError(f"no {key} in {MAX_MESSAGES} messages")


@asynccontextmanager
async def notify_socket(directory: Path | None = None) -> AsyncIterator[NotifySocket]:
    """A datagram socket at ``directory``/notify, or an abstract one if ``directory`` is None."""
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
    with sock:
        if directory is None:
            name = f"signald-test-{os.getpid()}-{id(sock)}"
            await sock.bind("\0" + name)
            yield NotifySocket(sock, "@" + name)
        else:
            path = str(directory / "notify")
            await sock.bind(path)
            yield NotifySocket(sock, path)


class Daemon:
    def __init__(self, process: trio.Process) -> None:
        assert process.stderr is not None
        self.process = process
        self._stderr = process.stderr
        #: Everything read from its stderr so far.
        self.log = b""

    async def wait_for_log(self, pattern: bytes) -> re.Match[bytes]:
        with trio.fail_after(TIMEOUT):
            while not (match := re.search(pattern, self.log)):
                chunk = await self._stderr.receive_some(65536)
                assert chunk, f"exited before logging {pattern!r}: {self.log.decode(errors='replace')}"
                self.log += chunk
        return match

    async def port(self) -> int:
        return int((await self.wait_for_log(rb"listening on 127\.0\.0\.1:(\d+)")).group(1))

    async def stop(self) -> int:
        """SIGTERM, then read its stderr to the end; its exit status."""
        self.process.send_signal(signal.SIGTERM)
        return await self.wait()

    async def wait(self) -> int:
        with trio.fail_after(TIMEOUT):
            while chunk := await self._stderr.receive_some(65536):
                self.log += chunk
            return await self.process.wait()


@asynccontextmanager
async def run_signald(
    *args: str, env: dict[str, str] | None = None, prefix: Sequence[str] = ()
) -> AsyncIterator[Daemon]:
    """``signald ARGS`` (after ``prefix``, e.g. systemd-socket-activate), killed if still running at the end."""
    process = await trio.lowlevel.open_process(
        [*prefix, *SIGNALD, *args],
        stderr=subprocess.PIPE,
        env={**{k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}, **(env or {})},
        cwd=ROOT,
    )
    try:
        yield Daemon(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
