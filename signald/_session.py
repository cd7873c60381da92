"""One WebSocket client: reads frames, applies the protocol, writes through its Outbox.

A session runs five tasks in its own nursery:

* the reader parses each frame and acts on it (join, leave, relay, ping);
* the writer drains the :class:`Outbox` to the socket, so nothing else ever awaits it;
* the pinger sends a WebSocket ping every ``ping_interval`` and drops a silent peer;
* the idler closes the connection once it has spent ``idle_timeout`` outside any room;
* the closer waits for a close request (eviction, oversize frame, shutdown) and performs
  the close handshake under ``close_timeout``, because trio-websocket's ``aclose`` would
  otherwise wait forever on a peer that never answers.

Every frame to the client, including the session's own errors, goes through the outbox, so
the client sees them in the order the server decided them.

The reader charges every frame to the connection's :class:`MessageRate` before looking at it,
so a flood is refused at the cost of a clock read, without parsing a single dropped frame.
"""

from __future__ import annotations

import logging
import math

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from . import _messages as m
from ._auth import JoinTokens
from ._config import LimitsConfig
from ._hub import RoomHub, RoomTask
from ._ids import new_peer_id
from ._limits import MessageRate, Verdict
from ._metrics import Observer
from ._outbox import Outbox

log = logging.getLogger("signald.session")

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009


@attrs.frozen
class Peer:
    """This process's kind of room member: its frames go to a local outbox."""

    peer_id: str
    username: str
    outbox: Outbox

    def deliver(self, text: str) -> bool:
        return self.outbox.push(text)


