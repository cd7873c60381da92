"""One WebSocket client's protocol, as a pure state machine: events in, room commands and frames out.

Rule 1: no I/O, no awaits, no clock. Every event carries ``now``; the shell (``_transport``)
reads the socket, feeds the codec, and calls these methods; tests call them directly.

Events in, as method calls:

* ``text(frame, now)`` and ``binary(now)``: a whole data message from the client;
* ``pong(payload, now)``: a WebSocket pong;
* ``timer(now)``: the shell's wake-up at ``deadline`` (a ping due, a pong overdue, the idle
  timeout, the close-handshake bound);
* ``joined(room, now)`` / ``join_refused(now)``: the outcome of a :class:`Join` the shell carried out;
* ``resumed(room, member, now)`` / ``resume_failed(why, request_id, now)``: the outcome of a
  :class:`Resume`;
* ``superseded(now)``: another connection resumed this session (the room calls it, through the
  member, while handing the seat over);
* ``close(code, reason, now)``: the server decided (shutdown, a send queue overflow);
* ``peer_closed(code, now)``: the client's close frame (the codec has queued the echo);
* ``failed(code, reason, now)``: the codec failed the connection (1002, 1007, 1009) and has
  queued its close frame;
* ``socket_closed(now)``: EOF, a reset, or a write error.

Out:

* frames, pushed to the :class:`Outbox` in the order they were decided: text replies, and
  :class:`~signald._outbox.Ping` / :class:`~signald._outbox.Close` control frames;
* room commands, appended to ``commands`` (:class:`Join`, :class:`Resume`, :class:`Leave`,
  :class:`Suspend`, :class:`Relay`), which the shell carries out in order after each event,
  before it feeds the next one;
* ``deadline``: when the shell must call ``timer`` next; ``done``: the shell may close the socket.

What it decides (a relay of some type, an error code, an eviction) is also told to its
:class:`~signald._metrics.Observer`, which counts it in memory or ignores it: no I/O either.

Rule 2: the room hears at once how a connection ended, in the same step the session decides
it, not after the close handshake has run its course. Ended on purpose (``leave-room``, the
client's close with 1000, 1001 or no code, or the server's close for shutdown, eviction, rate, a
protocol failure), the member leaves: :class:`Leave`, and the room sends ``user-left`` then. (A
cluster's drain closes with ``keep_seat``: another node may take the session over.)
Lost (EOF or a reset without a close frame, a ping timeout, the client's close with any other
code), the member is suspended: :class:`Suspend` carries the text frames still queued, never
written, and the room keeps them and the seat for ``rooms.resume_grace``, for a ``resume``.

Rule 3: a join happens for both sides or for neither. The shell waits for the room's answer to a
:class:`Join` or a :class:`Resume` (shielded: the room task never waits on a socket, so it
always answers) and reports it; a session that closed in the meantime ends the seat it was given
as its connection ended (Rule 2).

The session charges every data message to its :class:`MessageRate` before looking at it, so a
flood is refused at the cost of a clock comparison, without parsing a single dropped frame. The
message size is not checked here: the codec closes with 1009 past ``max_message_bytes``.
"""

from __future__ import annotations

import enum
import functools
import logging
import math
from collections.abc import Callable
from typing import Protocol

import attrs

from . import _messages as m
from ._auth import JoinTokens
from ._config import LimitsConfig
from ._ids import new_peer_id, resume_token_seat
from ._limits import MessageRate, Verdict
from ._metrics import Observer
from ._outbox import Close, Outbox, Ping
from ._room import Member
from ._turn import IceServers
from ._websocket import CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_POLICY

log = logging.getLogger("signald.session")


#: Close codes a client sends when it means to go: its member leaves at once (Rule 2). 1005 is
#: a close frame without a code (``ws.close()`` in a browser).
CLIENT_GOODBYES = (1000, 1001, 1005)
CLOSE_RESUMED_ELSEWHERE = 4001


class RoomHandle(Protocol):
    """Where a joined member's later commands go (a room task today)."""

    async def leave(self, member: Member) -> None: ...

    async def suspend(self, member: Member, unsent: list[bytes], max_bytes: int) -> None: ...

    async def relay(
        self, sender_id: str, to: str, text: bytes, request_id: m.RequestId, received_at: float
    ) -> None: ...


@attrs.frozen
class LocalMember:
    """This process's kind of room member: its frames go to its connection's outbox."""

    peer_id: str
    username: str
    outbox: Outbox = attrs.field(repr=False)
    #: The shell's way to tell the session it was superseded (see ``Session.superseded``).
    on_superseded: Callable[[], list[bytes]] = attrs.field(repr=False, eq=False)

    def deliver(self, frame: bytes) -> bool:
        return self.outbox.push(frame)

    def superseded(self) -> list[bytes]:
        return self.on_superseded()


