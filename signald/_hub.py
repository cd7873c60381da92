"""Rooms as tasks: each room is a trio task that owns a memory channel.

Joins, leaves and relays for a room are commands sent into its channel and applied by its
task, one after another, to the pure :class:`~signald._room.Room`; that serialization is why
no locks exist anywhere. The room task drains its channel in batches and never awaits a
socket: delivering a frame means pushing it into the member's :class:`Outbox`. Only the room
task touches its room: applying a command from the sender's task when the room is idle was
measured (bench/) at a few percent faster, and left out, since then the room would no longer
be owned by one task, which is what lets it move behind another transport later.

A room task ends when its room should no longer exist (empty, and either created by a join or
idle past ``rooms.idle_ttl``). It unregisters itself and closes its channel in the same
synchronous step in which it saw the channel empty, so a command can never be lost in between:
a sender that loses the race gets ``BrokenResourceError`` and looks the room up again.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal, Protocol

import attrs
import trio

from . import _messages as m
from ._config import RoomsConfig
from ._ids import new_room_id, utc_now
from ._room import Member, Room
from ._turn import IceServers

log = logging.getLogger("signald.rooms")

#: Commands applied per wake-up before the room task yields to other tasks.
BATCH = 256
#: Commands a room's channel buffers before senders wait (backpressure on flooding readers).
CHANNEL_SIZE = 1024


@attrs.define
class _Join:
    member: Member
    request_id: m.RequestId
    ice_servers: list[dict[str, Any]] | None
    done: trio.Event = attrs.field(factory=trio.Event)
    joined: bool = False


@attrs.frozen
class _Leave:
    peer_id: str


#: Not frozen: one per relayed message, and a frozen attrs class takes twice as long to build.
@attrs.define
class _Relay:
    sender_id: str
    to: str
    text: bytes
    request_id: m.RequestId


_Command = _Join | _Leave | _Relay


class TooManyRooms(Exception):
    """``rooms.max_rooms`` rooms are live already; creating another is refused."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the server has {limit} rooms, its limit; try again later")


class ClusterUnavailable(Exception):
    """Cluster mode: Redis cannot be reached, so what needs the whole cluster is refused."""


@attrs.frozen
class MemberInfo:
    peer_id: str
    username: str
    joined_at: datetime


@attrs.frozen
class RoomInfo:
    """What REST shows of a room: a copy, so that no handler holds a room task's live ``Room``."""

    id: str
    name: str
    max_participants: int
    created_at: datetime
    participant_count: int
    #: In join order; filled in only where a route shows them (GET /api/rooms/:id).
    members: tuple[MemberInfo, ...] = ()

    @classmethod
    def of(cls, room: Room, *, with_members: bool = False) -> RoomInfo:
        members = (
            tuple(MemberInfo(seat.member.peer_id, seat.member.username, seat.joined_at) for seat in room.seats.values())
            if with_members
            else ()
        )
        return cls(room.id, room.name, room.max_participants, room.created_at, room.participant_count, members)


class RoomTask:
    """A room, its channel, and the task that applies the channel's commands to it."""

    def __init__(self, room: Room, idle_ttl: float, clock: Callable[[], datetime]) -> None:
        self.room = room
        self._idle_ttl = idle_ttl
        self._clock = clock
        self._send, self._receive = trio.open_memory_channel[_Command](CHANNEL_SIZE)

    async def join(self, member: Member, request_id: m.RequestId, ice_servers: list[dict[str, Any]] | None) -> bool:
        """Raises ``trio.BrokenResourceError`` if this room has just ended."""
        command = _Join(member, request_id, ice_servers)
        await self._send.send(command)
        await command.done.wait()
        return command.joined

    async def leave(self, peer_id: str) -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # room gone, so the member is too
            await self._send.send(_Leave(peer_id))

    async def relay(self, sender_id: str, to: str, text: bytes, request_id: m.RequestId) -> None:
        """Queue a relay; waits only when the channel is full (a flooding reader).

        ``send_nowait`` skips the scheduler round trip that ``send`` makes even when there
        is room, and the sender's next read is a checkpoint anyway. The wait is shielded: a
        cancellation (the reader's timer) must not lose a relay, and the room always drains.
        """
        command = _Relay(sender_id, to, text, request_id)
        try:
            self._send.send_nowait(command)
        except trio.WouldBlock:
            with trio.CancelScope(shield=True), contextlib.suppress(trio.BrokenResourceError):
                await self._send.send(command)
        except trio.BrokenResourceError:
            pass  # the room has ended, so its members, the sender included, have left

    def _apply(self, command: _Command) -> None:
        room = self.room
        if isinstance(command, _Relay):
            room.relay(command.sender_id, command.to, command.text, command.request_id)
        elif isinstance(command, _Join):
            command.joined = room.join(command.member, self._clock(), command.request_id, command.ice_servers)
            command.done.set()
            if command.joined:
                log.info(
                    "room %s: %s joined as %r (%d present)",
                    room.id,
                    command.member.peer_id,
                    command.member.username,
                    room.participant_count,
                )
        elif command.peer_id in room.seats:
            room.leave(command.peer_id)
            log.info("room %s: %s left (%d present)", room.id, command.peer_id, room.participant_count)

    def _occupied(self) -> bool:
        """Whether the room must stay, whatever its idle time."""
        return bool(self.room.seats)

    def _ends(self, deadline: float) -> bool:
        """Whether an unoccupied room ends now (its channel is empty)."""
        return not self.room.persistent or trio.current_time() >= deadline

    def _end_reason(self) -> str:
        return "idle" if self.room.persistent else "empty"

    async def run(self, hub: RoomHub) -> None:
        idle_since = trio.current_time()
        with self._receive:
            while True:
                deadline = idle_since + self._idle_ttl if not self._occupied() else math.inf
                # A cancel scope costs more than the rest of a wake-up: open one only to time out.
                with trio.move_on_at(deadline) if deadline != math.inf else contextlib.nullcontext():
                    command = await self._receive.receive()
                    self._apply(command)
                    for _ in range(BATCH):
                        try:
                            self._apply(self._receive.receive_nowait())
                        except trio.WouldBlock:
                            break
                    else:
                        continue  # more queued: apply it after a checkpoint, not now
                # Reached with the channel empty (drained or timed out) and no await since.
                if self._occupied():
                    continue
                if self._ends(deadline):
                    hub._forget(self)
                    log.info("room %s: removed (%s)", self.room.id, self._end_reason())
                    return
                if deadline == math.inf:
                    idle_since = trio.current_time()


