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
Commands that find the channel's deadline already past are still applied before it ends.

The room task's one wait has a deadline, and that deadline is the only timer a room has: the
idle TTL of an empty posted room, or the end of the earliest grace of a suspended member.
A resume token names its room, so finding the seat it belongs to is the same lookup as a
join's; no table of live tokens exists to share between processes. The hub only remembers,
within a bound, tokens that stopped working and why, to answer a late resume in words. A
cluster (``_cluster``) checks a token in Redis, which keeps only a digest of each member's
current one, and moves the seat to whichever node the member resumes on; what it changes
here is how a suspended member's time runs out (``RoomTask._expire``: through Redis) and
what a drain does with the members it suspended (``RoomHub.hand_over``: waits for claims).

Metrics are reported where the facts are: the room task tells its observer (``_metrics``) each
relay's time from the read that brought it, and how many members a command removed (a leave, or
evictions during a relay or a join); the hub tells it each join's outcome and time.
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
from ._ids import new_resume_token, new_room_id, resume_token_seat, utc_now
from ._metrics import Observer
from ._room import Member, Room
from ._turn import IceServers

log = logging.getLogger("signald.rooms")

#: Commands applied per wake-up before the room task yields to other tasks.
BATCH = 256
#: Commands a room's channel buffers before senders wait (backpressure on flooding readers).
CHANNEL_SIZE = 1024


class Answer:
    """A room task's answer to a join, awaited by the one task that asked.

    Like a ``trio.Event`` with one waiter, except that the wait cannot be cancelled: the room
    task always answers (it never waits on a socket), and a join given up halfway would seat
    a member its connection never hears of. So a join needs no shielded cancel scope around
    it, which cost a join more than the wait itself (48k instructions here). A cancellation
    that comes meanwhile is delivered at the caller's next checkpoint.
    """

    __slots__ = ("_is_set", "_waiter")

    def __init__(self) -> None:
        self._is_set = False
        self._waiter: trio.lowlevel.Task | None = None

    def set(self) -> None:
        self._is_set = True
        if self._waiter is not None:
            trio.lowlevel.reschedule(self._waiter)
            self._waiter = None

    async def wait(self) -> None:
        """Until ``set``; at once (without a checkpoint) if it has been already."""
        if not self._is_set:
            self._waiter = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)


@attrs.define
class _Join:
    member: Member
    request_id: m.RequestId
    ice_servers: list[dict[str, Any]] | None
    done: Answer = attrs.field(factory=Answer)
    joined: bool = False


@attrs.frozen
class _Leave:
    member: Member


@attrs.frozen
class _Suspend:
    member: Member
    unsent: list[bytes]
    max_bytes: int


@attrs.define
class _Resume:
    peer_id: str
    token: str = attrs.field(repr=False)
    connect: Callable[[str, str], Member]
    request_id: m.RequestId
    ice_servers: list[dict[str, Any]] | None
    done: trio.Event = attrs.field(factory=trio.Event)
    member: Member | None = None


#: Not frozen: one per relayed message, and a frozen attrs class takes twice as long to build.
@attrs.define
class _Relay:
    sender_id: str
    to: str
    text: bytes
    request_id: m.RequestId
    #: ``trio.current_time()`` when the frame was read off the sender's socket (relay time).
    received_at: float


_Command = _Join | _Leave | _Suspend | _Resume | _Relay


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


class ResumeFailed(Exception):
    """A resume token that does not (or no longer) fits a seat; ``str()`` says why."""


#: Resume tokens remembered after they stop working, so a late resume hears why it failed.
RETIRED_TOKENS = 10_000
TOKEN_UNKNOWN = "unknown resume token: it was never issued, or its session ended long ago"