@attrs.frozen
class Join:
    room_id: str
    member: LocalMember
    request_id: m.RequestId


@attrs.frozen
class Resume:
    #: A secret: never logged.
    token: str = attrs.field(repr=False)
    request_id: m.RequestId


@attrs.frozen
class Leave:
    room: RoomHandle
    member: LocalMember


@attrs.frozen
class Suspend:
    room: RoomHandle
    member: LocalMember
    #: Text frames queued for the lost connection and never written: the room keeps them.
    unsent: list[bytes]
    max_bytes: int


#: Not frozen, unlike the other commands: one is made per relayed message, and a frozen attrs
#: class takes twice as long to build (2 % of signald's CPU at saturation, profiled in bench/).
@attrs.define
class Relay:
    room: RoomHandle
    sender_id: str
    to: str
    text: bytes
    request_id: m.RequestId
    #: The ``now`` of the read that brought the frame: where the relay time (metrics) starts.
    received_at: float


Command = Join | Resume | Leave | Suspend | Relay


class State(enum.Enum):
    OPEN = "open"
    #: Our close frame is queued (or the codec's): waiting for the client's, or EOF, until ``deadline``.
    CLOSING = "closing"
    #: Nothing more to do: the shell closes the socket once its writer has written what is queued.
    DONE = "done"


@functools.lru_cache(maxsize=8)
def _bounds(limits: LimitsConfig) -> m.Bounds:
    """The shape bounds of ``limits``: one object shared by every session under them."""
    return m.Bounds(
        username=limits.max_username_length,
        sdp=limits.max_sdp_length,
        candidate=limits.max_candidate_length,
        depth=limits.max_json_depth,
    )


