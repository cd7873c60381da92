"""A network blip in a cluster: what only a cluster has, beyond tests/test_resume.py.

tests/test_resume.py runs the resume behaviour on one process and on two nodes, the member
resuming on the other node than the one it was lost on. Here is what one process has no
counterpart for: a resume on the member's own node that must still claim in Redis, a burst
of relays racing the claim from either node, and a drained node handing its members over.

Two nodes in the test's process on the session's redis-server (tests/_topology.py), so the
test can see each node's connection count: "the node has seen the loss" is observed as it
dropping, which happens only after the session has handed its member to the room. A member
whose connection is lost is a :class:`RawWebSocket`, cut with a reset (no close frame).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio

from signald import Server

from ._clients import TIMEOUT, connect, http_request
from ._topology import SharedRedis, serve
from .adversarial._harness import RawWebSocket
from .conftest import make_config
from .test_resume import closed_by, lose, raw_join, resume

Nodes = Callable[..., Awaitable[list[Server]]]


@pytest.fixture
async def nodes(shared_redis: SharedRedis) -> AsyncIterator[Nodes]:
    """``await nodes(**sections)``: two nodes on one Redis, listening and connected to it."""
    cluster = {"redis_url": shared_redis.url(), "node_timeout": 2}
    await shared_redis.flush()
    async with trio.open_nursery() as nursery:

        async def start(**sections: dict[str, Any]) -> list[Server]:
            configs = [make_config(cluster=cluster, **sections) for _ in range(2)]
            return list((await serve(nursery, configs)).servers)

        yield start
        nursery.cancel_scope.cancel()  # the servers stop before the next test empties Redis


def candidate(i: int) -> dict[str, Any]:
    return {"candidate": f"candidate:1 1 udp 2122260223 127.0.0.1 {40000 + i} typ host {i}", "sdpMid": "0"}


def number(message: dict[str, Any]) -> int:
    assert message["type"] == "ice-candidate", message
    return int(message["candidate"]["candidate"].split()[-1])


async def room_count(port: int) -> int:
    status, _, room = await http_request(port, "GET", "/api/rooms/r")
    assert status == 200, room
    return int(room["participantCount"])


async def test_a_member_resuming_on_its_own_node_claims_in_redis_too(nodes: Nodes) -> None:
    """The resume on the other node is in test_resume.py; on the member's own node, the
    claim in Redis is what makes its old token fail on every node after."""
    one, two = await nodes()
    async with connect(one.port) as alice, connect(two.port) as dave:
        await alice.join("r", "alice")
        await dave.join("r", "dave")
        await alice.expect("user-joined", peerId=dave.peer_id)
        raw = await RawWebSocket.open(one.port)
        bob = await raw_join(raw, "r", "bob")
        assert bob["resumeGrace"] == 30 and isinstance(bob["resumeToken"], str)
        await alice.expect("user-joined", peerId=bob["peerId"])
        await dave.expect("user-joined", peerId=bob["peerId"])
        await lose(one, raw)

        # Kept for bob, in this order: two offers from its own node, one from the other node,
        # and a newcomer's user-joined. Each step is seen through before the next is sent.
        for n in range(2):
            await alice.send(type="webrtc-offer", to=bob["peerId"], sdp=f"alice {n}")
        await alice.roundtrip_ping()  # alice's relays are in the room's channel
        await dave.send(type="webrtc-offer", to=bob["peerId"], sdp="dave")
        await dave.send(type="webrtc-offer", to=alice.peer_id, sdp="dave to alice")
        await alice.expect("webrtc-offer", sdp="dave to alice")  # so dave's relay to bob went first
        async with connect(two.port) as carol:
            await carol.join("r", "carol")
            for member in (alice, dave):
                await member.expect("user-joined", peerId=carol.peer_id, username="carol")
            assert [await room_count(port) for port in (one.port, two.port)] == [4, 4]

            async with connect(one.port) as bob2:
                resumed = await resume(bob2, bob["resumeToken"], requestId="back")
                assert resumed == {
                    "type": "resumed",
                    "roomId": "r",
                    "peerId": bob["peerId"],
                    "username": "bob",
                    "participants": [
                        {"peerId": alice.peer_id, "username": "alice"},
                        {"peerId": dave.peer_id, "username": "dave"},
                        {"peerId": carol.peer_id, "username": "carol"},
                    ],
                    "missed": 4,
                    "resumeToken": resumed["resumeToken"],
                    "resumeGrace": 30,
                    "requestId": "back",
                }
                assert resumed["resumeToken"] != bob["resumeToken"]
                for n in range(2):
                    await bob2.expect("webrtc-offer", **{"from": alice.peer_id, "sdp": f"alice {n}"})
                await bob2.expect("webrtc-offer", **{"from": dave.peer_id, "sdp": "dave"})
                await bob2.expect("user-joined", peerId=carol.peer_id, username="carol")

                # Live again, both ways, with members of both nodes.
                for member in (alice, dave, carol):
                    await member.send(type="webrtc-offer", to=bob["peerId"], sdp=f"live from {member.peer_id}")
                    await bob2.expect("webrtc-offer", **{"from": member.peer_id, "sdp": f"live from {member.peer_id}"})
                    await bob2.send(type="webrtc-answer", to=member.peer_id, sdp="answer")
                    await member.expect("webrtc-answer", **{"from": bob["peerId"], "sdp": "answer"})

                # The old token works nowhere any more.
                for port in (one.port, two.port):
                    async with connect(port) as thief:
                        failed = await resume(thief, bob["resumeToken"])
                        assert failed["code"] == "resume-failed" and "used already" in failed["message"]
                for member in (alice, dave, carol, bob2):
                    assert await member.messages_before_pong() == []  # nobody saw bob leave
                assert [await room_count(port) for port in (one.port, two.port)] == [4, 4]


@pytest.mark.parametrize(
    ("sender_at", "resume_at"),
    [(1, 1), (1, 0), (0, 1)],
    ids=["sender's node, from the other", "own node, sender on the other", "other node, sender on the first"],
)
async def test_a_burst_to_a_member_while_it_resumes_arrives_once_and_in_order(
    nodes: Nodes, sender_at: int, resume_at: int
) -> None:
    """The member was on node 0; a burst of relays races its resume."""
    servers = await nodes()
    async with connect(servers[sender_at].port) as sender:
        await sender.join("r", "sender")
        raw = await RawWebSocket.open(servers[0].port)
        bob = await raw_join(raw, "r", "bob")
        await sender.expect("user-joined", peerId=bob["peerId"])
        await lose(servers[0], raw)
        halfway = trio.Event()

        async def burst() -> None:
            for i in range(300):
                await sender.send(type="ice-candidate", to=bob["peerId"], candidate=candidate(i))
                if i == 100:
                    halfway.set()

        async with connect(servers[resume_at].port) as bob2, trio.open_nursery() as nursery:
            nursery.start_soon(burst)
            await halfway.wait()
            resumed = await resume(bob2, bob["resumeToken"])
            assert resumed["type"] == "resumed" and resumed["peerId"] == bob["peerId"]
            received = [number(await bob2.recv()) for _ in range(300)]
            assert received == list(range(300))
            assert await sender.messages_before_pong() == []  # no peer-not-found, no user-left
            assert await bob2.messages_before_pong() == []  # and nothing twice


async def test_a_drained_node_lets_its_members_resume_on_another(nodes: Nodes) -> None:
    one, two = await nodes(server={"shutdown_grace": TIMEOUT})
    async with connect(two.port) as alice, connect(one.port) as bob:
        await alice.join("r", "alice")
        joined = await bob.join("r", "bob")
        await alice.expect("user-joined", peerId=bob.peer_id)
        await alice.send(type="webrtc-offer", to=bob.peer_id, sdp="before")
        await bob.expect("webrtc-offer", sdp="before")
        one.shutdown()
        assert await closed_by(bob) == (1001, "server shutting down; resume on another node")
        await alice.send(type="webrtc-offer", to=bob.peer_id, sdp="while away")
        async with connect(two.port) as bob2:
            resumed = await resume(bob2, joined["resumeToken"])
            assert (resumed["type"], resumed["peerId"]) == ("resumed", bob.peer_id)
            await bob2.expect("webrtc-offer", sdp="while away")
            await alice.send(type="webrtc-offer", to=bob.peer_id, sdp="live")
            await bob2.expect("webrtc-offer", sdp="live")
            assert await alice.messages_before_pong() == []  # no user-left
            assert await room_count(two.port) == 2


async def test_a_drained_member_nobody_resumes_leaves_when_the_grace_ends(nodes: Nodes) -> None:
    one, two = await nodes(server={"shutdown_grace": 0.5})
    async with connect(two.port) as alice, connect(one.port) as bob:
        await alice.join("r", "alice")
        joined = await bob.join("r", "bob")
        await alice.expect("user-joined", peerId=bob.peer_id)
        one.shutdown()
        assert (await closed_by(bob))[0] == 1001
        await alice.expect("user-left", peerId=bob.peer_id)
        assert await alice.messages_before_pong() == []
        async with connect(two.port) as bob2:
            failed = await resume(bob2, joined["resumeToken"])
            assert failed["code"] == "resume-failed", failed
