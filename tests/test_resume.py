"""A network blip is not a goodbye: suspend and resume through real sockets.

The member whose connection is lost is a :class:`RawWebSocket`, so the test can cut its TCP
connection without a close frame (a reset), which is what a phone switching networks does.
Every wait is bounded; "the server has seen the loss" is observed as its connection count
dropping, which happens only after the session has handed its member to the room.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import trio

from signald import Server

from ._clients import Client, connect, http_request, text_frame
from .adversarial._harness import RawWebSocket, raw_websocket, reset, wait_until


async def raw_join(raw: RawWebSocket, room: str, username: str) -> dict[str, Any]:
    await raw.send(text_frame({"type": "join-room", "roomId": room, "username": username}))
    joined = await raw.recv()
    assert joined["type"] == "joined-room", joined
    return joined


async def lose(server: Server, raw: RawWebSocket, connections_left: int) -> None:
    """Cut ``raw``'s TCP connection with a reset, and wait until the server has noticed."""
    await reset(raw.stream)
    await wait_until(lambda: server.connections.total == connections_left)


async def resume(client: Client, token: str, **fields: Any) -> dict[str, Any]:
    await client.send(type="resume", token=token, **fields)
    return await client.recv()


async def test_a_dropped_member_resumes_with_what_it_missed_then_goes_live(
    server_factory: Callable[..., Any],
) -> None:
    server = await server_factory()
    async with connect(server.port) as alice:
        await alice.join("r", "alice")
        raw = await RawWebSocket.open(server.port)
        bob = await raw_join(raw, "r", "bob")
        assert bob["resumeGrace"] == 30 and isinstance(bob["resumeToken"], str)
        await alice.expect("user-joined", peerId=bob["peerId"])
        await lose(server, raw, 1)

        for n in range(3):  # kept for bob, not answered with peer-not-found
            await alice.send(type="webrtc-offer", to=bob["peerId"], sdp=f"offer {n}")
        async with connect(server.port) as carol:
            await carol.join("r", "carol")
            status, _, room = await http_request(server.port, "GET", "/api/rooms/r")
            assert status == 200 and room["participantCount"] == 3
            assert [p["username"] for p in room["participants"]] == ["alice", "bob", "carol"]
            assert (await alice.expect("user-joined"))["username"] == "carol"
            assert await alice.messages_before_pong() == []  # nothing about bob at all

            async with connect(server.port) as bob2:
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
                for n in range(3):
                    await bob2.expect("webrtc-offer", **{"from": alice.peer_id, "sdp": f"offer {n}"})
                await bob2.expect("user-joined", peerId=carol.peer_id, username="carol")
                # Live again, both ways.
                await alice.send(type="webrtc-offer", to=bob["peerId"], sdp="live")
                await bob2.expect("webrtc-offer", **{"from": alice.peer_id, "sdp": "live"})
                await bob2.send(type="webrtc-answer", to=alice.peer_id, sdp="answer")
                await alice.expect("webrtc-answer", **{"from": bob["peerId"], "sdp": "answer"})
                assert await alice.messages_before_pong() == []
                assert await carol.messages_before_pong() == []
                assert await bob2.messages_before_pong() == []


