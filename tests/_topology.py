"""The servers a behaviour test talks to: one process, or two nodes of a cluster on Redis.

A test that takes the ``topology`` fixture (or ``start_topology``, to pass config sections;
both in conftest.py) runs twice: against one signald on its own, and against two nodes on a
real redis-server, each node a ``Server`` in the test's process with its own Redis link,
node id and port. Clients pick
their node with ``topology.port(i)``: client ``i`` talks to node ``i % len(ports)``, so with
two nodes consecutive clients sit on different nodes, and with one process they all share
it. Both runs must pass unchanged: that is the promise that a cluster behaves, for every
client, as one server. Clients on different nodes see events at different times, so these
tests wait on events (frames, bounded polls of REST), never on sleeps.

One redis-server serves the whole session (started on first use, stopped at the end). Each
two-node test empties it (``FLUSHALL``) before its nodes start, when the previous test's
nodes have stopped (a test's servers run in its fixture's nursery, cancelled at teardown),
so nothing of one test reaches the next.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from signald import Server

from ._clients import TIMEOUT, Client, connect
from ._redis import POLL, RedisServer, poll_until

TOPOLOGIES = ["one-process", "two-nodes"]


class SharedRedis:
    """One redis-server for the session, without persistence, started when first asked for."""

    def __init__(self, directory: Path) -> None:
        self._server = RedisServer(directory, persistent=False)
        self._process: subprocess.Popen[bytes] | None = None

    def url(self) -> str:
        """Its URL; the first call starts it (a few milliseconds, blocking: once a session)."""
        if self._process is None:
            self._process = subprocess.Popen(
                self._server.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            deadline = time.monotonic() + TIMEOUT
            while self._command(b"PING") != b"+PONG":
                assert self._process.poll() is None, "redis-server exited at start"
                assert time.monotonic() < deadline, f"redis-server did not answer PING within {TIMEOUT} s"
                time.sleep(POLL)  # a start-up wait for a process (no event announces it)
        return self._server.url

    def _command(self, command: bytes) -> bytes | None:
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as client:
            client.settimeout(TIMEOUT)
            client.connect(str(self._server.socket))
            client.sendall(command + b"\r\n")
            return client.recv(64).strip()
        return None

    async def flush(self) -> None:
        """Empty it: the nodes of the previous test have stopped."""
        stream = await trio.open_unix_socket(str(self._server.socket))
        async with stream:
            await stream.send_all(b"FLUSHALL\r\n")
            with trio.fail_after(TIMEOUT):
                assert (await stream.receive_some(64)).startswith(b"+OK")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


@attrs.frozen
class Topology:
    """The servers of one test and the port each client uses."""

    servers: tuple[Server, ...]

    @property
    def ports(self) -> list[int]:
        return [server.port for server in self.servers if server.port]

    def server(self, i: int) -> Server:
        """Client ``i``'s node itself (for its connection count)."""
        return self.servers[i % len(self.servers)]

    def port(self, i: int) -> int:
        """Client ``i``'s node: clients alternate between the nodes."""
        ports = self.ports
        return ports[i % len(ports)]

    def connect(self, i: int, **kwargs: Any) -> contextlib.AbstractAsyncContextManager[Client]:
        """A WebSocket client of client ``i``'s node."""
        return connect(self.port(i), **kwargs)

    @asynccontextmanager
    async def joined_pair(self, room: str) -> AsyncIterator[tuple[Client, Client]]:
        """Clients "a" (node 0) and "b" (node 1) in ``room``, a's ``user-joined`` for b read."""
        async with self.connect(0) as a, self.connect(1) as b:
            await a.join(room, "a")
            await b.join(room, "b")
            await a.expect("user-joined", peerId=b.peer_id)
            yield a, b


async def serve(nursery: trio.Nursery, configs: list[Any]) -> Topology:
    """A server per config in ``nursery``, returned once listening and (cluster) connected to Redis."""
    servers = []
    for config in configs:
        server = Server(config)
        await nursery.start(server.serve)
        servers.append(server)

    async def connected() -> bool:
        return not any(server.hub.problem for server in servers)

    await poll_until(connected, "every node is connected to Redis")
    return Topology(tuple(servers))
