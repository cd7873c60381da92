"""One server of many nodes: the WebSocket and REST behaviour of one process, across nodes.

Every test here runs twice: against one signald on its own, and against two nodes on a real
redis-server, with clients alternating between the nodes. Both must behave the same for every
client. The nodes here are two servers in the test's process (each its own Redis link, node
id and port), which start in milliseconds; test_cluster_failures.py runs real processes, to
kill them, and has the tests of what only a cluster has (a node dying, Redis going away).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from signald import Server

from ._clients import TIMEOUT, Client, connect, http_request
from ._redis import poll_until, redis_server
from .conftest import make_config


@pytest.fixture(params=["one process", "two nodes"])
async def start(request: pytest.FixtureRequest, nursery: trio.Nursery) -> AsyncIterator[Any]:
    """``await start(**sections)``: the ports clients use, in turn (one, or two nodes)."""
    async with contextlib.AsyncExitStack() as stack:
        cluster: dict[str, Any] = {}
        if request.param == "two nodes":
            redis = await stack.enter_async_context(redis_server())
            cluster = {"cluster": {"redis_url": redis.url, "node_timeout": 2}}

        async def servers(**sections: dict[str, Any]) -> list[int]:
            started = []
            for _ in range(2 if cluster else 1):
                server = Server(make_config(**cluster, **sections))
                await nursery.start(server.serve)
                started.append(server)

            async def connected() -> bool:  # listening, and in cluster mode connected to Redis
                return not any(server.hub.problem for server in started)

            await poll_until(connected, "every node is connected to Redis")
            assert all(server.port for server in started)
            return [server.port for server in started if server.port]

        yield servers
        nursery.cancel_scope.cancel()  # the servers, before their Redis stops


@pytest.fixture
async def ports(start: Any) -> list[int]:
    return await start()


def nth(ports: list[int], i: int) -> int:
    """Client ``i``'s node: clients alternate between the nodes."""
    return ports[i % len(ports)]


async def test_members_on_different_nodes_see_and_reach_each_other(ports: list[int]) -> None:
    async with connect(nth(ports, 0)) as a, connect(nth(ports, 1)) as b, connect(nth(ports, 2)) as c:
        await a.join("room", "alice")
        await b.join("room", "bob")
        joined = await c.join("room", "carol", requestId=42)
        assert joined["requestId"] == 42
        assert joined["participants"] == [
            {"peerId": a.peer_id, "username": "alice"},
            {"peerId": b.peer_id, "username": "bob"},
        ]
        await a.expect("user-joined", roomId="room", peerId=b.peer_id, username="bob")
        await a.expect("user-joined", peerId=c.peer_id)
        await b.expect("user-joined", peerId=c.peer_id, username="carol")
        # Offer, answer and candidates both ways, across nodes.
        await a.send(type="webrtc-offer", to=b.peer_id, sdp="offer-sdp", requestId=1)
        assert await b.recv() == {"type": "webrtc-offer", "from": a.peer_id, "sdp": "offer-sdp"}
        await b.send(type="webrtc-answer", to=a.peer_id, sdp="answer-sdp")
        assert await a.recv() == {"type": "webrtc-answer", "from": b.peer_id, "sdp": "answer-sdp"}
        candidate = {"candidate": "candidate:0 1 UDP 1 127.0.0.1 5000 typ host", "sdpMid": "0", "sdpMLineIndex": 0}
        await c.send(type="ice-candidate", to=a.peer_id, candidate=candidate)
        assert await a.recv() == {"type": "ice-candidate", "from": c.peer_id, "candidate": candidate}
        await a.send(type="webrtc-offer", to="nobody-here", sdp="x", requestId="r")
        await a.expect("error", code="peer-not-found", requestId="r")
        # leave-room and a disconnect both reach every node.
        await b.send(type="leave-room")
        await a.expect("user-left", roomId="room", peerId=b.peer_id, username="bob")
        await c.expect("user-left", peerId=b.peer_id)
        await b.roundtrip_ping()  # no reply to leave-room
    async with connect(nth(ports, 0)) as a, connect(nth(ports, 1)) as b:
        await a.join("room2", "a")
        async with connect(nth(ports, 1)) as gone:
            await gone.join("room2", "gone")
            await a.expect("user-joined", peerId=gone.peer_id)
        await a.expect("user-left", peerId=gone.peer_id)


async def test_order_from_a_to_b_under_a_burst_of_500(ports: list[int]) -> None:
    async with connect(nth(ports, 0)) as a, connect(nth(ports, 1)) as b:
        await a.join("burst", "a")
        await b.join("burst", "b")
        await a.expect("user-joined", peerId=b.peer_id)
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


async def test_relays_never_precede_learning_of_the_sender(ports: list[int]) -> None:
    """Members offer to a newcomer the moment they hear of it; the newcomer knew them first."""
    async with connect(nth(ports, 0)) as a, connect(nth(ports, 1)) as b:
        await a.join("meet", "a")
        await b.join("meet", "b")
        await a.expect("user-joined", peerId=b.peer_id)

        async def offer_on_join(member: Client) -> None:
            left = 0
            while left < 6:
                event = await member.recv()
                if event["type"] == "user-joined":
                    await member.send(type="webrtc-offer", to=event["peerId"], sdp=f"from {member.peer_id}")
                else:
                    assert event["type"] == "user-left"
                    left += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(offer_on_join, a)
            nursery.start_soon(offer_on_join, b)
            for round_ in range(6):
                async with connect(nth(ports, round_)) as newcomer:
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


