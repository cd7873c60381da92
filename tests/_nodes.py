"""signald processes for the cluster tests: N nodes on one Redis, or one process on its own."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from ._clients import TIMEOUT, http_request
from ._process import ROOT, SIGNALD, SYSTEMD_VARIABLES
from ._redis import poll_until

#: Short, so that a dead node is noticed within a test's time bound.
NODE_TIMEOUT = 2.0


def toml(tree: dict[str, dict[str, Any]]) -> str:
    """Enough TOML for a config file: tables of strings, numbers and booleans."""
    lines = []
    for section, values in tree.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


class Node:
    """One signald process; its log goes to a file, so a chatty node never blocks on a pipe."""

    def __init__(self, process: trio.Process, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path
        self.port = 0

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_for_log(self, pattern: str) -> re.Match[str]:
        found: list[re.Match[str]] = []

        async def logged() -> bool:
            assert self.process.poll() is None, f"signald exited: {self.log}"
            found[:] = [match] if (match := re.search(pattern, self.log)) else []
            return bool(found)

        await poll_until(logged, f"signald logs {pattern!r}")
        return found[0]

    async def health(self) -> dict[str, Any]:
        status, _, body = await http_request(self.port, "GET", "/health")
        assert status == 200, body
        return body

    async def wait_until_healthy(self) -> None:
        """Listening is not enough in cluster mode: it must have reached Redis too."""

        async def healthy() -> bool:
            return (await self.health())["status"] == "healthy"

        await poll_until(healthy, "signald is healthy")

    async def ready(self, healthy: bool) -> None:
        """Listening, and with ``healthy`` (in cluster mode) connected to Redis."""
        self.port = int((await self.wait_for_log(r"listening on 127\.0\.0\.1:(\d+)")).group(1))
        if healthy:
            await self.wait_until_healthy()

    def kill(self) -> None:
        """``kill -9``: no leave, no goodbye; Redis hears nothing more from it."""
        if self.process.returncode is None:
            self.process.kill()


@asynccontextmanager
async def spawn_node(directory: Path, name: str, tree: dict[str, dict[str, Any]]) -> AsyncIterator[Node]:
    """Start a node (without waiting for it: see ``Node.ready``); stopped when the block ends."""
    config = directory / f"{name}.toml"
    config.write_text(toml(tree))
    log_path = directory / f"{name}.log"
    with open(log_path, "wb") as log_file:  # noqa: ASYNC230 (a local file, opened once per node)
        process = await trio.lowlevel.open_process(
            [*SIGNALD, "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stderr=log_file,
            env={k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES},
            cwd=ROOT,
        )
    try:
        yield Node(process, log_path)
    finally:
        if process.returncode is None:
            process.terminate()
            with trio.CancelScope(shield=True), trio.move_on_after(TIMEOUT) as scope:
                await process.wait()
            if scope.cancelled_caught:
                process.kill()


NodesFactory = Callable[..., Any]


@asynccontextmanager
async def node_factory(directory: Path, redis_url: str | None) -> AsyncIterator[NodesFactory]:
    """``await start(count, rooms={...})`` -> nodes, all stopped when the block ends.

    They are returned once listening and (unless ``healthy=False``) connected to Redis.

    With ``redis_url`` the nodes form a cluster; without, ``count`` must be 1.
    """
    async with AsyncExitStack() as stack:
        started = 0

        async def start(count: int, *, healthy: bool = True, **sections: dict[str, Any]) -> list[Node]:
            nonlocal started
            tree: dict[str, dict[str, Any]] = {"server": {"host": "127.0.0.1", "port": 0}, "log": {"level": "info"}}
            if redis_url is not None:
                tree["cluster"] = {"redis_url": redis_url, "node_timeout": NODE_TIMEOUT}
            else:
                assert count == 1, "several processes need a cluster"
            for name, values in sections.items():
                tree.setdefault(name, {}).update(values)
            nodes = []
            for _ in range(count):  # all start at once: a process takes a second or two to import
                started += 1
                nodes.append(await stack.enter_async_context(spawn_node(directory, f"node{started}", tree)))
            for node in nodes:
                await node.ready(healthy)
            return nodes

        yield start
