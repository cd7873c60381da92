"""Random sequences of joins, leaves, relays, lost connections, resumes and overflowing members,
against pure rooms.

Hypothesis drives several :class:`~signald._room.Room` objects the way sessions do (one room per
client at a time, a fresh peer id per join, relays routed through the room the client last
joined; a connection may be lost with frames still unwritten, its member suspended, and resumed
on a new connection with its current token or a stale one, while the clock runs past graces)
with members that may run out of queue space and get evicted. Every frame delivered is checked
at the moment of delivery, and the rooms' state after every step:

* membership is consistent: each seated member's picture of its room, built only from the
  frames it received across all its connections (plus, while suspended, the frames kept for
  it), is exactly the room's other members; nobody is seated twice; an evicted member is
  seated nowhere; ``resumed`` lists exactly the others;
* no relay crosses rooms and none reaches a non-member: a relay is delivered only to the
  connection holding a seat of the room relaying it, from a sender that connection knows of,
  and outside a resume only from the member relaying it;
* nothing but an ``error`` reaches anyone not seated, and that only to the one who asked;
  nothing reaches a lost or superseded connection;
* a resume succeeds exactly with the seat's current token while the seat exists; a failed one
  changes nothing; every token that stops working is reported once.
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
GRACE = 10.0
#: Small, so that keeping frames for a suspended member overflows now and then.
BUFFER = 5


@attrs.define(eq=False)
class Probe:
    """A member that checks every frame handed to it against the world's rules."""

    world: RoomMachine
    peer_id: str
    username: str
    capacity: int
    frames: list[dict[str, Any]] = attrs.field(factory=list)
    #: Frames its session's earlier connections received (this one resumed it).
    earlier: list[dict[str, Any]] = attrs.field(factory=list)
    overflowed: bool = False
    was_superseded: bool = False

    def deliver(self, text: bytes) -> bool:
        if self.overflowed:
            return False  # its queue is closed: nothing more reaches the client, until it is evicted
        frame = json.loads(text)
        self.world.check_delivery(self, frame)
        if len(self.frames) >= self.capacity:
            self.overflowed = True
            return False
        self.frames.append(frame)
        return True

    def superseded(self) -> list[bytes]:
        self.was_superseded = True
        return []

    def view(self, kept: list[bytes] = ()) -> dict[str, str]:  # type: ignore[assignment]
        """The room's other members, as this session learned of them from its frames."""
        return view_of([*self.earlier, *self.frames, *(json.loads(text) for text in kept)])


def view_of(frames: list[dict[str, Any]]) -> dict[str, str]:
    others: dict[str, str] = {}
    for frame in frames:
        if frame["type"] == "joined-room":
            others = {p["peerId"]: p["username"] for p in frame["participants"]}
        elif frame["type"] == "user-joined":
            assert frame["peerId"] not in others, "told of an arrival it already knew of"
            others[frame["peerId"]] = frame["username"]
        elif frame["type"] == "user-left":
            del others[frame["peerId"]]  # KeyError: told of a departure it never heard arrive
    return others


@attrs.define
class Slot:
    """A client's current session: its member on its latest connection, room and token."""

    probe: Probe
    room: Room
    token: str
    lost: bool = False


class RoomMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.retired: dict[str, str] = {}
        self.rooms = {
            room_id: Room(
                room_id,
                room_id,
                3,
                NOW,
                persistent=True,
                resume_grace=GRACE,
                resume_buffer=BUFFER,
                token_retired=self.retire,
            )
            for room_id in ROOMS
        }
        self.clients: list[Slot | None] = [None] * CLIENTS
        self.serial = 0
        self.now = 0.0
        #: Every token ever issued, so a stale one can be tried.
        self.issued: list[str] = []
        #: The room whose method is running, and the member on whose behalf (None: the clock).
        self.acting: tuple[Room, Probe | None] | None = None
        self.resuming = False

    def retire(self, token: str, why: str) -> None:
        assert token in self.issued, "retired a token nobody was given"
        assert token not in self.retired, f"{token} retired twice"
        self.retired[token] = why

    def new_token(self) -> str:
        self.serial += 1
        self.issued.append(f"token{self.serial}")
        return self.issued[-1]

    # -- the rules: what sessions do --------------------------------------------------

    def _seated(self, client: int) -> Slot | None:
        slot = self.clients[client]
        if slot is not None and slot.probe.peer_id in slot.room.seats:
            return slot
        return None

    @rule(client=st.integers(0, CLIENTS - 1), room_id=st.sampled_from(ROOMS), capacity=st.integers(1, 12))
    def join(self, client: int, room_id: str, capacity: int) -> None:
        slot = self._seated(client)
        if slot is not None and not slot.lost:
            return  # a session answers already-in-room without asking the room
        self.serial += 1
        probe = Probe(self, f"peer{self.serial}", f"user{client}", capacity)
        room = self.rooms[room_id]
        before = dict(room.seats)
        self.acting = (room, probe)
        token = self.new_token()
        joined = room.join(probe, NOW, self.serial, resume_token=token)
        self.acting = None
        if len(before) >= room.max_participants:
            self.issued.remove(token)  # never handed out
            assert not joined and probe.frames[-1]["code"] == m.ROOM_FULL
            assert room.seats.keys() == before.keys()
        else:
            assert joined
            assert probe.frames[0]["resumeToken"] == token
            self.clients[client] = Slot(probe, room, token)

    @rule(client=st.integers(0, CLIENTS - 1))
    def leave(self, client: int) -> None:
        slot = self._seated(client)
        if slot is None or slot.lost:
            return
        self.acting = (slot.room, slot.probe)
        slot.room.leave(slot.probe)
        self.acting = None
        assert slot.probe.peer_id not in slot.room.seats
        assert self.retired[slot.token]

    @rule(client=st.integers(0, CLIENTS - 1), max_bytes=st.sampled_from([300, 100_000]), unwritten=st.integers(0, 2))
    def lose_connection(self, client: int, max_bytes: int, unwritten: int) -> None:
        """The connection is lost; its last ``unwritten`` frames were still queued, never sent."""
        slot = self._seated(client)
        if slot is None or slot.lost:
            return
        probe = slot.probe
        cut = max(len(probe.frames) - unwritten, 1)  # joined-room (or resumed) was surely written
        unsent = [json.dumps(frame).encode() for frame in probe.frames[cut:]]
        del probe.frames[cut:]
        self.acting = (slot.room, slot.probe)
        slot.room.suspend(slot.probe, self.now, unsent, max_bytes)
        self.acting = None
        slot.lost = True
        assert slot.probe.peer_id in slot.room.suspended

    def _away(self) -> list[int]:
        return [client for client in range(CLIENTS) if (slot := self._seated(client)) is not None and slot.lost]

    @precondition(lambda self: self._away())
    @rule(pick=st.integers(0, CLIENTS - 1), capacity=st.integers(1, 12))
    def come_back(self, pick: int, capacity: int) -> None:
        """A client whose connection was lost resumes with its current token."""
        away = self._away()
        self.resume(away[pick % len(away)], 0, capacity)

    @precondition(lambda self: self._away())
    @rule(pick=st.integers(0, CLIENTS - 1), count=st.integers(1, BUFFER + 1))
    def relay_to_away(self, pick: int, count: int) -> None:
        """Members still connected relay to a member whose connection was lost (kept, maybe overflowing)."""
        away = self._away()
        target = away[pick % len(away)]
        room = self.clients[target].room  # type: ignore[union-attr]
        senders = [c for c in range(CLIENTS) if (slot := self._seated(c)) and not slot.lost and slot.room is room]
        for n in range(count):
            if senders:
                self.relay(senders[n % len(senders)], target, "ice-candidate", stale=False)

    @precondition(lambda self: any(slot is not None for slot in self.clients))
    @rule(client=st.integers(0, CLIENTS - 1), stale=st.integers(0, 3), capacity=st.integers(1, 12))
    def resume(self, client: int, stale: int, capacity: int) -> None:
        """The client resumes with its token, or with one of the last few issued (stale > 0),
        whether or not its connection was lost, and whether or not its session still exists."""
        slot = self.clients[client]
        if slot is None:
            return
        token = slot.token if not stale else self.issued[-min(stale, len(self.issued))]
        room, old = slot.room, slot.probe
        seat = room.seats.get(old.peer_id)
        fits = seat is not None and token == slot.token
        assert fits == (seat is not None and seat.resume_token == token)
        counts = {id(p): len(p.frames) for p in self.all_probes()}
        kept = [json.loads(text) for text in seat.kept.frames] if seat is not None and seat.kept is not None else []
        made: list[Probe] = []

        def connect(peer_id: str, username: str) -> Probe:
            assert (peer_id, username) == (old.peer_id, old.username)
            made.append(Probe(self, peer_id, username, capacity, earlier=[*old.earlier, *old.frames]))
            return made[-1]

        new_token = self.new_token()
        self.acting, self.resuming = (room, None), True
        resumed = room.resume(old.peer_id, token, connect, new_token)
        self.acting, self.resuming = None, False
        if not fits:
            self.issued.remove(new_token)  # never handed out
            assert resumed is None and not made
            assert counts == {id(p): len(p.frames) for p in self.all_probes() if id(p) in counts}
            return
        assert resumed is made[0]
        assert self.retired[token] == "this resume token has been used already; each resume gives a new one"
        assert old.was_superseded != slot.lost  # a still-open old connection is superseded
        self.clients[client] = Slot(made[0], room, new_token)
        frames = made[0].frames
        if frames and not made[0].overflowed:
            assert frames[0]["type"] == "resumed" and frames[0]["resumeToken"] == new_token
            assert frames[0]["missed"] == len(frames) - 1
            assert frames[1:] == kept, "not exactly the kept frames, in order"
            others = {p["peerId"]: p["username"] for p in frames[0]["participants"]}
            if old.peer_id in room.seats:  # not evicted by what it was handed
                assert others == {p: s.member.username for p, s in room.seats.items() if p != old.peer_id}

    @rule(seconds=st.sampled_from([1.0, GRACE / 2, GRACE]))
    def tick(self, seconds: float) -> None:
        self.now += seconds
        for room in self.rooms.values():
            self.acting = (room, None)
            ended = room.expire(self.now)
            self.acting = None
            for peer_id in ended:
                assert peer_id not in room.seats

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
        if slot is None or target_slot is None or slot.lost:
            return
        probe, room = slot.probe, slot.room  # routed through the room it last joined, even if evicted since
        to = target_slot.probe.peer_id if not stale else f"gone{self.serial}"
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
            seat = self.rooms[room.id].seats.get(to)
            if seat is not None:  # not evicted by this very frame: then it has it, or keeps it
                latest = json.loads(seat.kept.frames[-1]) if seat.kept is not None else seat.member.frames[-1]
                assert isinstance(seat.member, Probe)
                assert latest["type"] == kind

    # -- the checks ---------------------------------------------------------------------

    def all_probes(self) -> list[Probe]:
        seated = [seat.member for room in self.rooms.values() for seat in room.seats.values()]
        latest = [slot.probe for slot in self.clients if slot is not None]
        return list({id(p): p for p in [*seated, *latest] if isinstance(p, Probe)}.values())

    def check_delivery(self, probe: Probe, frame: dict[str, Any]) -> None:
        assert self.acting is not None, "a frame delivered outside any room operation"
        room, actor = self.acting
        if frame["type"] == "error":
            if self.resuming:  # one kept for the resumer: it answered what its lost connection sent
                seat = room.seats.get(probe.peer_id)
                assert seat is not None and seat.member is probe, f"{frame['code']} handed to another"
            else:
                assert probe is actor, f"{frame['code']} sent to {probe.peer_id}, not to the one who asked"
            return
        seat = room.seats.get(probe.peer_id)
        assert seat is not None, f"{frame['type']} delivered to non-member {probe.peer_id}"
        assert seat.member is probe and seat.kept is None, "delivered to a lost or superseded connection"
        if frame["type"] in ("webrtc-offer", "webrtc-answer", "ice-candidate"):
            known = frame["from"] in probe.view() or frame["from"] == probe.peer_id
            assert known, "relay from a sender the receiver does not know of"
            if not self.resuming:  # a resume hands over relays from members who may have left since
                assert actor is not None and frame["from"] == actor.peer_id, "relay attributed to another"
                assert frame["from"] in room.seats, "relay from a sender who is not in the receiving room"
        else:
            assert frame["roomId"] == room.id, "membership event about another room"

    @invariant()
    def membership_is_consistent(self) -> None:
        where: dict[str, str] = {}
        live_tokens: set[str | None] = set()
        for room in self.rooms.values():
            assert len(room.seats) <= room.max_participants
            assert set(room.suspended) == {p for p, s in room.seats.items() if s.kept is not None}
            for peer_id, seat in room.seats.items():
                assert seat.member.peer_id == peer_id
                assert peer_id not in where, f"{peer_id} seated in {where[peer_id]} and {room.id}"
                where[peer_id] = room.id
                probe = seat.member
                assert isinstance(probe, Probe)
                assert not probe.overflowed or seat.kept is not None, "an overflowed member was not evicted"
                assert seat.kept is None or seat.kept.until > self.now, "a grace ran out unnoticed"
                others = {p: s.member.username for p, s in room.seats.items() if p != peer_id}
                assert probe.view(seat.kept.frames if seat.kept is not None else []) == others
                assert seat.resume_token not in self.retired
                live_tokens.add(seat.resume_token)
        assert not live_tokens & self.retired.keys()
        assert live_tokens | self.retired.keys() == set(self.issued), "a token neither working nor retired"
        seated_clients = [self._seated(client) for client in range(CLIENTS)]
        assert len({slot.probe.peer_id for slot in seated_clients if slot}) == sum(1 for s in seated_clients if s)


RoomMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, derandomize=True, database=None
)
TestRoomProperties = RoomMachine.TestCase