class RoomTask:
    """A room, its channel, and the task that applies the channel's commands to it."""

    def __init__(self, room: Room, idle_ttl: float, clock: Callable[[], datetime], observer: Observer) -> None:
        self.room = room
        self._idle_ttl = idle_ttl
        self._clock = clock
        self._observer = observer
        self._send, self._receive = trio.open_memory_channel[_Command](CHANNEL_SIZE)

    async def join(self, member: Member, request_id: m.RequestId, ice_servers: list[dict[str, Any]] | None) -> bool:
        """Raises ``trio.BrokenResourceError`` if this room has just ended; never ``Cancelled``."""
        command = _Join(member, request_id, ice_servers)
        await self._put(command)
        await command.done.wait()
        return command.joined

    async def leave(self, member: Member) -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # room gone, so the member is too
            await self._put(_Leave(member))

    async def suspend(self, member: Member, unsent: list[bytes], max_bytes: int) -> None:
        """``member``'s connection was lost; see :meth:`Room.suspend`."""
        with contextlib.suppress(trio.BrokenResourceError):
            await self._put(_Suspend(member, unsent, max_bytes))

    async def _put(self, command: _Command) -> None:
        """Queue ``command``, waiting only if the channel is full; never lost to a cancellation.

        ``send`` would yield to the scheduler even when there is room: one round trip more
        per join and per leave, which a join storm pays thousands of times a second. The wait
        for a full channel is shielded here, so that the common case pays for no scope.
        """
        try:
            self._send.send_nowait(command)
        except trio.WouldBlock:
            with trio.CancelScope(shield=True):
                await self._send.send(command)

    async def resume(
        self,
        peer_id: str,
        token: str,
        connect: Callable[[str, str], Member],
        request_id: m.RequestId,
        ice_servers: list[dict[str, Any]] | None,
    ) -> Member | None:
        """Raises ``trio.BrokenResourceError`` if this room has just ended."""
        command = _Resume(peer_id, token, connect, request_id, ice_servers)
        await self._send.send(command)
        await command.done.wait()
        return command.member

    async def relay(self, sender_id: str, to: str, text: bytes, request_id: m.RequestId, received_at: float) -> None:
        """Queue a relay; waits only when the channel is full (a flooding reader).

        ``send_nowait`` skips the scheduler round trip that ``send`` makes even when there
        is room, and the sender's next read is a checkpoint anyway. The wait is shielded: a
        cancellation (the reader's timer) must not lose a relay, and the room always drains.
        """
        command = _Relay(sender_id, to, text, request_id, received_at)
        try:
            self._send.send_nowait(command)
        except trio.WouldBlock:
            with trio.CancelScope(shield=True), contextlib.suppress(trio.BrokenResourceError):
                await self._send.send(command)
        except trio.BrokenResourceError:
            pass  # the room has ended, so its members, the sender included, have left

    def _apply(self, command: _Command) -> None:
        room = self.room
        observer = self._observer
        present = len(room.seats)  # any command may end in members leaving: a relay by evicting them
        if isinstance(command, _Relay):
            error = room.relay(command.sender_id, command.to, command.text, command.request_id)
            observer.delivered(command.received_at)
            if error is not None:
                observer.error_sent(error)
        elif isinstance(command, _Join):
            peer_id = command.member.peer_id
            token = new_resume_token(room.id, peer_id) if room.resume_grace > 0 else None
            command.joined = room.join(
                command.member, self._clock(), command.request_id, command.ice_servers, resume_token=token
            )
            command.done.set()
            if not command.joined:
                observer.error_sent(m.ROOM_FULL)  # the one reason a room refuses a member
            else:
                present += 1
                log.info(
                    "room %s: %s joined as %r (%d present)",
                    room.id,
                    peer_id,
                    command.member.username,
                    room.participant_count,
                )
        elif isinstance(command, _Resume):
            token = new_resume_token(room.id, command.peer_id)
            command.member = room.resume(
                command.peer_id, command.token, command.connect, token, command.request_id, command.ice_servers
            )
            command.done.set()
            if command.member is not None:
                log.info("room %s: %s resumed on a new connection", room.id, command.peer_id)
        elif self._holds_seat(command.member):
            peer_id = command.member.peer_id
            if isinstance(command, _Suspend):
                room.suspend(command.member, trio.current_time(), command.unsent, command.max_bytes)
            else:
                room.leave(command.member)
            if peer_id in room.suspended:
                log.info("room %s: %s lost its connection; seat kept for %g s", room.id, peer_id, room.resume_grace)
            elif peer_id not in room.seats:
                log.info("room %s: %s left (%d present)", room.id, peer_id, room.participant_count)
        if len(room.seats) < present:
            observer.left(present - len(room.seats))

    def _expire(self, now: float) -> None:
        """End the suspended members whose time is up (the room task's timer: see the top)."""
        room = self.room
        present = len(room.seats)
        for peer_id in room.expire(now):
            log.info("room %s: %s left, not back within %g s", room.id, peer_id, room.resume_grace)
        self._observer.left(present - len(room.seats))

    def _holds_seat(self, member: Member) -> bool:
        """Whether ``member``'s connection speaks for its seat (see :meth:`Room.leave`)."""
        seat = self.room.seats.get(member.peer_id)
        return seat is not None and seat.member is member and seat.kept is None

    def _apply_queued(self) -> bool:
        """Apply queued commands without waiting; True if it stopped at ``BATCH`` (more may wait)."""
        for _ in range(BATCH):
            try:
                self._apply(self._receive.receive_nowait())
            except trio.WouldBlock:
                return False
        return True

    def _occupied(self) -> bool:
        """Whether the room must stay, whatever its idle time."""
        return bool(self.room.seats)

    def _ends(self, now: float, idle_since: float | None) -> bool:
        """Whether an unoccupied room ends now (its channel is empty)."""
        return not self.room.persistent or (idle_since is not None and now >= idle_since + self._idle_ttl)

    def _end_reason(self) -> str:
        return "idle" if self.room.persistent else "empty"

    async def run(self, hub: RoomHub) -> None:
        room = self.room
        #: When the room was last seen empty; None while it has members.
        idle_since: float | None = trio.current_time()
        with self._receive:
            while True:
                if self._occupied():
                    idle_since = None
                elif idle_since is None:
                    idle_since = trio.current_time()
                deadline = math.inf if idle_since is None else idle_since + self._idle_ttl
                if room.suspended:
                    deadline = min(deadline, room.next_expiry)
                # A cancel scope costs more than the rest of a wake-up: open one only to time out.
                if deadline == math.inf:
                    self._apply(await self._receive.receive())
                else:
                    with trio.move_on_at(deadline):
                        self._apply(await self._receive.receive())
                if self._apply_queued():
                    continue  # more queued: apply it after a checkpoint, not now
                # Reached with the channel empty and no await since it was seen empty.
                now = trio.current_time()
                if room.suspended and room.next_expiry <= now:
                    self._expire(now)
                if self._occupied():
                    continue
                if self._ends(now, idle_since):
                    hub._forget(self)
                    log.info("room %s: removed (%s)", room.id, self._end_reason())
                    return


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
        retired_tokens: int = RETIRED_TOKENS,
        observer: Observer | None = None,
    ) -> None:
        self.config = config
        self._observer = observer or Observer()
        #: The ICE servers members get (with TURN credentials of their own when configured).
        self.ice = ice or IceServers()
        self._nursery = nursery
        self._clock = clock
        self._store = store
        self._rooms: dict[str, RoomTask] = {}
        #: Resume tokens that stopped working, oldest first, and why; at most ``retired_tokens``.
        self._retired: dict[str, str] = {}
        self._retired_cap = retired_tokens

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

    @property
    def redis_queue_bytes(self) -> int:
        """Bytes queued for Redis and not yet answered (cluster mode; 0 for one process)."""
        return 0

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
        room = Room(
            room_id,
            name,
            max_participants,
            created_at or self._clock(),
            persistent,
            resume_grace=self.config.resume_grace,
            resume_buffer=self.config.resume_buffer,
            token_retired=self._retire,
        )
        task = RoomTask(room, self.config.idle_ttl, self._clock, self._observer)
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
        (the member has been sent the error). It cannot be cancelled (see :class:`Answer`): a
        join happens for both sides or for neither, and the caller needs no shield for it.
        """
        started = trio.current_time()
        # Minted here, in the joiner's task, so the room task spends no time on HMACs.
        ice_servers = self.ice.for_member(member.peer_id) if self.ice.mints else None
        while True:
            task = self._rooms.get(room_id)
            if task is None:
                if not self.config.auto_create:
                    return self._refuse(member, m.ROOM_NOT_FOUND, f"room {room_id} does not exist", request_id, started)
                if self.at_capacity:
                    refusal = str(TooManyRooms(self.config.max_rooms))
                    return self._refuse(member, m.TOO_MANY_ROOMS, refusal, request_id, started)
                task = self._start(room_id, room_id, self.config.max_participants, "join")
            try:
                joined = await task.join(member, request_id, ice_servers)
            except trio.BrokenResourceError:
                continue  # that room just ended; look again (a new one may be created)
            return self._outcome(task, joined, started)

    def _outcome(self, task: RoomTask, joined: bool, started: float) -> RoomTask | None:
        """What ``join`` returns, reported to the observer: the room task, or None if refused."""
        if joined:
            self._observer.joined(started)
            return task
        self._observer.join_refused(started)
        return None

    async def resume(
        self, token: str, connect: Callable[[str, str], Member], request_id: m.RequestId = None
    ) -> tuple[RoomTask, Member]:
        """Give the seat ``token`` names to the member ``connect(peer_id, username)`` makes.

        The room tells the new member (``resumed`` and what it missed). The token itself names
        the room, so this lookup needs no table of live tokens; a cluster backend resolves the
        room as it does for a join. Raises :class:`ResumeFailed` saying why the token does not fit.
        """
        if self.config.resume_grace <= 0:
            raise ResumeFailed("resume is turned off on this server (rooms.resume_grace is 0)")
        seat = resume_token_seat(token)
        task = self._rooms.get(seat[0]) if seat is not None else None
        if seat is None or task is None:
            raise ResumeFailed(self._retired.get(token, TOKEN_UNKNOWN))
        # Minted here, as for a join: a resumed member gets fresh TURN credentials of its own.
        ice_servers = self.ice.for_member(seat[1]) if self.ice.mints else None
        try:
            member = await task.resume(seat[1], token, connect, request_id, ice_servers)
        except trio.BrokenResourceError:
            member = None  # the room ended meanwhile, and its members with it
        if member is None:
            raise ResumeFailed(self._retired.get(token, TOKEN_UNKNOWN))
        return task, member

    async def hand_over(self, deadline: float) -> None:
        """Draining: what to do with the members the drain suspended, until ``deadline``.

        In one process nobody can take them over: the drain ends sessions at once instead (see
        ``_server``). A cluster hub waits for other nodes to claim them.
        """

    def _retire(self, token: str, why: str) -> None:
        self._retired[token] = why
        if len(self._retired) > self._retired_cap:
            del self._retired[next(iter(self._retired))]

    def _refuse(self, member: Member, code: str, text: str, request_id: m.RequestId, started: float) -> None:
        member.deliver(m.encode_error(code, text, request_id))
        self._observer.error_sent(code)
        self._observer.join_refused(started)
