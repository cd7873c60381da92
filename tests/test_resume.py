"""A network blip is not a goodbye: suspend and resume through real sockets.

Every test here takes ``topology`` (or ``start_topology``) and so runs twice: against one
process, and against two cluster nodes on a real Redis (tests/_topology.py), since a member
must not be able to tell the two apart. The member whose connection is lost is client 1, so
on node 1; it always comes back as client 0, so on node 0: in a cluster it resumes on the
*other* node than the one it dropped on, which is the cluster's promise. Other members sit
on both nodes. None of these tests is about one process only: the transport's side of
suspension (a reset, a FIN, a close code, a ping timeout) is each node's own, but what the
room and the member see after it is what a cluster must keep. tests/test_cluster_resume.py
has what only a cluster has (a burst racing a claim, a drain's handover, a resume on the
member's own node claiming in Redis).

The lost member is a :class:`RawWebSocket`, so the test can cut its TCP connection without
a close frame (a reset), which is what a phone switching networks does. Every wait is
bounded; "the node has seen the loss" is observed as its connection count dropping, which
happens only after the session has handed its member to the room.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed

from signald import Server

from ._clients import TIMEOUT, Client, http_request, text_frame
from ._topology import Topology
from .adversarial._harness import RawWebSocket, raw_websocket, reset, wait_until
from .conftest import StartTopology

LOST = 1  # the client index of the member whose connection is lost (node 1 of two)
BACK = 0  # the client index it resumes as (node 0 of two: the other node)


async def raw_join(raw: RawWebSocket, room: str, username: str) -> dict[str, Any]:
    await raw.send(text_frame({"type": "join-room", "roomId": room, "username": username}))
    joined = await raw.recv()
    assert joined["type"] == "joined-room", joined
    return joined


async def lose(server: Server, raw: RawWebSocket) -> None:
    """Cut ``raw``'s TCP connection (to ``server``) with a reset, and wait until it has noticed."""
    left = server.connections.total - 1
    await reset(raw.stream)
    await wait_until(lambda: server.connections.total == left)


async def resume(client: Client, token: str, **fields: Any) -> dict[str, Any]:
    await client.send(type="resume", token=token, **fields)
    return await client.recv()


async def closed_by(client: Client) -> tuple[int | None, str | None]:
    """The close code and reason the server closed ``client`` with."""
    with trio.fail_after(TIMEOUT), pytest.raises(ConnectionClosed) as closed:
        while True:
            await client.ws.get_message()
    return closed.value.reason.code, closed.value.reason.reason


async def room_participants(port: int) -> list[str]:
    status, _, room = await http_request(port, "GET", "/api/rooms/r")
    assert status == 200 and room["participantCount"] == len(room["participants"]), room
    return [p["username"] for p in room["participants"]]


