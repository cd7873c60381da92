"""The trio-websocket floor: the smallest relay trio + trio-websocket can be, in signald's messages.

A reference row beside the lean floor (floor.py, which signald's targets are judged against):
what a relay costs when trio-websocket carries it. Deliberately nothing more than a dict of
rooms: no validation, no limits, no eviction, no keep-alive, no h11 in front (trio-websocket's
own handshake), and each relay is sent by the sender's own handler task straight to the
addressee's socket.

Run: ``python bench/floor_tw.py --port 3000`` (127.0.0.1 only).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import secrets
from functools import partial

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

RELAYED = {"webrtc-offer": "sdp", "webrtc-answer": "sdp", "ice-candidate": "candidate"}


def _dump(message: dict[str, object]) -> str:
    return json.dumps(message, separators=(",", ":"))  # compact, like signald's frames


#: room id -> peer id -> (username, connection); insertion order is join order.
Rooms = dict[str, dict[str, tuple[str, WebSocketConnection]]]


async def _broadcast(members: dict[str, tuple[str, WebSocketConnection]], text: str) -> None:
    for _, ws in list(members.values()):
        with contextlib.suppress(ConnectionClosed):
            await ws.send_message(text)


async def handler(rooms: Rooms, request: WebSocketRequest) -> None:
    ws = await request.accept()
    peer_id = secrets.token_urlsafe(16)
    room_id: str | None = None
    try:
        while True:
            msg = json.loads(await ws.get_message())
            kind = msg["type"]
            if kind in RELAYED and room_id is not None:
                target = rooms[room_id].get(msg["to"])
                if target is not None:
                    field = RELAYED[kind]
                    await target[1].send_message(_dump({"type": kind, "from": peer_id, field: msg[field]}))
            elif kind == "join-room" and room_id is None:
                room_id, username = msg["roomId"], msg["username"]
                members = rooms.setdefault(room_id, {})
                others = [{"peerId": p, "username": u} for p, (u, _) in members.items()]
                joined = {"type": "joined-room", "roomId": room_id, "peerId": peer_id, "username": username}
                await ws.send_message(_dump({**joined, "participants": others}))
                arrival = {"type": "user-joined", "roomId": room_id, "peerId": peer_id, "username": username}
                await _broadcast(members, _dump(arrival))
                members[peer_id] = (username, ws)
            elif kind == "ping":
                await ws.send_message(_dump({"type": "pong"}))
    except ConnectionClosed:
        pass
    finally:
        if room_id is not None:
            members = rooms[room_id]
            username, _ = members.pop(peer_id)
            if members:
                departure = {"type": "user-left", "roomId": room_id, "peerId": peer_id, "username": username}
                with trio.CancelScope(shield=True):
                    await _broadcast(members, _dump(departure))
            else:
                del rooms[room_id]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--gc-threshold", type=int, help="young-generation GC threshold (default: Python's)")
    args = parser.parse_args()
    if args.gc_threshold:
        gc.set_threshold(args.gc_threshold)
    rooms: Rooms = {}
    trio.run(partial(serve_websocket, partial(handler, rooms), "127.0.0.1", args.port, ssl_context=None))


if __name__ == "__main__":
    main()