async def test_membership_events_same_order_for_every_member_on_every_node(ports: list[int]) -> None:
    async with connect(nth(ports, 0)) as w1, connect(nth(ports, 1)) as w2, connect(nth(ports, 2)) as w3:
        watchers = [w1, w2, w3]
        for i, watcher in enumerate(watchers):
            await watcher.join("busy", f"w{i}")
        await w1.expect("user-joined")
        await w1.expect("user-joined")
        await w2.expect("user-joined")

        async def churn(n: int) -> None:
            for j in range(4):
                async with connect(nth(ports, n + j)) as temp:  # joins and leaves on both nodes at once
                    await temp.join("busy", f"t{n}-{j}")
                    await temp.send(type="leave-room")
                    await temp.messages_before_pong()

        async with trio.open_nursery() as nursery:
            for n in range(4):
                nursery.start_soon(churn, n)
        sequences = []
        for watcher in watchers:
            events = []
            while len(events) < 32:
                message = await watcher.recv()
                events.append((message["type"], message["peerId"]))
            sequences.append(events)
        assert sequences[0] == sequences[1] == sequences[2]


async def test_capacity_holds_for_concurrent_joins_on_every_node(ports: list[int]) -> None:
    status, _, room = await http_request(ports[0], "POST", "/api/rooms", {"name": "Pair", "maxParticipants": 2})
    assert status == 201
    outcomes: list[str] = []
    all_answered = trio.Event()

    async def join(i: int) -> None:
        async with connect(nth(ports, i)) as client:
            await client.send(type="join-room", roomId=room["id"], username=f"u{i}")
            reply = await client.recv()
            outcomes.append(reply["type"] if reply["type"] == "joined-room" else reply["code"])
            if len(outcomes) == 8:
                all_answered.set()
            with trio.fail_after(TIMEOUT):  # members stay until every join is answered
                await all_answered.wait()

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(join, i)
    assert sorted(outcomes) == ["joined-room"] * 2 + ["room-full"] * 6


async def test_rest_on_any_node_shows_the_cluster(ports: list[int]) -> None:
    status, _, created = await http_request(ports[0], "POST", "/api/rooms", {"name": "Standup", "maxParticipants": 4})
    assert status == 201
    room_id = created["id"]
    last = ports[-1]
    status, _, listing = await http_request(last, "GET", "/api/rooms")
    assert status == 200 and [r["id"] for r in listing["rooms"]] == [room_id]
    assert listing["rooms"][0]["name"] == "Standup" and listing["rooms"][0]["maxParticipants"] == 4
    async with connect(nth(ports, 0)) as a, connect(nth(ports, 1)) as b:
        await a.join(room_id, "alice")
        await b.join(room_id, "bob")
        for port in ports:
            status, _, room = await http_request(port, "GET", f"/api/rooms/{room_id}")
            assert status == 200
            assert [(p["peerId"], p["username"]) for p in room["participants"]] == [
                (a.peer_id, "alice"),
                (b.peer_id, "bob"),
            ]
            assert room["participantCount"] == 2 and room["createdAt"] == created["createdAt"]
            health = (await http_request(port, "GET", "/health"))[2]
            assert (health["status"], health["rooms"], health["users"]) == ("healthy", 1, 2)
    status, _, missing = await http_request(last, "GET", "/api/rooms/nope")
    assert status == 404 and missing["error"] == "room-not-found"


async def test_max_rooms_counts_the_rooms_of_every_node(start: Any) -> None:
    ports = await start(rooms={"max_rooms": 2})
    status, _, _ = await http_request(ports[0], "POST", "/api/rooms", {"name": "one"})
    assert status == 201
    async with connect(nth(ports, 1)) as a, connect(nth(ports, 0)) as b:
        await a.join("two", "a")
        await b.send(type="join-room", roomId="three", username="b")
        await b.expect("error", code="too-many-rooms")
        for port in ports:
            status, _, body = await http_request(port, "POST", "/api/rooms", {"name": "four"})
            assert (status, body["error"]) == (503, "too-many-rooms")
        await b.join("two", "b")  # existing rooms can still be joined


async def test_room_not_found_without_auto_create(start: Any) -> None:
    ports = await start(rooms={"auto_create": False})
    async with connect(nth(ports, 1)) as a:
        await a.send(type="join-room", roomId="nope", username="a", requestId=7)
        await a.expect("error", code="room-not-found", requestId=7)
        status, _, created = await http_request(ports[0], "POST", "/api/rooms", {"name": "made"})
        assert status == 201
        await a.join(created["id"], "a")


async def test_posted_room_is_removed_after_idle_ttl_on_every_node(start: Any) -> None:
    ports = await start(rooms={"idle_ttl": 1})
    status, _, room = await http_request(ports[0], "POST", "/api/rooms", {"name": "Brief"})
    assert status == 201

    async def gone_everywhere() -> bool:
        statuses = [(await http_request(port, "GET", f"/api/rooms/{room['id']}"))[0] for port in ports]
        return statuses == [404] * len(ports)

    await poll_until(gone_everywhere, "the idle room is gone", within=6)
    status, _, listing = await http_request(ports[-1], "GET", "/api/rooms")
    assert listing["rooms"] == []
