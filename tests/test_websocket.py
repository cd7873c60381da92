"""The WebSocket protocol end to end: real server on 127.0.0.1, real clients.

Tests that take ``topology`` run twice: against one process, and against two cluster nodes
on a real Redis with clients alternating between them (tests/_topology.py), since a client
must not be able to tell the two apart. The tests that take ``server`` are about one
process's transport and timers, which a cluster does not change and which two nodes would
only make slower: oversize frames (1009), the handshake (origin check, a frame pipelined
with it), ping timeouts, and the debug log of one process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, ConnectionRejected

from signald import Server

from ._clients import TIMEOUT, UPGRADE_REQUEST, Client, connect, http_request, text_frame
from ._redis import poll_until
from ._topology import Topology


async def test_join_reports_others_in_join_order(topology: Topology) -> None:
    async with topology.connect(0) as a, topology.connect(1) as b, topology.connect(2) as c:
        await a.join("room", "alice")
        await b.join("room", "bob")
        joined = await c.join("room", "carol", requestId=42)
        assert joined["requestId"] == 42
        assert joined["participants"] == [
            {"peerId": a.peer_id, "username": "alice"},
            {"peerId": b.peer_id, "username": "bob"},
        ]
        assert len({a.peer_id, b.peer_id, c.peer_id}) == 3
        assert all(len(p or "") >= 22 for p in (a.peer_id, b.peer_id, c.peer_id))  # 128 random bits
        await a.expect("user-joined", roomId="room", peerId=b.peer_id, username="bob")
        await a.expect("user-joined", peerId=c.peer_id)
        await b.expect("user-joined", peerId=c.peer_id, username="carol")


async def test_full_offer_answer_candidate_exchange(topology: Topology) -> None:
    async with topology.joined_pair("call") as (a, b):
        await a.send(type="webrtc-offer", to=b.peer_id, sdp="offer-sdp", requestId=1)
        assert await b.recv() == {"type": "webrtc-offer", "from": a.peer_id, "sdp": "offer-sdp"}
        await b.send(type="webrtc-answer", to=a.peer_id, sdp="answer-sdp")
        assert await a.recv() == {"type": "webrtc-answer", "from": b.peer_id, "sdp": "answer-sdp"}
        candidate = {"candidate": "candidate:0 1 UDP 1 127.0.0.1 5000 typ host", "sdpMid": "0", "sdpMLineIndex": 0}
        await a.send(type="ice-candidate", to=b.peer_id, candidate={**candidate, "junk": [1, 2]})
        assert await b.recv() == {"type": "ice-candidate", "from": a.peer_id, "candidate": candidate}
        await a.send(type="ice-candidate", to=b.peer_id, candidate=None)
        assert await b.recv() == {"type": "ice-candidate", "from": a.peer_id, "candidate": None}
        # No reply to a successful relay: the next thing a sees is its own pong.
        await a.roundtrip_ping()


async def test_leave_and_disconnect_send_user_left(topology: Topology) -> None:
    async with topology.connect(0) as a:
        await a.join("r", "alice")
        async with topology.connect(1) as b:
            await b.join("r", "bob")
            await a.expect("user-joined")
            await b.send(type="leave-room")
            await a.expect("user-left", roomId="r", peerId=b.peer_id, username="bob")
            await b.roundtrip_ping()  # no reply to leave-room
            await b.join("r", "bob again")
            await a.expect("user-joined", username="bob again")
        await a.expect("user-left", username="bob again")


async def test_auto_created_room_vanishes_when_empty(topology: Topology) -> None:
    async with topology.connect(0) as a:
        await a.join("ephemeral", "alice")
        for port in topology.ports:
            assert (await http_request(port, "GET", "/api/rooms/ephemeral"))[0] == 200
        await a.send(type="leave-room")
        await a.roundtrip_ping()

    async def gone_everywhere() -> bool:
        statuses = [(await http_request(port, "GET", "/api/rooms/ephemeral"))[0] for port in topology.ports]
        return statuses == [404] * len(statuses)

    await poll_until(gone_everywhere, "the emptied room is gone on every node")
    for port in topology.ports:
        assert (await http_request(port, "GET", "/api/rooms"))[2]["rooms"] == []


async def error_of(client: Client, **message: Any) -> dict[str, Any]:
    await client.send(**message)
    return await client.expect("error")


async def test_every_protocol_error_code_and_connection_survives(topology: Topology) -> None:
    async with topology.connect(0) as a, topology.connect(1) as b:
        await a.ws.send_message("{not json")
        assert (await a.expect("error"))["code"] == "invalid-json"
        await a.ws.send_message("[1, 2]")
        assert (await a.expect("error"))["code"] == "invalid-message"
        assert (await error_of(a, roomId="r"))["code"] == "invalid-message"  # missing type
        assert (await error_of(a, type=7))["code"] == "invalid-message"
        bad_room = await error_of(a, type="join-room", roomId="no spaces", username="x", requestId="q1")
        assert bad_room["code"] == "invalid-message" and bad_room["requestId"] == "q1"
        assert (await error_of(a, type="ice-candidate", to="abc"))["code"] == "invalid-message"
        await a.ws.send_message(b"\x00binary")
        assert (await a.expect("error"))["code"] == "invalid-message"
        unknown = await error_of(a, type="teleport", requestId=5)
        assert unknown["code"] == "unknown-type" and unknown["requestId"] == 5
        for kind in ("leave-room", "webrtc-offer"):
            message: dict[str, Any] = {"type": kind, "requestId": kind}
            if kind == "webrtc-offer":
                message.update(to="somebody", sdp="x")
            reply = await error_of(a, **message)
            assert reply["code"] == "not-in-room" and reply["requestId"] == kind
        await a.join("r", "alice")
        again = await error_of(a, type="join-room", roomId="other", username="alice", requestId="dup")
        assert again["code"] == "already-in-room" and again["requestId"] == "dup"
        ghost = await error_of(a, type="webrtc-offer", to="ghost-peer-id", sdp="x", requestId=9)
        assert ghost["code"] == "peer-not-found" and ghost["requestId"] == 9
        # b is in another room: not reachable from a's room.
        await b.join("elsewhere", "bob")
        assert (await error_of(a, type="webrtc-offer", to=b.peer_id, sdp="x"))["code"] == "peer-not-found"
        # Still fully working after all of that.
        await a.roundtrip_ping()


async def test_room_full(start_topology: Callable[..., Any]) -> None:
    topology = await start_topology(rooms={"max_participants": 2})
    async with topology.connect(0) as a, topology.connect(1) as b, topology.connect(2) as c:
        await a.join("small", "a")
        await b.join("small", "b")
        reply = await error_of(c, type="join-room", roomId="small", username="c", requestId="full")
        assert reply["code"] == "room-full" and reply["requestId"] == "full"
        await c.join("other", "c")  # the refusal left c free to join elsewhere


async def test_room_not_found_without_auto_create(start_topology: Callable[..., Any]) -> None:
    topology = await start_topology(rooms={"auto_create": False})
    async with topology.connect(1) as a:
        reply = await error_of(a, type="join-room", roomId="nope", username="a", requestId=7)
        assert reply["code"] == "room-not-found" and reply["requestId"] == 7
        # Created on the other node, joinable here.
        status, _, room = await http_request(topology.port(0), "POST", "/api/rooms", {"name": "Standup"})
        assert status == 201
        await a.join(room["id"], "a")


async def test_oversize_message_closes_with_1009(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(limits={"max_message_bytes": 1024, "send_queue_bytes": 4096})
    async with connect(server.port) as a:
        await a.send(type="ping", pad="x" * 900)
        await a.expect("pong")
        # 400 characters but 1600 bytes: the byte limit is what counts.
        await a.send(type="ping", pad="é" * 800)
        with pytest.raises(ConnectionClosed) as info:
            await a.recv()
        assert info.value.reason.code == 1009


async def test_handshake_with_disallowed_origin_is_403(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(cors={"allowed_origins": ["https://good.example"]})
    with pytest.raises(ConnectionRejected) as info:
        async with connect(server.port, origin="https://evil.example"):
            pass
    assert info.value.status_code == 403
    async with connect(server.port, origin="https://good.example") as ok:
        await ok.roundtrip_ping()
    async with connect(server.port) as raw:  # no Origin: a native client
        await raw.roundtrip_ping()


async def test_order_from_a_to_b_under_a_burst_of_500(topology: Topology) -> None:
    """A normal reader is never evicted by a burst, and sees A's frames in A's order."""
    async with topology.joined_pair("burst") as (a, b):
        received: list[int] = []

        async def read_all() -> None:
            while len(received) < 500:
                message = await b.recv()
                assert message["type"] == "ice-candidate" and message["from"] == a.peer_id
                received.append(int(message["candidate"]["candidate"].split()[-1]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            for i in range(500):
                candidate = {"candidate": f"candidate:1 1 udp 2122260223 127.0.0.1 {40000 + i} typ host {i}"}
                await a.send(type="ice-candidate", to=b.peer_id, candidate={**candidate, "sdpMid": "0"})
        assert received == list(range(500))
        await b.roundtrip_ping()


async def test_relays_never_precede_learning_of_the_sender(topology: Topology) -> None:
    """Members offer to a newcomer the moment they hear of it; the newcomer knew them first."""
    async with topology.joined_pair("meet") as (a, b):

        async def offer_on_join(member: Client) -> None:
            left = 0
            while left < 10:
                event = await member.recv()
                if event["type"] == "user-joined":
                    await member.send(type="webrtc-offer", to=event["peerId"], sdp=f"from {member.peer_id}")
                else:
                    assert event["type"] == "user-left"
                    left += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(offer_on_join, a)
            nursery.start_soon(offer_on_join, b)
            for round_ in range(10):
                async with topology.connect(round_) as newcomer:
                    await newcomer.send(type="join-room", roomId="meet", username=f"n{round_}")
                    known: set[str] = set()
                    offers = 0
                    while offers < 2:
                        message = await newcomer.recv()
                        if message["type"] == "joined-room":
                            known |= {p["peerId"] for p in message["participants"]}
                        else:
                            assert message["type"] == "webrtc-offer"
                            assert message["from"] in known, "relay arrived before its sender was announced"
                            offers += 1
                    await newcomer.send(type="leave-room")


async def test_membership_events_same_order_for_all_members(topology: Topology) -> None:
    """Also when members join and leave concurrently on different nodes."""
    async with topology.connect(0) as w1, topology.connect(1) as w2, topology.connect(2) as w3:
        watchers = [w1, w2, w3]
        for i, watcher in enumerate(watchers):
            await watcher.join("busy", f"w{i}")
        # Drain the watchers' own join announcements.
        await w1.expect("user-joined")
        await w1.expect("user-joined")
        await w2.expect("user-joined")

        async def churn(n: int) -> None:
            for j in range(5):
                async with topology.connect(n + j) as temp:  # with two nodes: on both at once
                    await temp.join("busy", f"t{n}-{j}")
                    await temp.send(type="leave-room")
                    await temp.messages_before_pong()

        async with trio.open_nursery() as nursery:
            for n in range(4):
                nursery.start_soon(churn, n)
        sequences = []
        for watcher in watchers:
            events = []
            while len(events) < 40:
                message = await watcher.recv()
                events.append((message["type"], message["peerId"]))
            sequences.append(events)
        assert sequences[0] == sequences[1] == sequences[2]


async def test_slow_reader_is_evicted_and_room_keeps_going(start_topology: Callable[..., Any]) -> None:
    topology = await start_topology(
        limits={"max_message_bytes": 65536, "send_queue_bytes": 65536, "max_sdp_length": 65536}
    )
    sdp = "x" * 60_000
    # message_queue_size=1: once one frame is buffered the slow client stops reading its socket.
    async with (
        topology.connect(0) as a,
        topology.connect(1) as b,
        topology.connect(1, message_queue_size=1) as slow,  # with two nodes, a's relays cross Redis
    ):
        await a.join("r", "a")
        await b.join("r", "b")
        await slow.join("r", "slow")
        await a.expect("user-joined")
        await a.expect("user-joined")
        await b.expect("user-joined")
        with trio.fail_after(TIMEOUT):
            for _ in range(1000):  # bounded: kernel buffers fill long before this
                await a.send(type="webrtc-offer", to=slow.peer_id, sdp=sdp)
                await a.send(type="ping")
                reply = await a.recv()
                if reply["type"] == "user-left":
                    break
                assert reply["type"] == "pong"
            else:
                pytest.fail("slow reader was never evicted")
        assert reply["peerId"] == slow.peer_id
        await b.expect("user-left", peerId=slow.peer_id)
        # The honest pair is unaffected.
        await a.send(type="webrtc-offer", to=b.peer_id, sdp="still here")
        await b.expect("webrtc-offer", sdp="still here")
        # Once the slow client reads again it finds the 1008 close behind the backlog.
        with pytest.raises(ConnectionClosed) as info, trio.fail_after(TIMEOUT):
            while True:
                await slow.ws.get_message()
        assert info.value.reason.code == 1008


async def test_silent_peer_is_dropped_after_ping_timeout(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(
        limits={"ping_interval": 0.05, "ping_timeout": 0.2, "close_timeout": 0.2}, rooms={"resume_grace": 0}
    )
    async with connect(server.port) as a:
        await a.join("r", "a")
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            # A hand-written handshake, then a join, then silence: no pongs, no reads.
            await stream.send_all(UPGRADE_REQUEST)
            await stream.send_all(text_frame({"type": "join-room", "roomId": "r", "username": "mute"}))
            joined = await a.expect("user-joined", username="mute")
            # The answering client keeps answering pings and is not dropped.
            left = await a.expect("user-left")
            assert left["peerId"] == joined["peerId"]
            await a.roundtrip_ping()


async def test_a_silent_member_leaves_at_the_ping_timeout_not_after_the_close_handshake(
    server_factory: Callable[..., Any],
) -> None:
    """The room hears of it when the server gives up on the member, though the close may take 60 s.

    Resume is off here: with it on, a ping timeout suspends the member instead (tests/test_resume.py).
    """
    server = await server_factory(
        limits={"ping_interval": 0.05, "ping_timeout": 0.2, "close_timeout": 60}, rooms={"resume_grace": 0}
    )
    async with connect(server.port) as a:
        await a.join("r", "a")
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(UPGRADE_REQUEST)
            await stream.send_all(text_frame({"type": "join-room", "roomId": "r", "username": "mute"}))
            joined = await a.expect("user-joined", username="mute")
            started = trio.current_time()
            left = await a.expect("user-left")  # within TIMEOUT (10 s), far less than close_timeout
            assert left["peerId"] == joined["peerId"]
            assert trio.current_time() - started < TIMEOUT


async def test_frame_pipelined_with_the_handshake_is_answered(server: Server) -> None:
    """Bytes h11 read past the request head reach the WebSocket, and are acted on at once."""
    assert server.port
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(UPGRADE_REQUEST + text_frame({"type": "ping", "requestId": "early"}))
        received = b""
        with trio.fail_after(TIMEOUT):
            while b'"requestId":"early"' not in received:
                chunk = await stream.receive_some(4096)
                assert chunk, f"closed early: {received!r}"
                received += chunk
        assert received.startswith(b"HTTP/1.1 101 ")
        assert b'{"type":"pong","requestId":"early"}' in received


async def test_debug_log_names_message_types_but_never_contents(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    assert server.port
    caplog.set_level(logging.DEBUG, logger="signald")
    async with connect(server.port) as a, connect(server.port) as b:
        await a.join("r", "alice")
        await b.join("r", "bob")
        await a.send(type="webrtc-offer", to=b.peer_id, sdp="v=0 SECRET-SDP")
        await a.send(type="ice-candidate", to=b.peer_id, candidate={"candidate": "SECRET-CANDIDATE"})
        await b.expect("webrtc-offer")
        await b.expect("ice-candidate")
    assert "webrtc-offer" in caplog.text and "ice-candidate" in caplog.text
    assert "joined" in caplog.text
    assert "SECRET" not in caplog.text