async def test_a_dropped_member_resumes_with_what_it_missed_then_goes_live(topology: Topology) -> None:
    async with topology.connect(0) as alice:
        await alice.join("r", "alice")
        raw = await RawWebSocket.open(topology.port(LOST))
        bob = await raw_join(raw, "r", "bob")
        assert bob["resumeGrace"] == 30 and isinstance(bob["resumeToken"], str)
        await alice.expect("user-joined", peerId=bob["peerId"])
        await lose(topology.server(LOST), raw)

        async with topology.connect(1) as carol:  # on the node bob was lost on
            await carol.join("r", "carol")
            assert (await alice.expect("user-joined"))["username"] == "carol"
            for port in topology.ports:  # bob is still present, everywhere
                assert await room_participants(port) == ["alice", "bob", "carol"]
            # Kept for bob, not answered with peer-not-found, in this order: the newcomer's
            # user-joined, two offers from alice, one from carol. Alice's relay to carol
            # follows hers to bob on the same way, so carol's to bob comes after them.
            for n in range(2):
                await alice.send(type="webrtc-offer", to=bob["peerId"], sdp=f"alice {n}")
            await alice.send(type="webrtc-offer", to=carol.peer_id, sdp="alice to carol")
            await carol.expect("webrtc-offer", sdp="alice to carol")
            await carol.send(type="webrtc-offer", to=bob["peerId"], sdp="carol")
            assert await alice.messages_before_pong() == []  # nothing about bob at all
            assert await carol.messages_before_pong() == []

            async with topology.connect(BACK) as bob2:
                resumed = await resume(bob2, bob["resumeToken"], requestId="back")
                assert resumed == {
                    "type": "resumed",
                    "roomId": "r",
                    "peerId": bob["peerId"],
                    "username": "bob",
                    "participants": [
                        {"peerId": alice.peer_id, "username": "alice"},
                        {"peerId": carol.peer_id, "username": "carol"},
                    ],
                    "missed": 4,
                    "resumeToken": resumed["resumeToken"],
                    "resumeGrace": 30,
                    "requestId": "back",
                }
                assert resumed["resumeToken"] != bob["resumeToken"]
                await bob2.expect("user-joined", peerId=carol.peer_id, username="carol")
                for n in range(2):
                    await bob2.expect("webrtc-offer", **{"from": alice.peer_id, "sdp": f"alice {n}"})
                await bob2.expect("webrtc-offer", **{"from": carol.peer_id, "sdp": "carol"})
                # Live again, both ways, with a member of each node.
                for member in (alice, carol):
                    await member.send(type="webrtc-offer", to=bob["peerId"], sdp=f"live from {member.peer_id}")
                    await bob2.expect("webrtc-offer", **{"from": member.peer_id, "sdp": f"live from {member.peer_id}"})
                    await bob2.send(type="webrtc-answer", to=member.peer_id, sdp="answer")
                    await member.expect("webrtc-answer", **{"from": bob["peerId"], "sdp": "answer"})
                for member in (alice, carol, bob2):
                    assert await member.messages_before_pong() == []  # nobody saw bob leave
                for port in topology.ports:
                    assert await room_participants(port) == ["alice", "bob", "carol"]


async def test_the_grace_running_out_ends_the_session_once(start_topology: StartTopology) -> None:
    topology = await start_topology(rooms={"resume_grace": 0.2})
    async with topology.connect(0) as alice, topology.connect(1) as dave:
        await alice.join("r", "alice")
        await dave.join("r", "dave")
        await alice.expect("user-joined", peerId=dave.peer_id)
        raw = await RawWebSocket.open(topology.port(LOST))
        bob = await raw_join(raw, "r", "bob")
        for member in (alice, dave):
            await member.expect("user-joined", peerId=bob["peerId"])
        await lose(topology.server(LOST), raw)
        for member in (alice, dave):
            await member.expect("user-left", peerId=bob["peerId"], username="bob")
        for member in (alice, dave):
            await member.send(type="webrtc-offer", to=bob["peerId"], sdp="late")
            gone = await member.expect("error", code="peer-not-found")
            assert bob["peerId"] in gone["message"]
            assert await member.messages_before_pong() == []  # user-left came once
        for port in topology.ports:
            assert await room_participants(port) == ["alice", "dave"]
        async with topology.connect(BACK) as bob2:
            failed = await resume(bob2, bob["resumeToken"], requestId=7)
            assert failed["type"] == "error" and failed["code"] == "resume-failed" and failed["requestId"] == 7
            assert "away longer than rooms.resume_grace" in failed["message"]
            await bob2.join("r", "bob")  # the connection stays usable: a fresh join
            assert bob2.peer_id != bob["peerId"]


