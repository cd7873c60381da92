"""Limits and room lifetimes that hold cluster-wide, on one process and on two nodes alike.

The WebSocket and REST behaviour tests (test_websocket.py, test_http.py) run against one
process and against two nodes with clients alternating between them (tests/_topology.py).
What is here holds in one process trivially and is what a cluster could most easily get
wrong: a room's capacity under joins racing on different nodes, ``rooms.max_rooms`` counting
every node's rooms, and a posted room's idle time running out in Redis for every node.
test_cluster_failures.py runs real processes, to kill them, and has the tests of what only
a cluster has (a node dying, Redis going away).
"""

from __future__ import annotations

from typing import Any

import trio

from ._clients import TIMEOUT, http_request
from ._redis import poll_until
from ._topology import Topology


async def test_capacity_holds_for_concurrent_joins_on_every_node(topology: Topology) -> None:
    status, _, room = await http_request(topology.port(0), "POST", "/api/rooms", {"name": "Pair", "maxParticipants": 2})
    assert status == 201
    outcomes: list[str] = []
    all_answered = trio.Event()

    async def join(i: int) -> None:
        async with topology.connect(i) as client:
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


async def test_max_rooms_counts_the_rooms_of_every_node(start_topology: Any) -> None:
    topology = await start_topology(rooms={"max_rooms": 2})
    status, _, _ = await http_request(topology.port(0), "POST", "/api/rooms", {"name": "one"})
    assert status == 201
    async with topology.connect(1) as a, topology.connect(0) as b:
        await a.join("two", "a")
        await b.send(type="join-room", roomId="three", username="b")
        await b.expect("error", code="too-many-rooms")
        for port in topology.ports:
            status, _, body = await http_request(port, "POST", "/api/rooms", {"name": "four"})
            assert (status, body["error"]) == (503, "too-many-rooms")
        await b.join("two", "b")  # existing rooms can still be joined


async def test_posted_room_is_removed_after_idle_ttl_on_every_node(start_topology: Any) -> None:
    topology = await start_topology(rooms={"idle_ttl": 1})
    ports = topology.ports
    status, _, room = await http_request(ports[0], "POST", "/api/rooms", {"name": "Brief"})
    assert status == 201

    async def gone_everywhere() -> bool:
        statuses = [(await http_request(port, "GET", f"/api/rooms/{room['id']}"))[0] for port in ports]
        return statuses == [404] * len(ports)

    await poll_until(gone_everywhere, "the idle room is gone", within=6)
    status, _, listing = await http_request(ports[-1], "GET", "/api/rooms")
    assert listing["rooms"] == []
