"""Rooms whose members sit on several nodes: the cluster's side of the room task design.

Each room is still a task on each node that has members in it, owning a memory channel,
and everything that changes it is a command in that channel. What differs from one process
(``_hub``) is who decides: a local join is sent to Redis (``_redis``), which admits it or
not and publishes it, numbered by its place in Redis' order, to every node of the room; the
room task seats the member when that event comes back, in the same stream as every other
node's events. So joins, leaves and their announcements happen in one order on every node.

A room task mirrors the room's members on other nodes as :class:`RemoteMember` seats. A
relay to one of them goes to Redis, which routes it to the member's node (``_redis`` rule 7);
a relay to a member on this node never leaves the process. A membership event needs no
delivery to a remote member (its own node announces it there), so a remote member's
``deliver`` is a no-op.

Resume. A member whose connection is lost is suspended on its node, as in one process:
Redis still says it is there, and nobody else hears of it. A ``resume`` on any node is a
``claim`` in Redis (the token's digest must match; the member moves to the claiming node,
with a new digest), which publishes ``moved`` in the room's order to every node of the room.
From that point of Redis' order, relays to the member are routed to the new node. So:

* The former node has, kept for the member, exactly what was delivered before the claim
  (relays Redis routed there, membership events, its own members' relays). On ``moved`` it
  closes a connection still open with 4001, and sends all that to the new node through its
  ordered stream (``handover``); its own members' later relays follow it there.
* The new node holds what arrives for the member after ``moved`` until the handover is in,
  then sends ``resumed`` (``missed``: the handover's count), the handed-over frames, and what
  it held. Its own members' relays were routed through Redis until ``moved`` (the member
  was remote), and some may still be on their way back when it applies ``moved``; so it
  holds its own members' relays aside until a ``mark`` it sends itself after ``moved`` comes
  back, behind all of them, and only then lets them in, behind what Redis brought.
* A resume on the member's own node claims in Redis too (so a token works once across the
  cluster), and then resumes the member here, as one process does.

Every relay thus reaches the member once, in its sender's order, after the membership
events that preceded it. The wait for a handover is bounded by ``cluster.node_timeout``: a
former node that died meanwhile fails the resume (``resume-failed``) and the member leaves.
A suspended member's end (its grace over, its kept frames overflowing, a drain no other node
claimed it from) goes through Redis like a leave, so every node hears ``user-left`` in order.

While Redis is unreachable, joins and relays to remote members are refused with
``cluster-unavailable``; relays between members of this node go on. A member that leaves
then is removed here at once and from Redis when it is back (``RedisLink.leave_soon``).

**The link's reader never waits for a room.** One task reads everything Redis sends this
node, for all its rooms. Were it to wait for one room's full channel, every room of the node
would stall behind that one (and Redis, whose output buffer for the node grows meanwhile,
would in the end drop the connection). So ``ClusterRoomTask.feed`` never blocks: a command
that finds its room's channel full starts the room's *backlog*, which every later command
from the link for that room joins until it is empty, so the room still applies them in
Redis' order; a feeder task moves the backlog into the channel as the room task makes room.
What a backlog keeps:

- membership events and snapshots (a resume's ``moved``, ``handover`` and ``mark`` among
  them), the link's notices (resync, lost) and the hub's drains, always: there is one per
  join, leave or resume, which Redis admits one at a time, and dropping one would leave this
  node's mirror of the room wrong (or a resume waiting for what never comes);
- relays, up to ``limits.send_queue_bytes`` of them (the bound of the room's backlog, as it
  is of each member's send queue). A relay that does not fit is dropped, and its sender is
  told ``cluster-unavailable`` once per backlog, as for a relay the queue to Redis refuses
  (``_redis`` rule 6): the relay was not delivered, and the sender may retry. A sender on
  another node is told through Redis; one on this node (a relay to a member resuming here
  from another node, which Redis routed back) is told here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import attrs
import trio

from . import _messages as m
from ._config import Config
from ._hub import (
    TOKEN_UNKNOWN,
    ClusterUnavailable,
    ResumeFailed,
    RoomHub,
    RoomInfo,
    RoomTask,
    TooManyRooms,
    _Join,
    _Leave,
    _Relay,
    _Suspend,
)
from ._ids import new_peer_id, new_resume_token, new_room_id, resume_token_digest, resume_token_seat
from ._metrics import Observer
from ._redis import RedisLink
from ._room import TOKEN_EXPIRED, TOKEN_LEFT, TOKEN_OVERFLOWED, TOKEN_USED, Kept, Member, Room, Seat
from ._startup import redis_tls_context
from ._turn import IceServers

log = logging.getLogger("signald.cluster")

#: The join script's refusals, as error codes.
JOIN_REFUSALS = {
    "room-not-found": m.ROOM_NOT_FOUND,
    "too-many-rooms": m.TOO_MANY_ROOMS,
    "room-full": m.ROOM_FULL,
}
HANDOVER_LATE = "the session could not be taken over: the server that held it did not hand it over in time"
#: Why a session ended, as the leave tells Redis and a later claim hears it (``_redis``'s
#: ``ended``), so a late resume on any node is told which, as in one process.
ENDINGS = {
    "left": TOKEN_LEFT,
    "expired": TOKEN_EXPIRED,
    "overflowed": TOKEN_OVERFLOWED,
    "dead": "the session has ended: the server that held it is gone",
    "late": HANDOVER_LATE,
}
ENDING_CODES = {why: code for code, why in ENDINGS.items()}
#: The claim script's refusals, as the ``resume-failed`` message (``gone``: see ``ENDINGS``).
CLAIM_REFUSALS = {
    "gone": TOKEN_UNKNOWN,
    "used": "this resume token is not the session's current one: it has been used already (each resume "
    "gives a new one)",
    "dead": ENDINGS["dead"],
}
UNAVAILABLE = "the cluster is unavailable (redis unreachable or too far behind); try again"


@attrs.frozen
class RemoteMember:
    """A member of the room whose socket is on another node."""

    peer_id: str
    username: str
    node: str

    def deliver(self, text: bytes) -> bool:
        """Membership events reach it from its own node; relays go through ``RedisLink.relay``."""
        return True

    def superseded(self) -> list[bytes]:
        """Its frames are queued on its own node, not here: a resume takes them over from
        there (``claim`` and ``handover``), never through this mirror."""
        return []


@attrs.define
class _ClusterJoin(_Join):
    """A join whose resume token was minted before it went to Redis (which keeps its digest)."""

    resume_token: str | None = attrs.field(default=None, repr=False)


@attrs.define
class _Routed(_Relay):
    """A relay Redis brought to this node: delivered here, never sent on."""


@attrs.define
class _Claim:
    """A resume on this node, waiting for its ``moved`` (and, from another node, the handover)."""

    peer_id: str
    token: str = attrs.field(repr=False)
    new_token: str = attrs.field(repr=False)
    connect: Callable[[str, str], Member]
    request_id: m.RequestId
    ice_servers: list[dict[str, Any]] | None
    done: trio.Event = attrs.field(factory=trio.Event)
    member: Member | None = None
    #: Why it failed, when it did after Redis said yes.
    why: str = ""


@attrs.frozen
class _Unclaim:
    """Redis refused the claim: nothing will come for it."""

    peer_id: str


@attrs.define
class _Arrival:
    """A member resumed here from another node: its seat holds what arrives until both the
    handover and this node's own ``mark`` are in (see the module docstring)."""

    claim: _Claim
    member: Member
    #: The handed-over frames, once they have come.
    frames: list[bytes] | None = None
    marked: bool = False
    #: Relays from this node's members that came before the mark, let in at the mark.
    late: list[bytes] = attrs.field(factory=list)


