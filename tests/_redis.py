"""A real redis-server owned by a test: a unix socket in a temporary directory, no /etc config."""

from __future__ import annotations

import math
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

from ._clients import TIMEOUT, free_port

#: Pause between looks at observable state (a socket, a log file, /health) that no event announces.
POLL = 0.02


async def poll_until(check: Callable[[], Awaitable[bool]], what: str, within: float = TIMEOUT) -> None:
    """Look at ``check`` every ``POLL`` seconds until it holds; fail after ``within`` seconds."""
    with trio.move_on_after(within):
        for _ in range(math.ceil(within / POLL)):
            if await check():
                return
            await trio.sleep(POLL)
    raise AssertionError(f"not within {within:g} s: {what}")


@attrs.frozen
class RedisTls:
    """Redis's own TLS files (PEM): its certificate and key, and the CA its clients' certificates need."""

    cert: Path
    key: Path
    client_ca: Path


class RedisServer:
    """One redis-server on ``directory``/redis.sock; ``stop`` and ``start`` again at will.

    With ``persistent`` it keeps an append-only file in ``directory`` (fsync always, so a
    ``stop`` loses nothing); without, a restart comes back empty. With ``tls`` it also listens
    on 127.0.0.1 with TLS only, asking every client for a certificate, and ``url`` is rediss://.
    """

    def __init__(self, directory: Path, persistent: bool, tls: RedisTls | None = None) -> None:
        self.directory = directory
        self.persistent = persistent
        self.socket = directory / "redis.sock"
        self.url = f"unix://{self.socket}"
        self._tls_options: list[str] = []
        if tls is not None:
            port = free_port()
            self.url = f"rediss://127.0.0.1:{port}"
            self._tls_options = [
                "--tls-port", str(port),
                "--tls-cert-file", str(tls.cert),
                "--tls-key-file", str(tls.key),
                "--tls-ca-cert-file", str(tls.client_ca),
                "--tls-auth-clients", "yes",
            ]  # fmt: skip
        self._process: trio.Process | None = None

    def command(self) -> list[str]:
        redis = shutil.which("redis-server")
        assert redis, "redis-server is missing: scripts/install-test-packages installs it"
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        return [
            redis,
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--save", "",
            *persistence,
            "--maxmemory-policy", "noeviction",
            *self._tls_options,
        ]  # fmt: skip

    async def start(self) -> None:
        assert self._process is None
        self._process = await trio.lowlevel.open_process(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        process = self._process

        async def answers() -> bool:
            assert process.poll() is None, "redis-server exited at start"
            return await self._answers()

        await poll_until(answers, "redis-server answers PING")

    async def _answers(self) -> bool:
        try:
            stream = await trio.open_unix_socket(str(self.socket))
        except OSError:
            return False
        async with stream:
            await stream.send_all(b"PING\r\n")
            return (await stream.receive_some(64)).startswith(b"+PONG")

    async def stop(self) -> None:
        """SIGTERM, as systemd stops it (it writes what it must and exits)."""
        assert self._process is not None
        self._process.terminate()
        with trio.fail_after(TIMEOUT):
            await self._process.wait()
        self._process = None

    def pause(self) -> None:
        """SIGSTOP: still connected, but reading and answering nothing (a stuck or swamped Redis)."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()


@asynccontextmanager
async def redis_server(*, persistent: bool = False, tls: RedisTls | None = None) -> AsyncIterator[RedisServer]:
    """A fresh server in its own short-named directory (a unix socket path has ~100 bytes)."""
    with tempfile.TemporaryDirectory(prefix="signald-redis-", dir="/tmp") as directory:
        server = RedisServer(Path(directory), persistent, tls)
        await server.start()
        try:
            yield server
        finally:
            server.kill()
            if server._process is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(TIMEOUT):
                    await server._process.wait()
