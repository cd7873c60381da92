"""Smoke test of the benchmark's machinery (bench/): not the benchmark, which is never a test.

The load generator builds and splits frames by hand to stay cheap, so a wrong byte there
would silently measure nothing; and the floors must speak signald's messages for the ratios
to mean anything.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from types import ModuleType

import pytest
import trio
from trio_websocket import serve_websocket
from wsproto.connection import Connection, ConnectionType
from wsproto.events import Ping, TextMessage

from ._clients import connect

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


loadgen = _load("loadgen")
floor = _load("floor")
floor_tw = _load("floor_tw")


def test_generator_frames_are_what_a_websocket_server_reads() -> None:
    server = Connection(ConnectionType.SERVER)
    candidate = loadgen.candidate_message("N8yHf2sKq5WzUo1GvJ6iLg", 1234567)
    server.receive_data(loadgen.client_frame(candidate) + loadgen.client_frame(b"x" * 70000))
    events = list(server.events())
    assert [event.data for event in events] == [candidate.decode(), "x" * 70000]
    assert 240 <= len(candidate) <= 260  # an ICE candidate's size, as the scenarios promise
    assert loadgen.timestamp_of(candidate) == 1234567


def test_generator_speaks_peerjs_with_a_candidate_of_the_same_size() -> None:
    ours = loadgen.candidate_message("bench2", 1234567)
    theirs = loadgen.candidate_message("bench2", 1234567, "peerjs")
    message = json.loads(theirs)
    assert (message["type"], message["dst"]) == ("CANDIDATE", "bench2")
    assert message["payload"]["candidate"] == json.loads(ours)["candidate"]
    assert abs(len(theirs) - len(ours)) <= 64
    assert loadgen.timestamp_of(theirs) == 1234567


def test_generator_splits_whole_server_frames_and_keeps_the_rest() -> None:
    server = Connection(ConnectionType.SERVER)
    data = server.send(TextMessage("a" * 10)) + server.send(TextMessage("b" * 300)) + server.send(Ping(b"p"))
    buf = bytearray(data + server.send(TextMessage("c" * 5))[:3])
    assert loadgen.split_frames(buf) == [(0x1, b"a" * 10), (0x1, b"b" * 300), (0x9, b"p")]
    assert buf == server.send(TextMessage("c" * 5))[:3]


async def _start_lean_floor(nursery: trio.Nursery) -> int:
    listeners = await nursery.start(floor.serve, 0)
    return listeners[0].socket.getsockname()[1]


async def _start_trio_websocket_floor(nursery: trio.Nursery) -> int:
    listener = await nursery.start(serve_websocket, partial(floor_tw.handler, {}), "127.0.0.1", 0, None)
    return listener.port


@pytest.mark.parametrize("start", [_start_lean_floor, _start_trio_websocket_floor], ids=["lean", "trio-websocket"])
async def test_floor_speaks_signalds_messages(
    nursery: trio.Nursery, start: Callable[[trio.Nursery], Awaitable[int]]
) -> None:
    port = await start(nursery)
    async with connect(port) as alice, connect(port) as bob:
        await alice.join("r", "alice")
        joined = await bob.join("r", "bob")
        assert joined["participants"] == [{"peerId": alice.peer_id, "username": "alice"}]
        await alice.expect("user-joined", peerId=bob.peer_id, username="bob")
        candidate = {"candidate": "candidate:1 1 udp 1 192.0.2.1 1 typ host", "sdpMid": "0", "sdpMLineIndex": 0}
        for _ in range(3):  # several in one read: each reaches bob, in order
            await alice.send(type="ice-candidate", to=bob.peer_id, candidate=candidate)
        for _ in range(3):
            relayed = await bob.expect("ice-candidate", candidate=candidate)
            assert relayed["from"] == alice.peer_id
    async with connect(port) as carol, connect(port) as dave:
        await carol.join("s", "carol")
        await dave.join("s", "dave")
        await carol.expect("user-joined", peerId=dave.peer_id)
        await dave.ws.aclose()
        await carol.expect("user-left", peerId=dave.peer_id, username="dave")