@attrs.define
class _Drain:
    """The node drains. ``end``: end the suspended members now (their leaves go to Redis by the
    hub, ``ended`` lists them); otherwise set ``done`` once none is suspended here."""

    end: bool
    done: trio.Event = attrs.field(factory=trio.Event)
    ended: list[str] = attrs.field(factory=list)


@attrs.frozen
class _Event:
    """A membership event or snapshot from Redis, as the script published it."""

    data: dict[str, Any]


@attrs.frozen
class _Sync:
    prune: bool


@attrs.frozen
class _Forget:
    """A join that will not complete: refused, or its member stopped waiting for it.

    ``sent``: it may have reached Redis, so it must be undone there too.
    """

    peer_id: str
    sent: bool


@attrs.frozen
class _Lost:
    """The link to Redis failed: joins waiting for their event will not get it."""


@attrs.frozen
class _Refuse:
    """A relay from ``sender_id``, a member on another node, to ``to`` was dropped (a full backlog)."""

    sender_id: str
    to: str


_LinkCommand = _Event | _Relay | _Sync | _Lost | _Refuse


def _unavailable(request_id: m.RequestId = None) -> bytes:
    return m.encode_error(m.CLUSTER_UNAVAILABLE, UNAVAILABLE, request_id)


class ClusterRoomTask(RoomTask):
    """A room task whose membership is decided in Redis; see the module docstring."""

    def __init__(
        self,
        room: Room,
        link: RedisLink,
        clock: Callable[[], datetime],
        observer: Observer,
        nursery: trio.Nursery,
        handover_timeout: float,
        max_bytes: int,
    ) -> None:
        super().__init__(room, math.inf, clock, observer)  # it ends when its last local member leaves
        self._link = link
        #: How long a member resumed here from another node waits for its handover.
        self._handover_timeout = handover_timeout
        #: A connection's send queue bound: on the frames held for an arriving member, and on
        #: the relays in the backlog.
        self._max_bytes = max_bytes
        #: Local joins sent to Redis, seated when their event arrives.
        self._pending: dict[str, _ClusterJoin] = {}
        #: Resumes sent to Redis as claims, carried out when their ``moved`` arrives.
        self._claims: dict[str, _Claim] = {}
        #: Members resumed here from another node, by peer id, until their handover is in.
        self._arriving: dict[str, _Arrival] = {}
        #: Suspended members whose end has gone to Redis (its leave event removes them), and why.
        self._ending: dict[str, str] = {}
        #: Suspended members whose kept frames overflowed during the command being applied.
        self._overflowing: list[str] = []
        #: Set (and dropped) once no member is suspended here: a drain waits for it.
        self._drained: trio.Event | None = None
        room.kept_overflowed = self._overflowing.append
        #: Where the feeder runs (see the module docstring on the backlog).
        self._nursery = nursery
        self._backlog: deque[_LinkCommand] = deque()
        #: Bytes of the relays in the backlog, at most ``_max_bytes``.
        self._backlog_bytes = 0
        #: Senders told of a relay dropped from this backlog (once each, per backlog).
        self._refused: set[str] = set()

    def _occupied(self) -> bool:
        return bool(self._pending or self._claims) or any(
            not isinstance(seat.member, RemoteMember) for seat in self.room.seats.values()
        )

    def _ends(self, now: float, idle_since: float | None) -> bool:
        return True  # the room lives on in Redis; this node needs no task for it without members

    def _end_reason(self) -> str:
        return "no members on this node"

    async def expect(self, command: _ClusterJoin | _Claim) -> None:
        """Register a join or a claim before it is sent to Redis, so its event finds it here.

        Raises ``trio.BrokenResourceError`` if this room task has just ended.
        """
        await self._send.send(command)

    def forget(self, peer_id: str, *, sent: bool = True) -> None:
        with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
            self._send.send_nowait(_Forget(peer_id, sent))
            return
        if sent:
            self._link.leave_soon(self.room.id, peer_id)

    async def unclaim(self, peer_id: str) -> None:
        """Redis refused the claim registered for ``peer_id`` (a claim left behind would keep
        this room task alive, so this waits for room in the channel rather than give up)."""
        with contextlib.suppress(trio.BrokenResourceError):
            await self._send.send(_Unclaim(peer_id))

    async def leave(self, member: Member) -> None:
        """Leave through Redis, whose event removes the member here in the room's order."""
        left = False
        try:
            left = await self._link.leave(self.room.id, member.peer_id)
        finally:
            if not left:  # Redis is away (or we were cancelled): leave here now, there later
                self._link.leave_soon(self.room.id, member.peer_id)
                with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                    self._send.send_nowait(_Leave(member))

    async def suspend(self, member: Member, unsent: list[bytes], max_bytes: int) -> None:
        """Kept here, as in one process; without resume, a lost connection leaves at once."""
        if self.room.resume_grace > 0:
            await super().suspend(member, unsent, max_bytes)
        else:
            await self.leave(member)

    def _apply(self, command: Any) -> None:
        if isinstance(command, _Routed):
            super()._apply(command)  # from another node (or from here, routed back) to a member here
        elif isinstance(command, _Relay):
            self._relay(command)
        elif isinstance(command, _Event):
            self._event(command.data)
        elif isinstance(command, _ClusterJoin):
            self._pending[command.member.peer_id] = command
        elif isinstance(command, _Leave | _Suspend):
            super()._apply(command)
        elif isinstance(command, _Claim):
            self._claims[command.peer_id] = command
        elif isinstance(command, _Unclaim):
            claim = self._claims.pop(command.peer_id, None)
            if claim is not None:
                claim.done.set()
        elif isinstance(command, _Forget):
            pending = self._pending.pop(command.peer_id, None)
            if pending is not None:
                pending.done.set()
            if command.sent and (pending is not None or command.peer_id in self.room.seats):
                self._link.leave_soon(self.room.id, command.peer_id)
                seat = self.room.seats.get(command.peer_id)
                if seat is not None and not self._link.available:  # no leave event will come
                    self.room.leave(seat.member)
        elif isinstance(command, _Sync):
            self._sync(command.prune)
        elif isinstance(command, _Lost):
            for pending in self._pending.values():
                pending.member.deliver(_unavailable(pending.request_id))
                pending.done.set()
            self._pending.clear()
            for claim in self._claims.values():
                claim.why = UNAVAILABLE
                claim.done.set()
            self._claims.clear()
        elif isinstance(command, _Refuse):
            self._refuse(command)
        elif isinstance(command, _Drain):
            self._drain(command)
        if self._overflowing:
            for peer_id in self._overflowing:
                self._end_there(peer_id, TOKEN_OVERFLOWED)
            self._overflowing.clear()
        if self._drained is not None and not self.room.suspended:
            self._drained.set()
            self._drained = None


    def _refuse(self, command: _Refuse) -> None:
        """Tell a sender of the relays a full backlog dropped (once: see the module docstring)."""
        seat = self.room.seats.get(command.sender_id)
        if seat is None:
            return  # gone meanwhile: nobody to tell
        refusal = _unavailable()
        self._observer.error_sent(m.CLUSTER_UNAVAILABLE)
        if isinstance(seat.member, RemoteMember):  # Redis routes it to the sender's node, as a relay
            self._link.relay(self.room.id, command.to, command.sender_id, refusal, _ignore)
        else:  # a relay of this node's, routed back through Redis to a member arriving here
            self.room.relay(command.to, command.sender_id, refusal)

    def _relay(self, command: _Relay) -> None:
        seats = self.room.seats
        sender, target = seats.get(command.sender_id), seats.get(command.to)
        if sender is None or target is None or isinstance(sender.member, RemoteMember):
            super()._apply(command)  # an error, or nobody to answer
            return
        if not isinstance(target.member, RemoteMember):
            arrival = self._arriving.get(command.to) if self._arriving else None
            if arrival is not None and not arrival.marked:  # behind what Redis brings back: see the top
                self._observer.delivered(command.received_at)
                arrival.late.append(command.text)
            else:
                super()._apply(command)  # both here
            return
        self._observer.delivered(command.received_at)  # handed to the link, for the other node
        refusal = _unavailable(command.request_id)

        def refuse() -> None:
            self._observer.error_sent(m.CLUSTER_UNAVAILABLE)
            sender.member.deliver(refusal)

        if not self._link.relay(self.room.id, command.sender_id, command.to, command.text, refuse):
            refuse()

    def _event(self, data: dict[str, Any]) -> None:
        room = self.room
        if "meta" in data:
            name, capacity, created, persistent = data["meta"]
            room.name, room.max_participants = name, int(capacity)
            room.created_at, room.persistent = datetime.fromisoformat(created), bool(persistent)
        kind, peer_id = data["k"], data.get("p")
        if kind == "sync":
            self._reset(data["m"] or [], prune=data["prune"])
        elif kind == "join":
            if "m" in data:  # this node's first member in the room: what it knew is stale
                self._reset(data["m"] or [], prune=True)
            if peer_id in room.seats:
                return  # a member re-registered after an outage: known here already
            joined_at = datetime.fromisoformat(data["t"])
            if data["n"] != self._link.node:
                room.join(RemoteMember(peer_id, data["u"], data["n"]), joined_at, admitted=True)
                return
            pending = self._pending.pop(peer_id, None)
            if pending is None:
                return  # given up on (``_Forget``), which has sent its leave
            pending.joined = room.join(
                pending.member,
                joined_at,
                pending.request_id,
                pending.ice_servers,
                resume_token=pending.resume_token,
                admitted=True,
            )
            pending.done.set()
            log.info(
                "room %s: %s joined as %r (%d present)",
                room.id,
                peer_id,
                pending.member.username,
                room.participant_count,
            )
        elif kind == "leave" and peer_id in room.seats:
            seat = room.seats[peer_id]
            here = not isinstance(seat.member, RemoteMember)
            if data.get("e") and here:
                # Swept as dead while alive (stalled past node_timeout): the member is still
                # here, and the lapsed lease makes this node register it again.
                return
            if here and seat.kept is not None:  # suspended (or arriving): its end was sent from here
                why = self._ending.pop(peer_id, TOKEN_LEFT)
                self._fail_arrival(peer_id, why)
                room.end(peer_id, why)
            else:
                room.leave(seat.member)
            log.info("room %s: %s left (%d present)", room.id, peer_id, room.participant_count)
        elif kind == "moved":
            self._moved(data)
        elif kind == "handover":
            arrival = self._arriving.get(peer_id)
            if arrival is not None and arrival.frames is None:
                arrival.frames = [text.encode() for text in data["f"]]
                self._settle_arrival(peer_id)
        elif kind == "mark":
            self._marked(peer_id)

    def _moved(self, data: dict[str, Any]) -> None:
        """Redis ran a claim: ``p`` moved from node ``f`` to node ``n`` (maybe the same)."""
        room, node = self.room, self._link.node
        peer_id, to, origin = data["p"], data["n"], data["f"]
        if "m" in data:  # the claim made this node one of the room's: what it knew is stale
            self._reset(data["m"] or [], prune=True)
        if to == node:
            claim = self._claims.pop(peer_id, None)
            if claim is None:
                if origin != node:  # given up on (the link failed meanwhile): it is ours to end
                    self._link.leave_soon(room.id, peer_id)
            elif origin == node:
                self._resume_here(claim)
            else:
                self._arrive(claim, data)
        elif origin == node:
            self._hand_over(peer_id, to)
        else:
            seat = room.seats.get(peer_id)
            if seat is not None and isinstance(seat.member, RemoteMember):
                seat.member = RemoteMember(peer_id, seat.member.username, to)

    def _resume_here(self, claim: _Claim) -> None:
        """A claim of a member of this node: the resume of one process, checked in Redis first."""
        room = self.room
        self._ending.pop(claim.peer_id, None)
        claim.member = room.resume(
            claim.peer_id, claim.token, claim.connect, claim.new_token, claim.request_id, claim.ice_servers
        )
        claim.done.set()
        if claim.member is not None:
            log.info("room %s: %s resumed on a new connection", room.id, claim.peer_id)
        elif claim.peer_id not in room.seats:  # Redis listed it here, but it is gone: not a ghost there
            self._link.leave_soon(room.id, claim.peer_id)

    def _arrive(self, claim: _Claim, data: dict[str, Any]) -> None:
        """A member of another node resumed here: hold its seat until the handover is in."""
        room, peer_id = self.room, claim.peer_id
        member = claim.connect(peer_id, data["u"])
        kept = Kept(trio.current_time() + self._handover_timeout, room.resume_buffer, self._max_bytes)
        seat = room.seats.get(peer_id)
        if seat is None:  # listed nowhere here yet (this node's first member of the room)
            room.seats[peer_id] = Seat(member, datetime.fromisoformat(data["t"]), claim.new_token, kept)
            if "m" in data:  # in join order, as everywhere
                order = [entry[0] for entry in data["m"]]
                room.seats = {p: room.seats[p] for p in sorted(room.seats, key=_position(order))}
        else:
            seat.member, seat.resume_token, seat.kept = member, claim.new_token, kept
        room.suspended[peer_id] = None  # its timer is the handover's bound
        self._arriving[peer_id] = _Arrival(claim, member)
        if not self._link.tell(self._link.node, {"r": room.id, "k": "mark", "p": peer_id}):
            # Redis is away or the queue to it full (``_redis`` rule 6): without the mark, this
            # node cannot know its own relays are all in, so the resume fails and the member leaves.
            log.warning("room %s: %s could not resume here: redis is unavailable", room.id, peer_id)
            self._fail_arrival(peer_id, UNAVAILABLE)
            self._end_there(peer_id, TOKEN_LEFT)
            return
        log.info("room %s: %s resuming here from node %s", room.id, peer_id, data["f"])

    def _marked(self, peer_id: str) -> None:
        """This node's own relays routed through Redis before ``moved`` are all in."""
        arrival = self._arriving.get(peer_id)
        if arrival is None or arrival.marked:
            return
        arrival.marked = True
        kept = self.room.seats[peer_id].kept
        assert kept is not None, "an arriving member's seat holds its frames"
        for text in arrival.late:
            if not kept.add(text):
                self._overflowing.append(peer_id)
                break
        arrival.late = []
        self._settle_arrival(peer_id)

    def _settle_arrival(self, peer_id: str) -> None:
        """Handover and mark both in: ``resumed``, then what was handed over, then what was held."""
        arrival = self._arriving[peer_id]
        if arrival.frames is None or not arrival.marked or peer_id in self._ending:
            return
        room = self.room
        del self._arriving[peer_id]
        seat = room.seats[peer_id]
        assert seat.kept is not None
        held, seat.kept = seat.kept.frames, None
        del room.suspended[peer_id]
        claim, member = arrival.claim, arrival.member
        others = [(s.member.peer_id, s.member.username) for p, s in room.seats.items() if p != peer_id]
        member.deliver(
            m.encode_resumed(
                room.id,
                peer_id,
                member.username,
                others,
                len(arrival.frames),
                claim.new_token,
                room.resume_grace,
                claim.request_id,
                claim.ice_servers,
            )
        )
        for text in (*arrival.frames, *held):
            member.deliver(text)  # a connection that cannot take them is evicted by its outbox
        claim.member = member
        claim.done.set()
        log.info("room %s: %s resumed on a new connection (handed over from another node)", room.id, peer_id)

    def _hand_over(self, peer_id: str, to: str) -> None:
        """A member of this node resumed on node ``to``: send it what was kept, and let go."""
        room = self.room
        seat = room.seats.get(peer_id)
        if seat is None or isinstance(seat.member, RemoteMember):
            return
        self._fail_arrival(peer_id, "the session was resumed elsewhere meanwhile")
        self._ending.pop(peer_id, None)
        if seat.kept is not None:
            frames = seat.kept.frames
            room.suspended.pop(peer_id, None)
        else:  # its connection is still open: it closes with 4001, and what it had not written moves
            frames = seat.member.superseded()
        if seat.resume_token is not None:
            room.token_retired(seat.resume_token, TOKEN_USED)
        seat.member, seat.kept, seat.resume_token = RemoteMember(peer_id, seat.member.username, to), None, None
        handover = {"r": room.id, "k": "handover", "p": peer_id, "f": [text.decode() for text in frames]}
        if self._link.tell(to, handover):
            log.info("room %s: %s resumed on node %s; %d kept messages handed over", room.id, peer_id, to, len(frames))
        else:  # Redis away, or the queue to it full: that node's wait for it is bounded (node_timeout)
            log.warning("room %s: %s resumed on node %s; no handover (redis unavailable)", room.id, peer_id, to)

    def _fail_arrival(self, peer_id: str, why: str) -> None:
        arrival = self._arriving.pop(peer_id, None)
        if arrival is not None:
            arrival.claim.why = why
            arrival.claim.done.set()

    def _expire(self, now: float) -> None:
        """Suspended members whose grace is over, and arrivals whose handover never came, end
        through Redis (their leave comes back in the room's order)."""
        room = self.room
        for peer_id in [p for p, seat in room.seats.items() if p in room.suspended and _until(seat) <= now]:
            why = TOKEN_EXPIRED
            if peer_id in self._arriving:
                log.warning("room %s: %s was resumed here, but no handover came; it leaves", room.id, peer_id)
                why = HANDOVER_LATE
                self._fail_arrival(peer_id, why)
            else:
                log.info("room %s: %s left, not back within %g s", room.id, peer_id, room.resume_grace)
            self._end_there(peer_id, why)

    def _end_there(self, peer_id: str, why: str) -> None:
        """End a suspended member in Redis; here too at once if Redis is away (no event comes)."""
        room = self.room
        if peer_id in self._ending or peer_id not in room.seats:
            return
        room.suspended.pop(peer_id, None)  # no timer for it any more
        self._link.leave_soon(room.id, peer_id, ENDING_CODES.get(why, "left"))
        if self._link.available:
            self._ending[peer_id] = why
        else:
            self._fail_arrival(peer_id, why)
            room.end(peer_id, why)

    def _drain(self, command: _Drain) -> None:
        if command.end:
            for peer_id in list(self.room.suspended):
                if peer_id not in self._arriving and peer_id not in self._ending:
                    self._ending[peer_id] = TOKEN_LEFT
                    self.room.suspended.pop(peer_id)
                    command.ended.append(peer_id)
            command.done.set()
        elif self.room.suspended:
            self._drained = command.done
        else:
            command.done.set()

    def _reset(self, entries: list[list[Any]], *, prune: bool) -> None:
        """Bring the mirror of remote members in line with a snapshot from Redis."""
        room = self.room
        listed = {entry[0] for entry in entries}
        if prune:
            for peer_id, seat in list(room.seats.items()):
                if isinstance(seat.member, RemoteMember) and peer_id not in listed:
                    room.leave(seat.member)
                    log.info("room %s: %s left (no longer in redis)", room.id, peer_id)
        for peer_id, username, node, joined_at, _ in entries:
            seat = room.seats.get(peer_id)
            if node == self._link.node:
                continue
            if seat is None:
                room.join(RemoteMember(peer_id, username, node), datetime.fromisoformat(joined_at), admitted=True)
                log.info("room %s: %s joined as %r on node %s (from redis)", room.id, peer_id, username, node)
            elif not isinstance(seat.member, RemoteMember) and peer_id not in self._arriving:
                # Resumed on ``node`` while this node could not hear of it (Redis was away): it
                # is that node's now. Hand over what was kept, in case that node still waits.
                self._hand_over(peer_id, node)

    def _sync(self, prune: bool) -> None:
        room = self.room
        held = [
            [
                peer_id,
                seat.member.username,
                seat.joined_at.isoformat(),
                resume_token_digest(seat.resume_token) if seat.resume_token else "",
            ]
            for peer_id, seat in room.seats.items()
            if not isinstance(seat.member, RemoteMember)
        ]
        if held:
            self._link.submit(
                "sync",
                room.id,
                json.dumps(held),
                int(prune),
                room.name,
                room.max_participants,
                room.created_at.isoformat(),
                int(room.persistent),
            )

    def feed(self, command: _LinkCommand | _Drain) -> bool:
        """Queue a command from the link or the hub, never waiting: see the module docstring on
        the backlog. False if this room task has ended (it has no members to tell)."""
        if not self._backlog:
            try:
                self._send.send_nowait(command)
                return True
            except trio.WouldBlock:
                self._nursery.start_soon(self._feed_backlog, name=f"room {self.room.id} backlog")
            except trio.BrokenResourceError:
                return False
        if isinstance(command, _Relay):
            if self._backlog_bytes and self._backlog_bytes + len(command.text) > self._max_bytes:
                if command.sender_id not in self._refused:
                    self._refused.add(command.sender_id)
                    self._backlog.append(_Refuse(command.sender_id, command.to))
                    log.warning(
                        "room %s: relays from %s dropped: more than %d bytes backlogged",
                        self.room.id,
                        command.sender_id,
                        self._max_bytes,
                    )
                return True
            self._backlog_bytes += len(command.text)
        self._backlog.append(command)
        return True

    async def _feed_backlog(self) -> None:
        """Move the backlog into the channel, oldest first, as the room task makes room."""
        backlog = self._backlog
        try:
            while backlog:
                await self._send.send(backlog[0])
                command = backlog.popleft()
                if isinstance(command, _Relay):
                    self._backlog_bytes -= len(command.text)
        except trio.BrokenResourceError:  # the room task has ended: no member here is left to tell
            for command in backlog:
                if isinstance(command, _Drain):
                    command.done.set()  # nothing of this room to drain
            backlog.clear()
            self._backlog_bytes = 0
        self._refused.clear()