class Session:
    #: Slotted: one per connection, thousands of them idle.
    __slots__ = (
        "_bounds",
        "_close_by",
        "_ice",
        "_idle_at",
        "_joining",
        "_keep_seat",
        "_limits",
        "_member",
        "_new_id",
        "_observer",
        "_on_superseded",
        "_ping_at",
        "_pings_sent",
        "_pong_by",
        "_rate",
        "_resuming",
        "_room",
        "_room_id",
        "_tokens",
        "close_code",
        "close_reason",
        "commands",
        "outbox",
        "remote",
        "state",
    )

    def __init__(
        self,
        limits: LimitsConfig,
        outbox: Outbox,
        now: float,
        remote: str = "",
        tokens: JoinTokens | None = None,
        new_id: Callable[[], str] = new_peer_id,
        ice: IceServers | None = None,
        on_superseded: Callable[[], list[bytes]] = list,
        observer: Observer | None = None,
    ) -> None:
        self._limits = limits
        self._ice = ice or IceServers()
        self.outbox = outbox
        self.remote = remote
        self._tokens = tokens
        self._new_id = new_id
        self._on_superseded = on_superseded
        self._observer = observer or Observer()
        self._rate = MessageRate(limits.message_rate, limits.message_burst, limits.rate_limit_close_after, now)
        self._bounds = _bounds(limits)
        self.commands: list[Command] = []
        self.state = State.OPEN
        #: Set once a close is decided: the code and reason (ours, the codec's or the client's).
        self.close_code: int | None = None
        self.close_reason = ""
        self._member: LocalMember | None = None
        self._room: RoomHandle | None = None
        self._room_id = ""
        self._joining: LocalMember | None = None
        self._resuming = False
        #: Decided with the close: whether the member keeps its seat (Rule 2).
        self._keep_seat = False
        self._pings_sent = 0
        self._ping_at = now + limits.ping_interval
        self._pong_by = math.inf
        self._idle_at = now + limits.idle_timeout
        self._close_by = math.inf

    # -- what the shell reads

    @property
    def deadline(self) -> float:
        if self.state is State.OPEN:
            return min(self._ping_at, self._pong_by, self._idle_at)
        return self._close_by if self.state is State.CLOSING else -math.inf

    @property
    def close_by(self) -> float:
        """When the close handshake must be over (infinity until a close is decided)."""
        return self._close_by

    @property
    def done(self) -> bool:
        return self.state is State.DONE

    @property
    def peer_id(self) -> str | None:
        """The member's id while it is in a room."""
        return self._member.peer_id if self._room is not None and self._member is not None else None

    # -- events from the client

    def text(self, frame: str, now: float) -> None:
        if self.state is State.OPEN and self._admit(now):
            self._handle(m.parse(frame, self._bounds), now)

    def binary(self, now: float) -> None:
        if self.state is State.OPEN and self._admit(now):
            self._reply_error(m.INVALID_MESSAGE, "binary frames are not supported; send JSON text frames")

    def _admit(self, now: float) -> bool:
        verdict = self._rate.check(now)
        if verdict is Verdict.ACCEPT:
            return True
        if verdict is Verdict.CLOSE:
            log.warning("%s: closed, %d messages over the rate limit", self.remote, self._rate.dropped)
            self.close(CLOSE_POLICY, "rate limit exceeded", now)
        else:
            limits = self._limits
            self._reply_error(
                m.RATE_LIMITED,
                f"message dropped: over {limits.message_rate:g} messages/s (burst {limits.message_burst})",
            )
        return False

    def _handle(self, message: m.ClientMessage | m.ProtocolError, now: float) -> None:
        match message:
            case m.Relay():
                if self._room is None or self._member is None:
                    self._reply_error(m.NOT_IN_ROOM, f"join a room before sending {message.type}", message.request_id)
                else:
                    sender = self._member.peer_id
                    log.debug("%s: %s %s -> %s", self.remote, message.type, sender, message.to)
                    self._observer.relayed(message.type)
                    text = m.encode_relay(message, sender)
                    self.commands.append(Relay(self._room, sender, message.to, text, message.request_id, now))
            case m.JoinRoom():
                self._join(message)
            case m.LeaveRoom():
                if self._room is None:
                    self._reply_error(m.NOT_IN_ROOM, "not in a room", message.request_id)
                else:
                    self._end(keep_seat=False)
                    self._idle_at = now + self._limits.idle_timeout
            case m.Resume():
                if self._busy(message.request_id):
                    return
                seat = resume_token_seat(message.token)
                self._room_id = seat[0] if seat is not None else ""
                self._resuming = True
                self._idle_at = math.inf
                self.commands.append(Resume(message.token, message.request_id))
            case m.Ping():
                self.outbox.push(m.encode_pong(message.request_id))
            case m.GetIceServers():
                if self._room is None or self._member is None:
                    self._reply_error(m.NOT_IN_ROOM, "join a room before asking for ICE servers", message.request_id)
                else:
                    ice_servers = self._ice.for_member(self._member.peer_id)
                    self.outbox.push(m.encode_ice_servers(ice_servers, message.request_id))
            case m.ProtocolError():
                self._reply_error(message.code, message.message, message.request_id)

    def _busy(self, request_id: m.RequestId) -> bool:
        """In a room, or about to be: answer ``already-in-room``."""
        if self._room is None and self._joining is None and not self._resuming:
            return False
        self._reply_error(m.ALREADY_IN_ROOM, f"already in room {self._room_id}; send leave-room first", request_id)
        return True

    def _join(self, message: m.JoinRoom) -> None:
        if self._busy(message.request_id):
            return
        if self._tokens is not None:
            problem = self._tokens.problem(message.token, message.room_id, message.username)
            if problem is not None:
                log.info("%s: join of room %s refused: %s", self.remote, message.room_id, problem)
                self._reply_error(m.UNAUTHORIZED, problem, message.request_id)
                return
        self._joining = self.member_for(self._new_id(), message.username)
        self._room_id = message.room_id
        self._idle_at = math.inf
        self.commands.append(Join(message.room_id, self._joining, message.request_id))

    def _reply_error(self, code: str, text: str, request_id: m.RequestId = None) -> None:
        self.outbox.push(m.encode_error(code, text, request_id))
        self._observer.error_sent(code)

    def member_for(self, peer_id: str, username: str) -> LocalMember:
        """The member this connection is, in a join or in a resume (the room picks its id then)."""
        return LocalMember(peer_id, username, self.outbox, self._on_superseded)

    def _end(self, *, keep_seat: bool) -> None:
        """The member leaves, or is suspended with what it was never sent (Rule 2)."""
        if self._room is not None and self._member is not None:
            if keep_seat:
                unsent = self.outbox.take_text()
                self.commands.append(Suspend(self._room, self._member, unsent, self._limits.send_queue_bytes))
            else:
                self.commands.append(Leave(self._room, self._member))
        self._room = self._member = None

    # -- outcomes of commands

    def joined(self, room: RoomHandle, now: float) -> None:
        """The room seated the member of the last :class:`Join` (and told it ``joined-room``)."""
        member, self._joining = self._joining, None
        assert member is not None, "joined() without a Join"
        self._seated(room, member)

    def _seated(self, room: RoomHandle, member: LocalMember) -> None:
        self._member, self._room = member, room
        if self.state is not State.OPEN:  # closed while the room was seating it: no ghost stays
            self._end(keep_seat=self._keep_seat)

    def resumed(self, room: RoomHandle, member: LocalMember, now: float) -> None:
        """The room gave this connection the seat of the last :class:`Resume` (and told it ``resumed``)."""
        assert self._resuming, "resumed() without a Resume"
        self._resuming = False
        self._seated(room, member)

    def resume_failed(self, why: str, request_id: m.RequestId, now: float) -> None:
        """The last :class:`Resume` fitted no seat; the client hears why and may join afresh."""
        self._resuming = False
        log.info("%s: resume refused: %s", self.remote, why)
        if self.state is State.OPEN:
            self._reply_error(m.RESUME_FAILED, why, request_id)
            self._idle_at = now + self._limits.idle_timeout

    def superseded(self, now: float) -> list[bytes]:
        """Another connection resumed this session: close this one with 4001; the seat is not ours.

        Returns the text frames queued here and never written; the new connection gets them.
        """
        log.info("%s: session resumed on another connection; closing this one", self.remote)
        self._room = self._member = None
        unsent = self.outbox.take_text()
        self.close(CLOSE_RESUMED_ELSEWHERE, "resumed elsewhere", now)
        return unsent

    def join_refused(self, now: float) -> None:
        """The room refused the last :class:`Join` (and told the member why)."""
        self._joining = None
        if self.state is State.OPEN:
            self._idle_at = now + self._limits.idle_timeout

    # -- keep-alive and timeouts

    def pong(self, payload: bytes, now: float) -> None:
        if self._pong_by != math.inf and payload == self._ping_payload():
            self._pong_by = math.inf
            self._ping_at = now + self._limits.ping_interval

    def _ping_payload(self) -> bytes:
        return str(self._pings_sent).encode()

    def timer(self, now: float) -> None:
        if self.state is State.CLOSING:
            if now >= self._close_by:
                log.info("%s: close handshake not finished within %g s", self.remote, self._limits.close_timeout)
                self.state = State.DONE
            return
        if self.state is not State.OPEN:
            return
        if now >= self._pong_by:
            log.info("%s: no pong within %.1f s, dropping", self.remote, self._limits.ping_timeout)
            self.close(CLOSE_GOING_AWAY, "ping timeout", now, keep_seat=True)
        elif now >= self._idle_at:
            timeout = self._limits.idle_timeout
            log.info("%s: closed, not in a room for %g s", self.remote, timeout)
            self.close(CLOSE_NORMAL, f"idle: not in a room for {timeout:g} s", now)
        elif now >= self._ping_at:
            self._pings_sent += 1
            self.outbox.control(Ping(self._ping_payload()))
            self._ping_at = math.inf
            self._pong_by = now + self._limits.ping_timeout

    # -- the end

    def close(self, code: int, reason: str, now: float, *, keep_seat: bool = False) -> None:
        """Close with ``code``: the member leaves (or is suspended) now, the close frame goes
        after what is being written."""
        if self.state is not State.OPEN:
            return
        self._closing(code, reason, now, keep_seat=keep_seat)
        self.outbox.finish(Close(code, reason))

    def overflowed(self, now: float) -> None:
        """The outbox refused a frame: the client is not reading. Evict it (its room has already)."""
        log.warning("%s: evicted, more than %d bytes unsent", self.remote, self._limits.send_queue_bytes)
        self._observer.evicted()
        self.close(CLOSE_POLICY, "send queue overflow: client is not reading", now)

    def failed(self, code: int, reason: str, now: float) -> None:
        """The codec failed the connection and queued its close frame; wait for EOF, bounded."""
        if self.state is State.OPEN:
            log.info("%s: closed with %d: %s", self.remote, code, reason)
            self._closing(code, reason, now, keep_seat=False)

    def peer_closed(self, code: int, now: float) -> None:
        """The client's close frame: it answers ours, or the codec has queued the echo.

        With 1000, 1001 or no code the client means to go; with any other, it may come back.
        """
        if self.state is State.OPEN:
            self._closing(None, "", now, keep_seat=code not in CLIENT_GOODBYES)
        self.state = State.DONE

    def socket_closed(self, now: float) -> None:
        """EOF, a reset or a write error. Unless a close was decided already, the connection was lost."""
        if self.state is State.OPEN:
            self._keep_seat = True
        self._end(keep_seat=self._keep_seat)
        self.state = State.DONE

    def _closing(self, code: int | None, reason: str, now: float, *, keep_seat: bool) -> None:
        self.state = State.CLOSING
        self.close_code, self.close_reason = code, reason
        self._close_by = now + self._limits.close_timeout
        self._keep_seat = keep_seat
        self._end(keep_seat=keep_seat)