class Session:
    def __init__(
        self,
        ws: WebSocketConnection,
        hub: RoomHub,
        limits: LimitsConfig,
        remote: str,
        tokens: JoinTokens | None = None,
        observer: Observer | None = None,
    ) -> None:
        self._ws = ws
        self._observer = observer or Observer()
        self._hub = hub
        self._limits = limits
        self.remote = remote
        self._tokens = tokens
        now = trio.current_time()
        self._rate = MessageRate(limits.message_rate, limits.message_burst, limits.rate_limit_close_after, now)
        self._bounds = m.Bounds(
            username=limits.max_username_length,
            sdp=limits.max_sdp_length,
            candidate=limits.max_candidate_length,
            depth=limits.max_json_depth,
        )
        #: Expires ``idle_timeout`` after the session last left a room; pushed to infinity in one.
        self._idle = trio.CancelScope(deadline=now + limits.idle_timeout)
        self.outbox = Outbox(limits.send_queue_bytes, self._evict)
        self._peer: Peer | None = None
        self._room: RoomTask | None = None
        self._close_requested = trio.Event()
        self._closed = trio.Event()
        self._close_code = 1000
        self._close_reason = ""

    def request_close(self, code: int, reason: str) -> None:
        """Ask for the connection to be closed; the first request's code wins."""
        if not self._close_requested.is_set():
            self._close_code, self._close_reason = code, reason
            self._close_requested.set()

    def _evict(self) -> None:
        log.warning("%s: evicted, more than %d bytes unsent", self.remote, self._limits.send_queue_bytes)
        self._observer.evicted()
        self.request_close(CLOSE_POLICY, "send queue overflow: client is not reading")

    async def run(self) -> None:
        log.info("%s: connected", self.remote)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                nursery.start_soon(self._pinger)
                nursery.start_soon(self._closer)
                nursery.start_soon(self._idler)
                await self._reader()
                if self._close_requested.is_set():
                    await self._closed.wait()  # let the closer finish its (bounded) handshake
                nursery.cancel_scope.cancel()
        finally:
            self.outbox.close()
            if self._room is not None and self._peer is not None:
                with trio.CancelScope(shield=True, deadline=trio.current_time() + self._limits.close_timeout):
                    await self._room.leave(self._peer.peer_id)
            closed = self._ws.closed
            self._observer.closed(self._close_code if self._close_requested.is_set() else closed and closed.code)
            log.info("%s: disconnected", self.remote)

    async def _reader(self) -> None:
        max_bytes = self._limits.max_message_bytes
        while True:
            try:
                frame = await self._ws.get_message()
            except ConnectionClosed:
                return
            verdict = self._rate.check(trio.current_time())
            if verdict is Verdict.CLOSE:
                log.warning("%s: closed, %d messages over the rate limit", self.remote, self._rate.dropped)
                self.request_close(CLOSE_POLICY, "rate limit exceeded")
                return
            if verdict is Verdict.DROP:
                limits = self._limits
                self._reply_error(
                    m.RATE_LIMITED,
                    f"message dropped: over {limits.message_rate:g} messages/s (burst {limits.message_burst})",
                )
                continue
            if isinstance(frame, bytes):
                self._reply_error(m.INVALID_MESSAGE, "binary frames are not supported; send JSON text frames")
                continue
            # Cheap bound first: a str of n characters encodes to at most 4n UTF-8 bytes.
            if len(frame) * 4 > max_bytes and len(frame.encode()) > max_bytes:
                self.request_close(CLOSE_TOO_BIG, f"message larger than {max_bytes} bytes")
                return
            await self._handle(m.parse(frame, self._bounds))

    async def _handle(self, message: m.ClientMessage | m.ProtocolError) -> None:
        match message:
            case m.Relay():
                if self._room is None or self._peer is None:
                    self._reply_error(m.NOT_IN_ROOM, f"join a room before sending {message.type}", message.request_id)
                else:
                    log.debug("%s: %s %s -> %s", self.remote, message.type, self._peer.peer_id, message.to)
                    self._observer.relayed(message.type)
                    text = m.encode_relay(message, self._peer.peer_id)
                    await self._room.relay(
                        self._peer.peer_id, message.to, text, message.request_id, trio.current_time()
                    )
            case m.JoinRoom():
                await self._join(message)
            case m.LeaveRoom():
                if self._room is None or self._peer is None:
                    self._reply_error(m.NOT_IN_ROOM, "not in a room", message.request_id)
                else:
                    room, self._room = self._room, None
                    self._idle.deadline = trio.current_time() + self._limits.idle_timeout
                    await room.leave(self._peer.peer_id)
            case m.Ping():
                self.outbox.push(m.encode_pong(message.request_id))
            case m.GetIceServers():
                if self._room is None or self._peer is None:
                    self._reply_error(m.NOT_IN_ROOM, "join a room before asking for ICE servers", message.request_id)
                else:
                    ice_servers = self._hub.ice.for_member(self._peer.peer_id)
                    self.outbox.push(m.encode_ice_servers(ice_servers, message.request_id))
            case m.ProtocolError():
                self._reply_error(message.code, message.message, message.request_id)

    async def _join(self, message: m.JoinRoom) -> None:
        if self._room is not None:
            self._reply_error(
                m.ALREADY_IN_ROOM, f"already in room {self._room.room.id}; send leave-room first", message.request_id
            )
            return
        if self._tokens is not None:
            problem = self._tokens.problem(message.token, message.room_id, message.username)
            if problem is not None:
                log.info("%s: join of room %s refused: %s", self.remote, message.room_id, problem)
                self._reply_error(m.UNAUTHORIZED, problem, message.request_id)
                return
        peer = Peer(new_peer_id(), message.username, self.outbox)
        # Shielded: once the room has the join it will seat the peer, and a session cancelled
        # before hearing so would never send the matching leave, leaving a ghost member.
        room = None
        with trio.CancelScope(shield=True, deadline=trio.current_time() + self._limits.close_timeout):
            room = await self._hub.join(message.room_id, peer, message.request_id)
        if room is not None:
            self._peer, self._room = peer, room
            self._idle.deadline = math.inf

    def _reply_error(self, code: str, text: str, request_id: m.RequestId = None) -> None:
        self.outbox.push(m.encode_error(code, text, request_id))
        self._observer.error_sent(code)

    async def _writer(self) -> None:
        try:
            while batch := await self.outbox.take():
                for text in batch:
                    await self._ws.send_message(text)
                    self.outbox.written(len(text))
        except ConnectionClosed:
            pass

    async def _pinger(self) -> None:
        while True:
            await trio.sleep(self._limits.ping_interval)
            with trio.move_on_after(self._limits.ping_timeout):
                try:
                    await self._ws.ping()
                except ConnectionClosed:
                    return
                continue
            log.info("%s: no pong within %.1f s, dropping", self.remote, self._limits.ping_timeout)
            self.request_close(CLOSE_GOING_AWAY, "ping timeout")
            return

    async def _idler(self) -> None:
        with self._idle:
            await trio.sleep_forever()
        timeout = self._limits.idle_timeout
        log.info("%s: closed, not in a room for %g s", self.remote, timeout)
        self.request_close(CLOSE_NORMAL, f"idle: not in a room for {timeout:g} s")

    async def _closer(self) -> None:
        await self._close_requested.wait()
        self.outbox.close()
        with trio.move_on_after(self._limits.close_timeout):
            await self._ws.aclose(self._close_code, self._close_reason)
        self._closed.set()