def _until(seat: Seat) -> float:
    return seat.kept.until if seat.kept is not None else math.inf


def _position(order: list[str]) -> Callable[[str], int]:
    """Sort key: a peer id's place in ``order`` (those not in it last)."""
    places = {peer_id: i for i, peer_id in enumerate(order)}
    return lambda peer_id: places.get(peer_id, len(places))


class ClusterHub(RoomHub):
    """This node's room tasks, with Redis deciding membership and answering for the cluster."""

    def __init__(
        self, config: Config, nursery: trio.Nursery, link: RedisLink, observer: Observer | None = None
    ) -> None:
        super().__init__(config.rooms, nursery, ice=IceServers.from_config(config.ice), observer=observer)
        self._link = link
        #: How long a member resumed here from another node waits for its handover.
        self._handover_timeout = config.cluster.node_timeout
        #: Each room's bound on its backlog and on what it holds for an arriving member.
        self._max_bytes = config.limits.send_queue_bytes
        link.attach(self)

    @property
    def problem(self) -> str | None:
        return None if self._link.available else self._link.problem

    @property
    def redis_queue_bytes(self) -> int:
        return self._link.queued_bytes

    @property
    def user_count(self) -> int:
        """Members connected to this node (its mirrors of other nodes' members not counted)."""
        seats = (seat for task in self._rooms.values() for seat in task.room.seats.values())
        return sum(not isinstance(seat.member, RemoteMember) for seat in seats)

    def _local_task(self, room_id: str) -> ClusterRoomTask:
        task = self._rooms.get(room_id)
        if isinstance(task, ClusterRoomTask):
            return task
        # Name and capacity arrive with the room's first event (its "meta").
        config = self.config
        room = Room(
            room_id,
            room_id,
            config.max_participants,
            self._clock(),
            persistent=False,
            resume_grace=config.resume_grace,
            resume_buffer=config.resume_buffer,
            token_retired=self._retire,
            evicts=False,
        )
        task = ClusterRoomTask(
            room, self._link, self._clock, self._observer, self._nursery, self._handover_timeout, self._max_bytes
        )
        self._rooms[room_id] = task
        self._nursery.start_soon(task.run, self, name=f"room {room_id}")
        return task

    async def join(self, room_id: str, member: Member, request_id: m.RequestId = None) -> RoomTask | None:
        """As ``RoomHub.join``, and like it never cancelled: here Redis takes part in a join, so
        the whole of it is shielded (the link answers every call, with None once Redis is away)."""
        with trio.CancelScope(shield=True):
            return await self._join(room_id, member, request_id)

    async def _join(self, room_id: str, member: Member, request_id: m.RequestId) -> RoomTask | None:
        started = trio.current_time()
        if not self._link.available:
            member.deliver(_unavailable(request_id))
            self._observer.error_sent(m.CLUSTER_UNAVAILABLE)
            self._observer.join_refused(started)
            return None
        ice_servers = self.ice.for_member(member.peer_id) if self.ice.mints else None
        token = new_resume_token(room_id, member.peer_id) if self.config.resume_grace > 0 else None
        while True:
            task = self._local_task(room_id)
            command = _ClusterJoin(member, request_id, ice_servers, resume_token=token)
            try:
                await task.expect(command)
            except trio.BrokenResourceError:
                continue  # that room task just ended; a new one is made
            break
        try:
            config = self.config
            outcome = await self._link.call(
                "join",
                room_id,
                member.peer_id,
                member.username,
                self._clock().isoformat(),
                int(config.auto_create),
                config.max_participants,
                config.max_rooms,
                resume_token_digest(token) if token else "",
            )
            if outcome is None or outcome[0] != "ok":
                task.forget(member.peer_id, sent=outcome is None)
                member.deliver(_refusal(room_id, outcome, config.max_rooms, request_id))
                self._observer.join_refused(started)
                return None
            await command.done.wait()
        except BaseException:
            task.forget(member.peer_id)
            raise
        return self._outcome(task, command.joined, started)

    async def resume(
        self, token: str, connect: Callable[[str, str], Member], request_id: m.RequestId = None
    ) -> tuple[RoomTask, Member]:
        """Claim the seat ``token`` names in Redis, from whichever node holds it (module docstring)."""
        if self.config.resume_grace <= 0:
            raise ResumeFailed("resume is turned off on this server (rooms.resume_grace is 0)")
        seat = resume_token_seat(token)
        if seat is None:
            raise ResumeFailed(self._retired.get(token, TOKEN_UNKNOWN))
        if not self._link.available:
            raise ResumeFailed(UNAVAILABLE)
        room_id, peer_id = seat
        ice_servers = self.ice.for_member(peer_id) if self.ice.mints else None
        claim = _Claim(peer_id, token, new_resume_token(room_id, peer_id), connect, request_id, ice_servers)
        while True:
            task = self._local_task(room_id)
            try:
                await task.expect(claim)
            except trio.BrokenResourceError:
                continue  # that room task just ended; a new one is made
            break
        digests = resume_token_digest(token), resume_token_digest(claim.new_token)
        outcome = await self._link.call("claim", room_id, peer_id, *digests)
        if outcome is None or outcome[0] != "ok":
            await task.unclaim(peer_id)
            if outcome is None:
                why = UNAVAILABLE
            elif outcome[0] == "gone" and len(outcome) > 1 and outcome[1]:
                why = ENDINGS.get(outcome[1], TOKEN_UNKNOWN)
            else:
                why = CLAIM_REFUSALS[outcome[0]]
            raise ResumeFailed(self._retired.get(token, why))
        await claim.done.wait()  # bounded: a handover has node_timeout to come
        if claim.member is None:
            raise ResumeFailed(claim.why or self._retired.get(token, TOKEN_UNKNOWN))
        return task, claim.member

    async def hand_over(self, deadline: float) -> None:
        """Draining: wait until ``deadline`` for other nodes to claim the members the drain
        suspended, then end the others (``user-left`` everywhere, through Redis)."""
        drains = []
        for task in list(self._rooms.values()):
            if isinstance(task, ClusterRoomTask):
                drain = _Drain(end=False)
                if task.feed(drain):
                    drains.append(drain)
        with trio.move_on_at(deadline):
            for drain in drains:
                await drain.done.wait()
        for task in list(self._rooms.values()):
            if isinstance(task, ClusterRoomTask):
                drain = _Drain(end=True)
                if task.feed(drain):
                    await drain.done.wait()  # a room task always applies what it was given
                    for peer_id in drain.ended:
                        log.info("room %s: %s left, not resumed elsewhere in the drain", task.room.id, peer_id)
                        await self._link.leave(task.room.id, peer_id)
        await self._link.flushed()  # the handovers sent meanwhile, before the link closes

    # -- what the link tells ---------------------------------------------------------

    # Each hands its command to the room and returns: it never waits for a room (see the
    # module docstring), so one room that cannot keep up delays no other.

    async def dispatch(self, event: dict[str, Any]) -> None:
        task = self._rooms.get(event["r"])
        if isinstance(task, ClusterRoomTask):  # else: no member here any more
            task.feed(_Event(event))

    async def relay(self, room: str, sender_id: str, to: str, text: bytes) -> None:
        task = self._rooms.get(room)
        if isinstance(task, ClusterRoomTask):
            task.feed(_Routed(sender_id, to, text, None, trio.current_time()))

    async def resync(self, prune: bool) -> None:
        for task in list(self._rooms.values()):
            if isinstance(task, ClusterRoomTask):
                task.feed(_Sync(prune))

    async def lost(self) -> None:
        for task in list(self._rooms.values()):
            if isinstance(task, ClusterRoomTask):
                task.feed(_Lost())

    # -- REST and /health, from Redis --------------------------------------------------

    async def rooms(self) -> list[RoomInfo]:
        return await self._link.rooms()

    async def room(self, room_id: str) -> RoomInfo | None:
        return await self._link.room(room_id)

    async def counts(self) -> tuple[int, int]:
        return await self._link.counts()

    async def create_room(self, name: str, max_participants: int | None = None) -> RoomInfo:
        capacity = max_participants or self.config.max_participants
        created_at = self._clock()
        for _ in range(3):  # 96 random bits: a clash never happens, but is cheap to rule out
            room_id = new_room_id()
            outcome = await self._link.create(room_id, name, capacity, created_at.isoformat())
            if outcome == "too-many-rooms":
                raise TooManyRooms(self.config.max_rooms)
            if outcome == "ok":
                log.info("room %s: created (api)", room_id)
                return RoomInfo(room_id, name, capacity, created_at, 0)
        raise ClusterUnavailable("could not find a free room id")


