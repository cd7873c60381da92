"""A room's membership and relay rules, free of I/O.

The room knows its members only through the :class:`Member` protocol: an id, a name, a
``deliver`` method that queues a frame without blocking, and ``superseded`` for a member
whose session another connection has taken over. Where the member's socket lives (this
process today, another process behind Redis tomorrow) is not the room's business, and tests
drive a room with plain objects and no sockets at all.

Because each method runs to completion without awaiting, every member observes membership
events in the same order, and a member always learns of a peer (``joined-room`` or
``user-joined``) before any relay from that peer can be delivered to it.

A member whose connection is lost is *suspended*, not removed: it keeps its seat (it is
listed, counted and cannot be taken), and whatever the room would deliver to it is kept, in
order, in its seat instead. When it *resumes* on a new connection, it gets ``resumed`` and
then exactly the kept frames, so the frames it sees across both connections are the ones it
would have seen without the blip; the others see nothing of it. The room only keeps so
much: past ``resume_buffer`` frames (or the byte bound of the connection it lost), or once
its grace has run out, the member leaves as from any other ending, with ``user-left`` to all.

A seat's resume token is the member's secret (the peer id is known to the whole room). The
room stores it to check it, rotates it on every resume, and reports through
``token_retired`` each token that stops working and why, so that whoever answers a stale
token can say why it failed.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

import attrs

from . import _messages as m


class Member(Protocol):
    @property
    def peer_id(self) -> str: ...

    @property
    def username(self) -> str: ...

    def deliver(self, frame: bytes) -> bool:
        """Queue one frame for this member; False means it cannot take more and must go."""
        ...

    def superseded(self) -> list[bytes]:
        """Another connection has resumed this member: this one gets nothing more and closes.

        Returns the frames queued for it and never written, which the new connection gets instead.
        """
        ...


#: Why a resume token no longer works: the ``message`` of the ``resume-failed`` error.
TOKEN_USED = "this resume token has been used already; each resume gives a new one"
TOKEN_EXPIRED = "the session has ended: the connection was away longer than rooms.resume_grace"
TOKEN_OVERFLOWED = "the session has ended: more messages arrived while away than the server keeps"
TOKEN_LEFT = "the session has ended: the member left the room"
TOKEN_EVICTED = "the session has ended: the member was not reading its messages"


@attrs.define
class Kept:
    """The frames a suspended member has missed, oldest first, within its bounds."""

    until: float
    max_frames: int
    max_bytes: int
    frames: list[bytes] = attrs.field(factory=list)
    size: int = 0

    def add(self, text: bytes) -> bool:
        """Keep one more frame; False once over a bound."""
        if len(self.frames) >= self.max_frames or self.size + len(text) > self.max_bytes:
            return False
        self.frames.append(text)
        self.size += len(text)
        return True


@attrs.define
class Seat:
    member: Member
    joined_at: datetime
    #: The member's current secret for resuming; None when resume is off.
    resume_token: str | None = attrs.field(default=None, repr=False)
    #: Set while the member is suspended: what it has missed, and until when it may resume.
    kept: Kept | None = None


def _ignore(token: str, why: str) -> None:
    pass


def _ignore_overflow(peer_id: str) -> None:
    pass


@attrs.define
class Room:
    id: str
    name: str
    max_participants: int
    created_at: datetime
    #: Created over REST: outlives its members until the idle TTL. Otherwise (created by a
    #: join) it disappears with its last member.
    persistent: bool
    #: Seconds a suspended member keeps its seat (``rooms.resume_grace``); 0 = leave at once.
    resume_grace: float = 0.0
    #: Frames kept for a suspended member at most (``rooms.resume_buffer``).
    resume_buffer: int = 256
    #: Told each resume token that stops working, with the reason (one of ``TOKEN_*``).
    token_retired: Callable[[str, str], None] = _ignore
    seats: dict[str, Seat] = attrs.field(factory=dict)  # insertion order is join order
    #: Remove a member whose queue overflowed, here and now. Off where membership is decided
    #: elsewhere (the cluster's script in Redis): the overflowing connection closes, and its
    #: leave comes back in the room's order like any other.
    evicts: bool = True
    #: Where the room does not evict (``evicts`` off), told the id of a suspended member whose
    #: kept frames overflowed (each time a frame is refused), so its end is decided there too.
    kept_overflowed: Callable[[str], None] = _ignore_overflow
    #: Peer ids of suspended members, oldest suspension first.
    suspended: dict[str, None] = attrs.field(factory=dict, init=False)
    _evicted: list[str] = attrs.field(factory=list, init=False)

    @property
    def participant_count(self) -> int:
        return len(self.seats)

    @property
    def next_expiry(self) -> float:
        """When the earliest suspended member's grace ends; infinity if none is suspended."""
        return min((self._kept(peer_id).until for peer_id in self.suspended), default=math.inf)

    def join(
        self,
        member: Member,
        now: datetime,
        request_id: m.RequestId = None,
        ice_servers: list[dict[str, Any]] | None = None,
        resume_token: str | None = None,
        *,
        admitted: bool = False,
    ) -> bool:
        """Seat ``member`` and tell everyone; False (and an error to the member) if full.

        ``ice_servers``, the member's own (see ``_turn``), goes into its ``joined-room``, and so
        does ``resume_token``, the member's secret for resuming after a lost connection.
        ``admitted``: the room's capacity was checked where its membership is decided (the
        cluster's script in Redis), so this room only carries the decision out.
        """
        if not admitted and len(self.seats) >= self.max_participants:
            member.deliver(
                m.encode_error(
                    m.ROOM_FULL,
                    f"room {self.id} is full ({self.max_participants} participants)",
                    request_id,
                )
            )
            return False
        seat = Seat(member, now, resume_token)
        self.seats[member.peer_id] = seat
        others = self._others(member.peer_id)
        joined = m.encode_joined_room(
            self.id, member.peer_id, member.username, others, request_id, ice_servers, resume_token, self.resume_grace
        )
        self._deliver(seat, joined)
        self._broadcast(
            m.encode_membership("user-joined", self.id, member.peer_id, member.username),
            exclude=member.peer_id,
        )
        self._settle()
        return True

    def leave(self, member: Member) -> None:
        """Remove ``member`` at once (leave-room, or a connection that ended for good).

        Ignored unless ``member`` itself holds its seat on a live connection: a connection
        superseded by a resume, or one already lost, no longer speaks for the seat.
        """
        seat = self.seats.get(member.peer_id)
        if seat is not None and seat.member is member and seat.kept is None:
            self._remove(member.peer_id, TOKEN_LEFT)
            self._settle()

    def suspend(self, member: Member, now: float, unsent: list[bytes], max_bytes: int) -> None:
        """``member``'s connection was lost: keep its seat, and its frames, for the grace period.

        ``unsent`` are the frames its connection had queued and never written; they are the
        first kept. ``max_bytes`` bounds the kept frames as the lost connection's send queue was
        bounded. ``now`` is on the clock ``expire`` is given. With no grace it leaves at once.
        """
        seat = self.seats.get(member.peer_id)
        if seat is None or seat.member is not member or seat.kept is not None:
            return
        if self.resume_grace <= 0 or seat.resume_token is None:
            self._remove(member.peer_id, TOKEN_LEFT)
        else:
            seat.kept = Kept(now + self.resume_grace, self.resume_buffer, max_bytes)
            self.suspended[member.peer_id] = None
            for text in unsent:
                self._deliver(seat, text)
        self._settle()

    def resume(
        self,
        peer_id: str,
        token: str,
        connect: Callable[[str, str], Member],
        new_token: str,
        request_id: m.RequestId = None,
        ice_servers: list[dict[str, Any]] | None = None,
    ) -> Member | None:
        """Hand ``peer_id``'s seat to a new connection, if ``token`` is its current secret.

        ``connect(peer_id, username)`` makes the member for the new connection; it gets
        ``resumed`` (with ``new_token``, which replaces ``token``) and then, in order, every
        frame the member missed. If the old connection is still open, it is superseded and its
        unwritten frames move over, so no frame reaches both. Nobody else is told anything.
        Returns the new member, or None (and nothing changes) if the token does not fit.
        """
        seat = self.seats.get(peer_id)
        if seat is None or seat.resume_token is None:
            return None
        if not hmac.compare_digest(seat.resume_token.encode(), token.encode()):
            return None
        if seat.kept is not None:
            missed = seat.kept.frames
            del self.suspended[peer_id]
        else:
            missed = seat.member.superseded()
        username = seat.member.username
        member = connect(peer_id, username)
        seat.member, seat.kept, seat.resume_token = member, None, new_token
        self.token_retired(token, TOKEN_USED)
        others = self._others(peer_id)
        resumed = m.encode_resumed(
            self.id, peer_id, username, others, len(missed), new_token, self.resume_grace, request_id, ice_servers
        )
        self._deliver(seat, resumed)
        for text in missed:
            self._deliver(seat, text)
        self._settle()
        return member

    def expire(self, now: float) -> list[str]:
        """End the suspended members whose grace is over at ``now``; returns their peer ids."""
        ended = [peer_id for peer_id in self.suspended if self._kept(peer_id).until <= now]
        for peer_id in ended:
            self._remove(peer_id, TOKEN_EXPIRED)
        self._settle()
        return ended

    def end(self, peer_id: str, why: str) -> None:
        """Remove ``peer_id`` whatever its connection's state (``why``: one of ``TOKEN_*``).

        For rooms whose membership is decided elsewhere (the cluster's script in Redis), which
        tells the room that a suspended member's session has ended.
        """
        if peer_id in self.seats:
            self._remove(peer_id, why)
            self._settle()

    def relay(self, sender_id: str, to: str, text: bytes, request_id: m.RequestId = None) -> str | None:
        """Deliver a pre-encoded relay frame from ``sender_id`` to ``to``, if both are here.

        A suspended addressee is still here: the frame is kept for it. Returns the code of the
        error the sender was answered with instead (``peer-not-found``), if any.
        """
        sender = self.seats.get(sender_id)
        if sender is None:
            return None  # evicted while its frame was in flight: nobody to answer
        target = self.seats.get(to)
        error = None
        if target is None:
            error = m.PEER_NOT_FOUND
            self._deliver(sender, m.encode_error(error, f"peer {to} is not in room {self.id}", request_id))
        else:
            self._deliver(target, text)
        self._settle()
        return error

    def _others(self, peer_id: str) -> list[tuple[str, str]]:
        return [(seat.member.peer_id, seat.member.username) for p, seat in self.seats.items() if p != peer_id]

    def _kept(self, peer_id: str) -> Kept:
        kept = self.seats[peer_id].kept
        assert kept is not None, "suspended members keep their frames"
        return kept

    def _deliver(self, seat: Seat, text: bytes) -> None:
        delivered = seat.member.deliver(text) if seat.kept is None else seat.kept.add(text)
        if not delivered:
            if not self.evicts:
                if seat.kept is not None:
                    self.kept_overflowed(seat.member.peer_id)
            elif seat.member.peer_id not in self._evicted:
                self._evicted.append(seat.member.peer_id)

    def _broadcast(self, text: bytes, exclude: str | None = None) -> None:
        """One encoded frame, handed to every member: encoded once, not once per recipient."""
        for peer_id, seat in self.seats.items():
            if peer_id != exclude:
                self._deliver(seat, text)

    def _remove(self, peer_id: str, why: str) -> None:
        seat = self.seats.pop(peer_id)
        self.suspended.pop(peer_id, None)
        if seat.resume_token is not None:
            self.token_retired(seat.resume_token, why)
        self._broadcast(m.encode_membership("user-left", self.id, peer_id, seat.member.username))

    def _settle(self) -> None:
        """Remove members whose queues overflowed; telling the others may overflow more."""
        while self._evicted:
            peer_id = self._evicted.pop(0)
            seat = self.seats.get(peer_id)
            if seat is not None:
                self._remove(peer_id, TOKEN_EVICTED if seat.kept is None else TOKEN_OVERFLOWED)
