"""The session core without sockets: events in, room commands and frames out (like test_room.py)."""

from __future__ import annotations

import json
import math
from typing import Any

import attrs

from signald import _messages as m
from signald._config import LimitsConfig, structure
from signald._outbox import Close, Item, Outbox, Ping
from signald._room import Member
from signald._session import Join, Leave, LocalMember, Relay, Resume, Session, State, Suspend

PEER = "N8yHf2sKq5WzUo1GvJ6iLg"


@attrs.frozen
class FakeRoom:
    """A room handle: the session only passes it back in its commands."""

    name: str

    async def leave(self, member: Member) -> None:
        raise AssertionError("the shell calls this, not the core")

    async def suspend(self, member: Member, unsent: list[str], max_bytes: int) -> None:
        raise AssertionError("the shell calls this, not the core")

    async def relay(self, sender_id: str, to: str, text: str, request_id: m.RequestId) -> None:
        raise AssertionError("the shell calls this, not the core")


ROOM = FakeRoom("r")


def limits(**overrides: Any) -> LimitsConfig:
    return structure({"limits": overrides}).limits


class Harness:
    """A session at time 0, its outbox, and readers for what came out."""

    def __init__(self, **overrides: Any) -> None:
        self.overflows = 0
        self.limits = limits(**overrides)
        self.outbox = Outbox(self.limits.send_queue_bytes, self._overflowed)
        ids = iter(f"peer{i}" for i in range(1000))
        self.session = Session(self.limits, self.outbox, 0.0, "test", new_id=lambda: next(ids))

    def _overflowed(self) -> None:
        self.overflows += 1
        self.session.overflowed(0.0)

    def send(self, now: float = 0.0, **message: Any) -> None:
        self.session.text(json.dumps(message), now)

    def commands(self) -> list[Any]:
        commands, self.session.commands = self.session.commands, []
        return commands

    def frames(self) -> list[Item]:
        """Everything queued, with text frames parsed."""
        items, self.outbox._items = self.outbox._items, []
        return [json.loads(item) if isinstance(item, bytes) else item for item in items]

    def join(self, room_id: str = "r", now: float = 0.0) -> str:
        self.send(now, type="join-room", roomId=room_id, username="u")
        (join,) = self.commands()
        assert isinstance(join, Join) and join.room_id == room_id
        self.session.joined(ROOM, now)
        self.member = join.member
        return join.member.peer_id


def test_join_then_relay_then_leave_are_room_commands_in_order() -> None:
    h = Harness()
    h.send(type="join-room", roomId="r", username="alice", requestId=7)
    (join,) = h.commands()
    assert join.room_id == "r" and join.request_id == 7
    assert (join.member.peer_id, join.member.username) == ("peer0", "alice")
    assert h.frames() == []  # joined-room comes from the room, not from the session
    h.session.joined(ROOM, 0.0)
    assert h.session.peer_id == "peer0"
    h.send(type="webrtc-offer", to=PEER, sdp="v=0", requestId=8)
    h.send(type="leave-room")
    relay, leave = h.commands()
    assert relay == Relay(ROOM, "peer0", PEER, b'{"type":"webrtc-offer","from":"peer0","sdp":"v=0"}', 8)
    assert leave == Leave(ROOM, join.member)
    assert h.session.peer_id is None
    h.send(type="webrtc-offer", to=PEER, sdp="v=0", requestId=9)
    assert h.commands() == []
    assert h.frames()[0]["code"] == m.NOT_IN_ROOM


def test_the_members_frames_go_to_the_outbox() -> None:
    h = Harness()
    h.send(type="join-room", roomId="r", username="u")
    (join,) = h.commands()
    assert join.member.deliver(b'{"type":"joined-room"}')
    assert h.frames() == [{"type": "joined-room"}]


def test_errors_outside_a_room_and_a_second_join() -> None:
    h = Harness()
    h.send(type="leave-room", requestId=1)
    h.send(type="ice-candidate", to=PEER, candidate=None, requestId=2)
    h.send(type="ping", requestId=3)
    h.session.binary(0.0)
    h.session.text("{nope", 0.0)
    assert [(f["type"], f.get("code"), f.get("requestId")) for f in h.frames()] == [  # type: ignore[index, union-attr]
        ("error", m.NOT_IN_ROOM, 1),
        ("error", m.NOT_IN_ROOM, 2),
        ("pong", None, 3),
        ("error", m.INVALID_MESSAGE, None),
        ("error", m.INVALID_JSON, None),
    ]
    h.send(type="join-room", roomId="r", username="u")
    h.send(type="join-room", roomId="s", username="u", requestId="again")  # the first is still in flight
    assert len(h.commands()) == 1
    h.session.joined(ROOM, 0.0)
    h.send(type="join-room", roomId="s", username="u", requestId="again")
    assert h.commands() == []
    assert [f["requestId"] for f in h.frames()] == ["again", "again"]  # type: ignore[index]


