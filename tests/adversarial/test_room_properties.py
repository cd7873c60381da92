"""Random sequences of joins, leaves, relays and overflowing members, against pure rooms.

Hypothesis drives several :class:`~signald._room.Room` objects the way sessions do (one room per
client at a time, a fresh peer id per join, relays routed through the room the client last
joined) with members that may run out of queue space and get evicted. Every frame delivered is
checked at the moment of delivery, and the rooms' state after every step:

* membership is consistent: each seated member's picture of its room, built only from the
  frames it received, is exactly the room's other members; nobody is seated twice; an evicted
  member is seated nowhere;
* no relay crosses rooms and none reaches a non-member: a relay is delivered only to a member
  of the room relaying it, from a member of that same room, and only to its addressee;
* nothing but an ``error`` reaches anyone not seated, and that only to the one who asked.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import attrs
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from signald import _messages as m
from signald._room import Room

NOW = datetime(2025, 10, 21, tzinfo=UTC)
ROOMS = ("r0", "r1", "r2")
CLIENTS = 6


@attrs.define(eq=False)
class Probe:
    """A member that checks every frame handed to it against the world's rules."""

    world: RoomMachine
    peer_id: str
    username: str
    capacity: int
    frames: list[dict[str, Any]] = attrs.field(factory=list)
    overflowed: bool = False

    def deliver(self, text: bytes) -> bool:
        frame = json.loads(text)
        self.world.check_delivery(self, frame)
        if self.overflowed or len(self.frames) >= self.capacity:
            self.overflowed = True
            return False
        self.frames.append(frame)
        return True

    def view(self) -> dict[str, str]:
        """The room's other members, as this member learned of them from its frames."""
        others: dict[str, str] = {}
        for frame in self.frames:
            if frame["type"] == "joined-room":
                others = {p["peerId"]: p["username"] for p in frame["participants"]}
            elif frame["type"] == "user-joined":
                others[frame["peerId"]] = frame["username"]
            elif frame["type"] == "user-left":
                del others[frame["peerId"]]  # KeyError: told of a departure it never heard arrive
        return others


class RoomMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.rooms = {room_id: Room(room_id, room_id, 3, NOW, persistent=True) for room_id in ROOMS}
        #: Per client: its latest member and the room it last joined (None before any join).
        self.clients: list[tuple[Probe, Room] | None] = [None] * CLIENTS
        self.serial = 0
        #: The room whose method is running, and the member on whose behalf.
        self.acting: tuple[Room, Probe] | None = None

    # -- the rules: what sessions do --------------------------------------------------

    def _seated(self, client: int) -> tuple[Probe, Room] | None:
        slot = self.clients[client]
        if slot is not None and slot[0].peer_id in slot[1].seats:
            return slot
        return None

    @rule(client=st.integers(0, CLIENTS - 1), room_id=st.sampled_from(ROOMS), capacity=st.integers(1, 12))
    def join(self, client: int, room_id: str, capacity: int) -> None:
        if self._seated(client):
            return  # a session answers already-in-room without asking the room
        self.serial += 1
        probe = Probe(self, f"peer{self.serial}", f"user{client}", capacity)
        room = self.rooms[room_id]
        before = dict(room.seats)
        self.acting = (room, probe)
        joined = room.join(probe, NOW, request_id=self.serial)
        self.acting = None
        if len(before) >= room.max_participants:
            assert not joined and probe.frames[-1]["code"] == m.ROOM_FULL
            assert room.seats.keys() == before.keys()
        else:
            assert joined
            self.clients[client] = (probe, room)

    @rule(client=st.integers(0, CLIENTS - 1))
    def leave(self, client: int) -> None:
        slot = self._seated(client)
        if slot is None:
            return
        probe, room = slot
        self.acting = (room, probe)
        room.leave(probe.peer_id)
        self.acting = None
        assert probe.peer_id not in room.seats

    @precondition(lambda self: any(slot is not None for slot in self.clients))
    @rule(
        sender=st.integers(0, CLIENTS - 1),
        addressee=st.integers(0, CLIENTS - 1),
        kind=st.sampled_from(["webrtc-offer", "webrtc-answer", "ice-candidate"]),
        stale=st.booleans(),
    )
    def relay(self, sender: int, addressee: int, kind: str, stale: bool) -> None:
        slot = self.clients[sender]
        target_slot = self.clients[addressee]
        if slot is None or target_slot is None:
            return
        probe, room = slot  # routed through the room it last joined, even if evicted since
        to = target_slot[0].peer_id if not stale else f"gone{self.serial}"
        field = "candidate" if kind == "ice-candidate" else "sdp"
        message = m.Relay(kind, to, field, None if field == "candidate" else "v=0", request_id=None)
        counts = {id(p): len(p.frames) for p in self.all_probes()}
        sender_seated = probe.peer_id in room.seats
        target_here = to in room.seats
        self.acting = (room, probe)
        room.relay(probe.peer_id, to, m.encode_relay(message, probe.peer_id))
        self.acting = None
        for other in self.all_probes():
            for frame in other.frames[counts[id(other)] :]:
                if frame["type"] == "user-left":
                    continue  # news of an eviction the relay caused (someone's queue overflowed)
                assert sender_seated, "a relay from a member no longer seated had an effect"
                if frame["type"] == "error":
                    assert other is probe and frame["code"] == m.PEER_NOT_FOUND and not target_here
                else:
                    assert frame == {"type": kind, "from": probe.peer_id, field: message.payload}
                    assert other.peer_id == to and target_here
        if sender_seated and target_here:
            addressee = self.rooms[room.id].seats.get(to)
            if addressee is not None:  # not evicted by this very frame: then it has it
                assert isinstance(addressee.member, Probe)
                assert addressee.member.frames[-1]["type"] == kind

    # -- the checks ---------------------------------------------------------------------

    def all_probes(self) -> list[Probe]:
        seated = [seat.member for room in self.rooms.values() for seat in room.seats.values()]
        latest = [slot[0] for slot in self.clients if slot is not None]
        return list({id(p): p for p in [*seated, *latest] if isinstance(p, Probe)}.values())

    def check_delivery(self, probe: Probe, frame: dict[str, Any]) -> None:
        assert self.acting is not None, "a frame delivered outside any room operation"
        room, actor = self.acting
        if frame["type"] == "error":
            assert probe is actor, f"{frame['code']} sent to {probe.peer_id}, not to the one who asked"
            return
        assert probe.peer_id in room.seats, f"{frame['type']} delivered to non-member {probe.peer_id}"
        if frame["type"] in ("webrtc-offer", "webrtc-answer", "ice-candidate"):
            assert frame["from"] in room.seats, "relay from a sender who is not in the receiving room"
            assert frame["from"] == actor.peer_id, "relay attributed to someone other than its sender"
        else:
            assert frame["roomId"] == room.id, "membership event about another room"

    @invariant()
    def membership_is_consistent(self) -> None:
        where: dict[str, str] = {}
        for room in self.rooms.values():
            assert len(room.seats) <= room.max_participants
            for peer_id, seat in room.seats.items():
                assert seat.member.peer_id == peer_id
                assert peer_id not in where, f"{peer_id} seated in {where[peer_id]} and {room.id}"
                where[peer_id] = room.id
                probe = seat.member
                assert isinstance(probe, Probe)
                assert not probe.overflowed, "an overflowed member was not evicted"
                others = {p: s.member.username for p, s in room.seats.items() if p != peer_id}
                assert probe.view() == others
        seated_clients = [self._seated(client) for client in range(CLIENTS)]
        assert len({slot[0].peer_id for slot in seated_clients if slot}) == sum(1 for s in seated_clients if s)


RoomMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None, derandomize=True, database=None
)
TestRoomProperties = RoomMachine.TestCase
