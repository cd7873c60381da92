"""Shared fixtures: an in-process server on port 0, and small WebSocket/HTTP clients."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio

from signald import Server
from signald._config import structure

from ._clients import Client, http_request

__all__ = ["Client", "http_request"]


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
