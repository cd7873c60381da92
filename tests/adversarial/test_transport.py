"""Attacks below the protocol: slow heads, resets, garbage, and request smuggling."""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Callable
from typing import Any

import pytest
import trio

from signald import Server

from .._clients import TIMEOUT, UPGRADE_REQUEST, connect, frame, http_request, text_frame
from ._harness import ABUSER, honest_pair, raw_stream, read_until_closed, reset, wait_until

SLOW = {"server": {"request_timeout": 0.3}}


async def trickle(stream: trio.SocketStream, data: bytes, interval: float) -> bytes:
    """Send ``data`` a byte at a time; return what the server said when it hung up on us."""

    async def send_slowly() -> None:
        for byte in data:
            try:
                await stream.send_all(bytes([byte]))
            except trio.BrokenResourceError:
                break
            await trio.sleep(interval)  # the attack itself: one byte per interval
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_slowly)
        received = await read_until_closed(stream)
        nursery.cancel_scope.cancel()
    return received


@pytest.mark.parametrize(
    "head",
    [
        b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Padding: " + b"a" * 200 + b"\r\n\r\n",
        UPGRADE_REQUEST[:-2] + b"X-Padding: " + b"a" * 200 + b"\r\n\r\n",  # slowloris on the handshake
        b"POST /api/rooms HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\n\r\n" + b" " * 200,  # a slow body
    ],
    ids=["http-head", "websocket-handshake", "http-body"],
)
async def test_slowloris_is_cut_off(server_factory: Callable[..., Any], head: bytes) -> None:
    server = await server_factory(**SLOW)
    async with honest_pair(server) as pair, await raw_stream(server.port, source=ABUSER) as stream:
        started = trio.current_time()
        # 20 ms a byte: the whole request would take seconds; the server allows 0.3 s for it.
        received = await trickle(stream, head, 0.02)
        elapsed = trio.current_time() - started
        assert received.startswith(b"HTTP/1.1 408 "), received[:80]
        assert b"request-timeout" in received
        assert 0.3 <= elapsed < 0.3 + 1.0
        await pair.exchange()
    assert server.connections.total == 0


async def test_many_slow_clients_do_not_block_honest_ones(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(**SLOW)
    async with honest_pair(server) as pair:
        streams = [await raw_stream(server.port, source=ABUSER) for _ in range(50)]
        for stream in streams:
            await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never more
        status, _, _ = await http_request(server.port, "GET", "/health")
        assert status == 200
        await pair.exchange()
        for stream in streams:  # every one of them was answered 408 and hung up on
            assert (await read_until_closed(stream)).startswith(b"HTTP/1.1 408 ")
            await stream.aclose()


@pytest.mark.parametrize("cut", ["mid-head", "mid-frame-header", "mid-frame-payload", "after-join"])
async def test_abrupt_reset(server_factory: Callable[..., Any], cut: str) -> None:
    """With resume off, a reset member leaves at once (test_resume.py covers the grace)."""
    server = await server_factory(rooms={"resume_grace": 0})
    assert server.port
    async with honest_pair(server) as pair, connect(server.port) as witness:
        await witness.join("victim", "witness")
        stream = await raw_stream(server.port, source=ABUSER)
        if cut == "mid-head":
            await stream.send_all(UPGRADE_REQUEST[:40])
        else:
            await stream.send_all(
                UPGRADE_REQUEST + text_frame({"type": "join-room", "roomId": "victim", "username": "rst"})
            )
            await witness.expect("user-joined", username="rst")
            whole = frame(0x1, b'{"type":"ping","pad":"' + b"x" * 200 + b'"}')
            await stream.send_all({"mid-frame-header": whole[:3], "mid-frame-payload": whole[:100]}.get(cut, b""))
        await pair.exchange()
        await reset(stream)
        if cut != "mid-head":
            await witness.expect("user-left", username="rst")  # the room forgot it at once
        await wait_until(lambda: server.connections.total == 3)
        await witness.roundtrip_ping()
        await pair.exchange()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",  # a TLS ClientHello
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"\r\n\r\n\r\n",
        b"GET /health\r\n\r\n",  # HTTP/0.9
        b"GET /health HTTP/1.1\r\nHost: x\r\nHost: y\r\n\x00\r\n\r\n",
        b"GET /health HTTP/1.1\r\n" + b"X: y\r\n" * 5000 + b"\r\n",  # an endless head: 431
        random.Random(4).randbytes(100_000),
    ],
    ids=["tls", "ssh", "blank-lines", "http-0.9", "nul-header", "huge-head", "random-bytes"],
)
async def test_garbage_instead_of_http(server: Server, garbage: bytes) -> None:
    assert server.port
    async with honest_pair(server) as pair:
        stream = await raw_stream(server.port, source=ABUSER)
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):  # refused before it was all sent: fine
                await stream.send_all(garbage)
            reply = await read_until_closed(stream)
        assert re.match(rb"HTTP/1.1 4\d\d ", reply), reply[:100]  # 400, or 431 for the endless head
        await pair.exchange()


