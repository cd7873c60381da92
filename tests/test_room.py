"""Room membership and relay rules, with plain in-memory members."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

import attrs
import pytest

from signald import _messages as m
from signald._room import TOKEN_EVICTED, TOKEN_EXPIRED, TOKEN_LEFT, TOKEN_OVERFLOWED, TOKEN_USED, Room

NOW = datetime(2025, 10, 21, 10, 30, tzinfo=UTC)


@attrs.define
class FakeMember:
    peer_id: str
    username: str
    capacity: int = 10_000
    frames: list[dict[str, Any]] = attrs.field(factory=list)
    #: Frames queued for this member's connection and not yet written (see ``superseded``).
    unsent: list[bytes] = attrs.field(factory=list)
    was_superseded: bool = False

    def deliver(self, text: bytes) -> bool:
        if self.was_superseded or len(self.frames) >= self.capacity:
            return False
        self.frames.append(json.loads(text))
        return True

    def superseded(self) -> list[bytes]:
        self.was_superseded = True
        unsent, self.unsent = self.unsent, []
        return unsent

    def types(self) -> list[str]:
        return [frame["type"] for frame in self.frames]


def room(max_participants: int = 4) -> Room:
    return Room("r", "Room", max_participants, NOW, persistent=False)


def test_join_tells_joiner_the_others_in_join_order_and_others_the_joiner() -> None:
    r = room()
    a, b, c = FakeMember("a", "A"), FakeMember("b", "B"), FakeMember("c", "C")
    assert r.join(a, NOW, "req")
    assert a.frames == [
        {
            "type": "joined-room",
            "roomId": "r",
            "peerId": "a",
            "username": "A",
            "participants": [],
            "resumeGrace": 0,
            "requestId": "req",
        }
    ]
    r.join(b, NOW)
    r.join(c, NOW)
    assert c.frames[0]["participants"] == [{"peerId": "a", "username": "A"}, {"peerId": "b", "username": "B"}]
    assert a.types() == ["joined-room", "user-joined", "user-joined"]
    assert b.types() == ["joined-room", "user-joined"]
    assert r.participant_count == 3


def test_full_room_refuses_with_error_and_no_events() -> None:
    r = room(max_participants=2)
    a, b, c = FakeMember("a", "A"), FakeMember("b", "B"), FakeMember("c", "C")
    r.join(a, NOW)
    r.join(b, NOW)
    assert not r.join(c, NOW, 9)
    assert c.frames == [{"type": "error", "code": m.ROOM_FULL, "message": c.frames[0]["message"], "requestId": 9}]
    assert "c" not in r.seats
    assert a.types() == ["joined-room", "user-joined"]


def test_leave_tells_the_others() -> None:
    r = room()
    a, b = FakeMember("a", "A"), FakeMember("b", "B")
    r.join(a, NOW)
    r.join(b, NOW)
    r.leave(b)
    assert a.frames[-1] == {"type": "user-left", "roomId": "r", "peerId": "b", "username": "B"}
    assert b.types() == ["joined-room"]
    r.leave(FakeMember("nobody", "N"))
    r.leave(FakeMember("a", "an impostor with a's id"))  # only the member itself speaks for its seat
    assert len(a.frames) == 3 and "a" in r.seats


def test_relay_reaches_only_its_target_in_order() -> None:
    r = room()
    a, b, c = FakeMember("a", "A"), FakeMember("b", "B"), FakeMember("c", "C")
    for member in (a, b, c):
        r.join(member, NOW)
    for i in range(5):
        r.relay("a", "b", json.dumps({"type": "webrtc-offer", "from": "a", "sdp": str(i)}))
    assert [f["sdp"] for f in b.frames if f["type"] == "webrtc-offer"] == ["0", "1", "2", "3", "4"]
    assert "webrtc-offer" not in c.types()
    assert "webrtc-offer" not in a.types()


def test_relay_to_unknown_peer_errors_to_sender() -> None:
    r = room()
    a = FakeMember("a", "A")
    r.join(a, NOW)
    r.relay("a", "ghost", "{}", "q")
    assert a.frames[-1]["code"] == m.PEER_NOT_FOUND and a.frames[-1]["requestId"] == "q"


def test_relay_from_non_member_is_dropped() -> None:
    r = room()
    b = FakeMember("b", "B")
    r.join(b, NOW)
    r.relay("gone", "b", '{"type":"x"}')
    assert b.types() == ["joined-room"]


def test_overflowing_member_is_evicted_and_others_told() -> None:
    r = room()
    a, b, slow = FakeMember("a", "A"), FakeMember("b", "B"), FakeMember("s", "S", capacity=1)
    r.join(a, NOW)
    r.join(slow, NOW)  # takes joined-room, now full
    r.join(b, NOW)  # user-joined to slow overflows: slow is evicted
    assert "s" not in r.seats
    assert a.types() == ["joined-room", "user-joined", "user-joined", "user-left"]
    assert b.frames[0]["participants"] == [{"peerId": "a", "username": "A"}, {"peerId": "s", "username": "S"}]
    assert b.frames[-1] == {"type": "user-left", "roomId": "r", "peerId": "s", "username": "S"}


def test_eviction_cascade_terminates() -> None:
    r = room(max_participants=10)
    members = [FakeMember(f"m{i}", f"M{i}", capacity=i + 2) for i in range(6)]
    for member in members:
        r.join(member, NOW)
    for _ in range(20):
        r.relay("m5", "m0", '{"type":"webrtc-offer"}')
    assert "m0" not in r.seats
    for member in members[1:]:
        assert all(f["peerId"] != member.peer_id for f in members[0].frames if f["type"] == "user-left")


def test_membership_events_same_order_for_everyone() -> None:
    r = room(max_participants=10)
    members = [FakeMember(f"m{i}", f"M{i}") for i in range(5)]
    for member in members:
        r.join(member, NOW)
    r.leave(members[1])
    r.leave(members[3])
    late = FakeMember("z", "Z")
    r.join(late, NOW)

    def events(member: FakeMember) -> list[tuple[str, str]]:
        return [(f["type"], f["peerId"]) for f in member.frames if f["type"] in ("user-joined", "user-left")]

    survivors = [members[0], members[2], members[4]]
    tail = events(survivors[0])[-3:]
    assert tail == [("user-left", "m1"), ("user-left", "m3"), ("user-joined", "z")]
    for member in survivors:
        assert events(member)[-3:] == tail


# -- suspend and resume ---------------------------------------------------------------------

GRACE = 30.0
LIMIT = 1_000_000  # bytes kept at most for a suspended member, when a test does not care


@attrs.define
class Tokens:
    """Resume tokens for a room: hands out new ones and records why old ones stopped working."""

    serial: int = 0
    retired: dict[str, str] = attrs.field(factory=dict)

    def new(self) -> str:
        self.serial += 1
        return f"token{self.serial}"

    def retire(self, token: str, why: str) -> None:
        assert token not in self.retired, f"{token} retired twice"
        self.retired[token] = why


def resumable(tokens: Tokens, max_participants: int = 4, buffer: int = 256) -> Room:
    return Room(
        "r",
        "Room",
        max_participants,
        NOW,
        persistent=False,
        resume_grace=GRACE,
        resume_buffer=buffer,
        token_retired=tokens.retire,
    )


def seated(r: Room, tokens: Tokens, *members: FakeMember) -> list[str]:
    """Join ``members`` in order; returns their resume tokens."""
    issued = []
    for member in members:
        issued.append(tokens.new())
        assert r.join(member, NOW, resume_token=issued[-1])
    return issued


def offer(sender: str, n: int) -> bytes:
    return json.dumps({"type": "webrtc-offer", "from": sender, "sdp": str(n)}).encode()


def test_joined_room_carries_the_token_and_the_grace() -> None:
    tokens = Tokens()
    r = resumable(tokens)
    a = FakeMember("a", "A")
    r.join(a, NOW, 1, resume_token="secret")
    assert a.frames == [
        {
            "type": "joined-room",
            "roomId": "r",
            "peerId": "a",
            "username": "A",
            "participants": [],
            "resumeToken": "secret",
            "resumeGrace": 30,
            "requestId": 1,
        }
    ]


def test_suspended_member_keeps_its_seat_and_its_frames_and_nobody_notices() -> None:
    tokens = Tokens()
    r = resumable(tokens, max_participants=3)
    a, b = FakeMember("a", "A"), FakeMember("b", "B")
    token_a, _ = seated(r, tokens, a, b)
    r.suspend(a, 100.0, [], LIMIT)
    assert list(r.suspended) == ["a"] and r.next_expiry == 100.0 + GRACE
    for n in range(3):
        r.relay("b", "a", offer("b", n))  # kept, not peer-not-found
    c = FakeMember("c", "C")
    assert r.join(c, NOW, resume_token=tokens.new())
    assert c.frames[0]["participants"] == [{"peerId": "a", "username": "A"}, {"peerId": "b", "username": "B"}]
    assert r.participant_count == 3
    assert not r.join(FakeMember("d", "D"), NOW, resume_token=tokens.new())  # a still holds its seat
    assert b.types() == ["joined-room", "user-joined"] and "error" not in b.types()
    assert a.types() == ["joined-room", "user-joined"]  # the lost connection got nothing more

    a2 = FakeMember("a", "not used: the seat's username is kept")
    resumed = r.resume("a", token_a, FakeMember, "fresh", "rq")
    assert resumed is not None and resumed.username == "A"
    assert resumed.frames == [
        {
            "type": "resumed",
            "roomId": "r",
            "peerId": "a",
            "username": "A",
            "participants": [{"peerId": "b", "username": "B"}, {"peerId": "c", "username": "C"}],
            "missed": 4,
            "resumeToken": "fresh",
            "resumeGrace": 30,
            "requestId": "rq",
        },
        *(json.loads(offer("b", n)) for n in range(3)),
        {"type": "user-joined", "roomId": "r", "peerId": "c", "username": "C"},
    ]
    assert not a2.frames
    r.relay("c", "a", offer("c", 9))  # then live
    assert resumed.frames[-1] == json.loads(offer("c", 9))
    assert not r.suspended and r.next_expiry == math.inf
    assert b.types() == ["joined-room", "user-joined"] and c.types() == ["joined-room"]
    assert tokens.retired == {token_a: TOKEN_USED}


def test_frames_the_lost_connection_never_wrote_are_kept_first() -> None:
    tokens = Tokens()
    r = resumable(tokens)
    a, b = FakeMember("a", "A"), FakeMember("b", "B")
    token_a, _ = seated(r, tokens, a, b)
    r.suspend(a, 0.0, [offer("b", 0), offer("b", 1)], LIMIT)
    r.relay("b", "a", offer("b", 2))
    resumed = r.resume("a", token_a, FakeMember, tokens.new())
    assert resumed is not None
    assert resumed.frames[0]["missed"] == 3
    assert [f["sdp"] for f in resumed.frames[1:]] == ["0", "1", "2"]


def test_grace_expiry_ends_the_session_once_with_user_left() -> None:
    tokens = Tokens()
    r = resumable(tokens)
    a, b = FakeMember("a", "A"), FakeMember("b", "B")
    token_a, _ = seated(r, tokens, a, b)
    r.suspend(a, 10.0, [], LIMIT)
    assert r.expire(10.0 + GRACE - 0.001) == [] and "a" in r.seats
    assert r.expire(10.0 + GRACE) == ["a"]
    assert r.expire(10.0 + GRACE + 1) == []
    assert [f for f in b.frames if f["type"] == "user-left"] == [
        {"type": "user-left", "roomId": "r", "peerId": "a", "username": "A"}
    ]
    assert "a" not in r.seats and not r.suspended
    assert tokens.retired == {token_a: TOKEN_EXPIRED}
    assert r.resume("a", token_a, FakeMember, tokens.new()) is None


def test_suspended_members_expire_in_the_order_their_graces_end() -> None:
    tokens = Tokens()
    r = resumable(tokens)
    a, b, c = FakeMember("a", "A"), FakeMember("b", "B"), FakeMember("c", "C")
    seated(r, tokens, a, b, c)
    r.suspend(b, 5.0, [], LIMIT)
    r.suspend(a, 1.0, [], LIMIT)
    assert r.next_expiry == 1.0 + GRACE
    assert r.expire(1.0 + GRACE) == ["a"]
    assert r.next_expiry == 5.0 + GRACE
    assert r.expire(5.0 + GRACE) == ["b"]
    assert [f["peerId"] for f in c.frames if f["type"] == "user-left"] == ["a", "b"]


@pytest.mark.parametrize("bound", ["frames", "bytes"])
def test_overflowing_what_is_kept_ends_the_session(bound: str) -> None:
    tokens = Tokens()
    r = resumable(tokens, buffer=3 if bound == "frames" else 100)
    a, b = FakeMember("a", "A"), FakeMember("b", "B")
    token_a, _ = seated(r, tokens, a, b)
    r.suspend(a, 0.0, [], 1000 if bound == "bytes" else LIMIT)
    sent = 0
    while "a" in r.seats:
        assert sent < 100
        r.relay("b", "a", offer("b", sent))
        sent += 1
    assert sent == 4 if bound == "frames" else 10 < sent < 30
    assert b.frames[-1] == {"type": "user-left", "roomId": "r", "peerId": "a", "username": "A"}
    assert "error" not in b.types()  # the overflowing relay was not answered with peer-not-found
    assert tokens.retired == {token_a: TOKEN_OVERFLOWED}


def test_unsent_frames_beyond_the_buffer_end_the_session_at_once() -> None:
    tokens = Tokens()
    r = resumable(tokens, buffer=2)
    a, b = FakeMember("a", "A"), FakeMember("b", "B")
    seated(r, tokens, a, b)
    r.suspend(a, 0.0, [offer("b", n) for n in range(3)], LIMIT)
    assert "a" not in r.seats and b.types()[-1] == "user-left"


def test_a_token_works_once_and_only_for_its_seat() -> None:
    tokens = Tokens()
    r = resumable(tokens)
    a, b = FakeMember("a", "A"), FakeMember("b", "B")
    token_a, token_b = seated(r, tokens, a, b)
    r.suspend(a, 0.0, [], LIMIT)
    assert r.resume("a", token_b, FakeMember, tokens.new()) is None  # b's secret does not open a's seat
    assert r.resume("a", "token-guess", FakeMember, tokens.new()) is None
    assert r.resume("nobody", token_a, FakeMember, tokens.new()) is None
    assert list(r.suspended) == ["a"]  # the failures changed nothing
    first = r.resume("a", token_a, FakeMember, "second")
    assert first is not None
    assert r.resume("a", token_a, FakeMember, tokens.new()) is None  # used up
    r.suspend(first, 1.0, [], LIMIT)
    again = r.resume("a", "second", FakeMember, "third")
    assert again is not None and again.frames[0]["missed"] == 0
    assert tokens.retired == {token_a: TOKEN_USED, "second": TOKEN_USED}
    assert b.types() == ["joined-room"]


def test_resume_takes_over_a_connection_that_is_still_open_without_duplicates() -> None:
    tokens = Tokens()
    r = resumable(tokens)
    a, b = FakeMember("a", "A"), FakeMember("b", "B")
    token_a, _ = seated(r, tokens, a, b)
    a.unsent = [offer("b", 0)]  # queued on the old connection, never written
    resumed = r.resume("a", token_a, FakeMember, tokens.new())
    assert a.was_superseded and resumed is not None
    assert resumed.frames[0]["missed"] == 1 and resumed.frames[1]["sdp"] == "0"
    r.relay("b", "a", offer("b", 1))
    assert resumed.frames[-1]["sdp"] == "1" and a.types() == ["joined-room", "user-joined"]
    r.leave(a)  # the old connection closing does not take the seat with it
    r.suspend(a, 0.0, [], LIMIT)
    assert r.seats["a"].member is resumed and not r.suspended
    assert b.types() == ["joined-room"]


def test_no_grace_means_a_lost_connection_leaves_at_once() -> None:
    r = room()
    a, b = FakeMember("a", "A"), FakeMember("b", "B")
    r.join(a, NOW)
    r.join(b, NOW)
    r.suspend(a, 0.0, [], LIMIT)
    assert "a" not in r.seats and b.types()[-1] == "user-left"


def test_leaving_or_eviction_retire_the_token_with_the_reason() -> None:
    tokens = Tokens()
    r = resumable(tokens)
    a, b, slow = FakeMember("a", "A"), FakeMember("b", "B"), FakeMember("s", "S", capacity=1)
    token_a, _, token_s = seated(r, tokens, a, b, slow)
    r.leave(a)  # telling slow overflows it
    r.suspend(b, 0.0, [], LIMIT)
    r.leave(b)  # a suspended member's old connection has no say any more: only expiry ends it
    assert tokens.retired == {token_a: TOKEN_LEFT, token_s: TOKEN_EVICTED}
    assert list(r.seats) == ["b"]
