"""Test clients that talk to a server on 127.0.0.1 with real sockets."""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h11
import trio
from trio_websocket import WebSocketConnection, open_websocket

#: Every wait in a test is bounded by this, so a bug fails a test instead of hanging CI.
TIMEOUT = 10


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1, for a server a test starts (coturn listens on both)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise AssertionError("no port free for both UDP and TCP")


class Client:
    """A raw WebSocket client speaking signald's JSON protocol."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.peer_id: str | None = None

    async def send(self, **message: Any) -> None:
        await self.ws.send_message(json.dumps(message))

    async def recv(self) -> dict[str, Any]:
        with trio.fail_after(TIMEOUT):
            return json.loads(await self.ws.get_message())

    async def expect(self, type_: str, **fields: Any) -> dict[str, Any]:
        message = await self.recv()
        assert message["type"] == type_, message
        for key, value in fields.items():
            assert message.get(key) == value, (key, message)
        return message

    async def join(self, room_id: str, username: str, **extra: Any) -> dict[str, Any]:
        await self.send(type="join-room", roomId=room_id, username=username, **extra)
        reply = await self.expect("joined-room", roomId=room_id, username=username)
        self.peer_id = reply["peerId"]
        return reply

    async def messages_before_pong(self) -> list[dict[str, Any]]:
        """Ping, and return everything that arrived before the pong, for busy rooms."""
        await self.send(type="ping", requestId="drain")
        skipped = []
        while (message := await self.recv()).get("requestId") != "drain":
            skipped.append(message)
        assert message["type"] == "pong"
        return skipped

    async def roundtrip_ping(self) -> None:
        """A ping/pong round trip: everything the server queued before it has arrived."""
        await self.send(type="ping", requestId="sync")
        await self.expect("pong", requestId="sync")


@asynccontextmanager
async def connect(
    port: int, *, origin: str | None = None, ssl_context: ssl.SSLContext | None = None, **kwargs: Any
) -> AsyncIterator[Client]:
    headers = [(b"Origin", origin.encode())] if origin else None
    async with open_websocket(
        "127.0.0.1", port, "/ws", use_ssl=ssl_context or False, extra_headers=headers, connect_timeout=TIMEOUT, **kwargs
    ) as ws:
        yield Client(ws)


@asynccontextmanager
async def joined_pair(port: int, room: str) -> AsyncIterator[tuple[Client, Client]]:
    """Clients "a" and "b" in ``room``, with a's ``user-joined`` for b already read."""
    async with connect(port) as a, connect(port) as b:
        await a.join(room, "a")
        await b.join(room, "b")
        await a.expect("user-joined", peerId=b.peer_id)
        yield a, b


async def http_request(
    port: int,
    method: str,
    target: str,
    body: bytes | dict[str, Any] | list[Any] | None = None,
    headers: list[tuple[str, str]] | None = None,
    *,
    source: str | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One request on a fresh connection: (status, lower-cased headers, parsed JSON or bytes).

    ``source`` is the loopback address to connect from (127.0.0.2, ...), to be another client.
    """
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            data = json.dumps(body).encode() if isinstance(body, dict | list) else (body or b"")
            all_headers = [("Host", f"127.0.0.1:{port}"), ("Connection", "close"), *(headers or [])]
            if data or method in ("POST", "PUT"):
                all_headers.append(("Content-Length", str(len(data))))
            await stream.send_all(conn.send(h11.Request(method=method, target=target, headers=all_headers)))
            if data:
                await stream.send_all(conn.send(h11.Data(data=data)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
            return await read_response(conn, stream)


async def read_response(conn: h11.Connection, stream: trio.abc.Stream) -> tuple[int, dict[str, str], Any]:
    response: h11.Response | None = None
    payload = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            payload += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            headers = {k.decode().lower(): v.decode() for k, v in response.headers}
            parsed: Any = bytes(payload)
            if headers.get("content-type") == "application/json":
                parsed = json.loads(payload)
            return response.status_code, headers, parsed


UPGRADE_REQUEST = (
    b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True, rsv: int = 0, length: int = -1
) -> bytes:
    """A client frame built by hand, for raw-socket tests; any field can be made wrong.

    Masking uses a zero key, so the payload goes out as it is. ``length`` overrides the
    length the header claims.
    """
    size = len(payload) if length < 0 else length
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mask_bit = 0x80 if masked else 0
    if size < 126:
        head += bytes([mask_bit | size])
    elif size < 2**16:
        head += bytes([mask_bit | 126]) + size.to_bytes(2, "big")
    else:
        head += bytes([mask_bit | 127]) + size.to_bytes(8, "big")
    return head + (b"\x00\x00\x00\x00" if masked else b"") + payload


def text_frame(message: dict[str, Any]) -> bytes:
    """A client text frame carrying ``message`` as JSON."""
    return frame(0x1, json.dumps(message).encode())