def _ignore() -> None:
    """A refusal lost with the link: the relay it answers was lost already."""


def _refusal(room_id: str, outcome: list[Any] | None, max_rooms: int, request_id: m.RequestId) -> bytes:
    if outcome is None:
        return _unavailable(request_id)
    code = JOIN_REFUSALS[outcome[0]]
    if code == m.ROOM_FULL:
        text = f"room {room_id} is full ({outcome[1]} participants)"
    elif code == m.TOO_MANY_ROOMS:
        text = str(TooManyRooms(max_rooms))
    else:
        text = f"room {room_id} does not exist"
    return m.encode_error(code, text, request_id)


@asynccontextmanager
async def open_cluster(config: Config) -> AsyncIterator[Callable[[trio.Nursery, Observer], ClusterHub]]:
    """This node's link to Redis, kept up in the background; yields how to make the hub.

    The link outlives the hub's room tasks, so that sessions closing at shutdown can still
    leave their rooms in Redis.
    """
    link = RedisLink(config.cluster, config.rooms, new_peer_id(), redis_tls_context(config.cluster))
    log.info("cluster: this is node %s, on %s", link.node, config.cluster.redis_url)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.run, name="redis link")
        yield lambda rooms, observer: ClusterHub(config, rooms, link, observer)
        link.closing = True
        nursery.cancel_scope.cancel()