async def test_the_grace_running_out_ends_the_session_once(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(rooms={"resume_grace": 0.2})
    async with connect(server.port) as alice:
        await alice.join("r", "alice")
        raw = await RawWebSocket.open(server.port)
        bob = await raw_join(raw, "r", "bob")
        await alice.expect("user-joined", peerId=bob["peerId"])
        await lose(server, raw, 1)
        await alice.expect("user-left", peerId=bob["peerId"], username="bob")
        await alice.send(type="webrtc-offer", to=bob["peerId"], sdp="late")
        gone = await alice.expect("error", code="peer-not-found")
        assert bob["peerId"] in gone["message"]
        assert await alice.messages_before_pong() == []  # user-left came once
        async with connect(server.port) as bob2:
            failed = await resume(bob2, bob["resumeToken"], requestId=7)
            assert failed["type"] == "error" and failed["code"] == "resume-failed" and failed["requestId"] == 7
            assert "away longer than rooms.resume_grace" in failed["message"]
            await bob2.join("r", "bob")  # the connection stays usable: a fresh join
            assert bob2.peer_id != bob["peerId"]


async def test_more_missed_messages_than_the_buffer_end_the_session(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(rooms={"resume_buffer": 3})
    async with connect(server.port) as alice:
        await alice.join("r", "alice")
        raw = await RawWebSocket.open(server.port)
        bob = await raw_join(raw, "r", "bob")
        await alice.expect("user-joined")
        await lose(server, raw, 1)
        for n in range(4):
            await alice.send(type="webrtc-offer", to=bob["peerId"], sdp=f"offer {n}")
        assert await alice.messages_before_pong() == [
            {"type": "user-left", "roomId": "r", "peerId": bob["peerId"], "username": "bob"}
        ]
        async with connect(server.port) as bob2:
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
async def test_a_bad_token_fails_and_the_connection_stays_usable(server: Server, token: str, words: str) -> None:
    async with connect(server.port) as alice, connect(server.port) as mallory:
        await alice.join("r", "alice")
        failed = await resume(mallory, token, requestId="m")
        assert failed == {"type": "error", "code": "resume-failed", "message": failed["message"], "requestId": "m"}
        assert words in failed["message"]
        await mallory.roundtrip_ping()
        await mallory.join("r", "mallory")
        await alice.expect("user-joined", username="mallory")


async def test_a_token_works_once(server_factory: Callable[..., Any]) -> None:
    server = await server_factory()
    async with connect(server.port) as alice:
        await alice.join("r", "alice")
        raw = await RawWebSocket.open(server.port)
        bob = await raw_join(raw, "r", "bob")
        await alice.expect("user-joined")
        await lose(server, raw, 1)
        async with connect(server.port) as bob2, connect(server.port) as thief:
            assert (await resume(bob2, bob["resumeToken"]))["type"] == "resumed"
            failed = await resume(thief, bob["resumeToken"])
            assert failed["code"] == "resume-failed" and "used already" in failed["message"]
            await alice.send(type="webrtc-offer", to=bob["peerId"], sdp="still bob2")
            await bob2.expect("webrtc-offer", sdp="still bob2")
            assert await thief.messages_before_pong() == []
            already = await resume(bob2, bob["resumeToken"], requestId=1)  # and one resume per connection
            assert already["code"] == "already-in-room"


@pytest.mark.parametrize("how", ["leave-room", "close 1000", "close 1001"])
async def test_a_deliberate_goodbye_ends_the_session_at_once(server: Server, how: str) -> None:
    async with connect(server.port) as alice:
        await alice.join("r", "alice")
        async with connect(server.port) as bob:
            joined = await bob.join("r", "bob")
            await alice.expect("user-joined")
            if how == "leave-room":
                await bob.send(type="leave-room")
            else:
                await bob.ws.aclose(code=int(how.split()[1]))
            await alice.expect("user-left", peerId=bob.peer_id)
        async with connect(server.port) as bob2:
            failed = await resume(bob2, joined["resumeToken"])
            assert failed["code"] == "resume-failed" and "left the room" in failed["message"]


@pytest.mark.parametrize("how", ["fin without a close frame", "close 4000"])
async def test_other_endings_keep_the_seat(server: Server, how: str) -> None:
    async with connect(server.port) as alice:
        await alice.join("r", "alice")
        raw = await RawWebSocket.open(server.port)
        bob = await raw_join(raw, "r", "bob")
        await alice.expect("user-joined")
        if how == "close 4000":
            await raw.send(b"\x88\x82\x00\x00\x00\x00" + (4000).to_bytes(2, "big"))  # a masked close frame
            assert await raw.expect_close() == 4000
        await raw.aclose()
        await wait_until(lambda: server.connections.total == 1)
        assert await alice.messages_before_pong() == []
        async with connect(server.port) as bob2:
            assert (await resume(bob2, bob["resumeToken"]))["missed"] == 0


async def test_a_silent_connection_is_dropped_and_its_seat_kept(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(limits={"ping_interval": 0.05, "ping_timeout": 0.2, "close_timeout": 0.2})
    async with connect(server.port) as alice:
        await alice.join("r", "alice")
        async with raw_websocket(server.port) as raw:  # it never answers pings
            bob = await raw_join(raw, "r", "bob")
            await alice.expect("user-joined")
            await wait_until(lambda: server.connections.total == 1)  # dropped for the ping timeout
            await alice.send(type="ice-candidate", to=bob["peerId"], candidate=None)
            assert await alice.messages_before_pong() == []
            async with connect(server.port) as bob2:
                resumed = await resume(bob2, bob["resumeToken"])
                assert resumed["missed"] == 1
                await bob2.expect("ice-candidate", **{"from": alice.peer_id, "candidate": None})


async def test_resuming_a_connection_that_is_still_open_closes_the_old_one(server: Server) -> None:
    async with connect(server.port) as alice:
        await alice.join("r", "alice")
        async with raw_websocket(server.port) as old:
            bob = await raw_join(old, "r", "bob")
            await alice.expect("user-joined")
            async with connect(server.port) as new:
                resumed = await resume(new, bob["resumeToken"])
                assert resumed["type"] == "resumed" and resumed["missed"] == 0
                event = await old.next_event()
                assert (event.code, event.reason) == (4001, "resumed elsewhere")  # type: ignore[attr-defined]
                await alice.send(type="webrtc-offer", to=bob["peerId"], sdp="once")
                await new.expect("webrtc-offer", sdp="once")
                await wait_until(lambda: server.connections.total == 2)
                assert await alice.messages_before_pong() == []  # the room saw nothing
                assert await new.messages_before_pong() == []
                status, _, room = await http_request(server.port, "GET", "/api/rooms/r")
                assert (status, room["participantCount"]) == (200, 2)


async def test_resume_off_gives_no_token_and_refuses(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(rooms={"resume_grace": 0})
    async with connect(server.port) as alice, connect(server.port) as bob:
        joined = await alice.join("r", "alice")
        assert "resumeToken" not in joined and joined["resumeGrace"] == 0
        failed = await resume(bob, f"r.{alice.peer_id}.x")
        assert failed["code"] == "resume-failed" and "turned off" in failed["message"]


async def test_tokens_are_never_logged(server_factory: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="signald")
    server = await server_factory()
    async with connect(server.port) as alice:
        await alice.join("r", "alice")
        raw = await RawWebSocket.open(server.port)
        bob = await raw_join(raw, "r", "bob")
        await lose(server, raw, 1)
        async with connect(server.port) as bob2, connect(server.port) as other:
            resumed = await resume(bob2, bob["resumeToken"])
            await resume(other, bob["resumeToken"])
            await bob2.send(type="leave-room")
            await bob2.roundtrip_ping()
            await trio.testing.wait_all_tasks_blocked()
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "resumed on a new connection" in text  # the log does tell the story...
    for token in (bob["resumeToken"], resumed["resumeToken"]):
        assert token.split(".")[2] not in text  # ...without the secrets