def test_a_refused_join_leaves_the_session_free_to_join_again() -> None:
    h = Harness(idle_timeout=10)
    h.send(type="join-room", roomId="full", username="u")
    h.commands()
    assert h.session.deadline == 20.0  # the next ping; no idle timeout while joining
    h.session.join_refused(5.0)
    assert h.session.deadline == 15.0  # idle again, from the refusal on
    h.join("other")
    assert h.session.peer_id == "peer1"


def test_a_60000_character_sdp_is_relayed_with_default_limits() -> None:
    """No shape bound refuses, by default, what max_message_bytes (65536) admits."""
    h = Harness()
    h.join()
    h.send(type="webrtc-offer", to=PEER, sdp="v" * 60_000)
    (relay,) = h.commands()
    assert isinstance(relay, Relay) and len(relay.text) > 60_000


def test_rate_limit_drops_then_closes_with_1008_and_leaves_at_once() -> None:
    h = Harness(message_rate=1.0, message_burst=3, rate_limit_close_after=3)  # the join takes one
    h.join()
    for _ in range(4):
        h.send(type="ping")
    frames = h.frames()
    assert [f["type"] for f in frames] == ["pong", "pong", "error", "error"]  # type: ignore[index]
    h.send(type="ping")  # the third drop closes
    assert h.commands() == [Leave(ROOM, h.member)]
    assert h.frames()[-1] == Close(1008, "rate limit exceeded")
    assert h.session.state is State.CLOSING
    h.send(type="ping")  # ignored once closing: nothing more goes out
    assert h.frames() == []


def test_pings_on_schedule_and_a_missing_pong_closes_and_suspends_at_once() -> None:
    h = Harness(ping_interval=20, ping_timeout=5, close_timeout=2)
    h.join()
    assert h.session.deadline == 20
    h.session.timer(19.9)  # early wake-ups do nothing
    assert h.frames() == []
    h.session.timer(20)
    (ping,) = h.frames()
    assert isinstance(ping, Ping) and h.session.deadline == 25
    h.session.pong(b"not ours", 21)
    assert h.session.deadline == 25
    h.session.pong(ping.payload, 22)
    assert h.session.deadline == 42  # answered: the next ping is an interval after the pong
    h.session.timer(42)
    (ping,) = h.frames()
    h.session.timer(47)
    # The room hears it now, not after the handshake; a silent connection may come back.
    assert h.commands() == [Suspend(ROOM, h.member, [], h.limits.send_queue_bytes)]
    assert h.frames() == [Close(1001, "ping timeout")]
    assert h.session.deadline == 49  # the close handshake's bound
    h.session.timer(49)
    assert h.session.done


def test_idle_outside_a_room_closes_with_1000_and_time_in_a_room_does_not_count() -> None:
    h = Harness(idle_timeout=10, ping_interval=1000)
    h.join(now=9)
    assert h.session.deadline == 1000
    h.session.timer(100)
    assert h.frames() == []
    h.send(100, type="leave-room")
    h.commands()
    assert h.session.deadline == 110
    h.send(105, type="ping")  # activity outside a room does not restart the clock
    h.frames()
    h.session.timer(110)
    assert h.frames() == [Close(1000, "idle: not in a room for 10 s")]


def test_a_join_answered_after_the_session_closed_is_undone() -> None:
    """Rule 3: the room seated the member while the session was closing: it must leave."""
    h = Harness()
    h.send(type="join-room", roomId="r", username="u")
    (join,) = h.commands()
    h.session.close(1001, "server shutting down", 1.0)
    assert h.commands() == []  # not in a room yet: nothing to leave
    h.session.joined(ROOM, 1.5)
    assert h.commands() == [Leave(ROOM, join.member)]
    assert h.session.peer_id is None


def test_eviction_closes_with_1008_after_dropping_the_queue() -> None:
    h = Harness(max_message_bytes=1024, send_queue_bytes=1024)
    h.join()
    assert h.outbox.push(b"x" * 1000)
    assert not h.outbox.push(b"y" * 100)
    assert h.overflows == 1
    assert h.frames() == [Close(1008, "send queue overflow: client is not reading")]
    assert h.commands() == [Leave(ROOM, h.member)]  # its room dropped it already; this is harmless


def test_a_codec_failure_leaves_and_waits_for_eof_within_the_close_bound() -> None:
    h = Harness(close_timeout=3)
    h.join()
    h.session.failed(1007, "text is not UTF-8", 10)
    assert h.commands() == [Leave(ROOM, h.member)]
    assert h.frames() == []  # the codec queued its own close frame
    assert (h.session.state, h.session.close_code, h.session.deadline) == (State.CLOSING, 1007, 13)
    h.session.socket_closed(11)
    assert h.session.done


