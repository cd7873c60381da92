"""Rooms whose members sit on several nodes: the cluster's side of the room task design.

Each room is still a task on each node that has members in it, owning a memory channel,
and everything that changes it is a command in that channel. What differs from one process
(``_hub``) is who decides: a local join is sent to Redis (``_redis``), which admits it or
not and publishes it, numbered by its place in Redis' order, to every node of the room; the
room task seats the member when that event comes back, in the same stream as every other
node's events. So joins, leaves and their announcements happen in one order on every node.

A room task mirrors the room's members on other nodes as :class:`RemoteMember` seats. A
relay to one of them is published to its node; a relay to a member on this node never
leaves the process. A membership event needs no delivery to a remote member (its own node
announces it there), so a remote member's ``deliver`` is a no-op.

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

- membership events and snapshots, and the link's notices (resync, lost), always: there is
  one per join or leave, which Redis admits one at a time, and dropping one would leave this
  node's mirror of the room wrong;
- relays, up to ``limits.send_queue_bytes`` of them (the bound of the room's backlog, as it
  is of each member's send queue). A relay that does not fit is dropped, and its sender (a
  member on another node) is told ``cluster-unavailable`` once per backlog, through Redis,
  as for a relay the queue to Redis refuses (``_redis`` rule 6): the relay was not
  delivered, and the sender may retry.
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
    ClusterUnavailable,
    ResumeFailed,
    RoomHub,
    RoomInfo,
    RoomTask,
    TooManyRooms,
    _Join,
    _Leave,
    _Relay,
)
from ._ids import new_peer_id, new_room_id
from ._metrics import Observer
from ._redis import RedisLink
from ._room import Member, Room
from ._startup import redis_tls_context
from ._turn import IceServers

log = logging.getLogger("signald.cluster")

#: The join script's refusals, as error codes.
JOIN_REFUSALS = {
    "room-not-found": m.ROOM_NOT_FOUND,
    "too-many-rooms": m.TOO_MANY_ROOMS,
    "room-full": m.ROOM_FULL,
}


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
        """Its frames are queued on its own node, not here."""
        return []


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
    text = "the cluster is unavailable (redis unreachable or too far behind); try again"
    return m.encode_error(m.CLUSTER_UNAVAILABLE, text, request_id)


class ClusterRoomTask(RoomTask):
    """A room task whose membership is decided in Redis; see the module docstring."""

    def __init__(
        self,
        room: Room,
        link: RedisLink,
        clock: Callable[[], datetime],
        observer: Observer,
        nursery: trio.Nursery,
        backlog_bytes: int,
    ) -> None:
        super().__init__(room, math.inf, clock, observer)  # it ends when its last local member leaves
        self._link = link
        #: Local joins sent to Redis, seated when their event arrives.
        self._pending: dict[str, _Join] = {}
        #: Where the feeder runs (see the module docstring on the backlog).
        self._nursery = nursery
        self._backlog: deque[_LinkCommand] = deque()
        #: Bytes of the relays in the backlog, at most ``_backlog_limit``.
        self._backlog_bytes = 0
        self._backlog_limit = backlog_bytes
        #: Senders told of a relay dropped from this backlog (once each, per backlog).
        self._refused: set[str] = set()

    def _occupied(self) -> bool:
        return bool(self._pending) or any(
            not isinstance(seat.member, RemoteMember) for seat in self.room.seats.values()
        )

    def _ends(self, now: float, idle_since: float | None) -> bool:
        return True  # the room lives on in Redis; this node needs no task for it without members

    def _end_reason(self) -> str:
        return "no members on this node"

    async def expect(self, command: _Join) -> None:
        """Register a join before it is sent to Redis, so its event finds it here.

        Raises ``trio.BrokenResourceError`` if this room task has just ended.
        """
        await self._send.send(command)

    def forget(self, peer_id: str, *, sent: bool = True) -> None:
        with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
            self._send.send_nowait(_Forget(peer_id, sent))
            return
        if sent:
            self._link.leave_soon(self.room.id, peer_id)

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
        """A lost connection leaves at once: resume does not reach across nodes yet."""
        await self.leave(member)

    def _apply(self, command: Any) -> None:
        if isinstance(command, _Relay):
            self._relay(command)
        elif isinstance(command, _Event):
            self._event(command.data)
        elif isinstance(command, _Join):
            self._pending[command.member.peer_id] = command
        elif isinstance(command, _Leave):
            super()._apply(command)
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
        elif isinstance(command, _Refuse):
            seat = self.room.seats.get(command.sender_id)
            if seat is not None and isinstance(seat.member, RemoteMember):  # sent to its node as a relay
                refusal = _unavailable()
                self._link.relay(seat.member.node, self.room.id, command.to, command.sender_id, refusal, _ignore)
        else:  # a resume: no seat here has a resume token, so it is refused
            super()._apply(command)

    def _relay(self, command: _Relay) -> None:
        seats = self.room.seats
        sender, target = seats.get(command.sender_id), seats.get(command.to)
        if (
            sender is None
            or target is None
            or not isinstance(target.member, RemoteMember)
            or isinstance(sender.member, RemoteMember)
        ):
            super()._apply(command)  # both here, or from another node to a member here, or an error
            return
        self._observer.delivered(command.received_at)  # handed to the link, for the other node
        refusal = _unavailable(command.request_id)
        if not self._link.relay(
            target.member.node,
            self.room.id,
            command.sender_id,
            command.to,
            command.text,
            lambda: sender.member.deliver(refusal),
        ):
            sender.member.deliver(refusal)

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
                pending.member, joined_at, pending.request_id, pending.ice_servers, admitted=True
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
            if data.get("e") and not isinstance(room.seats[peer_id].member, RemoteMember):
                # Swept as dead while alive (stalled past node_timeout): the member is still
                # connected here, and the lapsed lease makes this node register it again.
                return
            room.leave(room.seats[peer_id].member)
            log.info("room %s: %s left (%d present)", room.id, peer_id, room.participant_count)

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
            if peer_id not in room.seats and node != self._link.node:
                room.join(RemoteMember(peer_id, username, node), datetime.fromisoformat(joined_at), admitted=True)
                log.info("room %s: %s joined as %r on node %s (from redis)", room.id, peer_id, username, node)

    def _sync(self, prune: bool) -> None:
        room = self.room
        held = [
            [peer_id, seat.member.username, seat.joined_at.isoformat()]
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

    def feed(self, command: _LinkCommand) -> None:
        """Queue a command from the link, never waiting: see the module docstring on the backlog."""
        if not self._backlog:
            try:
                self._send.send_nowait(command)
                return
            except trio.WouldBlock:
                self._nursery.start_soon(self._feed_backlog, name=f"room {self.room.id} backlog")
            except trio.BrokenResourceError:
                return  # ended: it has no members to tell
        if isinstance(command, _Relay):
            if self._backlog_bytes and self._backlog_bytes + len(command.text) > self._backlog_limit:
                if command.sender_id not in self._refused:
                    self._refused.add(command.sender_id)
                    self._backlog.append(_Refuse(command.sender_id, command.to))
                    log.warning(
                        "room %s: relays from %s dropped: more than %d bytes backlogged",
                        self.room.id,
                        command.sender_id,
                        self._backlog_limit,
                    )
                return
            self._backlog_bytes += len(command.text)
        self._backlog.append(command)

    async def _feed_backlog(self) -> None:
        """Move the backlog into the channel, oldest first, as the room task makes room."""
        backlog = self._backlog
        try:
            while backlog:
                await self._send.send(backlog[0])
                command = backlog.popleft()
                if isinstance(command, _Relay):
                    self._backlog_bytes -= len(command.text)
        except trio.BrokenResourceError:
            backlog.clear()  # the room task has ended: no member here is left to tell
            self._backlog_bytes = 0
        self._refused.clear()


class ClusterHub(RoomHub):
    """This node's room tasks, with Redis deciding membership and answering for the cluster."""

    def __init__(
        self, config: Config, nursery: trio.Nursery, link: RedisLink, observer: Observer | None = None
    ) -> None:
        super().__init__(config.rooms, nursery, ice=IceServers.from_config(config.ice), observer=observer)
        self._link = link
        #: Each room's backlog bound (see the module docstring).
        self._backlog_limit = config.limits.send_queue_bytes
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
        room = Room(room_id, room_id, self.config.max_participants, self._clock(), persistent=False, evicts=False)
        task = ClusterRoomTask(room, self._link, self._clock, self._observer, self._nursery, self._backlog_limit)
        self._rooms[room_id] = task
        self._nursery.start_soon(task.run, self, name=f"room {room_id}")
        return task

    async def join(self, room_id: str, member: Member, request_id: m.RequestId = None) -> RoomTask | None:
        started = trio.current_time()
        if not self._link.available:
            member.deliver(_unavailable(request_id))
            self._observer.error_sent(m.CLUSTER_UNAVAILABLE)
            self._observer.join_refused(started)
            return None
        ice_servers = self.ice.for_member(member.peer_id) if self.ice.mints else None
        while True:
            task = self._local_task(room_id)
            command = _Join(member, request_id, ice_servers)
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
        raise ResumeFailed("resume is not available when signald runs as a cluster ([cluster]) yet")

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
            task.feed(_Relay(sender_id, to, text, None, trio.current_time()))

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
