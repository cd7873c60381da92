"""What every attack test needs: an honest pair to keep watch, and clients that misbehave.

Each attack runs against a real server on 127.0.0.1 while two honest peers in a room of their
own relay numbered offers both ways. The pair checks every frame it receives against the next
number it expects, so a single lost, duplicated, reordered or stray frame fails the test; it
exchanges before the attack, while the abuser is still at it, and afterwards, and the server
must answer ``/health`` with 200 at the end.

Abusers connect from other loopback addresses (127.0.0.2, ...) when per-address limits are
under test, so they never share a count with the honest pair on 127.0.0.1.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio.testing
import wsproto
import wsproto.events as ev

from signald import Server

from .._clients import TIMEOUT, Client, connect, http_request

ABUSER = "127.0.0.2"


async def assert_healthy(port: int) -> None:
    status, _, body = await http_request(port, "GET", "/health")
    assert status == 200 and body["status"] == "healthy", (status, body)


class HonestPair:
    """Two members of room ``honest`` relaying numbered offers; any loss or disorder fails."""

    def __init__(self, alice: Client, bob: Client) -> None:
        self.alice = alice
        self.bob = bob
        self.sent = {id(alice): 0, id(bob): 0}
        self.received = {id(alice): 0, id(bob): 0}

    async def exchange(self, count: int = 5) -> None:
        """``count`` offers each way; each must be the very next one its receiver expects."""
        for sender, receiver in ((self.alice, self.bob), (self.bob, self.alice)):
            for _ in range(count):
                await sender.send(type="webrtc-offer", to=receiver.peer_id, sdp=f"seq {self.sent[id(sender)]}")
                self.sent[id(sender)] += 1
            for _ in range(count):
                expected = self.received[id(receiver)]
                message = await receiver.recv()
                assert message == {"type": "webrtc-offer", "from": sender.peer_id, "sdp": f"seq {expected}"}, message
                self.received[id(receiver)] += 1


@asynccontextmanager
async def honest_pair(server: Server, room: str = "honest", **join: Any) -> AsyncIterator[HonestPair]:
    """The pair, joined and exchanging; on a clean exit, one more exchange and a health check."""
    assert server.port
    async with connect(server.port) as alice, connect(server.port) as bob:
        await alice.join(room, "alice", **join)
        await bob.join(room, "bob", **join)
        await alice.expect("user-joined", username="bob")
        pair = HonestPair(alice, bob)
        await pair.exchange()
        yield pair
        await pair.exchange()
        assert pair.sent == pair.received
    await assert_healthy(server.port)


async def raw_stream(port: int, *, source: str | None = None, rcvbuf: int | None = None) -> trio.SocketStream:
    """A TCP connection to the server, from ``source``, with a small receive buffer if asked."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connecting, so the window the server sees is small from the start
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if source is not None:
        await sock.bind((source, 0))
    with trio.fail_after(TIMEOUT):
        await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def reset(stream: trio.SocketStream) -> None:
    """Close with a TCP RST instead of a FIN: SO_LINGER with a zero timeout."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


async def read_until_closed(stream: trio.abc.ReceiveStream, limit: int = 1 << 20) -> bytes:
    """Everything the server sends until it closes (at most ``limit`` bytes)."""
    received = b""
    with trio.fail_after(TIMEOUT):
        while len(received) < limit and (chunk := await stream.receive_some(65536)):
            received += chunk
    return received


class RawWebSocket:
    """A WebSocket client that sends whatever bytes it is told, and parses what comes back.

    wsproto parses the server's frames; the frames we send are built by hand (``frame``), so
    they can be as broken as the attack needs.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self._events: list[ev.Event] = []
        self._text = ""

    @classmethod
    async def open(cls, port: int, *, rcvbuf: int | None = None) -> RawWebSocket:
        """Connected and upgraded; raises AssertionError if the handshake was refused."""
        raw = cls(await raw_stream(port, rcvbuf=rcvbuf))
        await raw.stream.send_all(raw._ws.send(ev.Request(host="127.0.0.1", target="/ws")))
        event = await raw.next_event()
        assert isinstance(event, ev.AcceptConnection), event
        return raw

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def next_event(self) -> ev.Event:
        """The next complete event: whole text messages are joined; EOF is a ``None`` close."""
        with trio.fail_after(TIMEOUT):
            while True:
                for event in self._ws.events():
                    if isinstance(event, ev.TextMessage):
                        self._text += event.data
                        if not event.message_finished:
                            continue
                        event = ev.TextMessage(self._text)
                        self._text = ""
                    return event
                data = await self.stream.receive_some(65536)
                self._ws.receive_data(data or None)

    async def recv(self) -> dict[str, Any]:
        event = await self.next_event()
        assert isinstance(event, ev.TextMessage), event
        return json.loads(event.data)

    async def expect_close(self) -> int:
        """Skip any messages still queued and return the close code the server sent."""
        for _ in range(100_000):
            event = await self.next_event()
            if isinstance(event, ev.CloseConnection):
                return event.code
        raise AssertionError("no close")

    async def aclose(self) -> None:
        await self.stream.aclose()


@asynccontextmanager
async def raw_websocket(port: int, **kwargs: Any) -> AsyncIterator[RawWebSocket]:
    raw = await RawWebSocket.open(port, **kwargs)
    async with raw.stream:
        yield raw


async def upgrade_status(
    port: int, *, source: str | None = None, headers: bytes = b""
) -> tuple[int, trio.SocketStream]:
    """Send an upgrade request; return the status and the stream, open, with the head read.

    The rest of a refusal (its JSON body) is left on the stream for ``refusal_code``.
    """
    stream = await raw_stream(port, source=source)
    await stream.send_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" + headers + b"\r\n"
    )
    head = b""
    with trio.fail_after(TIMEOUT):
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(1)  # byte by byte, to stop right after the head
            assert chunk, head
            head += chunk
    return int(head.split(b" ", 2)[1]), stream


async def refusal_code(stream: trio.SocketStream) -> str:
    """The ``error`` code in the body of a refused handshake (the server then closes)."""
    return json.loads(await read_until_closed(stream))["error"]


async def wait_until(predicate: Any) -> None:
    """Wait, without sleeping, until the server's tasks have made ``predicate()`` true."""
    with trio.fail_after(TIMEOUT):
        while not predicate():
            await trio.testing.wait_all_tasks_blocked()
