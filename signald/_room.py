"""One room's membership and relay rules, as a pure state machine.

The room knows its members only through the :class:`Member` protocol: an id, a name, and a
``deliver`` method that queues a frame without blocking. Where the member's socket lives
(this process today, another process behind Redis tomorrow) is not the room's business,
and tests drive a room with plain objects and no sockets at all.

Because each method runs to completion without awaiting, every member observes membership
events in the same order, and a member always learns of a peer (``joined-room`` or
``user-joined``) before any relay from that peer can be delivered to it.
"""

from __future__ import annotations

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


@attrs.frozen
class Seat:
    member: Member
    joined_at: datetime


@attrs.define
class Room:
    id: str
    name: str
    max_participants: int
    created_at: datetime
    #: Created over REST: outlives its members until the idle TTL. Otherwise (created by a
    #: join) it disappears with its last member.
    persistent: bool
    seats: dict[str, Seat] = attrs.field(factory=dict)  # insertion order is join order
    #: Remove a member whose queue overflowed, here and now. Off where membership is decided
    #: elsewhere (the cluster's script in Redis): the overflowing connection closes, and its
    #: leave comes back in the room's order like any other.
    evicts: bool = True
    _evicted: list[str] = attrs.field(factory=list, init=False)

    @property
    def participant_count(self) -> int:
        return len(self.seats)

    def join(
        self,
        member: Member,
        now: datetime,
        request_id: m.RequestId = None,
        ice_servers: list[dict[str, Any]] | None = None,
        *,
        admitted: bool = False,
    ) -> bool:
        """Seat ``member`` and tell everyone; False (and an error to the member) if full.

        ``ice_servers``, the member's own (see ``_turn``), goes into its ``joined-room``.
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
        others = [(seat.member.peer_id, seat.member.username) for seat in self.seats.values()]
        self.seats[member.peer_id] = Seat(member, now)
        joined = m.encode_joined_room(self.id, member.peer_id, member.username, others, request_id, ice_servers)
        self._deliver(member, joined)
        self._broadcast(
            m.encode_membership("user-joined", self.id, member.peer_id, member.username),
            exclude=member.peer_id,
        )
        self._settle()
        return True

    def leave(self, peer_id: str) -> None:
        """Remove a member (leave-room or disconnect); unknown ids are ignored."""
        if peer_id in self.seats:
            self._remove(peer_id)
            self._settle()

    def relay(self, sender_id: str, to: str, text: bytes, request_id: m.RequestId = None) -> None:
        """Deliver a pre-encoded relay frame from ``sender_id`` to ``to``, if both are here."""
        sender = self.seats.get(sender_id)
        if sender is None:
            return  # evicted while its frame was in flight: nobody to answer
        target = self.seats.get(to)
        if target is None:
            self._deliver(
                sender.member,
                m.encode_error(m.PEER_NOT_FOUND, f"peer {to} is not in room {self.id}", request_id),
            )
        else:
            self._deliver(target.member, text)
        self._settle()

    def _deliver(self, member: Member, text: bytes) -> None:
        if not member.deliver(text) and self.evicts and member.peer_id not in self._evicted:
            self._evicted.append(member.peer_id)

    def _broadcast(self, text: bytes, exclude: str | None = None) -> None:
        """One encoded frame, handed to every member: encoded once, not once per recipient."""
        for peer_id, seat in self.seats.items():
            if peer_id != exclude:
                self._deliver(seat.member, text)

    def _remove(self, peer_id: str) -> None:
        seat = self.seats.pop(peer_id)
        self._broadcast(m.encode_membership("user-left", self.id, peer_id, seat.member.username))

    def _settle(self) -> None:
        """Remove members whose queues overflowed; telling the others may overflow more."""
        while self._evicted:
            peer_id = self._evicted.pop(0)
            if peer_id in self.seats:
                self._remove(peer_id)