class RoomStore(Protocol):
    """Where rooms created over REST outlive the process. Told synchronously and never
    awaited, so neither the hub nor a room task ever waits for a disk."""

    def created(self, room: Room) -> None: ...

    def removed(self, room: Room) -> None: ...


class RoomHub:
    """Every live room in this process, by id; creates room tasks in ``nursery``."""

    def __init__(
        self,
        config: RoomsConfig,
        nursery: trio.Nursery,
        clock: Callable[[], datetime] = utc_now,
        store: RoomStore | None = None,
        ice: IceServers | None = None,
    ) -> None:
        self.config = config
        #: The ICE servers members get (with TURN credentials of their own when configured).
        self.ice = ice or IceServers()
        self._nursery = nursery
        self._clock = clock
        self._store = store
        self._rooms: dict[str, RoomTask] = {}

    def __len__(self) -> int:
        return len(self._rooms)

    def get(self, room_id: str) -> Room | None:
        task = self._rooms.get(room_id)
        return task.room if task is not None else None

    @property
    def user_count(self) -> int:
        return sum(task.room.participant_count for task in self._rooms.values())

    def create(self, name: str, max_participants: int | None = None) -> Room:
        """A persistent room (POST /api/rooms), with a fresh random id."""
        if self.at_capacity:
            raise TooManyRooms(self.config.max_rooms)
        room_id = new_room_id()
        while room_id in self._rooms:  # 96 random bits: never in practice, but cheap to rule out
            room_id = new_room_id()
        room = self._start(room_id, name, max_participants or self.config.max_participants, "api").room
        if self._store is not None:
            self._store.created(room)
        return room

    @property
    def at_capacity(self) -> bool:
        return len(self._rooms) >= self.config.max_rooms

    # What REST and /health ask. Async because in cluster mode (``_cluster.ClusterHub``) the
    # answers come from Redis; here they are this process's rooms.

    @property
    def problem(self) -> str | None:
        """Why the server cannot do all it should (shown by /health), or None."""
        return None

    async def rooms(self) -> list[RoomInfo]:
        return [RoomInfo.of(task.room) for task in self._rooms.values()]

    async def room(self, room_id: str) -> RoomInfo | None:
        task = self._rooms.get(room_id)
        return RoomInfo.of(task.room, with_members=True) if task is not None else None

    async def create_room(self, name: str, max_participants: int | None = None) -> RoomInfo:
        return RoomInfo.of(self.create(name, max_participants))

    async def counts(self) -> tuple[int, int]:
        """Rooms and members: the numbers /health shows."""
        return len(self._rooms), self.user_count

    def restore(self, room_id: str, name: str, max_participants: int, created_at: datetime) -> Room:
        """Bring back a room the store kept across a restart; its idle time counts from now.

        A lowered ``rooms.max_participants`` caps it like any room created today.
        """
        max_participants = min(max_participants, self.config.max_participants)
        return self._start(room_id, name, max_participants, "restored", created_at).room

    def _start(
        self,
        room_id: str,
        name: str,
        max_participants: int,
        how: Literal["api", "join", "restored"],
        created_at: datetime | None = None,
    ) -> RoomTask:
        persistent = how != "join"  # a join-created room vanishes with its last member
        room = Room(room_id, name, max_participants, created_at or self._clock(), persistent)
        task = RoomTask(room, self.config.idle_ttl, self._clock)
        self._rooms[room_id] = task
        self._nursery.start_soon(task.run, self, name=f"room {room_id}")
        log.info("room %s: created (%s)", room_id, how)
        return task

    def _forget(self, task: RoomTask) -> None:
        if self._rooms.get(task.room.id) is task:
            del self._rooms[task.room.id]
            if task.room.persistent and self._store is not None:
                self._store.removed(task.room)

    async def join(self, room_id: str, member: Member, request_id: m.RequestId = None) -> RoomTask | None:
        """Seat ``member`` in ``room_id``; the room task tells it (and the room) the outcome.

        Returns the room task to send later commands to, or None when the join was refused
        (the member has been sent the error).
        """
        # Minted here, in the joiner's task, so the room task spends no time on HMACs.
        ice_servers = self.ice.for_member(member.peer_id) if self.ice.mints else None
        while True:
            task = self._rooms.get(room_id)
            if task is None:
                if not self.config.auto_create:
                    member.deliver(m.encode_error(m.ROOM_NOT_FOUND, f"room {room_id} does not exist", request_id))
                    return None
                if self.at_capacity:
                    refusal = TooManyRooms(self.config.max_rooms)
                    member.deliver(m.encode_error(m.TOO_MANY_ROOMS, str(refusal), request_id))
                    return None
                task = self._start(room_id, room_id, self.config.max_participants, "join")
            try:
                joined = await task.join(member, request_id, ice_servers)
            except trio.BrokenResourceError:
                continue  # that room just ended; look again (a new one may be created)
            return task if joined else None
