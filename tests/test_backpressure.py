"""Eviction is for clients that stop reading, never for clients the server is slow to serve.

The reader runs in another process (tests/_reader_process.py): a reader inside this trio run
would read only when the server's own tasks let it, which is not what a browser does.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from ._clients import TIMEOUT, connect, text_frame
from ._process import ROOT
from .adversarial._harness import RawWebSocket

#: 500 offers of 2 KB: a 1 MB burst, eight times the send queue below.
OFFERS = 500
SEND_QUEUE = {"send_queue_bytes": 131072}


class ReaderProcess:
    def __init__(self, process: trio.Process) -> None:
        assert process.stdout is not None and process.stdin is not None
        self.process = process
        self._stdout = process.stdout
        self.stdin = process.stdin
        self._buffer = b""

    async def line(self) -> str:
        with trio.fail_after(TIMEOUT):
            while b"\n" not in self._buffer:
                chunk = await self._stdout.receive_some(4096)
                assert chunk, f"the reader process exited: {self._buffer!r}"
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()


@asynccontextmanager
async def reader_process(port: int, room: str, *args: str) -> AsyncIterator[tuple[ReaderProcess, str]]:
    """The process, joined to ``room``, and its peer id."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests._reader_process", str(port), room, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        reader = ReaderProcess(process)
        kind, peer_id = (await reader.line()).split()
        assert kind == "joined"
        yield reader, peer_id
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def test_a_reader_that_keeps_up_gets_a_1_mb_burst_complete_and_in_order(
    server_factory: Callable[..., Any],
) -> None:
    server = await server_factory(limits=SEND_QUEUE)
    async with reader_process(server.port, "burst", "read", str(OFFERS)) as (reader, peer_id):
        sender = await RawWebSocket.open(server.port)
        async with sender.stream:
            await sender.send(text_frame({"type": "join-room", "roomId": "burst", "username": "sender"}))
            joined = await sender.recv()
            assert [p["peerId"] for p in joined["participants"]] == [peer_id]
            offers = (
                text_frame({"type": "webrtc-offer", "to": peer_id, "sdp": f"{i:06d} " + "x" * 2000})
                for i in range(OFFERS)
            )
            await sender.send(b"".join(offers) + text_frame({"type": "ping", "requestId": "end"}))
            assert await reader.line() == f"ok {OFFERS}"
            # Nobody left in between: the sender's next frame is its own pong.
            assert await sender.recv() == {"type": "pong", "requestId": "end"}


async def test_a_reader_that_stops_reading_is_evicted_with_1008_and_its_room_goes_on(
    server_factory: Callable[..., Any],
) -> None:
    server = await server_factory(limits=SEND_QUEUE)
    sdp = "x" * 60_000
    async with (
        reader_process(server.port, "stall", "stall") as (stalled, peer_id),
        connect(server.port) as sender,
        connect(server.port) as witness,
    ):
        await sender.join("stall", "sender")
        await witness.join("stall", "witness")
        await sender.expect("user-joined", username="witness")
        with trio.fail_after(TIMEOUT):
            for _ in range(1000):  # bounded: the queue overflows long before this
                await sender.send(type="webrtc-offer", to=peer_id, sdp=sdp)
                await sender.send(type="ping")
                reply = await sender.recv()
                if reply["type"] == "user-left":
                    break
                assert reply["type"] == "pong"
            else:
                raise AssertionError("the reader that stopped reading was never evicted")
        assert reply["peerId"] == peer_id
        await witness.expect("user-left", peerId=peer_id)
        await sender.send(type="webrtc-offer", to=witness.peer_id, sdp="the room goes on")
        await witness.expect("webrtc-offer", sdp="the room goes on")
        # Told to read again, it finds the backlog, then the 1008 close.
        await stalled.stdin.send_all(b"read\n")
        assert await stalled.line() == "closed 1008"
