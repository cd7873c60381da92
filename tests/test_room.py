"""Room membership and relay rules, with plain in-memory members."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import attrs

from signald import _messages as m
from signald._room import Room

NOW = datetime(2025, 10, 21, 10, 30, tzinfo=UTC)


@attrs.define
class FakeMember:
    peer_id: str
    username: str
    capacity: int = 10_000
    frames: list[dict[str, Any]] = attrs.field(factory=list)

    def deliver(self, text: bytes) -> bool:
        if len(self.frames) >= self.capacity:
            return False
        self.frames.append(json.loads(text))
        return True

    def types(self) -> list[str]:
        return [frame["type"] for frame in self.frames]


def room(max_participants: int = 4) -> Room:
    return Room("r", "Room", max_participants, NOW, persistent=False)


def test_join_tells_joiner_the_others_in_join_order_and_others_the_joiner() -> None:
    r = room()
    a, b, c = FakeMember("a", "A"), FakeMember("b", "B"), FakeMember("c", "C")
    assert r.join(a, NOW, "req")
    assert a.frames == [
        {"type": "joined-room", "roomId": "r", "peerId": "a", "username": "A", "participants": [], "requestId": "req"}
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
    r.leave("b")
    assert a.frames[-1] == {"type": "user-left", "roomId": "r", "peerId": "b", "username": "B"}
    assert b.types() == ["joined-room"]
    r.leave("nobody")
    assert len(a.frames) == 3


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
    r.leave("m1")
    r.leave("m3")
    late = FakeMember("z", "Z")
    r.join(late, NOW)

    def events(member: FakeMember) -> list[tuple[str, str]]:
        return [(f["type"], f["peerId"]) for f in member.frames if f["type"] in ("user-joined", "user-left")]

    survivors = [members[0], members[2], members[4]]
    tail = events(survivors[0])[-3:]
    assert tail == [("user-left", "m1"), ("user-left", "m3"), ("user-joined", "z")]
    for member in survivors:
        assert events(member)[-3:] == tail