async def test_more_missed_messages_than_the_buffer_end_the_session(start_topology: StartTopology) -> None:
    topology = await start_topology(rooms={"resume_buffer": 3})
    async with topology.connect(0) as alice, topology.connect(1) as dave:
        await alice.join("r", "alice")
        await dave.join("r", "dave")
        await alice.expect("user-joined", peerId=dave.peer_id)
        raw = await RawWebSocket.open(topology.port(LOST))
        bob = await raw_join(raw, "r", "bob")
        for member in (alice, dave):
            await member.expect("user-joined", peerId=bob["peerId"])
        await lose(topology.server(LOST), raw)
        for n in range(4):
            await alice.send(type="webrtc-offer", to=bob["peerId"], sdp=f"offer {n}")
        for member in (alice, dave):
            await member.expect("user-left", roomId="r", peerId=bob["peerId"], username="bob")
            assert await member.messages_before_pong() == []  # once, and no peer-not-found
        async with topology.connect(BACK) as bob2:
            failed = await resume(bob2, bob["resumeToken"])
            assert failed["code"] == "resume-failed" and "more messages arrived" in failed["message"]


@pytest.mark.parametrize(
    ("token", "words"),
    [
        ("not-a-token", "unknown resume token"),
        ("r.AAAAAAAAAAAAAAAAAAAAAA.guessed", "unknown resume token"),
        ("elsewhere.AAAAAAAAAAAAAAAAAAAAAA.guessed", "unknown resume token"),
    ],
)
async def test_a_bad_token_fails_and_the_connection_stays_usable(topology: Topology, token: str, words: str) -> None:
    async with topology.connect(0) as alice, topology.connect(1) as mallory:
        await alice.join("r", "alice")
        failed = await resume(mallory, token, requestId="m")
        assert failed == {"type": "error", "code": "resume-failed", "message": failed["message"], "requestId": "m"}
        assert words in failed["message"]
        await mallory.roundtrip_ping()
        await mallory.join("r", "mallory")
        await alice.expect("user-joined", username="mallory")


async def test_a_token_works_once(topology: Topology) -> None:
    async with topology.connect(0) as alice:
        await alice.join("r", "alice")
        raw = await RawWebSocket.open(topology.port(LOST))
        bob = await raw_join(raw, "r", "bob")
        await alice.expect("user-joined")
        await lose(topology.server(LOST), raw)
        async with topology.connect(BACK) as bob2:
            assert (await resume(bob2, bob["resumeToken"]))["type"] == "resumed"
            for i in range(len(topology.ports)):  # on no node, the former one included
                async with topology.connect(i) as thief:
                    failed = await resume(thief, bob["resumeToken"])
                    assert failed["code"] == "resume-failed" and "used already" in failed["message"]
                    await alice.send(type="webrtc-offer", to=bob["peerId"], sdp=f"still bob2 {i}")
                    await bob2.expect("webrtc-offer", sdp=f"still bob2 {i}")
                    assert await thief.messages_before_pong() == []
            already = await resume(bob2, bob["resumeToken"], requestId=1)  # and one resume per connection
            assert already["code"] == "already-in-room"


@pytest.mark.parametrize("how", ["leave-room", "close 1000", "close 1001"])
async def test_a_deliberate_goodbye_ends_the_session_at_once(topology: Topology, how: str) -> None:
    async with topology.connect(0) as alice:
        await alice.join("r", "alice")
        async with topology.connect(LOST) as bob:
            joined = await bob.join("r", "bob")
            await alice.expect("user-joined")
            if how == "leave-room":
                await bob.send(type="leave-room")
            else:
                await bob.ws.aclose(code=int(how.split()[1]))
            await alice.expect("user-left", peerId=bob.peer_id)
        async with topology.connect(BACK) as bob2:
            failed = await resume(bob2, joined["resumeToken"])
            assert failed["code"] == "resume-failed" and "left the room" in failed["message"]