def room_request(body: bytes, framing: bytes) -> bytes:
    return b"POST /api/rooms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + framing + b"\r\n" + body


#: A second request hidden in a body: whoever frames the body differently from us would run it.
SMUGGLED = b"POST /api/rooms HTTP/1.1\r\nHost: x\r\nContent-Length: 18\r\n\r\n" + b'{"name":"smuggled"}'[:18]
CHUNKED_EMPTY = b"0\r\n\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        # CL.TE and TE.CL: both framings at once are refused, whichever comes first.
        (room_request(CHUNKED_EMPTY + SMUGGLED, b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"), 400),
        (room_request(CHUNKED_EMPTY + SMUGGLED, b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n"), 400),
        (room_request(b"", b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n"), 400),
        # Obfuscated Transfer-Encoding, duplicate or conflicting Content-Length.
        (room_request(CHUNKED_EMPTY + SMUGGLED, b"Transfer-Encoding: xchunked\r\n"), 501),
        (room_request(CHUNKED_EMPTY + SMUGGLED, b"Transfer-Encoding: chunked, identity\r\n"), 501),
        (room_request(CHUNKED_EMPTY + SMUGGLED, b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n"), 501),
        (room_request(CHUNKED_EMPTY + SMUGGLED, b"Transfer-Encoding : chunked\r\n"), 400),
        (room_request(b"{}" + SMUGGLED, b"Content-Length: 2\r\nContent-Length: 40\r\n"), 400),
        (room_request(b"{}" + SMUGGLED, b"Content-Length: +2\r\n"), 400),
        # Both framings on a WebSocket upgrade.
        (UPGRADE_REQUEST[:-2] + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_EMPTY, 400),
    ],
    ids=["cl-te", "te-cl", "cl0-te", "te-xchunked", "te-list", "te-twice", "te-space", "cl-twice", "cl-plus", "ws"],
)
async def test_request_smuggling_is_refused(server: Server, request_bytes: bytes, status: int) -> None:
    assert server.port
    async with honest_pair(server) as pair:
        stream = await raw_stream(server.port, source=ABUSER)
        async with stream:
            await stream.send_all(request_bytes)
            reply = await read_until_closed(stream)
        # One answer, an error, and the connection closed: nothing after the head was run.
        assert reply.startswith(b"HTTP/1.1 %d " % status), reply[:100]
        assert reply.count(b"HTTP/1.1 ") == 1
        assert b"connection: close" in reply.lower()
        await pair.exchange()
    _, _, listing = await http_request(server.port, "GET", "/api/rooms")
    assert listing["rooms"] == []


async def test_pipelined_requests_are_answered_in_order_not_confused(server: Server) -> None:
    """The honest counterpart: two requests back to back, each framed by Content-Length."""
    assert server.port
    body = b'{"name":"one"}'
    first = room_request(body, b"Content-Length: %d\r\n" % len(body))
    stream = await raw_stream(server.port)
    async with stream:
        await stream.send_all(first + b"GET /api/rooms HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = await read_until_closed(stream)
    assert reply.startswith(b"HTTP/1.1 201 ") and reply.count(b"HTTP/1.1 200 ") == 1
    with trio.fail_after(TIMEOUT):
        _, _, listing = await http_request(server.port, "GET", "/api/rooms")
    assert [room["name"] for room in listing["rooms"]] == ["one"]