def test_the_clients_goodbye_leaves_and_a_lost_socket_suspends() -> None:
    for code in (1000, 1001, 1005):
        h = Harness()
        h.join()
        h.session.peer_closed(code, 1.0)
        assert h.commands() == [Leave(ROOM, h.member)]
        assert h.session.done and h.session.deadline == -math.inf
    for end in ("close 4000", "close 1011", "socket_closed"):
        h = Harness()
        h.join()
        assert h.outbox.push(b'{"type":"user-joined"}')  # queued, never written
        if end == "socket_closed":
            h.session.socket_closed(1.0)
        else:
            h.session.peer_closed(int(end.split()[1]), 1.0)
        assert h.commands() == [Suspend(ROOM, h.member, [b'{"type":"user-joined"}'], h.limits.send_queue_bytes)]
        assert h.session.done and h.frames() == []


def test_the_clients_close_answers_ours() -> None:
    h = Harness()
    h.session.close(1001, "server shutting down", 0.0)
    assert h.session.state is State.CLOSING and h.session.close_code == 1001
    h.session.peer_closed(1001, 0.5)
    assert h.session.done and h.session.close_code == 1001  # the first close decided wins


# -- resume ---------------------------------------------------------------------------------

TOKEN = "r.peer7.secret"


def resume(h: Harness, now: float = 0.0, **extra: Any) -> Resume:
    h.send(now, type="resume", token=TOKEN, **extra)
    (command,) = h.commands()
    assert isinstance(command, Resume) and command.token == TOKEN
    assert "secret" not in repr(command)
    return command


def test_a_resume_takes_the_seat_it_is_given_and_then_acts_like_a_join() -> None:
    h = Harness(idle_timeout=10, ping_interval=1000)
    command = resume(h, requestId="back")
    assert command.request_id == "back" and h.session.deadline == 1000  # no idle timeout meanwhile
    member = h.session.member_for("peer7", "bob")
    assert member == LocalMember("peer7", "bob", h.outbox, list)
    h.session.resumed(ROOM, member, 0.0)
    assert h.session.peer_id == "peer7"
    h.send(type="ice-candidate", to=PEER, candidate=None)
    h.send(type="leave-room")
    relay, leave = h.commands()
    assert isinstance(relay, Relay) and relay.sender_id == "peer7"
    assert leave == Leave(ROOM, member)


def test_nothing_else_while_a_resume_is_pending_or_done() -> None:
    h = Harness()
    resume(h)
    for message in ({"type": "resume", "token": TOKEN}, {"type": "join-room", "roomId": "x", "username": "u"}):
        h.send(**message, requestId=1)
        assert h.commands() == []
        (error,) = h.frames()
        assert error["code"] == "already-in-room" and "already in room r" in error["message"]  # type: ignore[index]
    h.session.resumed(ROOM, h.session.member_for("peer7", "bob"), 0.0)
    h.send(type="resume", token=TOKEN)
    assert h.commands() == [] and h.frames()[0]["code"] == "already-in-room"  # type: ignore[index]


def test_a_failed_resume_is_told_and_the_session_may_join_afresh() -> None:
    h = Harness(idle_timeout=10, ping_interval=1000)
    resume(h, now=5.0, requestId=3)
    h.session.resume_failed("unknown resume token", 3, 6.0)
    assert h.frames() == [{"type": "error", "code": "resume-failed", "message": "unknown resume token", "requestId": 3}]
    assert h.session.deadline == 16  # outside a room again: the idle clock runs
    assert h.join() == "peer0"


def test_a_resume_answered_after_the_connection_ended_ends_the_seat_the_same_way() -> None:
    for lost in (True, False):
        h = Harness()
        resume(h)
        if lost:
            h.session.socket_closed(1.0)
        else:
            h.session.peer_closed(1000, 1.0)
        assert h.commands() == []  # not seated yet
        member = h.session.member_for("peer7", "bob")
        h.session.resumed(ROOM, member, 1.5)
        expected = Suspend(ROOM, member, [], h.limits.send_queue_bytes) if lost else Leave(ROOM, member)
        assert h.commands() == [expected]


def test_superseded_closes_with_4001_hands_over_the_unwritten_and_leaves_the_seat_alone() -> None:
    h = Harness()
    h.join()
    assert h.outbox.push(b'{"n":1}') and h.outbox.push(b'{"n":2}')
    unsent = h.session.superseded(2.0)
    assert unsent == [b'{"n":1}', b'{"n":2}']
    assert h.commands() == []  # the seat belongs to the connection that resumed
    assert h.frames() == [Close(4001, "resumed elsewhere")]
    assert h.session.state is State.CLOSING and h.session.peer_id is None
    h.session.socket_closed(2.5)
    assert h.commands() == []