@pytest.mark.parametrize("how", ["fin without a close frame", "close 4000"])
async def test_other_endings_keep_the_seat(topology: Topology, how: str) -> None:
    async with topology.connect(0) as alice:
        await alice.join("r", "alice")
        raw = await RawWebSocket.open(topology.port(LOST))
        bob = await raw_join(raw, "r", "bob")
        await alice.expect("user-joined")
        node = topology.server(LOST)
        left = node.connections.total - 1
        if how == "close 4000":
            await raw.send(b"\x88\x82\x00\x00\x00\x00" + (4000).to_bytes(2, "big"))  # a masked close frame
            assert await raw.expect_close() == 4000
        await raw.aclose()
        await wait_until(lambda: node.connections.total == left)
        assert await alice.messages_before_pong() == []
        async with topology.connect(BACK) as bob2:
            assert (await resume(bob2, bob["resumeToken"]))["missed"] == 0


async def test_a_silent_connection_is_dropped_and_its_seat_kept(start_topology: StartTopology) -> None:
    topology = await start_topology(limits={"ping_interval": 0.05, "ping_timeout": 0.2, "close_timeout": 0.2})
    async with topology.connect(0) as alice:
        await alice.join("r", "alice")
        async with raw_websocket(topology.port(LOST)) as raw:  # it never answers pings
            bob = await raw_join(raw, "r", "bob")
            await alice.expect("user-joined")
            node = topology.server(LOST)
            left = node.connections.total - 1
            await wait_until(lambda: node.connections.total == left)  # dropped for the ping timeout
            await alice.send(type="ice-candidate", to=bob["peerId"], candidate=None)
            assert await alice.messages_before_pong() == []
            async with topology.connect(BACK) as bob2:
                resumed = await resume(bob2, bob["resumeToken"])
                assert resumed["missed"] == 1
                await bob2.expect("ice-candidate", **{"from": alice.peer_id, "candidate": None})


async def test_resuming_a_connection_that_is_still_open_closes_the_old_one(topology: Topology) -> None:
    async with topology.connect(0) as alice, topology.connect(LOST) as old:
        await alice.join("r", "alice")
        joined = await old.join("r", "bob")
        await alice.expect("user-joined", peerId=old.peer_id)
        async with topology.connect(BACK) as new:
            resumed = await resume(new, joined["resumeToken"])
            assert (resumed["type"], resumed["missed"]) == ("resumed", 0)
            assert await closed_by(old) == (4001, "resumed elsewhere")
            await alice.send(type="webrtc-offer", to=old.peer_id, sdp="once")
            await new.expect("webrtc-offer", sdp="once")
            await wait_until(lambda: sum(server.connections.total for server in topology.servers) == 2)
            assert await alice.messages_before_pong() == []  # the room saw nothing
            assert await new.messages_before_pong() == []
            for port in topology.ports:
                assert await room_participants(port) == ["alice", "bob"]


async def test_resume_off_gives_no_token_and_refuses(start_topology: StartTopology) -> None:
    topology = await start_topology(rooms={"resume_grace": 0})
    async with topology.connect(0) as alice, topology.connect(1) as bob:
        joined = await alice.join("r", "alice")
        assert "resumeToken" not in joined and joined["resumeGrace"] == 0
        failed = await resume(bob, f"r.{alice.peer_id}.x")
        assert failed["code"] == "resume-failed" and "turned off" in failed["message"]


async def test_tokens_are_never_logged(topology: Topology, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="signald")
    async with topology.connect(0) as alice:
        await alice.join("r", "alice")
        raw = await RawWebSocket.open(topology.port(LOST))
        bob = await raw_join(raw, "r", "bob")
        await alice.expect("user-joined")
        await lose(topology.server(LOST), raw)
        async with topology.connect(BACK) as bob2, topology.connect(LOST) as other:
            resumed = await resume(bob2, bob["resumeToken"])
            await resume(other, bob["resumeToken"])
            await bob2.send(type="leave-room")
            await alice.expect("user-left", peerId=bob["peerId"])
            await bob2.roundtrip_ping()
            await trio.testing.wait_all_tasks_blocked()
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "resumed on a new connection" in text  # the log does tell the story...
    for token in (bob["resumeToken"], resumed["resumeToken"]):
        assert token.split(".")[2] not in text  # ...without the secrets
