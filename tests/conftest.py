"""Shared fixtures: an in-process server on port 0, the same behind one or two nodes, and clients."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from signald import Server
from signald._config import structure

from ._clients import Client, http_request
from ._topology import TOPOLOGIES, SharedRedis, Topology, serve

__all__ = ["Client", "Topology", "http_request"]


def make_config(**sections: dict[str, Any]) -> Any:
    """A config on 127.0.0.1:0 with any section overrides (``limits={"ping_interval": 1}``)."""
    tree: dict[str, Any] = {"server": {"host": "127.0.0.1", "port": 0}}
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return structure(tree)


@pytest.fixture
def server_factory(nursery: trio.Nursery) -> Callable[..., Any]:
    async def start(**sections: dict[str, Any]) -> Server:
        server = Server(make_config(**sections))
        await nursery.start(server.serve)
        return server

    return start


@pytest.fixture
async def server(server_factory: Callable[..., Any]) -> AsyncIterator[Server]:
    yield await server_factory()


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[SharedRedis]:
    """The redis-server of every two-node test (see tests/_topology.py); started when first used."""
    assert shutil.which("redis-server"), "redis-server is missing: scripts/install-test-packages installs it"
    with tempfile.TemporaryDirectory(prefix="signald-redis-", dir="/tmp") as directory:  # a short socket path
        redis = SharedRedis(Path(directory))
        try:
            yield redis
        finally:
            redis.stop()


StartTopology = Callable[..., Awaitable[Topology]]


@pytest.fixture(params=TOPOLOGIES)
async def start_topology(request: pytest.FixtureRequest, shared_redis: SharedRedis) -> AsyncIterator[StartTopology]:
    """``await start_topology(**sections)``: one server, or two nodes on Redis, with those sections."""
    cluster: dict[str, Any] = {}
    if request.param == "two-nodes":
        cluster = {"cluster": {"redis_url": shared_redis.url(), "node_timeout": 2}}
        await shared_redis.flush()
    async with trio.open_nursery() as nursery:

        async def start(**sections: dict[str, Any]) -> Topology:
            return await serve(nursery, [make_config(**cluster, **sections) for _ in range(2 if cluster else 1)])

        yield start
        nursery.cancel_scope.cancel()  # the servers stop before the next test empties Redis


@pytest.fixture
async def topology(start_topology: StartTopology) -> Topology:
    """Servers with the default config: one, or two nodes (clients alternate between them)."""
    return await start_topology()
