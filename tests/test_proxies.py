"""The README's nginx and Caddy snippets, run for real in front of signald (see ``_proxies``).

Clients connect to the proxy from different loopback addresses (127.0.0.2, 127.0.0.3, ...), as
different people would; signald sees every connection come from the proxy at 127.0.0.1. With
``limits.max_connections_per_ip = 1``, a second client can only get in if signald counts it by
the address the proxy forwarded, and a client's own ``X-Forwarded-For`` must change nothing.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from trio_websocket import ConnectionRejected, wrap_client_stream

from ._clients import TIMEOUT, Client, free_port
from ._proxies import caddy, nginx


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, ssl.SSLContext]:
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    directory = tmp_path_factory.mktemp("proxy-pki")
    cert, key = directory / "fullchain.pem", directory / "privkey.pem"
    issued.private_key_and_cert_chain_pem.write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return cert, key, client


@asynccontextmanager
async def through(
    port: int, source: str, tls: ssl.SSLContext | None, forwarded_for: str | None = None
) -> AsyncIterator[Client]:
    """A WebSocket to the proxy on ``port``, from the loopback address ``source``."""
    headers = [(b"X-Forwarded-For", forwarded_for.encode())] if forwarded_for else None
    async with trio.open_nursery() as nursery:
        with trio.fail_after(TIMEOUT):
            stream: Any = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
            if tls is not None:
                stream = trio.SSLStream(stream, tls, server_hostname="127.0.0.1")
            ws = await wrap_client_stream(nursery, stream, "127.0.0.1", "/ws", extra_headers=headers)
        try:
            yield Client(ws)
        finally:
            await ws.aclose()


def _rejection(exc: BaseException) -> ConnectionRejected | None:
    if isinstance(exc, ConnectionRejected):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _rejection(inner)) is not None:
                return found
    return None


async def refusal(port: int, source: str, tls: ssl.SSLContext | None, forwarded_for: str | None = None) -> str:
    """The handshake refusal, as "<status> <body>": trio-websocket raises it from its reader task."""
    try:
        async with through(port, source, tls, forwarded_for):
            pass
    except BaseException as exc:
        rejected = _rejection(exc)
        if rejected is None:
            raise
        return f"{rejected.status_code} {(rejected.body or b'').decode()}"
    raise AssertionError(f"a connection from {source} was accepted")


@asynccontextmanager
async def proxied(
    kind: str, tmp_path: Path, upstream: int, certificate: tuple[Path, Path, ssl.SSLContext]
) -> AsyncIterator[tuple[int, ssl.SSLContext | None]]:
    """The README's ``kind`` proxy in front of signald on ``upstream``: its port, and the client TLS context."""
    port = free_port()
    if kind == "nginx":
        cert, key, client = certificate
        async with nginx(tmp_path, port, upstream, cert, key):
            yield port, client
    else:
        async with caddy(tmp_path, port, upstream):
            yield port, None


PROXIES = ["nginx", "caddy"]


@pytest.mark.parametrize("kind", PROXIES)
async def test_signaling_through_the_proxy_counts_clients_by_their_own_address(
    kind: str, tmp_path: Path, server_factory: Callable[..., Any], certificate: Any
) -> None:
    server = await server_factory(server={"trusted_proxies": ["127.0.0.1"]}, limits={"max_connections_per_ip": 1})
    async with (
        proxied(kind, tmp_path, server.port, certificate) as (port, tls),
        through(port, "127.0.0.2", tls) as alice,
        through(port, "127.0.0.3", tls) as bob,
    ):
        await alice.join("proxied", "alice")
        await bob.join("proxied", "bob")
        await alice.expect("user-joined", peerId=bob.peer_id)
        await alice.send(type="webrtc-offer", to=bob.peer_id, sdp="v=0")
        await bob.expect("webrtc-offer", sdp="v=0", **{"from": alice.peer_id})
        await bob.send(type="ice-candidate", to=alice.peer_id, candidate=None)
        await alice.expect("ice-candidate", candidate=None, **{"from": bob.peer_id})
        # alice's address holds its one connection; a header naming someone else changes nothing.
        too_many = '429 {"error":"too-many-connections","message":"1 connections from 127.0.0.2 are open already"}'
        assert await refusal(port, "127.0.0.2", tls) == too_many
        assert await refusal(port, "127.0.0.2", tls, forwarded_for="127.0.0.9") == too_many
        # Nor can another client pose as alice to use up her allowance.
        async with through(port, "127.0.0.4", tls, forwarded_for="127.0.0.2") as carol:
            await carol.roundtrip_ping()
        await alice.roundtrip_ping()


@pytest.mark.parametrize("kind", PROXIES)
async def test_without_trusted_proxies_everyone_behind_the_proxy_is_one_address(
    kind: str, tmp_path: Path, server_factory: Callable[..., Any], certificate: Any
) -> None:
    server = await server_factory(limits={"max_connections_per_ip": 1})
    async with proxied(kind, tmp_path, server.port, certificate) as (port, tls), through(port, "127.0.0.2", tls) as a:
        await a.roundtrip_ping()
        refused = await refusal(port, "127.0.0.3", tls)
        assert refused.startswith("429 ") and "from 127.0.0.1 are open" in refused  # the proxy's address
