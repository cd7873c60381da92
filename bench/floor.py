"""The lean floor: the leanest relay trio + wsproto can be, speaking signald's messages.

signald's figures are reported as ratios to this one, measured in the same invocation, so
what the benchmark shows is what signald costs *on top of* a WebSocket relay done the cheap
way in Python. Per connection: one reader task, which reads up to 64 KiB and handles every
complete frame in it before reading again, and one writer task, which takes everything queued
for its socket and writes it with a single ``send_all``. Nothing more than a dict of rooms:
no validation, no limits, no eviction, no keep-alive, no close handshake, no drain.
wsproto's ``WSConnection`` answers the upgrade (it parses the request with h11).

Run: ``python bench/floor.py --port 3000`` (127.0.0.1 only).
"""

from __future__ import annotations

import argparse
import gc
import json
import secrets
from functools import partial

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request, TextMessage

RELAYED = {"webrtc-offer": "sdp", "webrtc-answer": "sdp", "ice-candidate": "candidate"}
READ_SIZE = 65536


def _dump(message: dict[str, object]) -> str:
    return json.dumps(message, separators=(",", ":"))  # compact, like signald's frames


class Member:
    """One connection: its codec, and the frames queued for its writer."""

    __slots__ = ("peer_id", "pending", "room_id", "username", "wakeup", "ws")

    def __init__(self) -> None:
        self.ws = WSConnection(ConnectionType.SERVER)
        self.pending: list[bytes] = []
        self.wakeup = trio.lowlevel.ParkingLot()
        self.peer_id = secrets.token_urlsafe(16)
        self.username = ""
        self.room_id: str | None = None

    def send(self, text: str) -> None:
        """Queue one text frame; never waits (the writer sends it with whatever else is queued)."""
        self.queue(self.ws.send(TextMessage(data=text)))

    def queue(self, frame: bytes) -> None:
        self.pending.append(frame)
        self.wakeup.unpark()

    async def writer(self, stream: trio.SocketStream) -> None:
        while True:
            if not self.pending:
                await self.wakeup.park()
            data = b"".join(self.pending)
            self.pending.clear()
            await stream.send_all(data)


#: room id -> peer id -> member; insertion order is join order.
Rooms = dict[str, dict[str, Member]]


def _broadcast(members: dict[str, Member], text: str) -> None:
    for member in members.values():
        member.send(text)


def _handle(rooms: Rooms, me: Member, text: str) -> None:
    """Apply one message from ``me``."""
    msg = json.loads(text)
    kind = msg["type"]
    if kind in RELAYED and me.room_id is not None:
        target = rooms[me.room_id].get(msg["to"])
        if target is not None:
            field = RELAYED[kind]
            target.send(_dump({"type": kind, "from": me.peer_id, field: msg[field]}))
    elif kind == "join-room" and me.room_id is None:
        room_id, me.username = msg["roomId"], msg["username"]
        members = rooms.setdefault(room_id, {})
        others = [{"peerId": p, "username": m.username} for p, m in members.items()]
        joined = {"type": "joined-room", "roomId": room_id, "peerId": me.peer_id, "username": me.username}
        me.send(_dump({**joined, "participants": others}))
        arrival = {"type": "user-joined", "roomId": room_id, "peerId": me.peer_id, "username": me.username}
        _broadcast(members, _dump(arrival))
        members[me.peer_id] = me
        me.room_id = room_id
    elif kind == "ping":
        me.send(_dump({"type": "pong"}))


def _leave(rooms: Rooms, me: Member) -> None:
    """Take ``me`` out of its room at once, before anything else can queue a frame for it."""
    if me.room_id is None:
        return
    members = rooms[me.room_id]
    del members[me.peer_id]
    if members:
        departure = {"type": "user-left", "roomId": me.room_id, "peerId": me.peer_id, "username": me.username}
        _broadcast(members, _dump(departure))
    else:
        del rooms[me.room_id]
    me.room_id = None


async def _read(rooms: Rooms, me: Member, stream: trio.SocketStream) -> None:
    """Until the client closes: read up to 64 KiB, handle every complete message in it, repeat."""
    parts: list[str] = []
    while data := await stream.receive_some(READ_SIZE):
        me.ws.receive_data(data)
        for event in me.ws.events():
            if isinstance(event, TextMessage):
                parts.append(event.data)  # wsproto hands over a frame's data as it arrives
                if event.message_finished:
                    text = parts[0] if len(parts) == 1 else "".join(parts)
                    parts.clear()
                    _handle(rooms, me, text)
            elif isinstance(event, Request):
                me.queue(me.ws.send(AcceptConnection()))
            elif isinstance(event, Ping):
                me.queue(me.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                return


async def handler(rooms: Rooms, stream: trio.SocketStream) -> None:
    me = Member()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(me.writer, stream)
            try:
                await _read(rooms, me, stream)
            finally:
                _leave(rooms, me)
                nursery.cancel_scope.cancel()
    except* (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away (the load generator resets its connections)
    finally:
        await trio.aclose_forcefully(stream)


async def serve(
    port: int, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED
) -> None:
    rooms: Rooms = {}
    await trio.serve_tcp(partial(handler, rooms), port, host="127.0.0.1", task_status=task_status)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--gc-threshold", type=int, help="young-generation GC threshold (default: Python's)")
    args = parser.parse_args()
    if args.gc_threshold:
        gc.set_threshold(args.gc_threshold)
    trio.run(partial(serve, args.port))


if __name__ == "__main__":
    main()
